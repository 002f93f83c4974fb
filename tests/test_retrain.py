"""One retrain path (issue 21): `msr-retrain` (what the Airflow DAG's retrain task runs), `msr-feed --retrain` and the
admin desk's `msr-desk retrain` share one lock, held for the retrain's whole life, and its status follows whoever holds
it. The real `msr-retrain` command in a throwaway project whose `desk.retrain` is a slow stand-in for `dvc repro`
(the real `dvc repro` runs under it in test_pipeline, test_airflow and test_hub)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import BIN, run
from msr.desk import audit_rows, retrain_running, retrain_status

SLOW = [sys.executable, "-c", "import time; print(\"Running stage 'train'\", flush=True); time.sleep(300)"]


def wait_for(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.1)
    return got


def test_a_killed_retrain_holds_the_lock_until_its_command_ends_then_shows_dead(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params.yaml").write_text(yaml.safe_dump({"desk": {"retrain": SLOW}}))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MSR_PROJECT_DIR", None)
    first = subprocess.Popen([str(BIN / "msr-retrain"), "--by", "airflow"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child = None
    try:
        s = wait_for(lambda: (s := retrain_status(project)).get("stage") == "train" and s.get("child") and s, "the retrain's command")
        child = s["child"]
        assert (s["state"], s["by"], s["pid"]) == ("running", "airflow", first.pid) and "note" not in s, s

        # a second retrain, from anywhere, is refused while it runs: exit code 3 and who holds it
        second = run(["msr-retrain", "--by", "ops"], project, check=False)
        assert second.returncode == 3 and "a retrain is already running (started by airflow at" in second.stderr, second.stderr

        # its starter killed: the command still runs and still holds the lock, and the status says so
        first.kill(); first.wait()
        s = retrain_status(project)
        assert s["state"] == "running" and f"its starter (pid {first.pid}) is gone; the command (pid {child}) still runs" == s["note"], s
        assert retrain_running(project)
        assert run(["msr-retrain", "--by", "ops"], project, check=False).returncode == 3

        # the command killed too: nobody holds the lock, and the status that said "running" says "dead"
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not retrain_running(project), "the lock to be free")
        s = retrain_status(project)
        assert s["state"] == "dead" and "ended without saying how" in s["error"] and "seconds" not in s, s
    finally:
        if first.poll() is None: first.kill(); first.wait()
        if child:
            try: os.kill(child, signal.SIGKILL)
            except ProcessLookupError: pass

    # a new retrain starts, its output comes on stdout as it runs, and the status and audit log follow
    (project / "params.yaml").write_text(yaml.safe_dump({"desk": {"retrain": [sys.executable, "-c", "print('retrained Bearer s3cret')"]}}))
    again = run(["msr-retrain", "--by", "ops"], project)
    assert "retrained Bearer ***" in again.stdout and "s3cret" not in again.stdout and "msr-retrain: started" in again.stderr
    s = retrain_status(project)
    assert (s["state"], s["by"], s["returncode"]) == ("finished", "ops", 0), s
    rows = [(r["who"], r["outcome"]) for r in reversed(audit_rows(project))]
    assert rows == [("airflow", "started"), ("ops", "refused"), ("ops", "refused"), ("ops", "started"), ("ops", "ok")], rows

    # a failing command: its exit code, "failed", and where its log is
    (project / "params.yaml").write_text(yaml.safe_dump({"desk": {"retrain": [sys.executable, "-c", "raise SystemExit(4)"]}}))
    failed = run(["msr-retrain"], project, check=False)
    assert failed.returncode == 4 and "the retrain failed (exit code 4; its log: data/desk/retrain.log)" in failed.stderr
    assert json.loads((project / "data/desk/retrain.json").read_text())["state"] == "failed"
    assert (project / "data/desk/retrain.lock").stat().st_mode & 0o777 == 0o600
