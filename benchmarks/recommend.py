"""Benchmark msr's model in process on the real catalogue: `fit` time and `recommend` latency
(50-seed playlists, k=50), medians and percentiles over repeated runs, for seeds given as catalogue
track ids and as foreign track records (a real person's playlist: fresh ids, with and without audio features).

    python benchmarks/recommend.py --fits 3 --queries 1000

Needs the pipeline's tables (run `dvc repro` first). Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from msr.core import PLAYLIST_TRACKS, SPLITS, TRACKS, load_params
from msr.transform import fit_playlists
from msr.model import MsrRecommender

from foreign import latency_queries

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=3, help="fits to time")
    ap.add_argument("--queries", type=int, default=1000, help="recommend calls to time")
    ap.add_argument("--seeds", type=int, default=50, help="seed tracks per query")
    ap.add_argument("--k", type=int, default=50, help="recommendations per query")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/recommend.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    tracks, pt, splits = (pd.read_parquet(p) for p in [TRACKS, PLAYLIST_TRACKS, SPLITS])
    train = fit_playlists(pt, splits, "test")
    params = load_params(section="train")
    fits = []
    for _ in range(args.fits):
        t0 = time.perf_counter()
        model = MsrRecommender(**params).fit(tracks, train)
        fits.append(time.perf_counter() - t0)
    kinds = latency_queries(tracks, pt, args.queries, args.seeds)  # seeds drawn from real playlists long enough to give them
    lats = {}
    for kind, qs in kinds.items():
        for q in qs[:50]: model.recommend(q, k=args.k)  # warm-up
        lat = []
        for q in qs:
            t0 = time.perf_counter()
            model.recommend(q, k=args.k)
            lat.append((time.perf_counter() - t0) * 1000)
        lats[kind] = {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                      "p99": float(np.percentile(lat, 99)), "queries": len(lat), "seeds": args.seeds, "k": args.k}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "catalogue": len(tracks), "fit_playlists": int(train["playlist_id"].nunique()),
              "fit_s": {"median": statistics.median(fits), "all": fits},
              "recommend_ms": lats["ids"], "recommend_foreign_ms": lats["foreign"], "recommend_foreign_nofeat_ms": lats["foreign_nofeat"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| catalogue | fit (median of {args.fits}) | seeds | recommend p50 | p90 | p99 | peak RSS |\n|---|---|---|---|---|---|---|")
    for kind, r in lats.items():
        print(f"| {len(tracks):,} tracks | {result['fit_s']['median']:.1f} s | {kind} | {r['p50']:.2f} ms | {r['p90']:.2f} ms | "
              f"{r['p99']:.2f} ms | {result['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
