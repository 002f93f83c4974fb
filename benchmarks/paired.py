"""msr's query latency against another version of its code, in the same minutes: the working tree and a git
revision (default HEAD), each in its own process with its own model fitted on the same tables and params,
the same queries sent to one and then the other, a block of 25 at a time. On a shared machine whose speed drifts by
tens of percent from one minute to the next (BENCHMARKS.md), only such pairs tell a 10 % change apart.

    python benchmarks/paired.py --base HEAD --queries 1000 --reps 3

Needs the pipeline's tables (run `dvc repro` first). The base revision is checked out in a temporary git
worktree (its code only; both read this tree's data). Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(code: Path, n_queries: int, seeds: int, k: int):
    "Fit msr from `code` on this tree's tables, then time the queries the driver names on stdin, one line each."
    sys.path.insert(0, str(code))
    import time

    import pandas as pd

    import msr
    from msr.core import PLAYLIST_TRACKS, SPLITS, TRACKS, load_params
    from msr.model import MsrRecommender
    from msr.transform import fit_playlists
    from foreign import latency_queries

    assert Path(msr.__file__).resolve().is_relative_to(code.resolve()), f"msr imported from {msr.__file__}, not {code}"
    tracks, pt, splits = (pd.read_parquet(p) for p in [TRACKS, PLAYLIST_TRACKS, SPLITS])  # this tree's: the cwd is ROOT
    params = load_params(section="train")
    model = MsrRecommender(**params).fit(tracks, fit_playlists(pt, splits, "test"))
    queries = latency_queries(tracks, pt, n_queries, seeds, without_features=False)  # those of benchmarks/recommend.py
    for q in queries["ids"][:50]: model.recommend(q, k=k)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:  # "kind start stop": time those queries, answer "ms:digest" for each on one line
        kind, start, stop = line.split()
        out = []
        for q in queries[kind][int(start):int(stop)]:
            t0 = time.perf_counter()
            answer = model.recommend(q, k=k)
            ms = (time.perf_counter() - t0) * 1000
            out.append(f"{ms:.6f}:{hashlib.sha256(' '.join(answer).encode()).hexdigest()[:16]}")
        print(" ".join(out), flush=True)


def start(code: Path, args) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", str(code), "--queries", str(args.queries), "--seeds", str(args.seeds), "--k", str(args.k)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return p


def ask(p: subprocess.Popen, kind: str, start: int, stop: int) -> list[tuple[float, str]]:
    "Each query's time (ms) and answer digest, for queries `start` to `stop` of `kind`."
    p.stdin.write(f"{kind} {start} {stop}\n"); p.stdin.flush()
    return [(float(ms), digest) for ms, digest in (token.split(":") for token in p.stdout.readline().split())]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="the git revision to compare the working tree with")
    ap.add_argument("--queries", type=int, default=1000, help="queries of each kind")
    ap.add_argument("--reps", type=int, default=3, help="times each query is sent to both")
    ap.add_argument("--block", type=int, default=25,
                    help="queries a process answers in a row before the other takes its turn (one at a time, each "
                         "would find the caches full of the other's data: about twice today's p50)")
    ap.add_argument("--seeds", type=int, default=50, help="seed tracks per query")
    ap.add_argument("--k", type=int, default=50, help="recommendations per query")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/paired.json")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args.worker, args.queries, args.seeds, args.k)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), rev], cwd=ROOT, check=True)
        try:
            procs = {"base": start(base, args), "tree": start(ROOT, args)}
            for p in procs.values():  # both fit at once, then the timing starts
                if p.stdout.readline().strip() != "ready": raise RuntimeError("a worker failed to start")
            rows = {}
            for kind in ["ids", "foreign"]:
                t = {"base": [], "tree": []}
                same = 0
                for rep in range(args.reps):
                    for b, first in enumerate(range(0, args.queries, args.block)):
                        stop = min(first + args.block, args.queries)
                        order = ["base", "tree"] if (b + rep) % 2 == 0 else ["tree", "base"]  # who goes first alternates
                        got = {name: ask(procs[name], kind, first, stop) for name in order}
                        for name in t: t[name] += [ms for ms, _ in got[name]]
                        same += sum(x[1] == y[1] for x, y in zip(got["base"], got["tree"]))
                diff = [b - a for a, b in zip(t["base"], t["tree"])]
                rows[kind] = {"base_p50": statistics.median(t["base"]), "tree_p50": statistics.median(t["tree"]),
                              "median_paired_difference": statistics.median(diff), "pairs": len(diff),
                              "identical_answers": same}
        finally:
            for p in procs.values():
                p.stdin.close(); p.wait(timeout=60)
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "base": rev,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "seeds": args.seeds, "k": args.k, "latency_ms": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| seeds | base ({rev}) p50 | working tree p50 | median paired difference | identical answers |\n|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['base_p50']:.2f} ms | {r['tree_p50']:.2f} ms | {r['median_paired_difference']:+.2f} ms | "
              f"{r['identical_answers']}/{r['pairs']} |")


if __name__ == "__main__":
    main()
