"""``HubServer``: a model hub directory served over real loopback HTTP, for the HTTP hub's tests.

It supports ``Range``, counts requests per path and can misbehave on purpose (dropped
connections, forced statuses, ignored ranges, slow bodies).
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["HubServer"]


class HubServer:
    """A threaded HTTP server for a hub directory. Knobs (set before the request):

    ``drop_after[path] = [n, ...]``: the next GETs of ``path`` send headers and ``n`` body
    bytes, then close the connection (one entry per GET). ``status[path] = [503, ...]``:
    answer these statuses first. ``ignore_range``: always answer 200 with the whole file.
    ``delay_s``: sleep per 64 KiB of body (keeps downloads in flight while others start).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, list[int]] = {}
        self.status: dict[str, list[int]] = {}
        self.ignore_range = False
        self.delay_s = 0.0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                server._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of ``path`` (None: no Range)."""
        with self._lock:
            return [r for p, r in self.requests if p == path]

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.lstrip("/")
        range_header = h.headers.get("Range")
        with self._lock:
            self.requests.append((path, range_header))
            statuses = self.status.get(path)
            forced = statuses.pop(0) if statuses else None
            drops = self.drop_after.get(path)
            drop = drops.pop(0) if drops else None
        if forced is not None:
            h.send_response(forced)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        file = (self.root / path).resolve()
        if not file.is_relative_to(self.root.resolve()) or not file.is_file():
            h.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if range_header and not self.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if drop is not None:
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        for offset in range(0, len(body), 65536):
            if self.delay_s:
                time.sleep(self.delay_s)
            h.wfile.write(body[offset : offset + 65536])
