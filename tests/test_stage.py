"""The stage runner: MLflow tracking of failures, and no secret in reports, MLflow or logs."""
from __future__ import annotations

import base64
import sqlite3

from conftest import all_text, run, set_params

SECRET = "tok-9f8e7d6c5b4a-do-not-log"


def test_secret_in_environment_never_logged(project, sample_zip, http_server):
    base, routes = http_server
    expected = "Basic " + base64.b64encode(f"msr:{SECRET}".encode()).decode()
    body = sample_zip.read_bytes()

    def guarded(handler):
        ok = handler.headers.get("Authorization") == expected
        handler.send_response(200 if ok else 403)
        handler.send_header("Content-Length", str(len(body) if ok else 0))
        handler.end_headers()
        if ok: handler.wfile.write(body)

    routes["/songs.zip"] = (200, {}, guarded)
    source = base.replace("http://", "http://msr:${MSR_DATA_TOKEN}@") + "/songs.zip?sig=abc"
    set_params(project, ingest={"source": source, "sha256": "", "offline_source": ""})
    env = {"MSR_DATA_TOKEN": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET}
    ok = run(["dvc", "repro", "ingest"], project, env=env)
    raw = project / "data/raw/spotify_songs.csv"
    good = raw.read_bytes()
    assert len(good) > 0
    # a wrong token fails with a clear message that does not contain the token either
    bad = run(["dvc", "repro", "--force", "ingest"], project, env={**env, "MSR_DATA_TOKEN": "x" + SECRET}, check=False)
    assert bad.returncode != 0 and "HTTP 403" in bad.stderr
    assert raw.read_bytes() == good  # the failed ingest left the good data alone
    for text in [ok.stdout, ok.stderr, bad.stdout, bad.stderr, all_text(project)]:
        assert SECRET not in text
    params = dict(sqlite3.connect(project / "mlflow.db").execute("select key, value from params where key='ingest.source'"))
    assert params["ingest.source"].startswith("http://***@127.0.0.1") and "sig=abc" not in params["ingest.source"]


def test_failed_stage_is_recorded_and_named(project, tmp_path):
    missing = tmp_path / "nowhere.zip"
    set_params(project, ingest={"source": str(missing), "offline_source": ""})
    p = run(["msr-stage", "ingest"], project, check=False)
    assert p.returncode == 1
    assert "stage 'ingest' failed: IngestError: source not found" in p.stderr and "outputs/ingest.ipynb" in p.stderr
    db = sqlite3.connect(project / "mlflow.db")
    assert db.execute("select status from runs where name='ingest'").fetchone()[0] == "FAILED"
    # the failed execution is kept as the report, with the error in it
    assert "source not found" in (project / "outputs/ingest.ipynb").read_text()
    unknown = run(["msr-stage", "nope"], project, check=False)
    assert unknown.returncode == 1 and "no stage 'nope'" in unknown.stderr


def test_failed_stage_keeps_earlier_outputs(project, sample_zip):
    "A stage that fails after writing some outputs leaves every declared output as the last good run left it."
    import nbformat
    set_params(project, ingest={"source": str(sample_zip), "sha256": "", "offline_source": ""})
    for stage in ["ingest", "validate"]: run(["msr-stage", stage, "--no_track"], project)
    outs = ["data/interim/songs.parquet", "data/interim/quarantine.csv", "outputs/validation.json",
            "outputs/validation_status.txt", "outputs/metrics/validate.json"]
    good = {p: (project / p).read_bytes() for p in outs}
    path = project / "nbs/stages/validate.ipynb"  # the real stage, with one more cell at its end
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell('from pathlib import Path\nPath("data/interim/songs.parquet").write_bytes(b"half")\n'
                                              'raise RuntimeError("failed after writing its outputs")'))
    nbformat.write(nb, path)
    (project / "outputs/validation.json").unlink()  # not there before this run: the failed run's copy goes too
    p = run(["msr-stage", "validate", "--no_track"], project, check=False)
    assert p.returncode == 1 and "failed after writing its outputs" in p.stderr and "left as they were" in p.stderr
    assert {p: (project / p).read_bytes() for p in outs if p != "outputs/validation.json"} == \
        {p: v for p, v in good.items() if p != "outputs/validation.json"}
    assert not (project / "outputs/validation.json").exists()
    assert "failed after writing its outputs" in (project / "outputs/validate.ipynb").read_text()  # the failure's report
    assert not list(project.glob(".msr-stage-*"))
