"""Ingest against real files and a real HTTP server on 127.0.0.1: every bad input gets a clear error
and leaves the previous good data untouched."""
from __future__ import annotations

import base64
import io
import socket
import time
import zipfile

import pytest

from conftest import ROOT
from msr.core import load_params
from msr.ingest import IngestError, SourceUnreachable, fetch, ingest
from msr.redact import redact_url

PARAMS = load_params(ROOT / "params.yaml", "ingest")
LIMITS = {k: PARAMS[k] for k in ("member", "timeout", "max_bytes", "max_ratio")} | {"sha256": ""}  # no checksum: test data


def get(source, dest, **kw) -> dict:
    "`fetch` with params.yaml's limits, no progress bar, and whatever the test changes."
    return fetch(source, dest, **{**LIMITS, "progress": False, **kw})


def run_ingest(source, **kw) -> dict:
    "`ingest` with params.yaml's limits, online, no progress bar, and whatever the test changes."
    return ingest(source, **{**LIMITS, "offline": False, "offline_source": "", "progress": False, **kw})

GOOD = b"track_id,energy\n6f807x0ima9a1j3VPbc7VN,0.5\n"


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf: zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture()
def dest(tmp_path):
    "A destination that already holds good data."
    d = tmp_path / "raw" / "spotify_songs.csv"
    d.parent.mkdir()
    d.write_bytes(b"previous,good\n1,2\n")
    return d


def assert_untouched(dest):
    assert dest.read_bytes() == b"previous,good\n1,2\n"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary files left


def test_download_csv_and_zip(http_server, dest):
    base, routes = http_server
    routes["/songs.csv"] = (200, {}, GOOD)
    routes["/songs.zip"] = (200, {}, zipped("tidytuesday/spotify_songs.csv", GOOD))
    assert get(f"{base}/songs.csv", dest)["rows"] == 1
    assert dest.read_bytes() == GOOD
    dest.write_bytes(b"")
    assert get(f"{base}/songs.zip?dl=1", dest)["bytes"] == len(GOOD)
    assert dest.read_bytes() == GOOD


def _truncated(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(GOOD) * 10))
    handler.end_headers()
    handler.wfile.write(GOOD)
    handler.wfile.flush()
    handler.close_connection = True


def _slow(handler):
    time.sleep(3)
    handler.send_response(200)
    handler.end_headers()


@pytest.mark.parametrize("route, reply, message", [
    ("/missing.csv", None, "HTTP 404"),
    ("/error.csv", (500, {}, b"oops"), "HTTP 500"),
    ("/empty.csv", (200, {}, b""), "is empty"),
    ("/corrupt.zip", (200, {}, zipped("spotify_songs.csv", GOOD * 50)[:60]), "corrupt zip"),
    ("/page.zip", (200, {"Content-Type": "text/html"}, b"<html>moved</html>"), "not a zip archive"),
    ("/binary.csv", (200, {}, b"\x00\x01\x02garbage"), "not a CSV"),
    ("/other.zip", (200, {}, zipped("readme.txt", b"hello")), "no member named 'spotify_songs.csv'"),
    ("/evil.zip", (200, {}, zipped("../../../etc/evil.csv", GOOD)), "path traversal"),
    ("/bomb.zip", (200, {}, zipped("spotify_songs.csv", b"0," * 2_000_000)), "archive bomb"),
    ("/truncated.csv", (200, {}, _truncated), "incomplete download"),
    ("/slow.csv", (200, {}, _slow), "timed out"),
])
def test_bad_http_sources(http_server, dest, route, reply, message):
    base, routes = http_server
    if reply: routes[route] = reply
    with pytest.raises(IngestError, match=message):
        get(f"{base}{route}", dest, timeout=1, max_bytes=1_000_000)
    assert_untouched(dest)


def test_oversized_download_refused(http_server, dest):
    base, routes = http_server
    routes["/big.csv"] = (200, {}, GOOD * 1000)
    with pytest.raises(IngestError, match="more than ingest.max_bytes"):
        get(f"{base}/big.csv", dest, max_bytes=1000)
    assert_untouched(dest)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_then_offline_fallback(dest, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/songs.csv"
    with pytest.raises(SourceUnreachable, match="could not reach 127.0.0.1"):
        get(url, dest, timeout=2)
    assert_untouched(dest)
    shipped = tmp_path / "shipped.zip"
    shipped.write_bytes(zipped("spotify_songs.csv", GOOD))
    meta = run_ingest(url, offline_source=str(shipped), dest=dest, timeout=2)
    assert meta["route"] == "offline fallback" and dest.read_bytes() == GOOD
    # offline=True never touches the network, and an HTTP error is not "unreachable": no fallback
    assert run_ingest("http://192.0.2.1/x.csv", offline=True, offline_source=str(shipped), dest=dest)["route"] == "offline"


def test_http_error_does_not_fall_back(http_server, dest, tmp_path):
    base, _ = http_server
    shipped = tmp_path / "shipped.zip"
    shipped.write_bytes(zipped("spotify_songs.csv", GOOD))
    with pytest.raises(IngestError, match="HTTP 404"):
        run_ingest(f"{base}/gone.csv", offline_source=str(shipped), dest=dest)
    assert_untouched(dest)


@pytest.mark.parametrize("source, message", [
    ("", "ingest.source is empty"),
    ("no/such/file.zip", "source not found"),
    ("s3://bucket/songs.zip", "unsupported source scheme 's3'"),
])
def test_bad_local_sources(dest, source, message):
    with pytest.raises(IngestError, match=message):
        get(source, dest)
    assert_untouched(dest)


def test_checksum_mismatch(dest, tmp_path):
    src = tmp_path / "songs.csv"
    src.write_bytes(GOOD)
    with pytest.raises(IngestError, match="expected ingest.sha256"):
        get(str(src), dest, sha256="ab" * 32)
    assert_untouched(dest)


def test_credentials_from_environment_never_shown(http_server, dest, monkeypatch):
    "A token in the environment reaches the server but never a message or the returned metadata."
    base, routes = http_server
    secret = "s3cr3t-t0ken-value"
    expected = "Basic " + base64.b64encode(f"msr:{secret}".encode()).decode()

    def guarded(handler):
        ok = handler.headers.get("Authorization") == expected
        body = GOOD if ok else b"denied"
        handler.send_response(200 if ok else 401)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    routes["/private.csv"] = (200, {}, guarded)
    monkeypatch.setenv("MSR_DATA_TOKEN", secret)
    source = base.replace("http://", "http://msr:${MSR_DATA_TOKEN}@") + "/private.csv"
    meta = get(source, dest)
    assert dest.read_bytes() == GOOD and secret not in str(meta)
    monkeypatch.setenv("MSR_DATA_TOKEN", "wrong-" + secret)
    with pytest.raises(IngestError) as err:
        get(source, dest)
    assert "HTTP 401" in str(err.value) and secret not in str(err.value)
    assert secret not in redact_url(source.replace("${MSR_DATA_TOKEN}", secret))
