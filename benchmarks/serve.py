"""Load-test the REST service as `make serve` runs it (`msr-serve`: msr's front and a pool of model processes),
the registered pyfunc model alone under `mlflow models serve` (the same load without the front), and the
in-process cost of one answer (the physical limit).

    python benchmarks/serve.py --runs 5 --seconds 15

Needs a finished `make run` (the registered champion) and `wrk` (Debian's package) on PATH. Loopback only.
The load generator is wrk in its own process with `benchmarks/queries.lua`, one keep-alive connection per wrk
thread, cycling real queries: for each dataset playlist (shuffled), its first half as seeds (at most 50), k = 20,
POST /invocations {"dataframe_records": [{"seeds": [...], "k": 20}]}. Each server gets a warm-up, then
`--runs` runs of `--seconds` for each connection count, interleaved; the figures are medians over runs.
Answers are appended to a throwaway monitoring log, whose rows are counted after each run (once the writer
has settled) and compared with the answers wrk received: every delivered answer is logged, nothing else.
Other jobs share the cores: before each run the script waits (up to --patience) until they keep fewer than
--quiet cores busy, and it records with each run the load average, the cores other jobs used during it and the
CPU each process spent per answer (server's main process, its other processes, wrk).

Writes benchmarks/results/serve.json (msr-serve, 8 connections), serve-1client.json (msr-serve, 1 connection),
serve-mlflow.json (`mlflow models serve -w 2`, both counts) and serve-inprocess.json; prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LUA = ROOT / "benchmarks/queries.lua"
RESULTS = ROOT / "benchmarks/results"
CHAMPION = "models:/msr-recommender@champion"
TARGETS = {8: {"p50_ms": 30.0, "answers_per_s": 250.0}, 1: {"p50_ms": 12.0}}  # issue 11, msr-serve


# ---------------------------------------------------------------- queries

def query_bodies(cap: int = 50, k: int = 20, seed: int = 0) -> list[str]:
    "One /invocations body per dataset playlist of >= 2 tracks (shuffled): its first half as seeds, at most `cap`."
    import pandas as pd
    pt = pd.read_parquet(ROOT / "data/processed/playlist_tracks.parquet", columns=["playlist_id", "track_id"])
    lists = [ids for ids in pt.groupby("playlist_id", sort=True)["track_id"].agg(list) if len(ids) >= 2]
    order = np.random.default_rng(seed).permutation(len(lists))
    return [json.dumps({"dataframe_records": [{"seeds": lists[i][:min(len(lists[i]) // 2, cap)], "k": k}]},
                       separators=(",", ":")) for i in order]


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(monitor: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MSR_MONITOR_DB": str(monitor),
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")}


def server_command(kind: str, port: int | str, workers: int) -> list[str]:
    if kind == "msr-serve":
        return [str(BIN / "msr-serve"), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--rate", "0"]
    return [str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]


def get(port: int, path: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r: return r.read()


def start(kind: str, port: int, workers: int, monitor: Path, log: Path) -> subprocess.Popen:
    "Start a server in its own session and wait for /ping."
    proc = subprocess.Popen(server_command(kind, port, workers), cwd=ROOT, env=server_env(monitor),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None: sys.exit(f"{kind} exited: {log.read_text()[-2000:]}")
        try:
            if get(port, "/ping") is not None: return proc
        except OSError: pass
        time.sleep(0.5)
    stop(proc)
    sys.exit(f"{kind} did not start within 180 s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen):
    "SIGTERM to the server's process group (its workers too), SIGKILL if it lingers."
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()


# ---------------------------------------------------------------- the monitoring log

def log_rows(db: Path) -> int:
    "Rows in the monitoring log (0 before it exists)."
    if not db.exists(): return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try: return con.execute("select count(*) from served").fetchone()[0]
    except sqlite3.OperationalError: return 0
    finally: con.close()


def settled_rows(db: Path, quiet: float = 1.5, timeout: float = 60.0) -> int:
    "The log's row count once it has stopped changing for `quiet` seconds (the server's writer is asynchronous)."
    last, since, deadline = log_rows(db), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.25)
        n = log_rows(db)
        if n != last: last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet: break
    return last


# ---------------------------------------------------------------- CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> dict:
    "CPU seconds (user + system) so far of each live process in process group `pgid`: pid -> seconds."
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: stat = (d / "stat").read_text()
        except OSError: continue
        rest = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(rest[2]) == pgid: out[int(d.name)] = (int(rest[11]) + int(rest[12])) / TICK
    return out


def machine_busy() -> float:
    "CPU seconds the whole machine has been busy (all cores; /proc/stat)."
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK  # all but idle and iowait


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(pgid: int | None, limit: float, patience: float) -> dict:
    """Wait (at most `patience` s) until other jobs keep less than `limit` cores busy over 2 s (the server's process
    group excepted): the machine is shared. Returns the wait and the last reading."""
    t0 = time.monotonic()
    while True:
        busy0, cpu0, s0 = machine_busy(), group_cpu(pgid) if pgid else {}, time.monotonic()
        time.sleep(2.0)
        cpu1 = group_cpu(pgid) if pgid else {}
        ours = sum(v - cpu0.get(p, 0) for p, v in cpu1.items())
        other = max(0.0, machine_busy() - busy0 - ours) / (time.monotonic() - s0)
        if other < limit or time.monotonic() - t0 >= patience:
            return {"waited_s": round(time.monotonic() - t0, 1), "other_jobs_cores_before": round(other, 2)}


# ---------------------------------------------------------------- load

def wrk(port: int, connections: int, seconds: float, bodies: Path, margin: float = 3.0) -> dict:
    "One wrk run (one connection per thread): the Lua script's summary, parsed."
    cmd = [shutil.which("wrk") or "/usr/bin/wrk", "-t", str(connections), "-c", str(connections),
           "-d", f"{int(seconds + margin)}s", "--timeout", "30s", "-s", str(LUA), f"http://127.0.0.1:{port}",
           "--", str(bodies), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + margin + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("msr-bench ")), None)
    if line is None: sys.exit(f"wrk gave no summary: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    return json.loads(line[len("msr-bench "):])


def one_run(kind: str, proc: subprocess.Popen, port: int, connections: int, seconds: float, bodies: Path, monitor: Path,
            quiet: float = 0.2, patience: float = 120.0) -> dict:
    waited = wait_quiet(proc.pid, quiet, patience)
    load_before = os.getloadavg()
    rows_before = settled_rows(monitor, quiet=0.5)
    cpu0, busy0, wrk0, t0 = group_cpu(proc.pid), machine_busy(), children_cpu(), time.monotonic()
    w = wrk(port, connections, seconds, bodies)
    cpu1, busy1, wrk1, wall = group_cpu(proc.pid), machine_busy(), children_cpu(), time.monotonic() - t0
    rows = settled_rows(monitor) - rows_before
    lat = np.array(w["latencies_ms"])
    ok = w["statuses"].get("200", 0)
    socket_errors = sum(v for k, v in w["wrk"]["errors"].items() if k != "status")
    run = {"connections": connections, "answers": w["answers"], "responses": int(sum(w["statuses"].values())),
           "statuses": w["statuses"], "non_200": int(sum(v for k, v in w["statuses"].items() if k != "200")),
           "200_without_predictions": ok - w["answers"], "socket_errors": socket_errors,
           "wrk_requests": w["wrk"]["requests"], "span_s": round(w["span_s"], 3),
           "answers_per_s": w["answers"] / w["span_s"] if w["span_s"] else 0.0,
           "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
           "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
           "log_rows": rows, "log_rows_match": rows == w["answers"],
           **waited, "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    run["errors"] = run["non_200"] + run["200_without_predictions"] + socket_errors
    # CPU per answer: the server's main process (msr-serve: the front; mlflow: its CLI), its other processes
    # (model processes; uvicorn's workers), wrk; and the cores busy with anything else (other jobs) during the run
    main = cpu1.get(proc.pid, 0) - cpu0.get(proc.pid, 0)
    others = sum(v - cpu0.get(p, 0) for p, v in cpu1.items() if p != proc.pid)
    n = max(w["answers"], 1)
    run["cpu_ms_per_answer"] = {"server_main": 1000 * main / n, "server_others": 1000 * others / n, "wrk": 1000 * (wrk1 - wrk0) / n}
    run["cores_busy"] = {"all": (busy1 - busy0) / wall, "other_jobs": max(0.0, (busy1 - busy0) - main - others - (wrk1 - wrk0)) / wall}
    return run


def bench_server(kind: str, args, bodies: Path, work: Path) -> dict:
    "Warm-up, then `args.runs` runs of every connection count (interleaved) against one server."
    port, monitor = free_port(), work / f"{kind}-served.sqlite"
    proc = start(kind, port, args.workers, monitor, work / f"{kind}.log")
    try:
        health = json.loads(get(port, "/health")) if kind == "msr-serve" else None
        print(f"{kind}: warm-up {args.warmup:g} s", file=sys.stderr)
        wrk(port, max(args.connections), args.warmup, bodies)
        runs = {c: [] for c in args.connections}
        for i in range(args.runs):
            for c in args.connections:
                r = one_run(kind, proc, port, c, args.seconds, bodies, monitor, args.quiet, args.patience)
                runs[c].append(r)
                print(f"{kind} run {i + 1}, {c} connections: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                      f"{r['answers_per_s']:.0f} answers/s, errors {r['errors']}, log rows {r['log_rows']} / answers {r['answers']}, "
                      f"load {r['loadavg_before'][0]:.2f}, other jobs {r['cores_busy']['other_jobs']:.2f} cores, CPU ms/answer "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_answer"].items()), file=sys.stderr)
        if kind == "msr-serve": health = json.loads(get(port, "/health"))
    finally:
        stop(proc)
    return {"model_version": (health or {}).get("model_version"), "log_health": (health or {}).get("log"), "runs": runs}


def summarize(kind: str, connections: int, runs: list, common: dict, extra: dict) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p90_ms", "p99_ms", "answers_per_s")}
    out = {**common, "server": kind, "connections": connections, **extra, "runs": runs,
           "errors_total": sum(r["errors"] for r in runs), "answers_total": sum(r["answers"] for r in runs),
           "log_rows_total": sum(r["log_rows"] for r in runs), "log_rows_match": all(r["log_rows_match"] for r in runs),
           "median": med, "median_cpu_ms_per_answer": {k: statistics.median(r["cpu_ms_per_answer"][k] for r in runs)
                                                         for k in runs[0]["cpu_ms_per_answer"]}}
    target = TARGETS.get(connections) if kind == "msr-serve" else None
    if target:
        out["targets"] = target
        out["targets_met"] = (all(med[k] <= v if k.endswith("_ms") else med[k] >= v for k, v in target.items())
                              and out["errors_total"] == 0 and out["log_rows_match"])
    return out


# ---------------------------------------------------------------- in process

def timed(fn, items, warmup: int = 50) -> list[float]:
    for x in items[:warmup]: fn(x)
    out = []
    for x in items:
        t0 = time.perf_counter(); fn(x); out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(ms: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms))}


def inprocess_child(queries: int, bodies_path: Path) -> dict:
    """The cost of one answer in this process: `Service.recommend` (with reasons), the model process's whole task
    (`msr.api._work`: answer, records, log rows) and the front's own work per request (checks, the pool's pickling
    both ways, the JSON answer), each over the same `queries` real queries."""
    from msr import api
    bodies = [b.encode() for b in bodies_path.read_text().splitlines() if b]
    bodies = (bodies * (queries // len(bodies) + 1))[:queries]
    api._PROCESS = api.ModelProcess(api.load_champion(CHAMPION))
    service = api._PROCESS.service
    rows = [[api.check_row(0, r, many=False) for r in api.read_rows(b)] for b in bodies]
    results = [api._work(("predict", r)) for r in rows[:200]]
    payloads = [res[1] for res in results]
    return {"threads": os.environ.get("OMP_NUM_THREADS", "default"), "queries": queries, "model_version": service.model_version,
            "recommend": pct(timed(lambda r: service.recommend(r[0]["seeds"], r[0]["k"], log=False), rows)),
            "model_task": pct(timed(lambda r: api._work(("predict", r)), rows)),
            "front_checks": pct(timed(lambda b: [api.check_row(0, r, many=False) for r in api.read_rows(b)], bodies)),
            "pool_pickling": pct(timed(lambda i: pickle.loads(pickle.dumps(("predict", rows[i]), -1)) and
                                       pickle.loads(pickle.dumps(results[i % len(results)], -1)), list(range(queries)))),
            "json_answer": pct(timed(lambda i: json.dumps(payloads[i % len(payloads)], separators=(",", ":")).encode(),
                                     list(range(queries)))),
            "answer_bytes": int(statistics.median(len(json.dumps(p, separators=(",", ":"))) for p in payloads))}


def bench_inprocess(args, bodies: Path, common: dict) -> dict:
    "The in-process figures with OMP_NUM_THREADS=1 (as in msr-serve's model processes) and unset, each in a fresh process."
    out = []
    for threads in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
        if threads: env["OMP_NUM_THREADS"] = threads
        waited = wait_quiet(None, args.quiet, args.patience)
        load = os.getloadavg()
        res = subprocess.run([sys.executable, __file__, "--inprocess-child", "--queries", str(args.queries), "--bodies", str(bodies)],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode: sys.exit(f"the in-process benchmark failed: {res.stderr[-3000:]}")
        out.append({**json.loads(res.stdout.strip().splitlines()[-1]), **waited, "loadavg_before": [round(x, 2) for x in load]})
    one = out[0]["model_task"]["p50_ms"] + out[0]["front_checks"]["p50_ms"] + out[0]["pool_pickling"]["p50_ms"] + out[0]["json_answer"]["p50_ms"]
    return {**common, "runs": out, "answer_cost_ms": one, "bound_answers_per_s_per_core": 1000 / one,
            "note": "answer_cost_ms: the model process's task + the front's checks, pickling and JSON, p50 each, OMP_NUM_THREADS=1 "
                    "(HTTP, asyncio and the log's writer not included)"}


# ---------------------------------------------------------------- main

def git_commit() -> str:
    try: return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError: return ""


def write(name: str, result: dict):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


def table_row(label: str, r: dict) -> str:
    m = r["median"]
    p50s = sorted(x["p50_ms"] for x in r["runs"])
    loads = "–".join(f"{x:.1f}" for x in (min(x["loadavg_before"][0] for x in r["runs"]), max(x["loadavg_before"][0] for x in r["runs"])))
    other = "–".join(f"{x:.2f}" for x in (min(x["cores_busy"]["other_jobs"] for x in r["runs"]), max(x["cores_busy"]["other_jobs"] for x in r["runs"])))
    cpu = " / ".join(f"{v:.1f}" for v in r["median_cpu_ms_per_answer"].values())
    return (f"| {label} | {r['connections']} | {len(r['runs'])} × {r['seconds']:g} s | {r['errors_total']} of {r['answers_total']:,} | "
            f"{r['log_rows_total']:,} = {r['answers_total']:,}: {'yes' if r['log_rows_match'] else 'NO'} | "
            f"**{m['p50_ms']:.1f} ms** ({p50s[0]:.1f}–{p50s[-1]:.1f}) | {m['p99_ms']:.1f} ms | {m['answers_per_s']:.0f} | {cpu} | {loads} | {other} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per server and connection count")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of one run")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the runs")
    ap.add_argument("--connections", type=int, nargs="+", default=[8, 1], help="keep-alive connections (wrk threads)")
    ap.add_argument("--workers", type=int, default=2, help="model processes / uvicorn workers")
    ap.add_argument("--quiet", type=float, default=0.2, help="before each run, wait until other jobs use fewer cores than this")
    ap.add_argument("--patience", type=float, default=120.0, help="longest wait for --quiet (seconds); the run starts anyway")
    ap.add_argument("--queries", type=int, default=1000, help="queries timed in process")
    ap.add_argument("--only", nargs="+", choices=["msr-serve", "mlflow", "inprocess"], default=["msr-serve", "mlflow", "inprocess"])
    ap.add_argument("--inprocess-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.inprocess_child:
        print(json.dumps(inprocess_child(args.queries, args.bodies))); return
    if not shutil.which("wrk") and not Path("/usr/bin/wrk").exists(): sys.exit("wrk not found: apt-get install wrk")
    common = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "wrk": subprocess.run([shutil.which("wrk") or "/usr/bin/wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="msr-bench-serve-") as d:
        work = Path(d)
        bodies = work / "bodies.jsonl"
        queries = query_bodies()
        bodies.write_text("\n".join(queries) + "\n")
        load = {"queries": len(queries), "seeds": "first half of a dataset playlist, at most 50", "k": 20,
                "seconds": args.seconds, "warmup_s": args.warmup, "workers": args.workers}
        for kind in ("msr-serve", "mlflow"):
            if kind not in args.only: continue
            got = bench_server(kind, args, bodies, work)
            extra = {**load, "model_version": got["model_version"], "log_health_after": got["log_health"],
                     "command": " ".join(re.sub(r"^.*/", "", a) if i == 0 else a for i, a in enumerate(server_command(kind, "PORT", args.workers)))}
            results = {c: summarize(kind, c, runs, common, extra) for c, runs in got["runs"].items()}
            if kind == "msr-serve":
                for c, r in results.items(): write("serve.json" if c == 8 else f"serve-{c}client{'s' if c > 1 else ''}.json", r)
            else:
                write("serve-mlflow.json", {**common, "server": kind, "by_connections": {str(c): r for c, r in results.items()}})
            rows += [table_row("msr-serve (front + 2 model processes)" if kind == "msr-serve" else "`mlflow models serve -w 2` (no front)", r)
                     for r in results.values()]
        if "inprocess" in args.only:
            inproc = bench_inprocess(args, bodies, common)
            write("serve-inprocess.json", inproc)
    print("| server | connections | runs | errors | log rows = answers | p50 | p99 | answers/s "
          "| CPU ms per answer (main / other server processes / wrk) | load avg | other jobs (cores) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows: print(r)
    if "inprocess" in args.only:
        print("\n| in process (1,000 queries) | OMP threads | p50 | p90 | p99 |\n|---|---|---|---|---|")
        for r in inproc["runs"]:
            for part in ("recommend", "model_task", "front_checks", "pool_pickling", "json_answer"):
                p = r[part]
                print(f"| {part} | {r['threads']} | {p['p50_ms']:.3f} ms | {p['p90_ms']:.3f} ms | {p['p99_ms']:.3f} ms |")
        print(f"\nOne answer's CPU in process (model task + front's checks, pickling, JSON; p50, 1 thread): "
              f"{inproc['answer_cost_ms']:.2f} ms, at most {inproc['bound_answers_per_s_per_core']:.0f} answers/s per core")


if __name__ == "__main__":
    main()
