"""The voila dashboard in a real headless Chromium (Debian's `chromium`, driven by Python playwright)."""
from __future__ import annotations

import secrets
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, ROOT, foreign_playlist, free_port, served_env, spotify_env, start_server, stop_server
from msr.core import AUDIO_FEATURES

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # this machine's network is closed: no background calls
SCREENSHOTS = ROOT / "outputs" / "screenshots"

if not CHROMIUM.exists():
    reason = f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs it)"
    print(f"\ntest_dashboard skipped: {reason}")
    pytest.skip(reason, allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def dashboard(served_project, tmp_path_factory, spotify_fake):
    """`voila nbs/dashboard.ipynb` on 127.0.0.1 with a token, as `make dashboard` runs it, over the served project,
    with Spotify configured against the fake (tests/fake_spotify.py) and a person logged in."""
    logs = tmp_path_factory.mktemp("dashboard")
    port, token = free_port(), secrets.token_urlsafe(16)
    env = {**served_env(served_project, logs / "served.sqlite"), **spotify_env(spotify_fake[1], logs / "spotify-tokens"),
           "JUPYTER_TOKEN": token}  # as `make dashboard` passes it: in the environment, never on the command line
    proc = start_server([str(BIN / "voila"), str(ROOT / "nbs/dashboard.ipynb"), "--no-browser", "--strip_sources=True",
                         "--Voila.ip=127.0.0.1", f"--port={port}", "--Voila.auto_token=True"],
                        ROOT / "nbs", env, f"tcp://127.0.0.1:{port}", logs / "voila.log")
    assert token not in Path(f"/proc/{proc.pid}/cmdline").read_text()  # another local user could read it there
    try: yield f"http://127.0.0.1:{port}", token, logs / "served.sqlite"
    finally: stop_server(proc)


@pytest.fixture()
def page(dashboard):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            url, token, _ = dashboard
            page.goto(f"{url}/?token={token}", timeout=180_000)
            page.wait_for_selector(".msr-go", timeout=180_000)  # the kernel ran the notebook
            yield page
        finally:
            browser.close()


def test_token_is_required(dashboard):
    url, _, _ = dashboard
    req = urllib.request.Request(url + "/", headers={"Accept": "text/html"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: status, final, body = r.status, r.url, r.read().decode()
    except urllib.error.HTTPError as e: status, final, body = e.code, url, ""
    assert status in (401, 403) or "/login" in final, (status, final)
    assert "msr-go" not in body


def test_recommend_for_a_dataset_playlist(page, dashboard, served_project):
    pt = pd.read_parquet(served_project / "data/processed/playlist_tracks.parquet")
    name = pt["playlist_name"].value_counts().index[0]
    assert "msr-recommender v1" in page.inner_text(".msr-model-header")
    assert "Dashboard.launch" not in page.content()  # code hidden
    words = [w.lower() for w in name.split()[:2]]
    page.fill(".msr-playlist-search input", " ".join(words))
    page.wait_for_function(  # the list is filtered once every option carries the words typed
        """words => { const o = [...document.querySelectorAll('.msr-playlist select option')].map(e => e.textContent.toLowerCase());
                     return o.length > 0 && o.every(t => words.every(w => t.includes(w))); }""", arg=words, timeout=30_000)
    page.locator(".msr-playlist select").select_option(index=0)
    page.click(".msr-go")
    page.wait_for_selector("tr.msr-rec", timeout=60_000)
    assert page.locator("tr.msr-rec").count() == 20
    status = page.inner_text(".msr-status")
    assert "predicted genre" in status and "msr-recommender v1" in status
    assert page.locator("tr.msr-rec a[href^='https://open.spotify.com/track/']").count() == 20
    page.wait_for_selector(".msr-profile-plot img", timeout=30_000)  # the audio profile plot
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)
    _, _, db = dashboard
    deadline, last = time.monotonic() + 10, None
    while last is None and time.monotonic() < deadline:  # the log's writer thread appends just after the answer
        if db.exists():
            with sqlite3.connect(db) as con: last = con.execute("select source, model from served order by id desc limit 1").fetchone()
        if last is None: time.sleep(0.1)
    assert last == ("dashboard", "msr-recommender v1")


def test_pick_tracks_and_errors(page, served_project):
    page.click("text=Pick tracks")
    page.click(".msr-go")
    page.wait_for_selector(".msr-status .msr-error")
    assert "add at least one track" in page.inner_text(".msr-status")
    tracks = pd.read_parquet(served_project / "data/processed/tracks.parquet")
    artist = tracks["track_artist"].value_counts().index[0]
    page.fill(".msr-track-search input", artist)
    page.press(".msr-track-search input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msr-track-hits select option').length > 0")
    page.locator(".msr-track-hits select").select_option(index=[0, 1])
    page.click("text=Add to seeds")
    page.wait_for_selector("text=2 seed(s)")
    page.click(".msr-go")
    page.wait_for_selector("tr.msr-rec", timeout=60_000)
    assert page.locator("tr.msr-rec").count() >= 10
    assert "Traceback" not in page.content()
    page.click(".lm-TabBar-tab:has-text('Monitor')")
    page.wait_for_selector(".msr-monitor-summary >> text=answers served", timeout=60_000)
    assert "catalogue coverage" in page.inner_text(".msr-monitor-summary")
    page.wait_for_selector(".msr-monitor-plot img", timeout=30_000)  # the similarity trend
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard-monitor.png"), full_page=True)


def test_songs_msr_does_not_have(page, served_project):
    "A person types two songs the catalogue does not hold; the artist box suggests catalogue artists as they type."
    tracks = pd.read_parquet(served_project / "data/processed/tracks.parquet")
    artist = tracks["track_artist"].value_counts().index[0]  # two new songs by the sample's most frequent artist, from its usual era
    year = tracks.loc[tracks["track_artist"] == artist, "track_album_release_date"].str[:4].mode()[0]
    page.click("text=Pick tracks")
    for i in range(2):
        page.fill(".msr-new-title input", f"A new song {i}")
        page.locator(".msr-new-artist input").press_sequentially(artist[:4].lower(), delay=50)
        page.wait_for_function(  # the suggestions (a datalist) offer the catalogue's spelling
            """a => [...document.querySelectorAll('.msr-new-artist datalist option')].some(o => o.value === a)""", arg=artist, timeout=30_000)
        page.fill(".msr-new-artist input", artist)
        page.fill(".msr-new-date input", year)
        page.click(".msr-new-add")
        page.wait_for_selector(f"text=A new song {i}", timeout=30_000)
    assert page.locator(".msr-new-seed").count() == 2
    page.click(".msr-go")
    page.wait_for_selector("tr.msr-rec", timeout=60_000)
    assert page.locator("tr.msr-rec").count() == 20
    assert "0 seeds in msr's catalogue, 2 foreign" in page.inner_text(".msr-seed-summary")
    assert "in your playlist" in page.inner_text(".msr-results")  # reasons name the typed songs
    assert "Traceback" not in page.content()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard-foreign-songs.png"), full_page=True)


def test_spotify_playlist_of_only_foreign_tracks(page, served_project, spotify_fake):
    "A Spotify link to a playlist none of whose tracks is in the catalogue: 20 recommendations with reasons."
    fake, _ = spotify_fake
    objects, rows, _ = foreign_playlist(served_project)
    pid = "7gEYpjA9oz9GiPac4AsH4n"
    fake.playlists[pid] = [{"item": t} for t in objects]
    for t, feats in zip(objects[:4], rows[AUDIO_FEATURES].head(4).to_dict("records")): fake.features_provider[t["id"]] = feats
    page.click("text=Spotify link")
    page.fill(".msr-spotify-link input", f"https://open.spotify.com/playlist/{pid}")
    page.click(".msr-go")
    # the page may still show the previous answer: wait for this one's summary, not just for result rows
    page.wait_for_selector(".msr-seed-summary >> text=0 seeds in msr's catalogue, 12 foreign (4 with audio features)", timeout=60_000)
    assert page.locator("tr.msr-rec").count() == 20
    reasons = page.locator("tr.msr-rec td:last-child").all_inner_texts()
    assert all(r.strip() for r in reasons), reasons
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard-spotify-foreign.png"), full_page=True)
