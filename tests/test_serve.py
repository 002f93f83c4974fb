"""The registered champion over real HTTP: behind `msr-serve` (what `make serve` runs), and as a pyfunc model under `mlflow models serve`."""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
import urllib.error
import urllib.request


import pandas as pd
import pytest

from conftest import BIN, foreign_playlist, free_port, served_env, start_server, stop_server
from msr.core import AUDIO_FEATURES


@pytest.fixture(scope="module")
def server(msr_server):
    "The session's `msr-serve` (conftest): (base URL, monitoring log)."
    return msr_server.url, msr_server.db


def test_pyfunc_model_under_mlflow_models_serve(served_project, tmp_path):
    """The registered model stays an MLflow pyfunc model that `mlflow models serve` (and so `build-docker`) can run:
    its input example answers, and a bad request is refused, through MLflow's own scoring server."""
    port = free_port()
    proc = start_server([str(BIN / "mlflow"), "models", "serve", "-m", "models:/msr-recommender@champion",
                         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                        served_project, served_env(served_project, tmp_path / "served.sqlite"), f"http://127.0.0.1:{port}/ping",
                        tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        example = next((served_project / "mlartifacts").rglob("serving_input_example.json"))
        status, body = post(url, json.loads(example.read_text()))
        assert status == 200 and len(body["predictions"]) == 10, body
        seeds, _ = playlist_seeds(served_project)
        status, body = post(url, {"dataframe_records": [{"seeds": seeds, "k": 5}, {"seeds": ["0" * 22], "k": 5}]})
        assert status == 400 and "row 1: none of the 1 seed" in body["message"], body
        assert len(logged(tmp_path / "served.sqlite", at_least=1)) == 1  # the pyfunc model logs its answers itself
    finally: stop_server(proc)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict | str]:
    "POST `body` (JSON-encoded unless bytes); return (status, parsed JSON or text)."
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r: status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e: status, text = e.code, e.read().decode()
    try: return status, json.loads(text)
    except json.JSONDecodeError: return status, text


def playlist_seeds(project, n: int = 10) -> tuple[list[str], list[str]]:
    "The first `n` tracks of the sample's largest playlist, and the rest of it."
    pt = pd.read_parquet(project / "data/processed/playlist_tracks.parquet")
    biggest = pt["playlist_id"].value_counts().index[0]
    tracks = pt.loc[pt["playlist_id"] == biggest, "track_id"].tolist()
    return tracks[:n], tracks[n:]


def logged(db, at_least: int = 0, timeout: float = 10.0) -> pd.DataFrame:
    """The server's monitoring log, once it has settled: the server's writer thread appends an answer's row
    just after the answer (best effort, never in the request's way), so wait for `at_least` rows and for no
    more to arrive for 0.3 s."""
    deadline, last, stable_since = time.monotonic() + timeout, None, time.monotonic()
    empty = pd.DataFrame(columns=["id", "source", "model", "seeds", "similarity", "client"])
    while True:
        df = empty
        if db.exists():  # opened read-only: reading must not create the file the server's writer is about to make
            try:
                with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                    df = pd.read_sql_query("select * from served order by id", con)
            except (sqlite3.OperationalError, pd.errors.DatabaseError): pass  # the writer has made the file, not yet its table
        if len(df) != last: last, stable_since = len(df), time.monotonic()
        if (len(df) >= at_least and time.monotonic() - stable_since >= 0.3) or time.monotonic() > deadline: return df
        time.sleep(0.05)


def test_input_example_is_a_ready_request(server, served_project):
    url, _ = server
    example = next((served_project / "mlartifacts").rglob("serving_input_example.json"))
    status, body = post(url, json.loads(example.read_text()))
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    assert len(rows) == 10
    assert rows["rank"].tolist() == list(range(1, 11))
    assert rows["url"].str.startswith("https://open.spotify.com/track/").all()
    assert rows["track_name"].notna().all() and rows["track_artist"].notna().all()
    assert rows["reasons"].map(len).gt(0).all()
    assert set(rows["model_version"]) == {"msr-recommender v1"}
    assert "tracks" in example.read_text()  # the example shows a track record beside the seed ids


def test_playlist_queries(server, served_project):
    url, db = server
    before = len(logged(db))
    seeds, rest = playlist_seeds(served_project)
    status, body = post(url, {"dataframe_records": [{"seeds": seeds, "k": 25}, {"seeds": seeds[:2] + ["0" * 22], "k": 7}]})
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    assert rows.groupby("query").size().tolist() == [25, 7]
    first = rows[rows["query"] == 0]
    assert first["track_id"].is_unique and not set(first["track_id"]) & set(seeds)
    assert first["score"].is_monotonic_decreasing
    assert set(first["track_id"]) & set(rest), "none of the playlist's other tracks among 25 recommendations"
    log = logged(db, at_least=before + 2)
    assert len(log) == before + 2  # one row per answered query
    assert set(log["source"].iloc[-2:]) == {"rest"} and set(log["model"].iloc[-2:]) == {"msr-recommender v1"}
    assert json.loads(log["seeds"].iloc[-1]) == seeds[:2]  # the unknown id is not a seed
    assert log["similarity"].iloc[-2:].between(-1, 1).all()
    status, body = post(url, {"dataframe_records": [{"seeds": seeds}]})
    assert status == 200 and len(body["predictions"]) == 20  # k defaults to 20


BAD = [
    ({"dataframe_records": [{"k": 5}]}, 400, "give 'seeds'"),
    ({"dataframe_records": [{"seeds": ["SEED"], "k": "ten"}]}, 400, "'k' must be an integer from 1 to 500, got \"ten\""),
    ({"dataframe_records": [{"seeds": "5ZULALImTm80tzUbYQYM9d", "k": 5}]}, 400, "'seeds' must be a list"),
    ({"dataframe_records": [{"seeds": ["0" * 22, "1" * 22], "k": 5}]}, 400, "none of the 2 seed track ids is in msr's catalogue"),
    ({"dataframe_records": [{"seeds": ["SEED"], "k": 0}]}, 400, "'k' must be from 1 to 500, got 0"),
    ({"dataframe_records": [{"seeds": ["SEED"], "k": 501}]}, 400, "'k' must be from 1 to 500, got 501"),
    ({"dataframe_records": [{"seeds": ["SEED"] * 1001, "k": 5}]}, 400, "too many seeds: 1001"),
    ({"dataframe_records": [{"seeds": ["SEED"], "k": 5}] * 65}, 400, "too many queries in one request: 65"),
    ({"dataframe_records": [{"seeds": ["SEED"], "k": 5}, {"seeds": ["0" * 22], "k": 5}]}, 400, "row 1: none of the 1 seed"),
    (b'{"dataframe_records": [{"seeds": [', 400, "valid JSON"),
    ({"records": []}, 400, "exactly one of dataframe_records"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[
    "missing-seeds", "k-not-a-number", "seeds-a-string", "only-unknown-ids", "k-zero", "k-too-big", "too-many-seeds",
    "too-many-queries", "one-bad-query", "malformed-json", "unknown-format"])
def test_bad_request_names_the_problem(server, served_project, body, status, message):
    url, db = server
    seed = playlist_seeds(served_project)[0][0]
    if not isinstance(body, bytes): body = json.loads(json.dumps(body).replace("SEED", seed))
    before = len(logged(db))
    got, answer = post(url, body)
    assert got == status, answer
    assert message in (answer["message"] if isinstance(answer, dict) else answer), answer
    assert len(logged(db)) == before  # refused requests are not logged as served
    ok, _ = post(url, {"dataframe_records": [{"seeds": [seed], "k": 3}]})
    assert ok == 200  # and the server keeps serving


def test_wrong_content_type(server):
    url, _ = server
    status, answer = post(url, b"seeds=x", content_type="application/x-www-form-urlencoded")
    assert status == 415 and "send the body as application/json" in answer["message"], answer


PID, NOT_MINE, EDITORIAL, DOWN = "3cEYpjA9oz9GiPac4AsH4n", "4dEYpjA9oz9GiPac4AsH4n", "37i9dQZF1DXcBWIGoYBM5M", "5eEYpjA9oz9GiPac4AsH4n"
FOREIGN = "6fEYpjA9oz9GiPac4AsH4n"


def test_spotify_playlist_link(server, served_project, spotify_fake):
    url, db = server
    fake, _ = spotify_fake
    seeds, rest = playlist_seeds(served_project, n=12)
    fake.playlists[PID] = [{"item": {"id": t, "type": "track", "name": "x", "artists": [{"name": "y"}]}} for t in seeds] + \
                          [{"is_local": True, "item": None}, {"item": {"id": "1" * 22, "type": "track", "name": "new", "artists": []}}]
    status, body = post(url, {"dataframe_records": [{"playlist_url": f"https://open.spotify.com/playlist/{PID}?si=x", "k": 15}]})
    assert status == 200, body
    rows = pd.DataFrame(body["predictions"])
    assert len(rows) == 15 and not set(rows["track_id"]) & set(seeds)
    assert set(rows["track_id"]) & set(rest), "none of the playlist's other tracks among the recommendations"
    assert json.loads(logged(db, at_least=1)["seeds"].iloc[-1]) == seeds  # the playlist's catalogue tracks were the seeds


def test_playlist_of_only_foreign_tracks(server, served_project, spotify_fake):
    "A Spotify playlist none of whose tracks is in the catalogue: 20 recommendations with reasons (it used to be a 400)."
    url, db = server
    fake, _ = spotify_fake
    objects, rows, rest = foreign_playlist(served_project)
    fake.playlists[FOREIGN] = [{"item": t} for t in objects]
    for t, feats in zip(objects[:6], rows[AUDIO_FEATURES].head(6).to_dict("records")): fake.features_provider[t["id"]] = feats
    status, body = post(url, {"dataframe_records": [{"playlist_url": f"https://open.spotify.com/playlist/{FOREIGN}"}]})
    assert status == 200, body
    got = pd.DataFrame(body["predictions"])
    assert len(got) == 20 and got["reasons"].map(len).gt(0).all()
    assert not set(got["track_id"]) & {t["id"] for t in objects}
    assert (got["seeds_known"].iat[0], got["seeds_foreign"].iat[0], got["seeds_with_features"].iat[0]) == (0, 12, 6)
    assert got["track_artist"].isin(set(rows["track_artist"])).mean() >= 0.5, got[["track_name", "track_artist"]]
    assert any("in your playlist" in r for rs in got["reasons"] for r in rs)
    assert ("GET", "/v1/audio-features?ids=" + "%2C".join(t["id"] for t in objects)) in fake.requests  # one provider batch


def test_track_records_in_a_request(server, served_project):
    url, _ = server
    objects, rows, rest = foreign_playlist(served_project)
    records = [{"track_name": t["name"], "track_artist": ", ".join(a["name"] for a in t["artists"]),
                "track_album_release_date": t["album"]["release_date"], **{f: float(v) for f, v in feats.items()}}
               for t, feats in zip(objects, rows[["danceability", "energy", "valence", "tempo"]].to_dict("records"))]
    seeds = playlist_seeds(served_project, 14)[0][12:]  # two catalogue tracks beside the records
    status, body = post(url, {"dataframe_records": [{"seeds": seeds, "tracks": records, "k": 20}, {"seeds": [], "tracks": records[:3], "k": 5}]})
    assert status == 200, body
    got = pd.DataFrame(body["predictions"])
    assert got.groupby("query").size().tolist() == [20, 5]
    first = got[got["query"] == 0]
    assert (first["seeds_known"].iat[0], first["seeds_foreign"].iat[0], first["seeds_with_features"].iat[0]) == (2, 12, 12)
    assert not set(first["track_id"]) & set(seeds)
    assert set(first["track_id"]) & set(rest), "none of the playlist's other tracks among 20 recommendations"
    for bad, message in [([{"artist": "x"}], 'unknown field "artist"'),
                         ([{"track_name": "Lonely", "track_artist": "Nobody Anyone Knows"}], "carry nothing msr can use")]:
        status, body = post(url, {"dataframe_records": [{"tracks": bad}]})
        assert status == 400 and message in body["message"], body


@pytest.mark.parametrize("link,status,message", [
    (f"https://open.spotify.com/playlist/{NOT_MINE}", 400, "is not yours"),
    (f"spotify:playlist:{EDITORIAL}", 400, "editorial playlists"),
    ("https://open.spotify.com/track/3cEYpjA9oz9GiPac4AsH4n", 400, "is a track link"),
    (f"https://open.spotify.com/playlist/{DOWN}", 503, "try again later"),
], ids=["not-owned", "editorial", "not-a-playlist", "spotify-down"])
def test_spotify_refusals(server, spotify_fake, link, status, message):
    url, _ = server
    fake, _ = spotify_fake
    fake.playlists[NOT_MINE] = fake.playlists[DOWN] = [{"item": {"id": "2" * 22, "type": "track"}}]
    fake.not_owned.add(NOT_MINE)
    fake.failures[f"/v1/playlists/{DOWN}/items"] = [(503, {}, None)] * 20
    got, answer = post(url, {"dataframe_records": [{"playlist_url": link}]})
    assert got == status, answer
    assert message in answer["message"], answer
