"""msr.spotify against a fake Spotify Web API, token endpoint and features provider on 127.0.0.1,
through the real spotipy client over real HTTP."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest

from fake_spotify import CLIENT_ID, CLIENT_SECRET, USER_TOKEN, serve, track
from msr.core import AUDIO_FEATURES
from msr.feed import run_feed
from msr.features import FeatureChain, playlist_seeds
from msr.spotify import (BadCredentials, Caller, NotConfigured, NotFound, NotPermitted, PrivateTokenCache, RateLimited,
                         SpotifySettings, SpotifyUnavailable, app_client, import_playlist, user_client)

PID = "3cEYpjA9oz9GiPac4AsH4n"
EDITORIAL = "37i9dQZF1DXcBWIGoYBM5M"


@pytest.fixture()
def spotify(tmp_path):
    "(fake state, settings pointing at the fake, a logged-in user client, a Caller that really sleeps but briefly)."
    server, url = serve(roles=("api", "token"))
    settings = SpotifySettings(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, api_url=f"{url}/v1/",
                               token_url=f"{url}/api/token", authorize_url=f"{url}/authorize",
                               read_timeout=1.0, connect_timeout=1.0, max_retries=3, max_wait=5, max_retry_after=3,
                               backoff=0.05, cache_dir=tmp_path / "tokens")
    # a person who logged in before: their token is in their private cache file
    PrivateTokenCache("alice", settings.cache_dir).save_token_to_cache(
        {"access_token": USER_TOKEN, "token_type": "Bearer", "expires_in": 3600, "expires_at": int(time.time()) + 3600,
         "scope": "playlist-read-private playlist-read-collaborative", "refresh_token": "refresh-DO-NOT-LEAK"})
    client = user_client("alice", settings)
    try: yield server.fake, settings, client, Caller(settings, seed=0)
    finally: server.shutdown(); server.server_close()


def test_import_pages_through_a_whole_playlist(spotify):
    fake, settings, client, call = spotify
    fake.playlists[PID] = [{"item": track(i)} for i in range(123)]
    got = import_playlist(client, f"https://open.spotify.com/intl-de/playlist/{PID}?si=abc", call)
    assert got.track_ids == [f"{i:022d}" for i in range(123)]
    pages = [p for m, p in fake.requests if p.startswith(f"/v1/playlists/{PID}/items")]
    assert len(pages) == 3 and all("limit=50" in p for p in pages)  # 50 a page, the 2026 maximum
    assert got.tracks["track_artist"].iloc[1] == "artist 1"


def test_skips_local_files_episodes_and_null_tracks(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = [{"item": track(1)}, {"is_local": True, "item": track(2, id=None, is_local=True)},
                           {"item": None}, {"item": {"id": "e" * 22, "type": "episode", "name": "a podcast"}}, {"track": track(3)}]
    got = import_playlist(client, f"spotify:playlist:{PID}", call)
    assert got.track_ids == [f"{1:022d}", f"{3:022d}"]  # the pre-2026 'track' field is read too
    assert got.skipped == {"local files": 1, "episodes": 1, "unavailable tracks": 1}


def test_empty_playlist_and_only_local_files(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = []
    assert import_playlist(client, PID, call).track_ids == []
    fake.playlists[PID] = [{"is_local": True, "item": track(i, id=None, is_local=True)} for i in range(4)]
    only_local = import_playlist(client, PID, call)
    assert only_local.track_ids == [] and only_local.skipped == {"local files": 4}
    assert "skipped: 4 local files" in only_local.summary()


def test_playlist_not_owned_and_editorial(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = [{"item": track(1)}]
    fake.not_owned.add(PID)
    with pytest.raises(NotPermitted, match="not yours"): import_playlist(client, PID, call)
    with pytest.raises(NotFound, match="editorial"): import_playlist(client, EDITORIAL, call)
    assert sum(p.startswith(f"/v1/playlists/{PID}") for _, p in fake.requests) == 1  # no retries of a 403


def test_bad_credentials(spotify):
    fake, settings, client, call = spotify
    wrong = SpotifySettings(**{**settings.__dict__, "client_secret": "wrong-secret"})
    with pytest.raises(BadCredentials, match="SPOTIFY_CLIENT_ID / SPOTIFY_CLIENT_SECRET") as e:
        call(app_client(wrong).search, "genre:pop", limit=10, type="track")
    assert "wrong-secret" not in str(e.value)
    fake.tokens.discard(USER_TOKEN)  # the user's token was revoked
    fake.playlists[PID] = [{"item": track(1)}]
    with pytest.raises(BadCredentials, match="log in again"): import_playlist(client, PID, call)
    ok = app_client(settings)  # the right credentials: a real client-credentials exchange with the token endpoint
    assert call(ok.search, "genre:pop", limit=10, type="track")["tracks"]["limit"] == 10
    with pytest.raises(NotConfigured, match="SPOTIFY_CLIENT_SECRET"):
        app_client(SpotifySettings(client_id=CLIENT_ID, client_secret=None))


def test_rate_limits(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = [{"item": track(1)}]
    path = f"/v1/playlists/{PID}/items"
    fake.fail(path, (429, {"Retry-After": "1"}, None))
    t0 = time.time()
    assert len(import_playlist(client, PID, call).track_ids) == 1
    assert 1.0 <= time.time() - t0 < 3  # waited as asked, once
    fake.fail(path, (429, {"Retry-After": "86400"}, None))
    t0 = time.time()
    with pytest.raises(RateLimited, match="asks to wait 86400 s") as e: import_playlist(client, PID, call)
    assert e.value.retry_after == 86400 and time.time() - t0 < 2  # an absurd Retry-After is not waited for


def test_server_errors(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = [{"item": track(1)}]
    path = f"/v1/playlists/{PID}/items"
    fake.fail(path, *[(503, {}, None)] * 3)
    assert len(import_playlist(client, PID, call).track_ids) == 1  # a burst of 5xx is ridden out
    fake.fail(path, *[(502, {}, None)] * 10)
    with pytest.raises(SpotifyUnavailable, match=r"HTTP 502\) after 4 attempts"): import_playlist(client, PID, call)


def test_timeouts_and_malformed_json(spotify):
    fake, _, client, call = spotify
    fake.playlists[PID] = [{"item": track(1)}]
    path = f"/v1/playlists/{PID}/items"
    fake.fail(path, *[("sleep", 1.5)] * 4)  # longer than read_timeout (1 s), four times
    with pytest.raises(SpotifyUnavailable, match="timed out"): import_playlist(client, PID, call)
    fake.failures.clear()
    fake.fail(path, *[(200, {}, b"{not json")] * 4)
    with pytest.raises(SpotifyUnavailable, match="malformed"): import_playlist(client, PID, call)


def test_feature_chain_over_http(spotify, tmp_path):
    fake, settings, client, call = spotify
    provider, purl = serve(roles=("provider",))
    try:
        ids = [f"{i:022d}" for i in range(90)]
        values = {c: 0.5 for c in AUDIO_FEATURES}
        provider.fake.features_provider = {sid: values for sid in ids[10:80]}  # the provider knows 70 of them
        catalogue = pd.DataFrame({"track_id": ids[:10], **{c: [0.1] * 10 for c in AUDIO_FEATURES}})
        chain = FeatureChain(catalogue, provider_url=purl, spotify=client, caller=call)
        feats, report = chain.features(ids)
        assert (report["catalogue"], report["provider"], report["spotify"]) == (10, 70, 0)
        assert report["missing"] == ids[80:]  # reported, not zero-filled
        assert len(feats) == 80 and not feats.isna().any().any()
        assert feats.loc[ids[0], "energy"] == 0.1 and feats.loc[ids[50], "energy"] == 0.5
        batches = [p for _, p in provider.fake.requests]
        assert len(batches) == 2  # 80 unknown ids, 40 per request
        assert "not available to this app" in report["disabled"]["spotify"]  # the 403 of /audio-features
        before = len(fake.requests)
        chain.features([f"{i:022d}" for i in range(200, 210)])
        assert not any("audio-features" in p for _, p in fake.requests[before:])  # switched off for the session
    finally:
        provider.shutdown(); provider.server_close()


def test_no_secret_or_token_in_logs_or_errors(spotify, caplog):
    fake, settings, client, call = spotify
    caplog.set_level(logging.DEBUG)
    fake.playlists[PID] = [{"item": track(i)} for i in range(60)]
    errors = []
    import_playlist(client, PID, call)
    app = app_client(settings)
    call(app.search, "genre:rock", limit=10, type="track")
    for setup in (lambda: fake.not_owned.add(PID), lambda: fake.fail(f"/v1/playlists/{PID}/items", (429, {"Retry-After": "999"}, None))):
        setup()
        try: import_playlist(client, PID, call)
        except Exception as e: errors.append(repr(e) + str(e))
    try: app_client(SpotifySettings(**{**settings.__dict__, "client_id": "another-app", "client_secret": CLIENT_SECRET + "x"})).search("x", limit=1)
    except Exception as e: errors.append(repr(e) + str(e))
    text = caplog.text + "\n".join(errors) + repr(settings)
    assert len(errors) == 3
    for secret in (CLIENT_SECRET, USER_TOKEN, "app-token-DO-NOT-LEAK", "refresh-DO-NOT-LEAK"):
        assert secret not in text, secret
    assert not list(settings.cache_dir.parent.glob(".cache*")) and not (settings.cache_dir.parent.parent / ".cache").exists()


def test_feed_over_http(spotify, tmp_path):
    "The feed against the fake: real searches (10 a page, offsets, budget), features from the provider, no duplicates on a rerun."
    fake, settings, _, _ = spotify
    provider, purl = serve(roles=("provider",))
    try:
        archive = pd.DataFrame({"track_id": [f"{i:022d}" for i in range(100)], **{c: [0.2] * 100 for c in AUDIO_FEATURES}})
        archive.to_parquet(tmp_path / "songs.parquet")
        fake.search_results['genre:"pop"'] = [track(i, duration_ms=200000) for i in range(90, 115)]  # 10 already known
        fake.search_results['genre:"rock"'] = [track(i, duration_ms=200000) for i in range(200, 204)]
        feats = {c: 0.6 for c in AUDIO_FEATURES if c != "duration_ms"}  # a provider without durations: the search gave them
        provider.fake.features_provider = {f"{i:022d}": feats for i in list(range(100, 112)) + [200, 201]}
        params = {"genres": {"pop": 'genre:"pop"', "rock": 'genre:"rock"'}, "request_budget": 10, "page_size": 10,
                  "pages_per_genre": 3, "provider_url": purl, "retrain_threshold": 0.01}
        paths = dict(songs_path=tmp_path / "songs.parquet", fed_path=tmp_path / "feed/tracks.parquet",
                     previous_path=tmp_path / "feed/prev.parquet", metrics_path=tmp_path / "feed.json")
        first = run_feed(params, settings, **paths)
        assert first["status"] == "fed" and first["requests"] == 4  # pop: 3 pages of 10 (25 results), rock: 1
        assert [p for _, p in fake.requests if p.startswith("/v1/search")][0].count("limit=10") == 1
        assert (first["found"], first["already_known"], first["added"]) == (29, 10, 14)
        assert len(first["without_features"]) == 5 and first["retrain"] and abs(first["growth"] - 0.14) < 1e-9
        fed = pd.read_parquet(paths["fed_path"])
        assert len(fed) == 14 and fed["duration_ms"].eq(200000).all() and not fed[AUDIO_FEATURES].isna().any().any()
        again = run_feed(params, settings, **paths)
        assert (again["added"], again["retrain"]) == (0, False) and len(pd.read_parquet(paths["fed_path"])) == 14
        assert len(pd.read_parquet(paths["previous_path"])) == 0  # the version before the first run (empty)
    finally:
        provider.shutdown(); provider.server_close()


def test_login_with_pkce_then_import(spotify, tmp_path):
    "`msr-spotify login`: the PKCE URL, the pasted redirect, a 0600 token file outside the working directory; then `import`."
    fake, settings, _, _ = spotify
    fake.playlists[PID] = [{"item": track(i)} for i in range(3)]
    bin_dir = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SPOTIFY_", "SPOTIPY_", "MSR_SPOTIFY"))},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SPOTIFY_CLIENT_ID": CLIENT_ID,
           "MSR_SPOTIFY_API_URL": settings.api_url, "MSR_SPOTIFY_TOKEN_URL": settings.token_url,
           "MSR_SPOTIFY_AUTHORIZE_URL": settings.authorize_url, "MSR_SPOTIFY_CACHE": str(tmp_path / "tokens"),
           "MSR_FEATURES_URL": ""}  # no features provider: the tracks stay without audio features
    work = tmp_path / "cwd"; work.mkdir()

    def login(answer):
        p = subprocess.Popen([str(bin_dir / "msr-spotify"), "login", "--user", "bob"], cwd=work, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        url = p.stdout.readline().split(": ", 1)[1].strip()
        out, err = p.communicate(answer(parse_qs(urlparse(url).query)) + "\n", timeout=60)
        return p.returncode, url, out + err

    code, url, out = login(lambda q: f"http://127.0.0.1:8898/callback?code=good-code&state={q['state'][0]}")
    q = parse_qs(urlparse(url).query)
    assert url.startswith(settings.authorize_url) and q["code_challenge_method"] == ["S256"] and q["client_id"] == [CLIENT_ID]
    assert code == 0, out
    token_file = tmp_path / "tokens" / "bob.json"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600" and USER_TOKEN in token_file.read_text()
    assert list(work.iterdir()) == []  # no spotipy .cache in the working directory
    assert USER_TOKEN not in out and "refresh-DO-NOT-LEAK" not in out
    bad, _, out = login(lambda q: "http://127.0.0.1:8898/callback?code=good-code&state=forged")
    assert bad == 1 and "login failed" in out  # a redirect with another state is refused
    listed = subprocess.run([str(bin_dir / "msr-spotify"), "import", f"spotify:playlist:{PID}", "--user", "bob"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "3 tracks from playlist" in listed.stdout and f"{2:022d}" in listed.stdout
    assert "0 in msr's catalogue, 3 foreign (0 with audio features)" in listed.stdout, listed.stdout


def test_a_login_without_every_scope_never_prompts(spotify):
    "A token file lacking a scope msr asks for: NotConfigured saying to log in again, never spotipy's interactive prompt."
    fake, settings, _, call = spotify
    fake.playlists[PID] = [{"item": track(1)}]
    PrivateTokenCache("bob", settings.cache_dir).save_token_to_cache(
        {"access_token": USER_TOKEN, "token_type": "Bearer", "expires_in": 3600, "expires_at": int(time.time()) + 3600,
         "scope": "playlist-read-private", "refresh_token": "refresh-DO-NOT-LEAK"})
    with pytest.raises(NotConfigured, match=r"lacks the permission\(s\) msr asks for \(playlist-read-collaborative\).*msr-spotify login"):
        playlist_seeds(PID, "bob", settings)
    # and the client itself, used directly, raises instead of reading a pasted URL from standard input
    with pytest.raises(NotConfigured, match="run `msr-spotify login` again"):
        import_playlist(user_client("bob", settings), PID, call)
    assert not [p for m, p in fake.requests if p.startswith(f"/v1/playlists/{PID}")]  # nothing was asked with the old token


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """(fake state, a `Service` whose Spotify is the fake, with a person logged in): the server's own path through
    `SpotifySettings.from_env` and msr's default limits (read timeout 15 s, Retry-After up to 30 s), a toy catalogue."""
    from conftest import spotify_env
    from msr.baselines import PopularityRecommender
    from msr.serve import Service
    from msr.testing import toy_world
    server, url = serve()
    for k, v in spotify_env(url, tmp_path / "tokens").items(): monkeypatch.setenv(k, v)
    tracks, pt = toy_world()
    server.fake.playlists[PID] = [{"item": track(i)} for i in range(120)]  # three pages, none in the catalogue
    server.fake.features_provider = {f"{i:022d}": {c: 0.5 for c in AUDIO_FEATURES} for i in range(120)}
    try: yield server.fake, Service(PopularityRecommender().fit(tracks, pt), tracks, spotify_wait=2)
    finally: server.shutdown(); server.server_close()


def timed(fn) -> tuple[object, float]:
    "(what `fn()` returned or raised, seconds it took)."
    t0 = time.monotonic()
    try: out = fn()
    except Exception as e: out = e
    return out, time.monotonic() - t0


def test_served_import_within_the_wait(served):
    "Nothing in the way: all three pages and the provider's features, well within the wait."
    _, service = served
    got, took = timed(lambda: service.import_playlist(PID))
    assert len(got.tracks) == 120 and got.features["provider"] == 120 and took < 1, (got, took)


@pytest.mark.parametrize("answers,retry_after", [
    ([(429, {"Retry-After": "25"}, None)], 25.0),  # longer than the wait: given up at once, Spotify's wait handed on
    ([(429, {"Retry-After": "1.5"}, None)] * 5, 1.5),  # waited for once, then no time is left for a second wait
], ids=["retry-after-25", "storm-of-1.5"])
def test_served_rate_limit_gives_up_within_the_wait(served, answers, retry_after):
    from msr.serve import Unavailable
    fake, service = served
    fake.fail(f"/v1/playlists/{PID}/items", *answers)
    err, took = timed(lambda: service.import_playlist(PID))
    assert isinstance(err, Unavailable) and err.retry_after == retry_after, err
    assert took <= service.spotify_wait + 1, took
    assert "rate-limit" in str(err)


@pytest.mark.parametrize("hang", ["pages", "provider"])
def test_served_hang_is_cut_at_the_wait(served, hang):
    "A Spotify (or provider) that hangs for 10 s, with a read timeout of 15 s: each request's timeout is cut to the time left."
    from msr.serve import Unavailable
    fake, service = served
    assert SpotifySettings.from_env().read_timeout > 10  # the settings alone would wait out the hang
    if hang == "pages":
        fake.fail(f"/v1/playlists/{PID}/items", ("sleep", 0.2), ("sleep", 10))  # the second page hangs
        err, took = timed(lambda: service.import_playlist(PID))
        assert isinstance(err, Unavailable) and "timed out" in str(err) and err.retry_after >= 1, err
    else:  # a provider that hangs costs the tracks their features, not the answer
        fake.fail("/v1/audio-features", ("sleep", 10))
        got, took = timed(lambda: service.import_playlist(PID))
        assert len(got.tracks) == 120 and got.features["provider"] == 0 and "no time left" in got.features["disabled"]["provider"], got
    assert service.spotify_wait - 0.1 <= took <= service.spotify_wait + 0.5, took


def test_served_short_retry_after_is_waited_for(served):
    fake, service = served
    fake.fail(f"/v1/playlists/{PID}/items", (429, {"Retry-After": "1"}, None))
    got, took = timed(lambda: service.import_playlist(PID))
    assert len(got.tracks) == 120 and 1 <= took < service.spotify_wait, (got, took)
