"""A stand-in for msr's REST service (`msr-serve`, msr.api) for the dashboard's tests and benchmark while it is not
there: the same contract for the dashboard's routes (msr.catalogue.ROUTES), over the standard library's HTTP server.

Run: python tests/api_standin.py --port 5001   (from the project root, or with MSR_PROJECT_DIR set)
"""
from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from msr.catalogue import ROUTES, Catalogue, load_service
from msr.core import load_params, project_root
from msr.monitor import open_monitor
from msr.serve import BadRequest, Unavailable

MAX_BODY = 1_000_000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str):
        url = urllib.parse.urlsplit(self.path)
        app = self.server.app
        if method == "GET" and url.path == "/health": return self._send(200, {"status": "ok", "model_version": app.service.model_version})
        handler = ROUTES.get((method, url.path))
        if handler is None: return self._send(404, {"error_code": "NOT_FOUND", "message": f"no route {method} {url.path[:100]}"})
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body = None
        if method == "POST":
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY: return self._send(413, {"error_code": "TOO_LARGE", "message": f"body over {MAX_BODY} bytes"})
            try: body = json.loads(self.rfile.read(n))
            except ValueError: return self._send(400, {"error_code": "BAD_REQUEST", "message": "the body is not JSON"})
        try: payload, answers = handler(app, query, body)
        except BadRequest as e: return self._send(400, {"error_code": "BAD_REQUEST", "message": str(e)})
        except Unavailable as e: return self._send(503, {"error_code": "UNAVAILABLE", "message": str(e)})
        self._send(200, payload)
        for a in answers: app.service.log(a, self.headers.get("X-MSR-Source", "api")[:32])  # once delivered

    def do_GET(self): self._route("GET")
    def do_POST(self): self._route("POST")
    def log_message(self, *args): pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    os.chdir(project_root())
    monitor = open_monitor(load_params(section="monitor"))
    service = load_service(monitor)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.app = SimpleNamespace(service=service, catalogue=Catalogue.from_project(service), monitor=monitor)
    print(f"msr REST stand-in on http://{args.host}:{args.port} ({service.model_version})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
