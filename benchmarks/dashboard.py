"""What one open dashboard page costs: its kernel's memory (RSS, PSS, USS from /proc/<pid>/smaps_rollup) and the time
from the browser's request to the rendered page (the Recommend button shown), in Debian's chromium driven by playwright;
plus the memory of the voila server and of the REST service that holds the champion for every page, and of `--pages`
pages open at once. Medians over `--runs` visits, each page left as a person leaves it.

Starts the REST service (msr-serve, one model process) and voila as
`make dashboard` does, over `--project` (a project after `make run`). Run: python benchmarks/dashboard.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from msr.testing import process_memory

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory(pid: int) -> dict:
    "`process_memory` summed over a process and its children."
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    ms = [process_memory(p.pid) for p in procs]
    return {k: sum(m[k] for m in ms) for k in ms[0]}


def start(cmd: list[str], env: dict, cwd: Path, ready, log: Path, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None: raise SystemExit(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            ready()
            return proc
        except Exception: time.sleep(0.5)
    raise SystemExit(f"{cmd[0]} did not come up:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen):
    import signal
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    proc.wait(timeout=30)


def _is_kernel(p: psutil.Process) -> bool:
    try: return p.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(p.cmdline())
    except psutil.Error: return False  # gone meanwhile


def kernels(voila: subprocess.Popen) -> list[psutil.Process]:
    "The voila server's live kernel processes."
    return [c for c in psutil.Process(voila.pid).children(recursive=True) if _is_kernel(c)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="a project after `make run` (tables and a model)")
    ap.add_argument("--runs", type=int, default=5, help="visits measured one at a time")
    ap.add_argument("--pages", type=int, default=8, help="pages then opened at once")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/dashboard.json")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from msr.pages import VOILA_ARGS
    tmp = Path(tempfile.mkdtemp(prefix="msr-dashboard-bench-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MSR_", "JUPYTER_"))}
    env = {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MSR_PROJECT_DIR": str(args.project.resolve()),
           "MSR_MONITOR_DB": str(tmp / "served.sqlite"), "MLFLOW_TRACKING_URI": f"sqlite:///{args.project.resolve()}/mlflow.db"}
    api_port, port, token = free_port(), free_port(), secrets.token_urlsafe(16)
    api_url = f"http://127.0.0.1:{api_port}"
    api_cmd = [str(BIN / "msr-serve"), "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"]
    t0 = time.perf_counter()
    api = start(api_cmd, env, args.project, lambda: urllib.request.urlopen(api_url + "/health", timeout=2), tmp / "api.log")
    api_start = time.perf_counter() - t0
    voila = start([str(BIN / "voila"), str(ROOT / "nbs/dashboard.ipynb"), "--no-browser", "--strip_sources=True", "--Voila.ip=127.0.0.1",
                   f"--port={port}", "--Voila.auto_token=True", *VOILA_ARGS],
                  {**env, "MSR_API_URL": api_url, "JUPYTER_TOKEN": token, "MSR_DASHBOARD_MAX_PAGES": str(args.pages + 1)}, ROOT / "nbs",
                  lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close(), tmp / "voila.log")
    url = f"http://127.0.0.1:{port}/?token={token}"
    visits, together = [], {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            open_page = lambda: browser.new_context().new_page()
            warm = open_page(); warm.goto(url); warm.wait_for_selector(".msr-go", timeout=180_000)  # first visit: caches, imports
            warm.goto("about:blank"); warm.context.close()
            for _ in range(args.runs):
                while kernels(voila): time.sleep(0.2)
                page = open_page()
                t = time.perf_counter()
                page.goto(url, timeout=180_000)
                page.wait_for_selector(".msr-go", timeout=180_000)
                render = time.perf_counter() - t
                time.sleep(1)  # the page's widgets connected
                (kernel,) = kernels(voila)
                visits.append({"render_s": render, **process_memory(kernel.pid)})
                t = time.perf_counter()
                page.goto("about:blank"); page.context.close()
                while kernels(voila): time.sleep(0.1)
                visits[-1]["gone_s"] = time.perf_counter() - t
                print(f"visit: {visits[-1]}", flush=True)
            pages = []
            for _ in range(args.pages):
                page = open_page(); page.goto(url, timeout=180_000); page.wait_for_selector(".msr-go", timeout=180_000); pages.append(page)
            ks = kernels(voila)
            sums = [process_memory(k.pid) for k in ks]
            together = {"pages": len(ks), **{f"kernels_{k}": sum(m[k] for m in sums) for k in sums[0]},
                        "voila_server": process_memory(voila.pid), "rest_service": tree_memory(api.pid)}
            for page in pages: page.goto("about:blank"); page.context.close()
            browser.close()
    finally:
        stop(voila); stop(api)
    med = {k: statistics.median(v[k] for v in visits) for k in visits[0]}
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "project": str(args.project), "rest_service": "msr-serve",
           "rest_service_start_s": api_start, "runs": args.runs, "page_median": med, "visits": visits, "together": together}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"page_median": med, "together": together}, indent=2))


if __name__ == "__main__":
    main()
