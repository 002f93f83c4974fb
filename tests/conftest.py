"""Shared fixtures: the real songs archive, a sample of it, a local HTTP server and a throwaway project copy."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from msr.testing import free_port  # noqa: F401 (the tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED_ZIP = ROOT.parent / "shared" / "data" / "spotify_songs.zip"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def songs_csv(tmp_path_factory) -> Path:
    "The real archive's CSV: from ../shared/data, else downloaded from its public home, else skip."
    dest = tmp_path_factory.mktemp("real") / "spotify_songs.csv"
    if SHARED_ZIP.exists():
        with zipfile.ZipFile(SHARED_ZIP) as zf: dest.write_bytes(zf.read("spotify_songs.csv"))
        return dest
    from msr.core import load_params
    from msr.ingest import IngestError, PUBLIC_URL, fetch
    limits = {k: v for k, v in load_params(ROOT / "params.yaml", "ingest").items() if k in ("member", "max_bytes", "max_ratio", "sha256")}
    try: fetch(PUBLIC_URL, dest, **limits, progress=False, timeout=20)
    except IngestError as e: pytest.skip(f"the real archive is not at {SHARED_ZIP} and could not be downloaded: {e}")
    return dest


@pytest.fixture(scope="session")
def songs(songs_csv) -> pd.DataFrame:
    return pd.read_csv(songs_csv)


def sample_rows(songs: pd.DataFrame, per_genre: int = 8) -> pd.DataFrame:
    """A few thousand real rows: the `per_genre` whole playlists of each genre that share the largest part of their tracks
    with other playlists, plus the rows that lack a name. Random playlists share almost no tracks with each other at this
    size, so the production-faithful evaluation (held-out tracks that training playlists hold) would have no query."""
    pairs = songs.drop_duplicates(["playlist_id", "track_id"])
    shared = (pairs["track_id"].map(pairs["track_id"].value_counts()) > 1).groupby(pairs["playlist_id"]).mean().rename("shared")
    playlists = songs.drop_duplicates("playlist_id")[["playlist_id", "playlist_genre"]].join(shared, on="playlist_id")
    chosen = (playlists.sort_values(["shared", "playlist_id"], ascending=[False, True])
              .groupby("playlist_genre").head(per_genre)["playlist_id"])
    rows = songs[songs["playlist_id"].isin(set(chosen)) | songs["track_name"].isna()]
    return rows.reset_index(drop=True)


@pytest.fixture(scope="session")
def sample_zip(songs, tmp_path_factory) -> Path:
    "A zip of a real sample, shaped like the shipped archive."
    path = tmp_path_factory.mktemp("sample") / "sample.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("spotify_songs.csv", sample_rows(songs).to_csv(index=False))
    return path


class Routes(BaseHTTPRequestHandler):
    "Serves `self.server.routes[path] = (status, headers, body)`; a callable body is called with the handler."
    def do_GET(self):
        route = self.server.routes.get(self.path.split("?")[0])
        if route is None: route = (404, {}, b"not found")
        status, headers, body = route
        if callable(body): return body(self)
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass


@pytest.fixture()
def http_server():
    "A real HTTP server on 127.0.0.1 with settable routes; yields (base_url, routes)."
    server = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    server.routes = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try: yield f"http://127.0.0.1:{server.server_address[1]}", server.routes
    finally:
        server.shutdown()
        server.server_close()


def project_files() -> list[str]:
    "The files a clone of the project has (tracked or new, not ignored), from the working tree."
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run a command with the project's environment first on PATH and MLflow on its embedded default."
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPOTIFY_", "SPOTIPY_", "MSR_SPOTIFY"))}  # no real services
    env = {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def copy_project(dest: Path) -> Path:
    "A copy of the project at `dest`, in a fresh git repository, with empty data/ and outputs/ and no MLflow store."
    for f in project_files():
        if f.startswith(("data/", "outputs/")) or f == "dvc.lock": continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


@pytest.fixture()
def project(tmp_path) -> Path:
    "A copy of the project in a fresh git repository, with empty data/ and outputs/ and no MLflow store."
    return copy_project(tmp_path / "msr")


def set_params(project: Path, **sections):
    "Update params.yaml sections in `project` (a shallow merge per section)."
    import yaml
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items(): params[section] = {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def served_project(songs, tmp_path_factory) -> Path:
    """A project folder built from the real sample: tables, a fitted msr model and its evaluation, registered
    as `msr-recommender` v1 (champion) in the folder's own MLflow store (sqlite, ./mlartifacts)."""
    from msr.core import PLAYLIST_TRACKS, TRACKS, load_params
    from msr.model import MsrRecommender
    from msr.transform import build_tables
    root = tmp_path_factory.mktemp("served")
    for f in ("params.yaml", "dvc.yaml"): shutil.copy2(ROOT / f, root / f)  # what marks a project root
    rows = sample_rows(songs).dropna(subset=["track_name", "track_artist"])
    tracks, playlist_tracks, _ = build_tables(rows)
    for table, path in ((tracks, TRACKS), (playlist_tracks, PLAYLIST_TRACKS)):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(root / path, index=False)
    # the model learns from every playlist but the largest, whose continuation the REST and dashboard tests ask for:
    # a query playlist is never one the model learned from (the evaluation protocol), as a person's own playlist is not
    biggest = playlist_tracks["playlist_id"].value_counts().index[0]
    MsrRecommender(**load_params(ROOT / "params.yaml", "train")).fit(
        tracks, playlist_tracks[playlist_tracks["playlist_id"] != biggest]).save(root / "data/models/recommender.pkl")
    (root / "outputs/metrics").mkdir(parents=True)
    (root / "outputs/metrics/recommend.json").write_text('{"msr": {"faithful/half": {"r_precision": 0.25}}}')
    run([str(BIN / "python"), "-c", "from msr.core import load_params; from msr.registry import register; register(**load_params(section='register'), split='test')"], root,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "MSR_MONITOR_DB": "off"})
    return root


@pytest.fixture(scope="session")
def spotify_fake():
    "A fake Spotify Web API, token endpoint and audio-features provider on 127.0.0.1 (tests/fake_spotify.py), one per session."
    from fake_spotify import serve as serve_fake
    server, url = serve_fake(roles=("api", "token", "provider"))
    try: yield server.fake, url
    finally: server.shutdown(); server.server_close()


def spotify_env(url: str, cache: Path) -> dict:
    """Environment for a server whose Spotify is the fake at `url`, with a person logged in (their token in a private
    cache file under `cache`) and the fake as audio-features provider."""
    import time
    from fake_spotify import CLIENT_ID, USER_TOKEN
    from msr.spotify import PrivateTokenCache
    PrivateTokenCache("me", cache).save_token_to_cache(
        {"access_token": USER_TOKEN, "token_type": "Bearer", "expires_in": 3600, "expires_at": int(time.time()) + 36000,
         "scope": "playlist-read-private playlist-read-collaborative", "refresh_token": "r"})
    return {"SPOTIFY_CLIENT_ID": CLIENT_ID, "MSR_SPOTIFY_API_URL": f"{url}/v1/", "MSR_SPOTIFY_TOKEN_URL": f"{url}/api/token",
            "MSR_SPOTIFY_CACHE": str(cache), "MSR_FEATURES_URL": url}


def foreign_playlist(project: Path, n: int = 12):
    """A real person's playlist: the first `n` tracks of the sample's largest playlist as songs msr has never seen
    (fresh Spotify ids, new titles, new albums), keeping their artists and dates; the catalogue rows they stand for,
    and the rest of that playlist."""
    tracks = pd.read_parquet(project / "data/processed/tracks.parquet").set_index("track_id")
    pt = pd.read_parquet(project / "data/processed/playlist_tracks.parquet")
    biggest = pt["playlist_id"].value_counts().index[0]
    members = pt.loc[pt["playlist_id"] == biggest, "track_id"].tolist()
    rows = tracks.loc[members[:n]]
    objects = [{"id": f"{9_000 + i:022d}", "type": "track", "name": f"Unreleased demo {i}",
                "artists": [{"name": a} for a in r.track_artist.split(", ")],
                "album": {"id": f"new-album-{i}", "name": f"Demos {i}", "release_date": r.track_album_release_date}}
               for i, r in enumerate(rows.itertuples())]
    return objects, rows, members[n:]


def served_env(project: Path, monitor_db: Path) -> dict:
    "Environment for a server over `served_project`: its MLflow store, its monitoring log, .venv/bin on PATH."
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MSR_"))}
    return {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
            "MSR_MONITOR_DB": str(monitor_db), "MSR_PROJECT_DIR": str(project)}


_SERVERS: dict = {}  # pid -> the msr.testing.Service that started it


def start_server(cmd: list[str], cwd: Path, env: dict, url: str, log: Path, timeout: float = 180):
    """Start a server process (own process group) and wait until `url` answers with 200 (tcp://host:port: accepts); returns the
    Popen. `msr.testing.Service`, as the guides start theirs, with this whole environment and a log the test reads."""
    from msr.testing import Service
    service = Service(cmd, url, env=env, timeout=timeout, cwd=cwd, status=None if url.startswith("tcp://") else 200,
                      log=log, inherit=False)
    _SERVERS[service.proc.pid] = service
    return service.proc


def stop_server(proc):
    "Stop a server started by `start_server`, children included."
    _SERVERS.pop(proc.pid).stop()


def all_text(project: Path) -> str:
    "Every text the project wrote: reports, metrics, MLflow store and artifacts."
    chunks = []
    for path in [*project.glob("outputs/**/*"), *project.glob("mlartifacts/**/*"), project / "mlflow.db"]:
        if path.is_file(): chunks.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


class Served:
    "A running msr-serve: its URL, monitoring log, process and server log."
    def __init__(self, url: str, db: Path, proc, log: Path):
        self.url, self.db, self.proc, self.log = url, db, proc, log


@pytest.fixture(scope="session")
def msr_server(served_project, tmp_path_factory, spotify_fake) -> Served:
    """`msr-serve` (what `make serve` runs) over `served_project`'s champion on 127.0.0.1, one per test session, with
    Spotify configured against the fake, a person logged in, no rate limit (tests send bursts) and its monitoring log
    in a folder of its own (the fault tests delete it)."""
    logs = tmp_path_factory.mktemp("msr-serve")
    port, url = free_port(), spotify_fake[1]
    db = logs / "monitor" / "served.sqlite"
    env = {**served_env(served_project, db), **spotify_env(url, logs / "spotify-tokens")}
    proc = start_server([str(BIN / "msr-serve"), "--port", str(port), "--rate", "0"], served_project, env,
                        f"http://127.0.0.1:{port}/ping", logs / "server.log")
    try: yield Served(f"http://127.0.0.1:{port}", db, proc, logs / "server.log")
    finally: stop_server(proc)


CHROMIUM = Path(os.environ.get("MSR_CHROMIUM", "/usr/bin/chromium"))  # Debian's (playwright's own download does not work here)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # this machine's network is closed: no background calls


def skip_without_browser():
    "Skip the calling test module, saying why, where Debian's chromium or playwright is missing."
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def browser():
    "One headless chromium for the session's browser tests (each test opens contexts of its own)."
    skip_without_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


class TeamServer:
    """A running team MLflow server (`msr-team server`: PostgreSQL, basic auth, proxied artifacts) in a folder of its own:
    its URL, folder, process and log, how long it took to answer, and the logins of its admin, a reader and a promoter."""
    def __init__(self, url: str, root: Path, proc, log: Path, start_seconds: float, passwords: dict):
        self.url, self.root, self.proc, self.log, self.start_seconds, self.passwords = url, root, proc, log, start_seconds, passwords
        self.artifacts = root / "data" / "team" / "artifacts"

    def env(self, user: str) -> dict:
        "The MLflow client variables that log `user` (admin, reader, promoter) in to this server."
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.passwords[user]}

    def database_url(self, database: str) -> str:
        "The SQLAlchemy URL, password included, of one of the server's PostgreSQL databases: mlflow, mlflow_auth or airflow."
        from msr.team import Team
        return Team(self.root).database_url(database)

    def secrets(self) -> dict:
        "Every secret the server and its users have: their passwords, the databases', Flask's key (name: value)."
        files = {p.name: p.read_text().strip() for p in (self.root / "data" / "team" / "secrets").glob("*") if p.name != "auth.ini"}
        return {**{f"user {u}": pw for u, pw in self.passwords.items()}, **files}


def team_unavailable() -> str | None:
    "Why no team server can run here (PostgreSQL missing; as root, no account to run it as), or None."
    from msr.core import load_params
    from msr.team import TeamError, pg_program, run_as
    try: pg_program("initdb"); pg_program("pg_ctl"); run_as(load_params(ROOT / "params.yaml", "team")["db_account"])
    except TeamError as e: return str(e)
    return None


@pytest.fixture(scope="session")
def team_server():
    """`msr-team server` (what `make mlflow-server` runs) on 127.0.0.1, one per test session, in a folder of its own: a
    PostgreSQL cluster made there, basic auth with a generated admin password, artifacts proxied to its data/team/artifacts,
    and two users made with `msr-team user add`: `reader` (its password generated into a 0600 file) and `promoter` (its
    password from MSR_TEAM_USER_PASSWORD). Stopped, database included, at the end of the session."""
    import secrets
    import tempfile
    import time
    why = team_unavailable()
    if why: pytest.skip(f"no team server here: {why}")
    root = Path(tempfile.mkdtemp(prefix="msr-team-"))  # not under pytest's 0700 base: PostgreSQL's account must pass through (as root)
    root.chmod(0o711)
    try:
        for f in ("params.yaml", "dvc.yaml"): shutil.copy2(ROOT / f, root / f)  # what marks a project root
        port = free_port()
        set_params(root, team={"db_port": free_port(), "port": port})
        passwords = {"admin": secrets.token_urlsafe(18), "promoter": secrets.token_urlsafe(18)}
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MSR_"))},
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"]}
        url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
        proc = start_server([str(BIN / "msr-team"), "server"], root, env, f"{url}/health", root / "server.log")
        start_seconds = time.monotonic() - t0
        try:
            run([str(BIN / "msr-team"), "user", "add", "reader", "--role", "reader"], root, env=env)
            passwords["reader"] = (root / "data/team/users/reader.password").read_text().strip()
            run([str(BIN / "msr-team"), "user", "add", "promoter", "--role", "promoter"], root,
                env={**env, "MSR_TEAM_USER_PASSWORD": passwords["promoter"]})
            yield TeamServer(url, root, proc, root / "server.log", start_seconds, passwords)
        finally:
            stop_server(proc)
            if run([str(BIN / "msr-team"), "db", "status"], root, check=False).returncode != 3:  # msr-team stops what it started
                run([str(BIN / "msr-team"), "db", "stop"], root, check=False)
                raise AssertionError(f"msr-team server left its PostgreSQL running:\n{(root / 'server.log').read_text()[-2000:]}")
    finally: shutil.rmtree(root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After `make test`: each group of skipped tests, how many, and why, where the reason names the command that
    brings them in (apt-get install chromium / postgresql, make hub-proxy, make airflow), so a machine without them
    says so in one place instead of in pytest's skip lines only."""
    from collections import Counter
    groups = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        groups[reason.removeprefix("Skipped: ")] += 1
    if not groups: return
    terminalreporter.section(f"msr: {sum(groups.values())} test(s) skipped, in {len(groups)} group(s)", sep="=")
    for reason, n in groups.most_common(): terminalreporter.line(f"{n:4d} skipped: {reason}")
