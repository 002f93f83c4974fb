"""The feed -> retrain loop as the Airflow DAG `msr_retrain` (dags/msr_retrain.py): the real Airflow 3 of `make airflow`
(its own venv, this project's AIRFLOW_HOME in a throwaway copy of the project, SQLite metadata DB) runs the DAG with
`airflow dags test` against a fake Spotify, with the real DVC pipeline, MLflow registry and alert channels."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from conftest import BIN, ROOT, run, set_params
from fake_spotify import CLIENT_ID as FAKE_ID, CLIENT_SECRET as FAKE_SECRET, serve as serve_fake, track as fake_track
from msr.core import AUDIO_FEATURES

AIRFLOW = ROOT / ".airflow" / "venv" / "bin" / "airflow"
pytestmark = pytest.mark.skipif(not AIRFLOW.exists(), reason=f"Airflow is not installed at {AIRFLOW.parent.parent}: run `make airflow` "
                                "(make pytest tries it; it installs apache-airflow from PyPI)")
DAG = "msr_retrain"
TASKS = ["feed", "retrain_signal", "retrain", "report"]


class Airflow:
    "The project copy's Airflow: its CLI with a clean environment (no MLflow, Spotify, msr or Airflow variables of ours)."
    def __init__(self, project: Path):
        self.project, self.home = project, project / ".airflow"
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)  # the DAG must find msr's venv itself
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPOTIFY_", "SPOTIPY_", "MSR_", "AIRFLOW"))}
        self.env = {**base, "PATH": path, "AIRFLOW_HOME": str(self.home), "MSR_VENV": str(BIN.parent)}  # the tests' msr environment

    def __call__(self, *args: str, env: dict | None = None, check: bool = True, timeout: float = 900):
        t0 = time.time()
        p = subprocess.run([str(self.home / "venv/bin/airflow"), *args], cwd=self.project, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=timeout)
        p.seconds = time.time() - t0
        if check and p.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
        return p

    def db(self, sql: str, *args):
        with sqlite3.connect(f"file:{self.home / 'airflow.db'}?mode=ro", uri=True) as con: return con.execute(sql, args).fetchall()

    def last_run(self) -> tuple[str, str, dict]:
        "The newest run of the DAG: its id, state, and each task's (state, try_number)."
        run_id, state = self.db("select run_id, state from dag_run where dag_id=? order by id desc limit 1", DAG)[0]
        tasks = {t: (s, n) for t, s, n in self.db("select task_id, state, try_number from task_instance where dag_id=? and run_id=?", DAG, run_id)}
        return run_id, state, tasks

    def xcom(self, run_id: str, task_id: str):
        rows = self.db("select value from xcom where dag_id=? and run_id=? and task_id=? and key='return_value'", DAG, run_id, task_id)
        value = json.loads(rows[0][0]) if rows else None
        return json.loads(value) if isinstance(value, str) else value


@pytest.fixture()
def airflow(project) -> Airflow:
    "`make airflow` in the project copy (the cached venv, a fresh .airflow/ with its airflow.cfg) and a migrated metadata DB."
    made = run(["make", "airflow"], project)
    assert "Airflow 3.3.2 in .airflow/venv" in made.stdout, made.stdout
    assert (project / ".airflow/airflow.cfg").stat().st_mode & 0o777 == 0o600
    af = Airflow(project)
    af("db", "migrate")
    return af


INSPECT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
dag = bag.dags["msr_retrain"]
from airflow.configuration import conf
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "msr_imported": "msr" in sys.modules,
                  "config": [conf.get("core", "dags_folder"), conf.getboolean("core", "load_examples"), conf.getint("core", "parallelism"),
                             conf.get("api", "host")],
                  "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
                  "tasks": {t.task_id: {"retries": t.retries, "retry_delay": t.retry_delay.total_seconds(),
                                        "backoff": t.retry_exponential_backoff, "max_retry_delay": t.max_retry_delay.total_seconds(),
                                        "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                                        "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule), "upstream": sorted(t.upstream_task_ids),
                                        "on_failure": [c.__name__ for c in (t.on_failure_callback or [])],
                                        "command": getattr(t, "bash_command", None)} for t in dag.tasks}}))
"""


def test_dag_imports_with_the_projects_settings(project, airflow):
    "The DAG imports in Airflow's own venv without msr, its settings come from params.yaml, and a broken one is an import error."
    set_params(project, airflow={"schedule": "@hourly", "retries": 3, "retry_delay": 7, "retry_backoff": 3, "max_retry_delay": 99,
                                 "feed_timeout": 111, "retrain_timeout": 222, "report_timeout": 33})
    ser = airflow("dags", "reserialize")
    errors = airflow("dags", "list-import-errors")
    assert "No data found" in errors.stdout, errors.stdout + errors.stderr
    details = json.loads(airflow("dags", "details", DAG, "-o", "json").stdout.strip().splitlines()[-1])[0]
    assert (details["timetable_summary"], details["max_active_runs"], details["fileloc"]) == ("0 * * * *", "1", str(project / "dags/msr_retrain.py"))

    inspected = subprocess.run([str(airflow.home / "venv/bin/python"), "-c", INSPECT, str(project / "dags")], env=airflow.env,
                               capture_output=True, text=True, check=True)
    got = json.loads(inspected.stdout.splitlines()[-1])
    assert got["errors"] == {} and not got["msr_imported"] and got["catchup"] is False and got["max_active_runs"] == 1
    assert got["config"] == [str(project / "dags"), False, 4, "127.0.0.1"]  # make airflow's .airflow/airflow.cfg
    tasks = got["tasks"]
    assert sorted(tasks) == sorted(TASKS)
    assert {t: v["upstream"] for t, v in tasks.items()} == {"feed": [], "retrain_signal": ["feed"], "retrain": ["retrain_signal"], "report": ["retrain"]}
    assert tasks["report"]["trigger_rule"] == "none_failed"  # it reports the champion when the retrain was skipped too
    for name, t in tasks.items():
        assert (t["retries"], t["retry_delay"], t["backoff"], t["max_retry_delay"], t["on_failure"]) == (3, 7, 3.0, 99, ["alert_failure"]), name
    assert [tasks[t]["timeout"] for t in TASKS] == [111, 33, 222, 33]
    # the retrain holds the one retrain lock that the desk and msr-feed --retrain share (tests/test_retrain.py)
    assert tasks["retrain"]["command"].endswith("\nmsr-retrain --by airflow --push"), tasks["retrain"]["command"]

    # a params.yaml without the airflow section is an import error that says what is missing
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("\nairflow:", "\nairflow_gone:"))
    airflow("dags", "reserialize", check=False)
    errors = airflow("dags", "list-import-errors", "-o", "json", check=False)
    assert errors.returncode == 1, errors.returncode  # it fails when there is one
    assert "msr_retrain needs the project's params.yaml with an airflow section" in errors.stdout, errors.stdout
    print(f"\nairflow dags reserialize {ser.seconds:.1f} s")


class Hook(BaseHTTPRequestHandler):
    "An alert webhook on 127.0.0.1: keeps each POSTed JSON body."
    def do_POST(self):
        self.server.alerts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204); self.end_headers()
    def log_message(self, *args): pass


def new_tracks(start: int, n: int = 60) -> list[dict]:
    return [fake_track(10**6 + i, duration_ms=180000, album={"id": "al", "name": "Al", "release_date": "2026-03-01"}) for i in range(start, start + n)]


def test_retrain_loop(project, airflow, sample_zip, tmp_path):
    """Three hourly runs of the DAG, each an `airflow dags test`: 60 new tracks retrain and register a version that is not
    promoted (alert), nothing new short-circuits the retrain (the report still names the champion), and a failing retrain
    is tried again, fails the run and alerts once, after its last try."""
    set_params(project, ingest={"source": str(sample_zip), "sha256": "", "offline_source": ""},
               airflow={"retries": 1, "retry_delay": 1, "retry_backoff": 2, "max_retry_delay": 2})
    run(["dvc", "repro"], project)  # what a deployment runs first (make run): the catalogue and champion v1

    api, api_url = serve_fake(roles=("api", "token"))
    provider, provider_url = serve_fake(roles=("provider",))
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    hook.alerts = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    commanded = tmp_path / "alerts.jsonl"
    try:
        def offer(tracks):  # what the fake Spotify finds for pop from now on, with their audio features
            api.fake.search_results['genre:"pop"'] = tracks
            provider.fake.features_provider = {t["id"]: {c: 0.4 for c in AUDIO_FEATURES if c != "duration_ms"} for t in tracks}
        offer(new_tracks(0))
        set_params(project, feed={"genres": {"pop": 'genre:"pop"'}, "provider_url": provider_url, "pages_per_genre": 6},
                   register={"min_gain": 1.0})  # the new version cannot beat the champion: not promoted
        env = {"SPOTIFY_CLIENT_ID": FAKE_ID, "SPOTIFY_CLIENT_SECRET": FAKE_SECRET, "MSR_SPOTIFY_API_URL": f"{api_url}/v1/",
               "MSR_SPOTIFY_TOKEN_URL": f"{api_url}/api/token", "MSR_SPOTIFY_CACHE": str(tmp_path / "tokens"),
               "MSR_ALERT_URL": f"http://127.0.0.1:{hook.server_address[1]}/hooks/k3y-in-path",
               "MSR_ALERT_COMMAND": f"cat >> {commanded}; echo >> {commanded}"}
        outputs = []
        remote = tmp_path / "dvc-remote"  # the team's DVC remote: the retrain pushes what it made
        run(["dvc", "remote", "add", "-d", "team", str(remote)], project)

        # 1. 60 new tracks: feed, signal, dvc repro (v2 registered, not promoted, the new model pushed), report alerts
        first = airflow("dags", "test", DAG, env=env)
        outputs.append(first.stdout + first.stderr)
        run_id, state, tasks = airflow.last_run()
        assert state == "success" and tasks == {t: ("success", 1) for t in TASKS}, (state, tasks)
        signal = airflow.xcom(run_id, "feed")
        assert (signal["retrain"], signal["added"], signal["registry"]) == (True, 60, {"latest": 1, "champion": 1}), signal
        db = sqlite3.connect(project / "mlflow.db")
        assert dict(db.execute("select alias, version from registered_model_aliases")) == {"champion": 1, "challenger": 2}
        report = airflow.xcom(run_id, "report")
        assert (report["event"], report["version"], report["champion"], report["alert_failures"]) == ("not_promoted", 2, 1, []), report
        model_md5 = next(o["md5"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["outs"]
                         if o["path"] == "data/models/recommender.pkl")
        assert (remote / "files/md5" / model_md5[:2] / model_md5[2:]).exists(), "the retrained model was not pushed to the DVC remote"
        retrained = [(r["who"], r["outcome"]) for r in map(json.loads, (project / "data/desk/audit.jsonl").read_text().splitlines())]
        assert retrained == [("airflow", "started"), ("airflow", "ok")], retrained  # through the one retrain lock
        assert len(hook.alerts) == 1, hook.alerts
        alert = hook.alerts[0]
        assert (alert["event"], alert["version"], alert["champion"], alert["dag_id"], alert["run_id"]) == ("not_promoted", 2, 1, DAG, run_id)
        assert "v2 registered but not promoted (does not beat champion v1" in alert["text"] and "retrained on +60 tracks, catalogue growth" in alert["text"], alert
        assert [json.loads(line)["event"] for line in commanded.read_text().splitlines() if line.strip()] == ["not_promoted"]
        assert "msr-loop: ALERT: msr (msr_retrain" in outputs[-1] and "k3y-in-path" not in outputs[-1]

        # 2. nothing new: the retrain is skipped, the report names the champion and alerts nobody
        second = airflow("dags", "test", DAG, env=env)
        outputs.append(second.stdout + second.stderr)
        run_id, state, tasks = airflow.last_run()
        assert state == "success" and {t: s for t, (s, _) in tasks.items()} == \
            {"feed": "success", "retrain_signal": "success", "retrain": "skipped", "report": "success"}, (state, tasks)
        report = airflow.xcom(run_id, "report")
        assert (report["event"], report["champion"], report["latest"], report["alert"]) == ("no_retrain", 1, 2, False), report
        assert "no retrain: +0 tracks, catalogue growth 0.00%" in outputs[-1] and len(hook.alerts) == 1

        # 3. new tracks again, but the retrain fails (a transform parameter out of range): tried twice (retries: 1), the run
        #    fails, the report does not run, and one alert names the task after its last try
        offer(new_tracks(60))
        set_params(project, transform={"test_size": 5})
        third = airflow("dags", "test", DAG, env=env, check=False)
        outputs.append(third.stdout + third.stderr)
        run_id, state, tasks = airflow.last_run()
        assert third.returncode != 0 and state == "failed", (third.returncode, state)
        assert tasks == {"feed": ("success", 1), "retrain_signal": ("success", 1), "retrain": ("failed", 2), "report": ("upstream_failed", 0)}, tasks
        assert len(hook.alerts) == 2, hook.alerts
        alert = hook.alerts[1]
        assert (alert["event"], alert["task_id"], alert["try_number"], alert["run_id"]) == ("task_failed", "retrain", 2, run_id), alert
        assert alert["text"].startswith(f"msr ({DAG}, {run_id}): task retrain failed after 2 tries"), alert
        assert alert["log_url"].endswith(f"/dags/{DAG}/runs/{quote(run_id)}/tasks/retrain?try_number=2") and alert["log_url"] in alert["text"]
        assert [json.loads(line)["event"] for line in commanded.read_text().splitlines() if line.strip()] == ["not_promoted", "task_failed"]
        assert dict(sqlite3.connect(project / "mlflow.db").execute("select max(version), count(*) from model_versions")) == {2: 2}

        # no Spotify secret or token in what Airflow printed (`dags test` prints the tasks' logs) nor in what the alerts carried
        for text in [*outputs, json.dumps(hook.alerts), commanded.read_text()]:
            assert FAKE_SECRET not in text and "app-token-DO-NOT-LEAK" not in text
        print(f"\nairflow dags test: retrain {first.seconds:.1f} s, short-circuit {second.seconds:.1f} s, failing retrain {third.seconds:.1f} s")
    finally:
        for srv in (api, provider, hook): srv.shutdown(); srv.server_close()


def test_team_metadata_db_on_postgresql(project, tmp_path, team_server):
    """Team mode: Airflow's metadata DB is the `airflow` database of the team's PostgreSQL (the cluster `msr-team` made for the
    session's team server; AIRFLOW__DATABASE__SQL_ALCHEMY_CONN; apache-airflow[postgres]). The DAG imports, and a run whose feed
    cannot run (this copy has no data yet) fails after its tries and alerts, the database's password unseen."""
    from urllib.parse import urlsplit
    uri = team_server.database_url("airflow")
    password = urlsplit(uri).password
    assert password and uri.startswith("postgresql+psycopg2://")
    run(["make", "airflow"], project)
    airflow = Airflow(project)
    airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = uri
    set_params(project, airflow={"retries": 0})
    commanded = tmp_path / "alerts.jsonl"
    migrated = airflow("db", "migrate")
    airflow("dags", "reserialize")
    assert "No data found" in airflow("dags", "list-import-errors").stdout
    failed = airflow("dags", "test", DAG, env={"MSR_ALERT_COMMAND": f"cat >> {commanded}"}, check=False)
    assert failed.returncode != 0 and not (project / ".airflow/airflow.db").exists()  # all in PostgreSQL
    runs = json.loads(airflow("dags", "list-runs", DAG, "-o", "json").stdout.strip().splitlines()[-1])
    assert [r["state"] for r in runs] == ["failed"], runs
    states = json.loads(airflow("tasks", "states-for-dag-run", DAG, runs[0]["run_id"], "-o", "json").stdout.strip().splitlines()[-1])
    assert {t["task_id"]: t["state"] for t in states} == {"feed": "failed", "retrain_signal": "upstream_failed",
                                                          "retrain": "upstream_failed", "report": "upstream_failed"}, states
    alert = json.loads(commanded.read_text())
    assert (alert["event"], alert["task_id"], alert["run_id"]) == ("task_failed", "feed", runs[0]["run_id"]), alert
    assert password not in failed.stdout + failed.stderr + commanded.read_text()
    print(f"\nPostgreSQL: airflow db migrate {migrated.seconds:.1f} s, a failing dags test {failed.seconds:.1f} s")
