"""The live page's HTTP server: a read-only view of one run directory.

A stdlib ``ThreadingHTTPServer`` on a daemon thread, GET and HEAD only (any other method gets 405),
serving the page, its script and stylesheet shipped in ``static/`` (no CDN: clusters and laptops
may be offline), and three JSON endpoints:

- ``/api/metrics?since=N``: the rows of ``metrics.jsonl`` for steps >= N, and the last step;
- ``/api/timeline``: the controller's decisions (``controller_timeline.jsonl``);
- ``/api/run``: run name, algorithm, model, controller kind, hold, α range, total steps.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from controller.dashboard.data import RunData

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# the page loads nothing from anywhere else
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _finite(value):
    """NaN and infinities as null: the browser's JSON.parse accepts no other spelling."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class Handler(BaseHTTPRequestHandler):
    server: DashboardHTTPServer

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse(self) -> None:
        """The page is read-only: nothing on it changes a run."""
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b'{"error": "read-only: only GET and HEAD"}\n',
            "application/json",
            {"Allow": "GET, HEAD"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def _serve(self, body: bool) -> None:
        url = urlparse(self.path)
        data = self.server.data
        try:
            if url.path in PAGES:
                name, ctype = PAGES[url.path]
                self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype, body=body)
                return
            if url.path == "/api/metrics":
                since = parse_qs(url.query).get("since", ["0"])[0]
                if not since.lstrip("-").isdigit():
                    self._json(
                        HTTPStatus.BAD_REQUEST, {"error": f"since={since!r}: expected a step number"}, body
                    )
                    return
                self._json(HTTPStatus.OK, data.metrics_since(int(since)), body)
            elif url.path == "/api/timeline":
                self._json(HTTPStatus.OK, data.timeline(), body)
            elif url.path == "/api/run":
                self._json(HTTPStatus.OK, data.run_info(), body)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"}, body)
        except (OSError, ValueError) as err:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(err)}, body)

    def _json(self, status: HTTPStatus, payload: dict, body: bool) -> None:
        content = json.dumps(_finite(payload)).encode()
        self._send(status, content, "application/json", {"Cache-Control": "no-store"}, body)

    def _send(
        self, status: HTTPStatus, content: bytes, ctype: str, headers: dict | None = None, body: bool = True
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(content)))
        for key, value in (SECURITY_HEADERS | (headers or {})).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format: str, *args) -> None:
        log.debug("dashboard %s - %s", self.address_string(), format % args)


class DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], data: RunData):
        self.data = data
        super().__init__(address, Handler)


class DashboardServer:
    """Serves one run directory's page on ``host:port`` (port 0: any free port) until ``stop``."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 0):
        data = RunData(run_dir)
        try:
            self.httpd = DashboardHTTPServer((host, port), data)
        except OSError as err:
            if err.errno != errno.EADDRINUSE or port == 0:
                raise
            log.warning(
                "dashboard.port=%d is in use on %s; serving the page on a free port instead", port, host
            )
            self.httpd = DashboardHTTPServer((host, 0), data)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
