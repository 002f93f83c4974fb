"""A fake Spotify Web API, token endpoint and audio-features provider on 127.0.0.1, answering with
the shapes the real services use in 2026, for the real spotipy client over real HTTP."""
from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CLIENT_ID, CLIENT_SECRET = "fake-client-id", "fake-client-secret-DO-NOT-LEAK"
USER_TOKEN = "user-token-DO-NOT-LEAK"


def track(i: int, **extra) -> dict:
    "A 2026-shaped track object (no popularity)."
    tid = f"{i:022d}"
    return {"id": tid, "type": "track", "name": f"song {i}", "uri": f"spotify:track:{tid}", "is_local": False,
            "href": f"https://api.spotify.com/v1/tracks/{tid}", "artists": [{"name": f"artist {i % 7}"}],
            "album": {"name": f"album {i % 5}"}, **extra}


class Fake:
    "State of the fake services: playlists, which of them the user may read, scripted failures, requests seen."
    def __init__(self):
        self.playlists: dict[str, list] = {}  # id -> entries ({"item": track} etc.)
        self.not_owned: set[str] = set()
        self.features_provider: dict[str, dict] = {}  # spotify id -> features
        self.audio_features_forbidden = True  # new apps since 2024-11-27
        self.failures: dict[str, list] = {}  # path -> [(status, headers, body) or ("sleep", seconds)], used in turn
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.tokens = {"app-token-DO-NOT-LEAK", USER_TOKEN}
        self.search_results: dict[str, list] = {}  # query -> track objects

    def fail(self, path: str, *answers):
        """Answer the next requests of `path` with `answers` in turn: (status, headers, body), e.g.
        (429, {"Retry-After": "25"}, None) for a rate limit, or ("sleep", seconds) to hang that long, then answer as usual."""
        self.failures.setdefault(path, []).extend(answers)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args): pass

    def send(self, status: int, body, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def scripted(self, path: str) -> bool:
        queue = self.server.fake.failures.get(path)
        if not queue: return False
        answer = queue.pop(0)
        if answer[0] == "sleep":
            time.sleep(answer[1]); return False
        status, headers, body = answer
        self.send(status, body if body is not None else {"error": {"status": status, "message": "scripted"}}, headers)
        return True

    def do_POST(self):
        fake = self.server.fake
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        fake.requests.append(("POST", self.path))
        if url.path != "/api/token": return self.send(404, {"error": "not found"})
        if self.scripted(url.path): return
        auth = self.headers.get("Authorization", "")
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if form.get("grant_type") == ["client_credentials"]:
            if auth != f"Basic {basic}":
                return self.send(400, {"error": "invalid_client", "error_description": "Invalid client"})
            return self.send(200, {"access_token": "app-token-DO-NOT-LEAK", "token_type": "Bearer", "expires_in": 3600})
        if form.get("grant_type") == ["authorization_code"]:  # PKCE: no secret, a verifier instead
            if form.get("client_id") != [CLIENT_ID] or form.get("code") != ["good-code"] or not form.get("code_verifier"):
                return self.send(400, {"error": "invalid_grant", "error_description": "Invalid authorization code"})
            return self.send(200, {"access_token": USER_TOKEN, "token_type": "Bearer", "expires_in": 3600,
                                   "refresh_token": "refresh-DO-NOT-LEAK", "scope": "playlist-read-private playlist-read-collaborative"})
        return self.send(400, {"error": "unsupported_grant_type"})

    def do_GET(self):
        fake = self.server.fake
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        fake.requests.append(("GET", self.path))
        if self.scripted(url.path): return
        if url.path == "/v1/audio-features" and "provider" in self.server.roles:  # ReccoBeats-shaped
            ids = q.get("ids", "").split(",")
            if len(ids) > 40: return self.send(400, {"error": "at most 40 ids"})
            content = [{"id": f"rb-{i}", "href": f"https://open.spotify.com/track/{sid}", **fake.features_provider[sid]}
                       for i, sid in enumerate(ids) if sid in fake.features_provider]
            return self.send(200, {"content": content})
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in fake.tokens:
            return self.send(401, {"error": {"status": 401, "message": "The access token expired"}})
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["v1", "audio-features"]:
            if fake.audio_features_forbidden: return self.send(403, {"error": {"status": 403}})
            return self.send(200, {"audio_features": []})
        if parts[:2] == ["v1", "playlists"] and len(parts) == 4 and parts[3] == "items":
            pid = parts[2]
            if pid.startswith("37i9") or pid not in fake.playlists:
                return self.send(404, {"error": {"status": 404, "message": "Resource not found"}})
            if pid in fake.not_owned: return self.send(403, {"error": {"status": 403, "message": "Forbidden"}})
            limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
            if limit > 50: return self.send(400, {"error": {"status": 400, "message": "Invalid limit"}})
            entries = fake.playlists[pid]
            page = entries[offset:offset + limit]
            base = f"http://{self.headers['Host']}/v1/playlists/{pid}/items"
            nxt = f"{base}?offset={offset + limit}&limit={limit}" if offset + limit < len(entries) else None
            return self.send(200, {"href": f"{base}?offset={offset}&limit={limit}", "items": page, "limit": limit,
                                   "offset": offset, "next": nxt, "previous": None, "total": len(entries)})
        if parts[:2] == ["v1", "search"]:
            limit = int(q.get("limit", 5))
            if limit > 10: return self.send(400, {"error": {"status": 400, "message": "Invalid limit"}})
            found, offset = fake.search_results.get(q.get("q", ""), []), int(q.get("offset", 0))
            nxt = "more" if offset + limit < len(found) else None
            return self.send(200, {"tracks": {"items": found[offset:offset + limit], "limit": limit, "offset": offset,
                                              "next": nxt, "total": len(found)}})
        return self.send(404, {"error": {"status": 404, "message": "Service not found"}})


class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        "A client that gave up on a hanging answer (a 'sleep' failure) is no error: only other errors are printed."
        import sys
        if not isinstance(sys.exc_info()[1], ConnectionError): super().handle_error(request, client_address)


def serve(roles=("api", "token", "provider")):
    "Start the fake on a free port; returns (server, base_url). `server.fake` holds the state."
    server = Server(("127.0.0.1", 0), Handler)
    server.fake, server.roles, server.daemon_threads = Fake(), set(roles), True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
