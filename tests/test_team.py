"""Team mode: the pipeline, the registry, msr-serve and the desk against the shared MLflow server (`team_server`:
PostgreSQL, basic auth, proxied artifacts), as a promoter and as a read-only user, over real HTTP."""
from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import BIN, all_text, copy_project, free_port, run, set_params, start_server, stop_server
from msr.testing import process_memory
from test_pipeline import STAGES
from test_serve import playlist_seeds


@pytest.fixture(scope="module")
def pipeline(team_server, sample_zip, tmp_path_factory):
    "A project copy whose `dvc repro` ran on the real sample as the promoter, tracking to the team server: (project, the run)."
    project = copy_project(tmp_path_factory.mktemp("team-project") / "msr")
    set_params(project, ingest={"source": str(sample_zip), "sha256": "", "offline_source": ""})
    t0 = time.monotonic()
    done = run(["dvc", "repro"], project, env=team_server.env("promoter"))
    print(f"dvc repro against the team server: {time.monotonic() - t0:.0f} s")
    return project, done


def client(team_server, user: str, monkeypatch) -> MlflowClient:
    "MLflow's client logged in to the team server as `user` (the credentials in this process's environment for the test)."
    for k, v in team_server.env(user).items(): monkeypatch.setenv(k, v)
    return MlflowClient(team_server.url)


def http(team_server, method: str, path: str, body: dict | None = None, user: str | None = None, password: str | None = None) -> int:
    "The HTTP status of one request to the team server, with basic auth when `user` is given."
    headers = {"Content-Type": "application/json"}
    if user: headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password or team_server.passwords[user]}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(team_server.url + path, data, headers, method=method), timeout=30) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def test_pipeline_tracks_and_registers_on_the_team_server(pipeline, team_server, monkeypatch):
    project, _ = pipeline
    admin = client(team_server, "admin", monkeypatch)
    experiment = admin.get_experiment_by_name("msr")
    runs = admin.search_runs([experiment.experiment_id], max_results=100)
    stages = {r.data.tags.get("msr.stage"): r for r in runs if r.data.tags.get("msr.kind") == "stage"}
    assert set(STAGES) <= set(stages)
    assert len({stages[s].data.tags["mlflow.parentRunId"] for s in STAGES}) == 1  # one pipeline run
    assert stages["evaluate"].data.params["genre.n_estimators"] and "original/faithful/half/r_precision" in stages["evaluate"].data.metrics

    # the registry: version 1 of msr-recommender, champion, registered by the promoter
    champion = admin.get_model_version_by_alias("msr-recommender", "champion")
    assert champion.version == "1" and champion.tags["msr.promoted"] == "true"
    assert stages["register"].data.tags["msr.registered_version"] == "1"

    # artifacts went through the server's proxy into its folder; the project kept no MLflow store of its own
    assert experiment.artifact_location == f"mlflow-artifacts:/{experiment.experiment_id}"
    exp_dir = team_server.artifacts / experiment.experiment_id
    assert (exp_dir / stages["evaluate"].info.run_id / "artifacts" / "report" / "evaluate.ipynb").stat().st_size > 0
    assert (exp_dir / stages["evaluate"].info.run_id / "artifacts" / "metrics" / "recommend.json").exists()
    model_files = list(exp_dir.glob("models/m-*/artifacts/MLmodel"))
    assert model_files and list(exp_dir.glob("models/m-*/artifacts/artifacts/recommender.pkl"))
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists() and not (project / "mlruns").exists()


def test_a_reader_reads_but_cannot_move_the_champion_or_create_runs(pipeline, team_server, monkeypatch):
    reader = client(team_server, "reader", monkeypatch)
    assert reader.get_model_version_by_alias("msr-recommender", "champion").version == "1"
    experiment = reader.get_experiment_by_name("msr").experiment_id
    assert reader.search_runs([experiment], max_results=1)
    moves = {"name": "msr-recommender", "alias": "champion", "version": "1"}
    assert http(team_server, "POST", "/api/2.0/mlflow/registered-models/alias", moves, "reader") == 403
    assert http(team_server, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": experiment}, "reader") == 403
    with pytest.raises(MlflowException) as refused:
        reader.set_registered_model_alias("msr-recommender", "champion", "1")
    assert refused.value.get_http_status_code() == 403
    # no login, or a wrong password: 401, for reading too
    assert http(team_server, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=msr") == 401
    assert http(team_server, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=msr", user="reader", password="wrong-password-1") == 401
    assert http(team_server, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=msr", user="reader") == 200
    # the champion is where it was
    assert client(team_server, "admin", monkeypatch).get_model_version_by_alias("msr-recommender", "champion").version == "1"


def test_the_desk_promotes_as_a_promoter_and_says_why_not_as_a_reader(pipeline, team_server, monkeypatch):
    "A challenger (v2) registered by the register stage; the Admin tab's promotion refused for a reader, done for a promoter."
    from msr.desk import Refused, move_champion
    project, _ = pipeline
    set_params(project, register={"min_gain": 1.0})  # the new version cannot beat the champion: it stays a challenger
    again = run(["dvc", "repro"], project, env=team_server.env("promoter"))
    assert "Running stage 'register'" in again.stdout
    admin = client(team_server, "admin", monkeypatch)
    assert admin.get_model_version_by_alias("msr-recommender", "challenger").version == "2"

    client(team_server, "reader", monkeypatch)
    with pytest.raises(Refused) as refused:
        move_champion(2, by="ana", reason="better on the new songs")
    message = str(refused.value)
    assert f"the MLflow server at {team_server.url} does not allow this to 'reader' (HTTP 403)" in message
    assert "msr-team user add NAME --role promoter" in message and team_server.passwords["reader"] not in message
    assert admin.get_model_version_by_alias("msr-recommender", "champion").version == "1"

    client(team_server, "promoter", monkeypatch)
    assert move_champion(2, by="ana", reason="better on the new songs") == {"champion_before": 1, "champion": 2}
    promoted = admin.get_model_version_by_alias("msr-recommender", "champion")
    assert (promoted.version, promoted.tags["msr.promoted_by"]) == ("2", "ana")
    assert set(promoted.aliases) == {"champion", "challenger"}  # deleting an alias takes MANAGE: a promoter has EDIT


def test_a_reader_serves_the_champion(pipeline, team_server, tmp_path, monkeypatch):
    "msr-serve (what `make serve` runs) with the read-only user's login loads the champion from the team server and answers."
    project, _ = pipeline
    champion = client(team_server, "admin", monkeypatch).get_model_version_by_alias("msr-recommender", "champion").version
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MSR_"))},
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **team_server.env("reader"),
           "MSR_MONITOR_DB": str(tmp_path / "served.sqlite"), "MSR_PROJECT_DIR": str(project)}
    log = tmp_path / "serve.log"
    proc = start_server([str(BIN / "msr-serve"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], project, env,
                        f"http://127.0.0.1:{port}/ping", log)
    try:
        seeds, _ = playlist_seeds(project)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps({"dataframe_records": [{"seeds": seeds, "k": 5}]}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r: status, body = r.status, json.loads(r.read())
        assert status == 200 and len(body["predictions"]) == 5, body
        assert {p["model_version"] for p in body["predictions"]} == {f"msr-recommender v{champion}"}, body["predictions"][0]
    finally: stop_server(proc)
    text = log.read_text()
    assert f"msr-recommender v{champion}" in text
    for name, value in team_server.secrets().items(): assert value not in text, f"{name} in msr-serve's log"


def test_the_server_is_lean(team_server, capsys):
    "Two processes (the mlflow command and one uvicorn worker), well under 1 GB, with job execution off."
    server = [p for p in psutil.Process(team_server.proc.pid).children(recursive=True)]
    memory = [process_memory(p.pid) for p in server]
    rss, pss = sum(m["rss_mb"] for m in memory), sum(m["pss_mb"] for m in memory)
    with capsys.disabled():
        print(f"\nteam server: answered /health {team_server.start_seconds:.1f} s after msr-team server started; "
              f"{len(server)} processes, RSS {rss:.0f} MB, PSS {pss:.0f} MB")
    assert len(server) == 2, [p.cmdline()[:4] for p in server]
    assert rss < 1024, rss


def test_the_airflow_database_is_there(team_server):
    "The cluster also holds Airflow's metadata database, owned by a role of its own, for team mode's scheduler."
    import psycopg2
    from sqlalchemy.engine import make_url
    url = make_url(team_server.database_url("airflow"))
    with psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database) as con:
        with con.cursor() as cur:
            cur.execute("create table if not exists probe (x int)")
            cur.execute("select current_user, current_database(), rolsuper from pg_roles where rolname = current_user")
            assert cur.fetchone() == ("airflow", "airflow", False)
    con.close()


def test_a_reader_cannot_run_a_stage(pipeline, team_server):
    "msr-stage as a read-only user: the server refuses its run (403) and the stage fails saying so."
    project, _ = pipeline
    failed = run(["msr-stage", "validate"], project, check=False, env=team_server.env("reader"))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert (f"msr-stage: stage 'validate': MLflow tracking failed: the MLflow server at {team_server.url} "
            "does not allow this to 'reader' (HTTP 403)") in failed.stderr
    assert team_server.passwords["reader"] not in failed.stdout + failed.stderr


def test_no_password_in_outputs_runs_or_logs(pipeline, team_server, monkeypatch):
    "No password or key of the team server in the project's reports and metrics, in any run's params and tags, or in the logs."
    project, done = pipeline
    admin = client(team_server, "admin", monkeypatch)
    runs = admin.search_runs([admin.get_experiment_by_name("msr").experiment_id], max_results=200)
    logged = json.dumps([{**r.data.params, **r.data.tags} for r in runs])
    versions = json.dumps([v.tags for v in admin.search_model_versions("name='msr-recommender'")])
    texts = {"outputs": all_text(project), "runs' params and tags": logged, "model versions' tags": versions,
             "dvc repro's output": done.stdout + done.stderr, "the server's log": team_server.log.read_text(),
             "the artifacts": "\n".join(p.read_bytes().decode("utf-8", "replace") for p in team_server.artifacts.rglob("*")
                                        if p.is_file() and p.suffix in (".ipynb", ".json", ".txt", ".yaml", ""))}
    assert "msr-recommender" in texts["outputs"] and "POST /api/2.0/mlflow/runs/create" in texts["the server's log"]  # what is searched is there
    for name, value in team_server.secrets().items():
        for where, text in texts.items(): assert value not in text, f"{name} in {where}"
