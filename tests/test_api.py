"""msr-serve as a clumsy or hostile client meets it: exact checks, refusals, limits, keys, log faults and load, over real HTTP."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, free_port, served_env, start_server, stop_server
from test_serve import PID, logged, playlist_seeds

LONG_ID = "0" * 22  # a well-formed id msr does not know


def call(url: str, method: str = "POST", path: str = "/invocations", body=None, headers: dict | None = None,
         content_type: str | None = "application/json", timeout: float = 60) -> tuple[int, dict, object]:
    """(status, headers, JSON or text) of one request made with http.client, which sends exactly the headers given
    (no default Content-Type, unlike urllib)."""
    host, port = url.split("//")[1].split(":")
    con = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    h = {**({"Content-Type": content_type} if content_type and data is not None else {}), **(headers or {})}
    try:
        con.request(method, path, body=data, headers=h)
        r = con.getresponse()
        text = r.read().decode("utf-8", "replace")
        try: parsed = json.loads(text)
        except json.JSONDecodeError: parsed = text
        return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed
    finally: con.close()


def assert_refusal(status: int, body, expected: int, code: str | None = None, contains: str | None = None):
    "A refusal as msr-serve gives them: one JSON object with error_code and a short message, no trace, no path."
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error_code", "message"}, body
    if code: assert body["error_code"] == code, body
    if contains: assert contains in body["message"], body
    assert len(body["message"]) <= 400, len(body["message"])
    for leak in ("Traceback", ".py", "/work", "/tmp", "Failed to predict", "DataFrame"):
        assert leak not in body["message"], body


def still_serving(url: str, seeds: list):
    status, _, body = call(url, body={"dataframe_records": [{"seeds": seeds[:3], "k": 2}]})
    assert status == 200 and len(body["predictions"]) == 2, body


@pytest.fixture(scope="module")
def seeds(served_project) -> list:
    return playlist_seeds(served_project)[0]


EXACT = [  # the inputs MLflow's DataFrame conversion used to change before msr saw them
    ({"seeds": [None, "SEED"]}, "'seeds[0]' must be a 22-character Spotify track id, got null"),
    ({"seeds": ["SEED", 5]}, "'seeds[1]' must be a 22-character Spotify track id, got 5"),
    ({"seeds": ["SEED", True]}, "got true"),
    ({"seeds": ["SEED"], "k": 10.5}, "'k' must be an integer from 1 to 500, got 10.5"),
    ({"seeds": ["SEED"], "k": True}, "got true"),
    ({"seeds": ["SEED"], "k": "10"}, 'got "10"'),
    ({"seeds": ["SEED"], "k": 2**63}, "got 9223372036854775808"),
    ({"seeds": ["SEED"], "k": -1}, "from 1 to 500, got -1"),
    ({"seeds": ["SEED"], "genre": "pop"}, 'unknown field "genre"'),
    ({"seeds": ["x" * 600_000]}, "(600002 characters)"),
]


@pytest.mark.parametrize("row,message", EXACT, ids=["null-seed", "int-seed", "bool-seed", "k-float", "k-bool", "k-string",
                                                      "k-2^63", "k-negative", "unknown-field", "huge-seed"])
def test_exact_checks(msr_server, seeds, row, message):
    before = len(logged(msr_server.db))
    row = json.loads(json.dumps(row).replace("SEED", seeds[0]))
    status, _, body = call(msr_server.url, body={"dataframe_records": [row]})
    assert_refusal(status, body, 400, "BAD_REQUEST", message)
    assert len(logged(msr_server.db)) == before  # a refusal is not an answer
    still_serving(msr_server.url, seeds)


def test_rows_mix_seeds_only_and_link_only(msr_server, seeds, spotify_fake):
    "README says 'seeds and/or playlist_url': one row of seeds, another with only a link, in every MLflow format."
    fake, _ = spotify_fake
    fake.playlists[PID] = [{"item": {"id": t, "type": "track", "name": "x", "artists": [{"name": "y"}]}} for t in seeds]
    link = f"https://open.spotify.com/playlist/{PID}"
    for body in ({"dataframe_records": [{"seeds": seeds[:4], "k": 3}, {"playlist_url": link, "k": 4}]},
                 {"dataframe_split": {"columns": ["seeds", "playlist_url", "k"], "data": [[seeds[:4], None, 3], [None, link, 4]]}},
                 {"inputs": [{"seeds": seeds[:4], "k": 3}, {"playlist_url": link, "k": 4}]}):
        status, _, got = call(msr_server.url, body=body)
        assert status == 200, got
        assert [p["query"] for p in got["predictions"]] == [0] * 3 + [1] * 4


def test_http_refusals(msr_server, seeds):
    url = msr_server.url
    status, _, body = call(url, body={"dataframe_records": [{"seeds": seeds}]}, content_type=None)
    assert_refusal(status, body, 415, "UNSUPPORTED_MEDIA_TYPE", "no Content-Type")
    status, _, body = call(url, body=b"seeds=x", content_type="text/csv")
    assert_refusal(status, body, 415, "UNSUPPORTED_MEDIA_TYPE", '"text/csv"')
    status, _, body = call(url, body=b"[" * 1000 + b"]" * 1000)
    assert_refusal(status, body, 400, "BAD_REQUEST", "nested too deeply")
    status, _, body = call(url, body=b'{"dataframe_records": [' + b"x" * 50_000_000)
    assert_refusal(status, body, 413, "REQUEST_TOO_LARGE", "at most 1048576")  # refused by its length, not echoed
    status, _, body = call(url, body={"dataframe_records": [{"seeds": ["x" * 10_000_000]}]})
    assert_refusal(status, body, 413, "REQUEST_TOO_LARGE")
    for path in ("/docs", "/redoc", "/openapi.json", "/version"):
        status, _, body = call(url, "GET", path)
        assert_refusal(status, body, 404, "NOT_FOUND")
    status, headers, body = call(url, "GET", "/invocations")
    assert_refusal(status, body, 405, "METHOD_NOT_ALLOWED")
    assert headers["allow"] == "POST"
    status, _, body = call(url, "GET", "/health", headers={"Host": "evil.example.com"})
    assert_refusal(status, body, 400, "UNKNOWN_HOST", "evil.example.com")
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # not HTTP at all
        s.sendall(b"HELLO THERE\r\n\r\n")
        answer = s.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 400") and '"error_code": "BAD_REQUEST"' in answer, answer
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:  # smuggling (issue 21 item 8)
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096): answer += chunk  # until msr-serve closes the connection
    assert answer.startswith(b"HTTP/1.1 400") and b"both Content-Length and Transfer-Encoding" in answer, answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the pipelined request is not answered: the connection was closed
    still_serving(url, seeds)


def rss_mb(pid: int) -> float:
    "Resident memory of a process (MB)."
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_big_bodies_cost_no_memory(msr_server, seeds):
    "4 concurrent 50 MB bodies and a million seeds are refused by their length, read and thrown away, not held."
    before = rss_mb(msr_server.proc.pid)
    big = b'{"dataframe_records": [{"seeds": [' + b'"' + b"a" * 50_000_000 + b'"]}]}'
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: call(msr_server.url, body=big), range(4)))
    for status, _, body in results: assert_refusal(status, body, 413, "REQUEST_TOO_LARGE")
    million = json.dumps({"dataframe_records": [{"seeds": [LONG_ID] * 1_000_000}]}).encode()
    t0 = time.monotonic()
    status, _, body = call(msr_server.url, body=million)
    assert_refusal(status, body, 413, "REQUEST_TOO_LARGE")
    assert time.monotonic() - t0 < 10
    grew = rss_mb(msr_server.proc.pid) - before
    print(f"front process memory: {before:.0f} MB before, +{grew:.1f} MB after 4 x 50 MB bodies and a 26 MB one")
    assert grew < 50, grew
    still_serving(msr_server.url, seeds)


def test_health_reports_model_and_log(msr_server, seeds):
    still_serving(msr_server.url, seeds)
    logged(msr_server.db, at_least=1)
    status, _, body = call(msr_server.url, "GET", "/health")
    assert status == 200 and body["status"] == "ok", body
    assert body["model_version"] == "msr-recommender v1"
    assert body["log"]["state"] == "ok" and body["log"]["dropped"] == 0 and body["log"]["written"] >= 1, body
    assert "path" not in body["log"]


def test_concurrent_load_answers_all_and_logs_each(msr_server, served_project):
    "8 keep-alive clients, 30 requests each: no error, and exactly one log row per answer delivered."
    import pandas as pd
    pt = pd.read_parquet(served_project / "data/processed/playlist_tracks.parquet")
    queries = [g["track_id"].tolist()[: max(1, len(g) // 2)][:50] for _, g in pt.groupby("playlist_id")][:40]
    before = len(logged(msr_server.db))
    host, port = msr_server.url.split("//")[1].split(":")

    def client(i: int) -> list:
        con, statuses = http.client.HTTPConnection(host, int(port), timeout=60), []
        for j in range(30):
            con.request("POST", "/invocations", json.dumps({"dataframe_records": [{"seeds": queries[(i * 30 + j) % len(queries)], "k": 20}]}),
                        {"Content-Type": "application/json"})
            r = con.getresponse(); r.read(); statuses.append(r.status)
        con.close()
        return statuses

    with ThreadPoolExecutor(8) as pool: statuses = [s for got in pool.map(client, range(8)) for s in got]
    assert statuses == [200] * 240
    assert len(logged(msr_server.db, at_least=before + 240)) == before + 240


def faults_allowed() -> bool:
    return os.geteuid() != 0 or shutil.which("chattr") is not None


@pytest.fixture()
def log_fault(msr_server, seeds):
    "Yields a function that sends n requests and checks every one is answered; afterwards checks the log recovered."
    def answered(n: int = 5):
        for _ in range(n): still_serving(msr_server.url, seeds)
    yield answered
    answered(3)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = call(msr_server.url, "GET", "/health")[2]
        if body["log"]["state"] == "ok" and body["log"]["queued"] == 0: break
        time.sleep(0.2)
    assert body["log"]["state"] == "ok", body  # the log recovered by itself
    before = len(logged(msr_server.db))
    answered(2)
    assert len(logged(msr_server.db, at_least=before + 2)) == before + 2  # and records again


def degraded(url: str, dropped_before: int, timeout: float = 25) -> dict:
    "The health answer once the log says degraded and counts more dropped rows."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = call(url, "GET", "/health")[2]
        if body["status"] == "degraded" and body["log"]["dropped"] > dropped_before: return body
        time.sleep(0.2)
    raise AssertionError(f"the health endpoint never said degraded: {body}")


def test_locked_log(msr_server, log_fault):
    dropped = call(msr_server.url, "GET", "/health")[2]["log"]["dropped"]
    con = sqlite3.connect(msr_server.db, timeout=1)
    con.execute("begin exclusive")
    try:
        t0 = time.monotonic()
        log_fault(5)
        assert time.monotonic() - t0 < 5  # answers do not wait for the locked log
        body = degraded(msr_server.url, dropped)
        assert "locked" in body["log"]["reason"], body
    finally: con.rollback(); con.close()
    assert "monitoring log" in msr_server.log.read_text()  # the server log says why


def test_read_only_log(msr_server, log_fault):
    files = [p for p in msr_server.db.parent.iterdir() if p.name.startswith(msr_server.db.name)]
    dropped = call(msr_server.url, "GET", "/health")[2]["log"]["dropped"]
    root = os.geteuid() == 0  # root writes files whatever their mode: make them immutable instead
    if root and shutil.which("chattr") is None: pytest.skip("running as root without chattr: a file cannot be made read-only")
    for p in files: subprocess.run(["chattr", "+i", str(p)], check=True) if root else p.chmod(0o444)
    try:
        log_fault(5)
        degraded(msr_server.url, dropped)
    finally:
        for p in files: subprocess.run(["chattr", "-i", str(p)], check=True) if root else p.chmod(0o644)


def test_log_file_deleted(msr_server, log_fault):
    "A deleted log file is made again: nothing is written into the unlinked one and lost."
    before = len(logged(msr_server.db))
    for p in list(msr_server.db.parent.iterdir()): p.unlink()
    log_fault(4)
    assert len(logged(msr_server.db, at_least=4)) == 4, before  # the new file holds every answer since


def test_log_folder_deleted_and_blocked(msr_server, log_fault):
    "The folder deleted is made again; while a file stands where the folder was, rows are dropped (counted); then it recovers."
    folder = msr_server.db.parent
    dropped = call(msr_server.url, "GET", "/health")[2]["log"]["dropped"]
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    try:
        log_fault(5)
        body = degraded(msr_server.url, dropped)
        assert body["log"]["reason"], body
    finally: folder.unlink()


@pytest.fixture(scope="module")
def strict_server(served_project, tmp_path_factory):
    """A second msr-serve over the same champion with tight limits (1 s header/body deadlines, 2 requests/s, burst 3)
    and an API key configured, so keys are required even on loopback: (url, key, project)."""
    from msr.api import ApiKeys
    root = tmp_path_factory.mktemp("strict")
    shutil.copy2(served_project / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((served_project / "params.yaml").read_text())
    params["serve"].update(header_timeout=1, body_timeout=1, rate=2, burst=3, workers=1, max_connections=1005)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    key = ApiKeys(root / params["serve"]["api_keys"]).add("tester")
    port = free_port()
    env = {**served_env(served_project, root / "served.sqlite"), "MSR_PROJECT_DIR": str(root)}
    proc = start_server([str(BIN / "msr-serve"), "--port", str(port)], root, env, f"tcp://127.0.0.1:{port}", root / "server.log")
    try: yield f"http://127.0.0.1:{port}", key, root
    finally: stop_server(proc)


def test_api_keys_and_rate_limit(strict_server, seeds):
    url, key, _ = strict_server
    status, headers, body = call(url, body={"dataframe_records": [{"seeds": seeds}]})
    assert_refusal(status, body, 401, "UNAUTHENTICATED", "msr-keys")
    assert headers["www-authenticate"] == "Bearer"
    assert_refusal(*call(url, body={"dataframe_records": [{"seeds": seeds}]}, headers={"Authorization": "Bearer msr_wrong"})[::2], 401)
    assert call(url, "GET", "/ping")[0] == 200  # liveness needs no key
    time.sleep(1.6)  # a full bucket
    got = [call(url, body={"dataframe_records": [{"seeds": seeds, "k": 2}]}, headers={"X-API-Key": key}) for _ in range(5)]
    assert [s for s, _, _ in got[:3]] == [200] * 3, got
    status, headers, body = got[-1]
    assert_refusal(status, body, 429, "RATE_LIMITED")
    assert 1 <= int(headers["retry-after"]) <= 2
    time.sleep(int(headers["retry-after"]))
    assert call(url, body={"dataframe_records": [{"seeds": seeds, "k": 2}]}, headers={"Authorization": f"Bearer {key}"})[0] == 200
    log = logged(strict_server[2] / "served.sqlite", at_least=4)
    assert log["client"].tolist() == ["key:tester"] * 4  # answers are logged under the key's name


def test_slow_clients_get_408(strict_server):
    "1,000 connections that never finish their headers, and one that never finishes its body, are answered 408 and closed; connections past the cap get 503 at once."
    url, key, _ = strict_server
    port = int(url.rsplit(":", 1)[1])
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
    for s in slow: s.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
    body_late = socket.create_connection(("127.0.0.1", port))
    body_late.sendall(f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100\r\n\r\n{\"data".encode())
    time.sleep(0.3)
    assert call(url, "GET", "/ping")[0] == 200  # others are served meanwhile
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]  # past max_connections (1005)
    refused = []
    for s in extra:
        s.settimeout(5)
        refused.append(s.recv(4096)); s.close()
    assert sum(r.startswith(b"HTTP/1.1 503") and b'"BUSY"' in r for r in refused) >= 5, refused
    for s in slow + [body_late]:
        s.settimeout(5)
        answer = b""
        while chunk := s.recv(4096): answer += chunk  # until the server closes
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"REQUEST_TIMEOUT"' in answer
        s.close()


def test_off_loopback_needs_api_keys(served_project, tmp_path):
    "Bound beyond loopback with no API key, msr-serve refuses to start (before binding anything) and says how to make one."
    root = tmp_path / "open"
    root.mkdir()
    for f in ("dvc.yaml", "params.yaml"): shutil.copy2(served_project / f, root / f)
    env = {**served_env(served_project, tmp_path / "served.sqlite"), "MSR_PROJECT_DIR": str(root)}
    p = subprocess.run([str(BIN / "msr-serve"), "--host", "0.0.0.0", "--port", str(free_port())], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "msr-keys add NAME" in p.stderr, p.stderr
    key = subprocess.run([str(BIN / "msr-keys"), "add", "ops"], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert key.startswith("msr_") and key not in (root / "data/serve/api_keys.json").read_text()
    listed = subprocess.run([str(BIN / "msr-keys"), "list"], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert listed.startswith("ops\tcreated ")
    p = subprocess.run([str(BIN / "msr-serve"), "--host", "0.0.0.0", "--port", str(free_port())], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "allowed_hosts" in p.stderr, p.stderr  # every address also needs the names clients use
    os.chmod(root / "data/serve/api_keys.json", 0o666)  # others could add their own key (issue 21, item 3)
    p = subprocess.run([str(BIN / "msr-serve"), "--port", str(free_port())], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "can be written by other users" in p.stderr and "chmod 600" in p.stderr, p.stderr
    p = subprocess.run([str(BIN / "msr-keys"), "add", "eve"], cwd=root, env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "can be written by other users" in p.stderr, p.stderr
    assert "eve" not in (root / "data/serve/api_keys.json").read_text()


def test_make_dashboard_beside_a_keyed_service(strict_server, tmp_path):
    """README's path: `make dashboard` with MSR_API_URL and MSR_API_KEY beside a keyed msr-serve. Its health probe sends
    the key (before, it sent none, got 401 and stopped with "no REST service answers"); without a key it stops at once,
    saying the service refuses it, and never starts a second service on the first one's port."""
    url, key, _ = strict_server
    port, token = free_port(), "dashboard-test-token"
    env = {k: v for k, v in os.environ.items() if k != "MSR_API_KEY"}
    env.update(MSR_API_URL=url, MSR_DASHBOARD_TOKEN=token)
    make = ["make", "--no-print-directory", "dashboard", f"DASHBOARD_PORT={port}"]
    p = subprocess.run(make, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and f"the REST service at {url} refuses requests without a key" in p.stdout, p.stdout + p.stderr
    assert "set MSR_API_KEY" in p.stdout and "starting one" not in p.stdout
    proc = start_server(make, ROOT, {**env, "MSR_API_KEY": key}, f"tcp://127.0.0.1:{port}", tmp_path / "dashboard.log")
    try:
        status, headers, _ = call(f"http://127.0.0.1:{port}", "GET", f"/?token={token}", timeout=120)
        assert status == 200 or (status == 302 and "login" not in headers["location"]), (status, headers)  # the token is taken
        status, headers, _ = call(f"http://127.0.0.1:{port}", "GET", "/", timeout=120)
        assert status == 302 and "/login" in headers["location"], (status, headers)  # and needed
        log = (tmp_path / "dashboard.log").read_text()
        assert f"msr dashboard: http://127.0.0.1:{port}/?token=" in log and key not in log, log[-2000:]
    finally: stop_server(proc)


def test_spotify_storm_does_not_starve_seeds(msr_server, seeds, spotify_fake):
    """Spotify answers 429 (Retry-After 4 s) to every playlist read: 16 link requests at once end within the Spotify wait
    (10 s) with 503 and a Retry-After, while plain seeds requests sent meanwhile are answered at once."""
    fake, _ = spotify_fake
    storm = "7gEYpjA9oz9GiPac4AsH4n"
    fake.playlists[storm] = [{"item": {"id": t, "type": "track", "name": "x", "artists": [{"name": "y"}]}} for t in seeds]
    fake.failures[f"/v1/playlists/{storm}/items"] = [(429, {"Retry-After": "4"}, None)] * 200
    before = len(logged(msr_server.db))
    link = {"dataframe_records": [{"playlist_url": f"https://open.spotify.com/playlist/{storm}"}]}
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        storming = [pool.submit(call, msr_server.url, body=link) for _ in range(16)]
        time.sleep(0.5)
        plain = []
        for _ in range(10):
            t = time.monotonic()
            status, _, body = call(msr_server.url, body={"dataframe_records": [{"seeds": seeds, "k": 5}]})
            plain.append((status, time.monotonic() - t))
        results = [f.result() for f in storming]
    took = time.monotonic() - t0
    fake.failures.pop(f"/v1/playlists/{storm}/items", None)
    assert all(s == 200 for s, _ in plain) and max(t for _, t in plain) < 2.0, plain
    for status, headers, body in results:
        assert_refusal(status, body, 503)
        assert int(headers["retry-after"]) >= 1
    assert sum(body["error_code"] == "BUSY" for _, _, body in results) >= 12  # 4 imports at a time; the rest told at once
    assert took < 10 + 4, took
    assert len(logged(msr_server.db, at_least=before + 10)) == before + 10  # the 503s were not answers


def test_client_that_left_is_not_logged(msr_server, seeds, spotify_fake):
    "A client that gives up before its answer is ready (Spotify slow for 2 s) gets nothing, and nothing is logged as served."
    fake, _ = spotify_fake
    slow = "8hEYpjA9oz9GiPac4AsH4n"
    fake.playlists[slow] = [{"item": {"id": t, "type": "track", "name": "x", "artists": [{"name": "y"}]}} for t in seeds]
    link = {"dataframe_records": [{"playlist_url": f"https://open.spotify.com/playlist/{slow}"}]}
    fake.fail(f"/v1/playlists/{slow}/items", ("sleep", 2))
    before = len(logged(msr_server.db))
    with pytest.raises(TimeoutError): call(msr_server.url, body=link, timeout=0.5)  # the client hangs up after 0.5 s
    time.sleep(2.5)  # the import ends, the answer is made, and there is nobody to give it to
    assert len(logged(msr_server.db)) == before
    fake.fail(f"/v1/playlists/{slow}/items", ("sleep", 1))
    status, _, body = call(msr_server.url, body=link)  # the same request, waited for: answered and logged
    assert status == 200, body
    assert len(logged(msr_server.db, at_least=before + 1)) == before + 1


def test_a_new_champion_is_served_without_a_restart(served_project, tmp_path):
    """The register stage (or an admin) moves the champion alias: msr-serve, looking every second here
    (serve.reload_interval), loads the new version beside the old one and answers with it, with no restart."""
    root = tmp_path / "project"
    for d in ("data/processed", "data/models"): shutil.copytree(served_project / d, root / d)
    for f in ("dvc.yaml", "mlflow.db"): shutil.copy2(served_project / f, root / f)  # a registry of its own (v1 champion)
    params = yaml.safe_load((served_project / "params.yaml").read_text())
    params["serve"].update(reload_interval=1, workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**served_env(served_project, tmp_path / "served.sqlite"), "MSR_PROJECT_DIR": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    port = free_port()
    proc = start_server([str(BIN / "msr-serve"), "--port", str(port)], root, env, f"tcp://127.0.0.1:{port}", tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        assert call(url, "GET", "/health")[2]["model_version"] == "msr-recommender v1"
        (root / "outputs/metrics").mkdir(parents=True)
        (root / "outputs/metrics/recommend.json").write_text('{"msr": {"faithful/half": {"r_precision": 0.5}}}')  # beats v1's 0.25
        subprocess.run([str(BIN / "python"), "-c", "from msr.core import load_params; from msr.registry import register; "
                        "print(register(**load_params(section='register'), split='test')['promoted'])"],
                       cwd=root, env={**env, "MSR_MONITOR_DB": "off"}, check=True, capture_output=True, text=True)
        deadline = time.monotonic() + 90
        while call(url, "GET", "/health")[2]["model_version"] != "msr-recommender v2":
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        status, _, body = call(url, body={"dataframe_records": [{"seeds": playlist_seeds(served_project)[0], "k": 3}]})
        assert status == 200 and {p["model_version"] for p in body["predictions"]} == {"msr-recommender v2"}, body
        assert "now serving msr-recommender v2" in (tmp_path / "server.log").read_text()
    finally: stop_server(proc)


def test_a_dead_model_process_is_replaced_once_in_the_background(served_project, tmp_path):
    """`kill -9` of one of two model processes with eight clients asking (issue 21, items 1 and 2): msr-serve starts new
    model processes once, in the background, so /ping answers throughout; requests meanwhile get 503 with Retry-After
    (never 500); then it answers again. If the model cannot be loaded at that moment (its file pulled away), it keeps
    trying and answers again by itself once the file is back."""
    import psutil
    root = tmp_path / "project"
    for d in ("data/processed", "data/models"): shutil.copytree(served_project / d, root / d)
    for f in ("dvc.yaml", "params.yaml"): shutil.copy2(served_project / f, root / f)
    env = {**served_env(served_project, tmp_path / "served.sqlite"), "MSR_PROJECT_DIR": str(root)}
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server([str(BIN / "msr-serve"), "--port", str(port), "--workers", "2", "--rate", "0", "--model", "local"], root, env,
                        f"http://127.0.0.1:{port}/ping", log)
    url, body = f"http://127.0.0.1:{port}", {"dataframe_records": [{"seeds": playlist_seeds(served_project)[0], "k": 10}]}

    def model_processes():
        return [c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]

    def answered_again(within: float):
        deadline = time.monotonic() + within
        while (status := call(url, body=body)[0]) != 200:
            assert status == 503 and time.monotonic() < deadline, (status, log.read_text()[-3000:])
            time.sleep(0.5)

    try:
        assert call(url, body=body)[0] == 200 and len(model_processes()) == 2
        with ThreadPoolExecutor(8) as clients:
            asking = [clients.submit(lambda: [call(url, body=body)[:2] for _ in range(6)]) for _ in range(8)]
            time.sleep(0.3)
            model_processes()[0].kill()
            while not all(f.done() for f in asking):  # the front is never blocked by the restart
                assert call(url, "GET", "/ping", timeout=5)[0] == 200
                time.sleep(0.2)
            answers = [a for f in asking for a in f.result()]
        assert {s for s, _ in answers} <= {200, 503} and any(s == 503 for s, _ in answers), answers
        assert all(h.get("retry-after") for s, h in answers if s == 503)
        answered_again(within=120)
        assert log.read_text().count("starting new model processes") == 1, log.read_text()[-3000:]
        assert call(url, "GET", "/health")[0] == 200

        model = root / "data/models/recommender.pkl"
        model.rename(tmp_path / "away.pkl")  # the next model processes cannot load it
        model_processes()[0].kill()
        deadline = time.monotonic() + 60
        while "did not start" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            status, headers, _ = call(url, body=body)
            assert status == 503 and headers.get("retry-after"), status
            time.sleep(0.5)
        status, headers, health = call(url, "GET", "/health")
        assert status == 200 and health["status"] == "degraded" and health["model"]["state"] == "restarting", health
        (tmp_path / "away.pkl").rename(model)
        answered_again(within=120)
        assert call(url, "GET", "/health")[2]["model"] == {"state": "ok"}
        assert "500" not in {str(s) for s, _ in answers} and "Traceback" not in log.read_text()
    finally: stop_server(proc)


def test_stopping_msr_serve_leaves_no_process(served_project, tmp_path):
    """SIGTERM to msr-serve's main process alone (what a supervisor sends) ends it with its model processes and the
    multiprocessing resource tracker, answering the requests already in flight; after `kill -9` of the main process
    its model processes end by themselves within seconds (issue 21, item 11)."""
    import psutil
    root = tmp_path / "project"
    for d in ("data/processed", "data/models"): shutil.copytree(served_project / d, root / d)
    for f in ("dvc.yaml", "params.yaml"): shutil.copy2(served_project / f, root / f)
    env = {**served_env(served_project, tmp_path / "served.sqlite"), "MSR_PROJECT_DIR": str(root)}
    body = {"dataframe_records": [{"seeds": playlist_seeds(served_project)[0], "k": 10}]}
    for how in (signal.SIGTERM, signal.SIGKILL):
        port, log = free_port(), tmp_path / f"server-{how.name}.log"
        proc = start_server([str(BIN / "msr-serve"), "--port", str(port), "--workers", "2", "--model", "local"], root, env,
                            f"http://127.0.0.1:{port}/ping", log)
        try:
            url = f"http://127.0.0.1:{port}"
            assert call(url, body=body)[0] == 200
            family = psutil.Process(proc.pid).children(recursive=True)
            assert len(family) == 3, family  # two model processes and the resource tracker
            with ThreadPoolExecutor(4) as clients:
                asking = [clients.submit(call, url, body=body) for _ in range(4)]
                time.sleep(0.05)
                os.kill(proc.pid, how)  # the main process only, not its group
                answers = [f.result()[0] if not f.exception() else type(f.exception()).__name__ for f in asking]
            if how == signal.SIGTERM:
                assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
                assert set(answers) <= {200, "ConnectionRefusedError"}, answers  # begun: answered; after the signal: refused
            gone, alive = psutil.wait_procs(family, timeout=15)
            assert not alive, (how.name, alive)
        finally: stop_server(proc)
