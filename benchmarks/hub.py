"""What a person waits for behind the hub: from sending the hub's login form to the dashboard rendered (the Recommend
button shown), and the memory of an admin's page (its kernel holds the Admin tab too), in Debian's chromium driven by
playwright. Starts `jupyterhub -f jupyterhub_config.py` (as `make hub` does) over a throwaway copy of `--project`'s
params on free ports, and msr-serve over `--project`'s champion; each run logs the first admin in from a fresh browser
context and leaves. Medians over `--runs`. Run: python benchmarks/hub.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from dashboard import BIN, CHROMIUM_ARGS, ROOT, free_port, start, stop
from msr.testing import process_memory


def stop_hub(proc):
    "The hub takes 30-60 s to stop by itself: SIGTERM, a short wait, then SIGKILL for its whole session."
    import signal
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    try: proc.wait(timeout=3)
    except Exception: os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT, help="a project after `make run` (tables and a registered champion)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/hub.json")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    project = args.project.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="msr-hub-bench-"))
    hubdir = tmp / "project"
    hubdir.mkdir()
    (hubdir / "dvc.yaml").write_text((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    port = free_port()
    params["hub"].update(port=port, hub_port=free_port(), proxy_api_port=free_port(), service_port=free_port(), login_burst=100)
    (hubdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MSR_", "JUPYTER", "MLFLOW_"))}
    env = {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MSR_MONITOR_DB": str(tmp / "served.sqlite"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    api_port, admin, password = free_port(), "bench-admin", secrets.token_urlsafe(16)
    api_url = f"http://127.0.0.1:{api_port}"
    api = start([str(BIN / "msr-serve"), "--port", str(api_port), "--workers", "1"], {**env, "MSR_PROJECT_DIR": str(project)},
                project, lambda: urllib.request.urlopen(api_url + "/health", timeout=2), tmp / "api.log")
    url = f"http://127.0.0.1:{port}"
    hub = start([str(BIN / "jupyterhub"), "-f", str(ROOT / "jupyterhub_config.py")],
                {**env, "MSR_PROJECT_DIR": str(hubdir), "MSR_API_URL": api_url, "MSR_HUB_ADMIN": admin, "MSR_HUB_ADMIN_PASSWORD": password},
                hubdir, lambda: urllib.request.urlopen(f"{url}/hub/login", timeout=2), tmp / "hub.log")
    runs = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for i in range(args.runs + 1):  # the first visit warms the service up and is not counted
                page = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
                page.goto(f"{url}/hub/login")
                page.fill("input[name=username]", admin)
                page.fill("input[name=password]", password)
                t0 = time.perf_counter()
                page.click("#login_submit")
                page.wait_for_selector(".msr-go", timeout=120_000)
                render = time.perf_counter() - t0
                time.sleep(1.0)  # the page settles
                voila = next(c for c in psutil.Process(hub.pid).children(recursive=True) if "voila" in " ".join(c.cmdline()))
                kernels = [k for k in voila.children(recursive=True) if "ipykernel_launcher" in " ".join(k.cmdline())]
                run = {"render_after_login_s": render, **{f"kernel_{k}": v for k, v in process_memory(kernels[-1].pid).items()}}
                if i: runs.append(run)
                print(("warm-up " if not i else "") + f"visit: {run}", flush=True)
                page.goto("about:blank"); page.context.close()
            browser.close()
    finally:
        stop_hub(hub); stop(api)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg(), "runs": args.runs, "median": med, "visits": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(med, indent=2))


if __name__ == "__main__":
    main()
