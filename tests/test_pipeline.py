"""End to end: the real `dvc repro` on a sample of the real archive, in a throwaway copy of the project."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import nbformat
import pandas as pd

from fake_spotify import CLIENT_ID as FAKE_ID, CLIENT_SECRET as FAKE_SECRET, serve as serve_fake, track as fake_track
from msr.core import AUDIO_FEATURES
from msr.desk import retrain_lock
from msr.recommend import MODEL_FORMAT
from conftest import BIN, all_text, run, set_params
from test_validate import CASES as VALIDATION_CASES

STAGES = ["ingest", "validate", "feed", "transform", "genre", "clusters", "train", "evaluate", "register"]


def ran(p) -> set[str]:
    "Stages a `dvc repro` run executed."
    return set(re.findall(r"Running stage '(\w+)'", p.stdout))


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_end_to_end(project, sample_zip, songs_csv, tmp_path):
    set_params(project, ingest={"source": str(sample_zip), "sha256": "", "offline_source": ""})
    first = run(["dvc", "repro"], project)
    assert ran(first) == set(STAGES), first.stdout

    # every stage's report is an executed notebook
    for stage in STAGES:
        nb = nbformat.read(project / "outputs" / f"{stage}.ipynb", as_version=4)
        assert nb.metadata["papermill"]["exception"] is None, stage
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), stage

    # ingest + validate: the sample arrived whole, the 5 rows without a name were quarantined
    sample = pd.read_csv(sample_zip)
    assert json.loads((project / "outputs/metrics/ingest.json").read_text())["rows"] == len(sample)
    validation = json.loads((project / "outputs/validation.json").read_text())
    assert validation["status"] is True and validation["quarantined"] == 5
    assert validation["valid_rows"] == len(sample) - 5
    assert len(pd.read_csv(project / "data/interim/quarantine.csv")) == 5
    assert (project / "outputs/validation_status.txt").read_text().strip() == "Validation status: True"

    # feed: without Spotify credentials nothing is fed, the report says why, and the pipeline goes on
    feed = json.loads((project / "outputs/metrics/feed.json").read_text())
    assert (feed["status"], feed["added"], feed["retrain"]) == ("skipped", 0, False) and "SPOTIFY_CLIENT_ID" in feed["reason"]
    assert len(pd.read_parquet(project / "data/feed/tracks.parquet")) == 0

    # transform: normalised tables, disjoint splits, queries only from valid/test playlists
    tracks = pd.read_parquet(project / "data/processed/tracks.parquet")
    pt = pd.read_parquet(project / "data/processed/playlist_tracks.parquet")
    splits = pd.read_parquet(project / "data/processed/splits.parquet")
    queries = pd.read_parquet(project / "data/processed/queries.parquet")
    assert tracks["track_id"].is_unique and set(pt["track_id"]) <= set(tracks["track_id"])
    assert not pt.duplicated(["playlist_id", "track_id"]).any()
    assert splits["playlist_id"].is_unique and set(splits["split"]) == {"train", "valid", "test"}
    q_splits = queries.merge(splits, on="playlist_id", suffixes=("", "_true"))
    assert (q_splits["split"] == q_splits["split_true"]).all() and set(queries["split"]) <= {"valid", "test"}
    assert set(queries["setting"]) == {"half", "quarter", "five"}

    # genre / clusters / evaluate: sane metrics, all models, all settings
    genre = json.loads((project / "outputs/metrics/genre.json").read_text())
    assert 0 <= genre["accuracy"] <= 1 and genre["playlists"] == (splits["split"] == "test").sum()
    clusters = json.loads((project / "outputs/metrics/clusters.json").read_text())
    assert set(clusters["genres"]) <= {"edm", "latin", "pop", "r&b", "rap", "rock"}
    table = json.loads((project / "outputs/metrics/recommend.json").read_text())
    assert set(table) == {"msr", "knn", "original", "popularity", "content", "random"}
    settings = {f"{p}/{s}" for p in ("faithful", "decoys", "leaky") for s in ("half", "quarter", "five")}
    settings |= {f"faithful/{kind}" for kind in ("foreign", "foreign_nofeat", "mixed")}
    for model in table.values():
        assert set(model) == settings
        for row in model.values():
            assert 0 <= row["r_precision"] <= 1 and 0 <= row["ndcg_at_50"] <= 1 and 0 <= row["clicks"] <= 51
        assert model["faithful/foreign"]["queries"] == model["faithful/half"]["queries"] == model["faithful/mixed"]["queries"]
        assert model["leaky/half"]["queries"] == model["decoys/half"]["queries"] >= model["faithful/half"]["queries"] > 0
    # msr's model beats the original method and random on every protocol by far, even learning from a few dozen playlists, and
    # so it does when the seeds are songs its catalogue has never seen (records; their tracks out of catalogue and training)
    for setting in ("faithful/half", "faithful/foreign", "faithful/foreign_nofeat", "faithful/mixed", "decoys/half", "leaky/half"):
        # NDCG@50: on the sample's 11 faithful queries with a few held-out tracks each, one lucky hit moves R-precision a lot
        floor = max(table["original"][setting]["ndcg_at_50"], table["random"][setting]["ndcg_at_50"], 0.01)
        assert table["msr"][setting]["ndcg_at_50"] > 2.5 * floor, (setting, table["msr"][setting], floor)
        assert table["msr"][setting]["refused"] == 0
    # the protocols say what they are: absence from the training playlists marks the answer only on the leaky one;
    # the served model's skew is measured for every model, and the peer was tuned on validation
    protocol = json.loads((project / "outputs/metrics/protocol.json").read_text())
    lift = {p: f["cold_lift"] for p, f in protocol["protocols"].items()}
    assert lift["faithful"] == 0 and lift["leaky"] > 3 * lift["decoys"], lift
    assert set(protocol["skew"]) == set(table) and all(0 <= s["ratio"] for s in protocol["skew"].values())
    assert set(protocol["tuned"]["knn"]) == {"similarity", "neighbours", "artist_weight", "album_weight"}
    assert json.loads((project / "outputs/metrics/train.json").read_text())["queries"] > 0
    for f in ["outputs/plots/evaluate.png", "outputs/plots/train_importance.png", "data/models/recommender.pkl", "outputs/plots/genre_confusion.png", "outputs/plots/clusters.png",
              "outputs/plots/recall/original.csv", "outputs/plots/genre_confusion.csv"]:
        assert (project / f).stat().st_size > 0, f
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "r_precision" in shown

    # MLflow: one run per stage, grouped under one pipeline run, with params, metrics, commit and report
    db = sqlite3.connect(project / "mlflow.db")
    runs = dict(db.execute("select name, run_uuid from runs"))
    assert set(STAGES) <= set(runs)
    parents = {db.execute("select value from tags where run_uuid=? and key='mlflow.parentRunId'", (runs[s],)).fetchone()[0]
               for s in STAGES}
    assert len(parents) == 1
    assert db.execute("select count(*) from params where run_uuid=? and key='genre.n_estimators'", (runs["evaluate"],)).fetchone()[0] == 1
    assert db.execute("select count(*) from metrics where run_uuid=? and key='original/faithful/half/r_precision'", (runs["evaluate"],)).fetchone()[0] == 1
    commit = db.execute("select value from tags where run_uuid=? and key='mlflow.source.git.commit'", (runs["ingest"],)).fetchone()[0]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert list((project / "mlartifacts").glob(f"*/{runs['evaluate']}/artifacts/report/evaluate.ipynb")) or \
        list((project / "mlartifacts").glob(f"{runs['evaluate']}/artifacts/report/evaluate.ipynb"))

    # register: the first version is the champion, loadable from the registry
    decision = json.loads((project / "outputs/register.json").read_text())
    assert decision == {"version": 1, "champion": 1, "promoted": True, "score": table["msr"]["faithful/half"]["r_precision"]}
    assert db.execute("select alias, version from registered_model_aliases where name='msr-recommender'").fetchall() == [("champion", 1)]

    # an immediate second run executes nothing
    second = run(["dvc", "repro"], project)
    assert ran(second) == set(), second.stdout

    # outputs are a function of code, params and data: re-running the stages whose runs differ most (the network
    # route, the fit's and the answers' timings, the feed) rewrites nothing, so dvc.lock and the metrics stay as committed
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first run"], project)
    again = {stage: run(["dvc", "repro", "--force", "--single-item", stage], project).stdout
             for stage in ("ingest", "feed", "train", "evaluate")}
    assert run(["git", "status", "--porcelain"], project).stdout == ""
    # how the runs went is printed (and logged to MLflow) instead: the route, the fit's time
    assert "msr-stage: ingest done" in again["ingest"] and "route=source" in again["ingest"], again["ingest"]
    assert re.search(r"msr-stage: train done in [\d.]+s, fit_seconds=[\d.]+", again["train"]), again["train"]

    # msr-repro (what .ci/run runs after make run-offline): the clean tree reproduces the commit; metrics that differ in
    # their last digits, as another CPU's do, and float outputs with other hashes pass and are reported; nothing else may change
    assert "reproduced against HEAD: 0 number(s) within tolerance" in run(["msr-repro"], project).stdout
    metrics = project / "outputs/metrics"
    clusters, table = json.loads((metrics / "clusters.json").read_text()), json.loads((metrics / "recommend.json").read_text())
    for g in clusters["genres"].values(): g["bic"] *= 1 + 1e-15
    table["msr"]["faithful/half"]["r_precision"] += 1e-13
    (metrics / "clusters.json").write_text(json.dumps(clusters))
    (metrics / "recommend.json").write_text(json.dumps(table))
    lock = (project / "dvc.lock").read_text()
    model_md5 = re.search(r"path: data/models/recommender.pkl\n\s+hash: md5\n\s+md5: (\w+)", lock).group(1)
    (project / "dvc.lock").write_text(lock.replace(model_md5, "f" * 32))
    shown = run(["msr-repro"], project).stdout
    assert "recommend.json:msr/faithful/half/r_precision" in shown and "within abs 0.01" in shown, shown
    assert f"float output's hash differs (allowed): stage train: out data/models/recommender.pkl {model_md5} -> {'f' * 32}" in shown
    run(["git", "checkout", "--", "outputs/metrics", "dvc.lock"], project)

    # a DVC remote (a local folder here): push, then a fresh clone pulls and finds nothing to re-run
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "remote"], project)
    run(["dvc", "push"], project)
    fresh = tmp_path / "fresh-clone"
    run(["git", "clone", "-q", str(project), str(fresh)], tmp_path)
    run(["dvc", "pull"], fresh)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], fresh).stdout
    assert ran(run(["dvc", "repro"], fresh)) == set()
    assert digest(fresh / "data/models/recommender.pkl") == digest(project / "data/models/recommender.pkl")

    # a real change is not a CPU's last digits: one training parameter moves msr's metrics beyond their tolerance, and
    # msr-repro fails naming each such metric with its committed and new values (and the changed params.yaml)
    set_params(fresh, train={"n_rank": 5})
    run(["dvc", "repro", "train", "evaluate"], fresh)
    failed = run(["msr-repro"], fresh, check=False)
    assert failed.returncode == 1 and "params.yaml: changed" in failed.stderr, failed.stdout + failed.stderr
    assert "stage train: the params it read changed" in failed.stderr
    assert re.search(r"recommend\.json:msr/faithful/\w+/r_precision: committed [\d.]+, now [\d.]+, more than its tolerance abs 0\.01",
                     failed.stderr), failed.stderr

    # one changed parameter re-runs the stages that read it, nothing else: silhouette_sample is the clusters stage's
    # alone (the models' clusters arguments, which evaluate reads too, would also move the baselines' figures and so
    # register a new version)
    set_params(project, clusters={"silhouette_sample": 2000})
    third = run(["dvc", "repro"], project)
    assert ran(third) == {"clusters"}, third.stdout

    # a new version that does not beat the champion by register.min_gain is registered, tagged challenger,
    # and the champion stays (only the register stage re-runs)
    set_params(project, register={"min_gain": 1.0})
    fourth = run(["dvc", "repro"], project)
    assert ran(fourth) == {"register"}, fourth.stdout
    decision = json.loads((project / "outputs/register.json").read_text())
    assert (decision["version"], decision["champion"], decision["promoted"]) == (2, 1, False)
    aliases = dict(sqlite3.connect(project / "mlflow.db").execute("select alias, version from registered_model_aliases"))
    assert aliases == {"champion": 1, "challenger": 2}
    tags = dict(sqlite3.connect(project / "mlflow.db").execute(
        "select key, value from model_version_tags where name='msr-recommender' and version=1"))
    assert tags["msr.model_format"] == str(MODEL_FORMAT)

    # a champion saved in a model format this msr cannot load is replaced by the next version, whatever the scores
    with sqlite3.connect(project / "mlflow.db") as con:
        con.execute("update model_version_tags set value='1' where name='msr-recommender' and version=1 and key='msr.model_format'")
    run(["dvc", "repro", "--single-item", "--force", "register"], project)
    decision = json.loads((project / "outputs/register.json").read_text())
    assert (decision["version"], decision["champion"], decision["promoted"]) == (3, 3, True), decision
    set_params(project, register={"min_gain": 0.0})

    # the feed loop: msr-feed --retrain against a fake Spotify and features provider grows the catalogue past the
    # threshold and retrains; no Spotify secret or token in reports, MLflow or output
    api, api_url = serve_fake(roles=("api", "token"))
    provider, provider_url = serve_fake(roles=("provider",))
    try:
        new_tracks = [fake_track(10**6 + i, duration_ms=180000, album={"id": "al", "name": "Al", "release_date": "2026-03-01"})
                      for i in range(60)]
        api.fake.search_results['genre:"pop"'] = new_tracks
        provider.fake.features_provider = {t["id"]: {c: 0.4 for c in AUDIO_FEATURES if c != "duration_ms"} for t in new_tracks}
        set_params(project, feed={"genres": {"pop": 'genre:"pop"'}, "provider_url": provider_url, "pages_per_genre": 6})
        env = {"SPOTIFY_CLIENT_ID": FAKE_ID, "SPOTIFY_CLIENT_SECRET": FAKE_SECRET, "MSR_SPOTIFY_API_URL": f"{api_url}/v1/",
               "MSR_SPOTIFY_TOKEN_URL": f"{api_url}/api/token", "MSR_SPOTIFY_CACHE": str(tmp_path / "tokens")}
        fed = run(["msr-feed", "--retrain"], project, env=env)
        assert "msr-feed: fed: +60 tracks" in fed.stdout and "retraining" in fed.stdout, fed.stdout
        feed = json.loads((project / "outputs/metrics/feed.json").read_text())
        assert (feed["added"], feed["requests"], feed["retrain"]) == (60, 6, True)
        assert json.loads((project / "outputs/metrics/transform.json").read_text())["fed_tracks"] == 60
        assert set(t["id"] for t in new_tracks) <= set(pd.read_parquet(project / "data/processed/tracks.parquet")["track_id"])
        decision = json.loads((project / "outputs/register.json").read_text())
        assert decision["version"] == 4  # retrained and registered; promoted only if it beat the champion
        for text in [fed.stdout, fed.stderr, all_text(project)]:
            assert FAKE_SECRET not in text and "app-token-DO-NOT-LEAK" not in text
        again = run(["msr-feed", "--retrain"], project, env=env)  # the same answers: nothing added, no retraining
        assert "+0 tracks" in again.stdout and "retraining" not in again.stdout

        # new tracks while another retrain holds the one retrain lock (the desk's, the DAG's): fed, but no second retrain
        more = [fake_track(10**6 + i, duration_ms=180000) for i in range(60, 120)]
        api.fake.search_results['genre:"pop"'] = more
        provider.fake.features_provider = {t["id"]: {c: 0.4 for c in AUDIO_FEATURES if c != "duration_ms"} for t in more}
        with retrain_lock(project) as held:
            assert held
            busy = run(["msr-feed", "--retrain"], project, env=env, check=False)
        assert busy.returncode == 3 and "msr-feed: fed: +60 tracks" in busy.stdout, busy.stdout + busy.stderr
        assert "msr-retrain: a retrain is already running" in busy.stderr, busy.stderr
        assert json.loads((project / "outputs/register.json").read_text())["version"] == 4
    finally:
        for srv in (api, provider): srv.shutdown(); srv.server_close()

    # bad input to ingest: clear error, the good raw data and everything after it unchanged
    raw, songs_out = project / "data/raw/spotify_songs.csv", project / "data/interim/songs.parquet"
    good = {p: digest(p) for p in [raw, songs_out, project / "data/interim/quarantine.csv"]}
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(sample_zip.read_bytes()[:5000])
    set_params(project, ingest={"source": str(corrupt)})
    bad = run(["dvc", "repro"], project, check=False)
    assert bad.returncode != 0 and "corrupt zip" in bad.stderr + bad.stdout
    assert {p: digest(p) for p in good} == good

    # every hard validation failure, as a whole `dvc repro`: the new archive is refused before it replaces anything,
    # the failure is named, and the raw and validated data come out byte-identical
    rows = pd.read_csv(sample_zip)
    validation_before = (project / "outputs/validation.json").read_text()
    for case, (corrupt, words) in VALIDATION_CASES.items():
        bad_csv = tmp_path / "bad.csv"
        corrupt(rows.copy()).to_csv(bad_csv, index=False)
        set_params(project, ingest={"source": bad_csv.as_uri()})
        failed = run(["dvc", "repro"], project, check=False)
        out = failed.stderr + failed.stdout
        assert failed.returncode != 0 and "validation failed" in out and "is unchanged" in out, (case, out[-2000:])
        for word in words: assert word in out, (case, word)
        assert {p: digest(p) for p in good} == good, case
        assert (project / "outputs/validation.json").read_text() == validation_before, case

    # a train stage that fails, or is killed, leaves the last good model and tables where msr-serve and the dashboard read
    # them (issue 21, item 10): DVC keeps persisted outputs in place while a stage runs, and each is replaced whole or not at all
    kept = {p: digest(p) for p in [project / "data/models/recommender.pkl", *(project / "data/processed").glob("*.parquet")]}
    set_params(project, train={"ltr_folds": 0})  # the model refuses it, after the stage has started
    failed = run(["dvc", "repro", "--single-item", "train"], project, check=False)
    assert failed.returncode != 0 and {p: digest(p) for p in kept} == kept, failed.stdout[-2000:] + failed.stderr[-2000:]
    set_params(project, train={"ltr_folds": 4})
    killed = subprocess.Popen(["dvc", "repro", "--single-item", "--force", "train"], cwd=project, env=os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(8)  # in the middle of the stage
    os.killpg(killed.pid, signal.SIGKILL); killed.wait()
    assert {p: digest(p) for p in kept} == kept
