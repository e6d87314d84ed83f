"""A proxy on 127.0.0.1 in front of the local STAC API that forwards only requests carrying a given
``Authorization`` header (401 otherwise), recording every request: a private, token-protected STAC API."""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


class HeaderProxy(BaseHTTPRequestHandler):
    """Forwards to ``upstream`` only requests whose ``Authorization`` is ``expected``; ``seen`` records
    (method, path, header) of every request."""

    upstream = ""
    root = ""
    expected = ""
    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _forward(self, method: str) -> None:
        header = self.headers.get("Authorization")
        self.seen.append((method, self.path, header))
        if header != self.expected:
            self._reply(401, b'{"code": "Unauthorized"}', "application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(
            self.upstream + self.path, data=body, method=method,
            headers={"Content-Type": self.headers.get("Content-Type") or "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, data, kind = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as error:
            status, data, kind = error.code, error.read(), error.headers.get("Content-Type")
        # Links (next pages, self) must lead back through the proxy.
        self._reply(status, data.replace(self.upstream.encode(), self.root.encode()), kind or "application/json")

    def _reply(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def serve_header_proxy(upstream: str) -> Iterator[type[HeaderProxy]]:
    """A running proxy in front of ``upstream``; set ``.expected`` on the yielded class, read ``.root``."""
    handler = type("Proxy", (HeaderProxy,), {"upstream": upstream.rstrip("/"), "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.root = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
