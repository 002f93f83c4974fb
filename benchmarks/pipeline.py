"""Benchmark the whole pipeline: `dvc repro` on the full archive from empty data/ and outputs/,
then a no-op re-run, several times each, in a throwaway copy of the project.

    python benchmarks/pipeline.py --runs 5          # prints a markdown table and writes JSON

Each full run starts like a fresh clone: no data/, outputs/, dvc.lock, DVC cache, MLflow store.
The data comes from the shipped archive (MSR_OFFLINE=1) so the network is not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in files:
        if not f or f.startswith(("data/", "outputs/")) or f == "dvc.lock" or not (ROOT / f).is_file(): continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["ingest"]["offline_source"] = str((ROOT / params["ingest"]["offline_source"]).resolve())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True)


def reset(project: Path) -> None:
    "Back to a fresh clone's state."
    for d in ["data", "outputs", "mlartifacts", ".dvc/cache", ".dvc/tmp"]: shutil.rmtree(project / d, ignore_errors=True)
    for f in ["dvc.lock", "mlflow.db"]: (project / f).unlink(missing_ok=True)
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=project, check=True)  # tracked outputs/metrics back


def timed(project: Path, cmd: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["MSR_OFFLINE"] = "1"  # the shipped archive: the network is not measured
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0: sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return elapsed


def stage_seconds(project: Path) -> dict:
    "Per-stage wall time from the MLflow store of the last run."
    import sqlite3
    db = sqlite3.connect(project / "mlflow.db")
    rows = db.execute("select r.name, m.value from runs r join metrics m on m.run_uuid = r.run_uuid "
                      "where m.key = 'stage_seconds'").fetchall()
    return {name: round(v, 2) for name, v in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="full runs (and as many no-op runs)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/pipeline.json")
    args = ap.parse_args()
    full, noop, stages = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "msr"
        copy_project(project)
        for i in range(args.runs):
            reset(project)
            full.append(timed(project, ["dvc", "repro"]))
            stages.append(stage_seconds(project))
            noop.append(timed(project, ["dvc", "repro"]))
            print(f"run {i + 1}: full {full[-1]:.1f}s, no-op {noop[-1]:.2f}s", file=sys.stderr)
    per_stage = {s: statistics.median(r[s] for r in stages) for s in stages[0]}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": args.runs,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "full_s": {"median": statistics.median(full), "min": min(full), "max": max(full), "all": full},
              "noop_s": {"median": statistics.median(noop), "min": min(noop), "max": max(noop), "all": noop},
              "stage_s_median": per_stage}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("| measure | median | min | max | runs |\n|---|---|---|---|---|")
    for name, key in [("full `dvc repro` from empty data/ and outputs/", "full_s"), ("no-op `dvc repro`", "noop_s")]:
        r = result[key]
        print(f"| {name} | {r['median']:.1f} s | {r['min']:.1f} s | {r['max']:.1f} s | {args.runs} |")
    print("\nper stage (median, s): " + ", ".join(f"{s} {v:.1f}" for s, v in per_stage.items()))


if __name__ == "__main__":
    main()
