"""Load-test the REST server as `make serve` runs it: `mlflow models serve` on the registry's champion,
N concurrent keep-alive clients sending real playlist queries, zero errors expected.

    python benchmarks/serve.py --clients 8 --requests 2000 --runs 3

Needs a finished `make run` (the registered champion). Each request is one query: the first half of a
real playlist (capped at 50 seeds) and k=20. Answers are logged to a throwaway monitoring log, so
the logging cost is measured too. Clients and server share the machine's cores. Prints a markdown
table and writes JSON with the medians over runs.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, workers: int, log: Path, monitor: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MSR_MONITOR_DB": str(monitor),
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/msr-recommender@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        if proc.poll() is not None: sys.exit(f"server exited: {log.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", "/ping")
            if c.getresponse().status == 200: return proc
        except OSError: pass
        time.sleep(0.5)
    sys.exit("server did not start within 120 s")


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY, as requests/urllib3 open them (http.client sends headers and body in
    two writes; without TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms to every request)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def client(port: int, bodies: list[bytes], out: list, errors: list, fresh: bool = False):
    conn = connect(port)
    for body in bodies:
        t0 = time.perf_counter()
        if fresh: conn.close(); conn = connect(port)
        try:
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            r = conn.getresponse(); data = r.read()
            if r.status != 200 or len(json.loads(data)["predictions"]) != 20: errors.append(r.status)
        except Exception as e:
            errors.append(repr(e)); conn.close(); conn = connect(port)
        out.append((time.perf_counter() - t0) * 1000)
    conn.close()


def one_run(port: int, bodies: list[bytes], clients: int, fresh: bool = False) -> dict:
    lat, errors = [], []
    share = [bodies[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=client, args=(port, s, lat, errors, fresh)) for s in share]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": len(errors), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "throughput_rps": len(lat) / wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000, help="requests per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers (make serve's SERVE_WORKERS)")
    ap.add_argument("--fresh-connections", action="store_true",
                    help="a new connection per request (uvicorn with several workers leaves Nagle on for keep-alive sockets: +40 ms)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/serve.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    pt = pd.read_parquet("data/processed/playlist_tracks.parquet")
    lists = [l for l in pt.groupby("playlist_id")["track_id"].apply(list) if len(l) >= 10]
    rng = np.random.default_rng(0)
    bodies = []
    for i in rng.integers(len(lists), size=args.requests):
        seeds = lists[i][: min(len(lists[i]) // 2, 50)]
        bodies.append(json.dumps({"dataframe_records": [{"seeds": seeds, "k": 20}]}).encode())
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = start(port, args.workers, Path(d) / "server.log", Path(d) / "served.sqlite")
        try:
            one_run(port, bodies[:200], args.clients, args.fresh_connections)  # warm-up
            runs = [one_run(port, bodies, args.clients, args.fresh_connections) for _ in range(args.runs)]
        finally:
            os.killpg(proc.pid, signal.SIGTERM); proc.wait(timeout=30)
    med = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms", "throughput_rps")}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "clients": args.clients, "requests_per_run": args.requests, "workers": args.workers,
              "fresh_connections": args.fresh_connections, "runs": runs,
              "errors_total": sum(r["errors"] for r in runs), "median": med}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("| clients | workers | requests/run | errors | p50 ms | p99 ms | req/s |\n|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.workers} | {args.requests} | {result['errors_total']} | {med['p50_ms']:.1f} | "
          f"{med['p99_ms']:.1f} | {med['throughput_rps']:.0f} |  (median of {args.runs} runs)")


if __name__ == "__main__":
    main()
