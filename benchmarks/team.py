"""The team's tracking server as `make mlflow-server` runs it (`msr-team server`: PostgreSQL, basic auth, proxied artifacts,
job execution off): how long it takes to answer /health (the first start makes the cluster, its databases and MLflow's
tables; later starts find them), its memory (the mlflow processes, and PostgreSQL's) idle and after a burst of tracking
calls, how long those calls take through basic auth, and how long Ctrl-C takes to stop it all. Runs in a throwaway
project folder on free ports; the first run is a first start, every later one a restart. Medians over `--runs`.
Run: python benchmarks/team.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from dashboard import BIN, ROOT, free_port, start
from msr.testing import process_memory


def memory(pids: list[int]) -> dict:
    "Summed RSS and PSS (MB) of `pids`."
    got = [process_memory(p) for p in pids if psutil.pid_exists(p)]
    return {"processes": len(got), "rss_mb": round(sum(m["rss_mb"] for m in got), 1), "pss_mb": round(sum(m["pss_mb"] for m in got), 1)}


def postgres_pids(cluster: Path) -> list[int]:
    "The PostgreSQL server processes of the cluster in `cluster` (the postmaster and its children)."
    pid_file = cluster / "postmaster.pid"
    if not pid_file.exists(): return []
    main = psutil.Process(int(pid_file.read_text().split()[0]))
    return [main.pid, *(c.pid for c in main.children(recursive=True))]


def track(url: str, password: str, runs: int) -> list[float]:
    "Seconds per tracked run through the server as its admin: create a run, log 20 params and 20 metrics, end it."
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    took = []
    for i in range(runs):
        t0 = time.perf_counter()
        run_id = client.create_run(exp.experiment_id, run_name=f"bench {i}").info.run_id
        client.log_batch(run_id, params=[Param(f"p{j}", str(j)) for j in range(20)],
                         metrics=[Metric(f"m{j}", float(j), int(time.time() * 1000), 0) for j in range(20)])
        client.set_terminated(run_id)
        took.append(time.perf_counter() - t0)
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50, help="tracked runs per start (create, log_batch, end)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/team.json")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="msr-team-bench-"))
    folder.chmod(0o711)  # as root, PostgreSQL runs as its own account, which must pass through
    try:
        for f in ("dvc.yaml", "params.yaml"): shutil.copy2(ROOT / f, folder / f)
        params = yaml.safe_load((folder / "params.yaml").read_text())
        port = free_port()
        params["team"].update(port=port, db_port=free_port())
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        password = secrets.token_urlsafe(18)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MSR_"))},
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_AUTH_ADMIN_PASSWORD": password}
        url, cluster = f"http://127.0.0.1:{port}", folder / params["team"]["state"] / "postgres"
        rows = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            proc = start([str(BIN / "msr-team"), "server"], env, folder, lambda: urllib.request.urlopen(url + "/health", timeout=2),
                         folder / f"server-{i}.log")
            up = time.perf_counter() - t0
            server = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]  # mlflow and its uvicorn worker
            idle, pg_idle = memory(server), memory(postgres_pids(cluster))
            calls = track(url, password, args.calls)
            loaded, pg_loaded = memory(server), memory(postgres_pids(cluster))
            t0 = time.perf_counter()
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as in a terminal: msr-team stops mlflow and the PostgreSQL it started
            proc.wait(timeout=120)
            stopped = time.perf_counter() - t0
            rows.append({"first_start": i == 0, "health_s": round(up, 2), "stop_s": round(stopped, 2),
                         "server_idle": idle, "server_after_calls": loaded, "postgres_idle": pg_idle, "postgres_after_calls": pg_loaded,
                         "call_median_ms": round(1000 * statistics.median(calls), 1), "call_max_ms": round(1000 * max(calls), 1)})
            print(json.dumps(rows[-1]))
        later = rows[1:] or rows
        med = lambda key, sub=None: statistics.median(r[key][sub] if sub else r[key] for r in later)  # noqa: E731
        summary = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
                   "runs": args.runs, "calls_per_run": args.calls, "first_start_health_s": rows[0]["health_s"],
                   "restart_health_s_median": med("health_s"), "stop_s_median": med("stop_s"),
                   "server_processes": rows[-1]["server_idle"]["processes"],
                   "server_rss_mb_median": {"idle": med("server_idle", "rss_mb"), "after_calls": med("server_after_calls", "rss_mb")},
                   "server_pss_mb_median": {"idle": med("server_idle", "pss_mb"), "after_calls": med("server_after_calls", "pss_mb")},
                   "postgres_pss_mb_median": {"idle": med("postgres_idle", "pss_mb"), "after_calls": med("postgres_after_calls", "pss_mb")},
                   "tracked_run_ms_median": med("call_median_ms"), "rows": rows}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    finally: shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__": main()
