"""msr's model at scale: synthetic catalogues of 30k to 1M tracks built from the real one.

    python benchmarks/scale.py --tracks 30000 100000 300000 1000000

Each size runs in its own process (so its peak RSS is its own). A catalogue of N tracks is made of
copies of the real catalogue: copy c renames every track, artist, album and playlist (so artist and
album cardinality stay realistic: about 0.38 artists and 0.8 albums per track) and jitters the audio
features (Gaussian, 5 % of each feature's spread, clipped to its range); the copy's playlists hold
the copy's tracks, so training playlists are synthesised the same way. The last copy is partial.
Measures fit time, recommend latency (50-seed playlists, k=50; seeds as track ids and as foreign track
records with audio features) and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RANGES = {"danceability": (0, 1), "energy": (0, 1), "speechiness": (0, 1), "acousticness": (0, 1),
          "instrumentalness": (0, 1), "liveness": (0, 1), "valence": (0, 1), "loudness": (-60, 5),
          "tempo": (0, 250), "duration_ms": (1000, None)}


def synthesize(tracks: pd.DataFrame, pt: pd.DataFrame, n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    "A catalogue of `n` tracks and its playlists, from copies of the real ones."
    rng = np.random.default_rng(seed)
    copies, parts_t, parts_p = -(-n // len(tracks)), [], []
    spread = tracks[list(RANGES)].std()
    for c in range(copies):
        t = tracks if (c + 1) * len(tracks) <= n else tracks.sample(n - c * len(tracks), random_state=seed)
        t = t.copy()
        suffix = f"~{c}" if c else ""
        for col in ["track_id", "track_artist", "track_album_id"]: t[col] = t[col].astype(str) + suffix
        if c:
            for col, (lo, hi) in RANGES.items():
                t[col] = (t[col] + rng.normal(0, 0.05 * spread[col], len(t))).clip(lo, hi)
        p = pt[pt["track_id"].isin(set(t["track_id"].str.removesuffix(suffix)) if c else set(t["track_id"]))].copy()
        for col in ["track_id", "playlist_id"]: p[col] = p[col].astype(str) + suffix
        parts_t.append(t); parts_p.append(p)
    return pd.concat(parts_t, ignore_index=True), pd.concat(parts_p, ignore_index=True)


def one(n: int, queries: int, seeds: int, k: int) -> dict:
    os.chdir(ROOT)
    from msr.core import PLAYLIST_TRACKS, TRACKS, load_params
    from msr.model import MsrRecommender
    tracks, pt = synthesize(pd.read_parquet(TRACKS), pd.read_parquet(PLAYLIST_TRACKS), n)
    params = load_params(section="train")
    t0 = time.perf_counter()
    model = MsrRecommender(**params).fit(tracks, pt)
    fit_s = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from foreign import latency_queries
    kinds = latency_queries(tracks, pt, queries, seeds, seed=1, without_features=False)
    qs = kinds["ids"]
    lats = {}
    for kind, queries_ in kinds.items():
        for q in queries_[:30]: model.recommend(q, k=k)
        lat = []
        for q in queries_:
            t0 = time.perf_counter()
            model.recommend(q, k=k)
            lat.append((time.perf_counter() - t0) * 1000)
        lats[kind] = lat
    lat = lats["ids"]
    # where a query's time goes: candidate generation + features vs. ranking
    from msr.model import _query
    q_ms = []
    for q in qs[:200]:
        s = model.read_seeds(q)
        t0 = time.perf_counter()
        _query(model.catalogue_, model.stats_, s, model.n_audio, model.n_cooc)
        q_ms.append((time.perf_counter() - t0) * 1000)
    return {"tracks": len(tracks), "playlists": int(pt["playlist_id"].nunique()), "pairs": len(pt),
            "fit_s": fit_s, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "foreign_p50_ms": float(np.percentile(lats["foreign"], 50)), "foreign_p99_ms": float(np.percentile(lats["foreign"], 99)),
            "candidates_features_p50_ms": float(np.percentile(q_ms, 50)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "training": model.training_}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, nargs="+", default=[30_000, 100_000, 300_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.queries, args.seeds, args.k)))
        return
    results = []
    for n in args.tracks:
        p = subprocess.run([sys.executable, __file__, "--one", str(n), "--queries", str(args.queries),
                            "--seeds", str(args.seeds), "--k", str(args.k)], capture_output=True, text=True)
        if p.returncode != 0: sys.exit(f"size {n} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"{n}: {results[-1]}", file=sys.stderr, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                                       "results": results}, indent=2) + "\n")
    print("| tracks | playlists | fit | recommend p50 | p99 | foreign seeds p50 | p99 | candidates+features p50 | peak RSS |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tracks']:,} | {r['playlists']:,} | {r['fit_s']:.1f} s | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['foreign_p50_ms']:.2f} ms | {r['foreign_p99_ms']:.2f} ms | {r['candidates_features_p50_ms']:.2f} ms | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
