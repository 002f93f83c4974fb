"""The Monitor tab's refresh on a big monitoring log: the REST route it asks (`msr.catalogue.get_monitor`:
`MonitorLog.summary` in SQL + the latest 5,000 answers drawn as a PNG), against reading the whole log into a
DataFrame (`frame()` + `summarize_served`, the way before).

Builds a synthetic log of real-looking rows (25 seeds, 20 results, track ids of the real catalogue's shape)
in a temporary folder, of about `--gb` gigabytes; medians over `--runs` refreshes. Run: python benchmarks/monitor.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from types import SimpleNamespace

from msr.catalogue import get_monitor
from msr.monitor import MonitorLog, plot_served, summarize_served

ROOT = Path(__file__).resolve().parents[1]
ALPHABET = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def build(path: Path, gb: float, catalogue: int = 28_352, seed: int = 0) -> int:
    "Write rows until the file holds about `gb` gigabytes; return the row count."
    rng = np.random.default_rng(seed)
    ids = ["".join(r) for r in ALPHABET[rng.integers(0, len(ALPHABET), (catalogue, 22))]]
    log = MonitorLog(path)  # the schema and the writer's settings
    con = log._writer()
    genres = ["edm", "latin", "pop", "r&b", "rap", "rock", None]
    n, t0 = 0, time.time() - 86400 * 30
    while path.stat().st_size < gb * 1e9:
        rows, tracks = [], {}
        for _ in range(5000):
            seeds, results = rng.choice(catalogue, 25, replace=False), rng.choice(catalogue, 20, replace=False)
            ts = t0 + n * 0.5
            rows.append((ts, "rest", "msr-recommender v1", genres[n % 7], 20, json.dumps([ids[i] for i in seeds]),
                         json.dumps([ids[i] for i in results]), float(rng.uniform(0, 1)), float(rng.uniform(0.5, 1)), 0.01))
            tracks.update({ids[i]: ts for i in results})
            n += 1
        with con:
            con.executemany("insert into served (ts, source, model, genre, k, seeds, results, similarity, diversity, seconds) "
                            "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            con.executemany("insert into served_tracks values (?, ?) on conflict (track_id) do update set last_ts = excluded.last_ts",
                            list(tracks.items()))
    return n


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the synthetic log")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--full-gb", type=float, default=0.1, help="size of the log the whole-frame way is timed on")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/monitor.json")
    args = ap.parse_args()
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{os.uname().machine}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as d:
        for label, gb in (("big", args.gb), ("small", args.full_gb)):
            path = Path(d) / f"{label}.sqlite"
            t0 = time.perf_counter(); rows = build(path, gb); built = time.perf_counter() - t0
            log = MonitorLog(path)

            page = SimpleNamespace(monitor=log, catalogue=SimpleNamespace(tracks=range(28_352), window=50, threshold=0.3))

            def refresh():  # what the REST service does for one Monitor-tab refresh
                payload, _ = get_monitor(page, {}, None)
                return payload["summary"]
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            sec, s = timed(refresh, args.runs)
            entry = {"rows": rows, "bytes": path.stat().st_size, "build_s": round(built, 1), "refresh_s": sec,
                     "served": s["served"], "peak_rss_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "peak_rss_mb_before": rss0 / 1024}
            if label == "small":  # the way before: the whole log as a DataFrame
                def whole():
                    df = log.frame(); s = summarize_served(df, 28_352, 50, 0.3)
                    fig = plot_served(df, 50, 0.3); plt.close(fig); return s
                entry["whole_frame_s"], _ = timed(whole, args.runs)
            result[label] = entry
            print(f"{label}: {rows} rows, {entry['bytes'] / 1e9:.2f} GB: refresh {sec:.2f} s"
                  + (f", whole-frame way {entry['whole_frame_s']:.2f} s" if "whole_frame_s" in entry else ""), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
