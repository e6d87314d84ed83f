"""A flaky HTTP proxy on loopback for the fault-injection tests (not collected by pytest).

It sits in front of a STAC API (forwarding every request, with the upstream's address in response bodies
rewritten to its own, so that links followed by the client come back through it) and serves a folder of
asset files under ``/files/`` with HTTP range requests (what GDAL's ``/vsicurl/`` sends for COGs). A seeded
share of all requests, API and files alike, is answered ``503 Service Unavailable``, but never the same request
(method, path, range) more than ``max_consecutive`` times in a row: the failures are transient, as the name
says, and a client retrying that often always gets through, whatever order its threads send requests in.
"""

from __future__ import annotations

import random
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FILES_PREFIX = "/files/"
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class ProxyStats:
    """Requests seen and failed, by kind (``api`` or ``files``)."""

    requests: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


@dataclass
class FlakyProxy:
    """What ``flaky_proxy`` yields: its root URL, where the files are, the counts, and the upstream API."""

    url: str
    files_url: str
    stats: ProxyStats
    upstream: str | None = None
    """Root URL of the STAC API that requests outside ``/files/`` go to (settable once the proxy runs, so
    that Items can name the proxy's file URLs before the API serving them starts)."""


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, clipped to the file."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first_text, _, last_text = spec.strip().partition("-")
    if first_text:
        first = int(first_text)
        last = min(int(last_text), size - 1) if last_text else size - 1
    else:  # the last n bytes
        first, last = max(0, size - int(last_text)), size - 1
    return (first, last) if first <= last else None


@contextmanager
def flaky_proxy(
    files_root: Path, *, failure_rate: float = 0.3, seed: int = 0, max_consecutive: int = 2
) -> Iterator[FlakyProxy]:
    """Serve on 127.0.0.1 (a free port) until the block ends; fail ``failure_rate`` of requests with 503, the
    same request at most ``max_consecutive`` times in a row."""
    rng = random.Random(seed)
    lock = threading.Lock()
    streak: Counter[tuple[str, str, str]] = Counter()  # failures in a row of each (method, path, range)
    proxy: FlakyProxy

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _fail(self, kind: str) -> bool:
            key = (self.command, self.path, self.headers.get("Range", ""))
            with lock:
                proxy.stats.requests[kind] += 1
                if rng.random() >= failure_rate or streak[key] >= max_consecutive:
                    streak.pop(key, None)
                    return False
                streak[key] += 1
                proxy.stats.failed[kind] += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _send(self, status: int, headers: dict[str, str], body: bytes, *, head: bool = False) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _file(self, head: bool) -> None:
            if self._fail("files"):
                return
            relative = urllib.request.url2pathname(self.path[len(FILES_PREFIX) :].split("?")[0])
            path = (files_root / relative).resolve()
            if not path.is_relative_to(files_root.resolve()) or not path.is_file():
                self._send(404, {}, b"not found", head=head)
                return
            data = path.read_bytes()
            headers = {"Accept-Ranges": "bytes", "Content-Type": "image/tiff"}
            wanted = _parse_range(self.headers["Range"], len(data)) if self.headers.get("Range") else None
            if wanted is None:
                self._send(200, headers, data, head=head)
                return
            first, last = wanted
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            self._send(206, headers, data[first : last + 1], head=head)

        def _forward(self, method: str) -> None:
            if self._fail("api"):
                return
            upstream = proxy.upstream
            if upstream is None:
                self._send(502, {}, b"no upstream set")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, reply, data = response.status, dict(response.headers), response.read()
            except urllib.error.HTTPError as error:
                status, reply, data = error.code, dict(error.headers), error.read()
            data = data.replace(upstream.encode(), proxy.url.encode())
            self._send(status, {k: v for k, v in reply.items() if k.lower() not in _HOP_HEADERS}, data)

        def do_GET(self) -> None:
            self._file(head=False) if self.path.startswith(FILES_PREFIX) else self._forward("GET")

        def do_HEAD(self) -> None:
            self._file(head=True) if self.path.startswith(FILES_PREFIX) else self._forward("HEAD")

        def do_POST(self) -> None:
            self._forward("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    proxy = FlakyProxy(url=url, files_url=url + FILES_PREFIX.rstrip("/"), stats=ProxyStats())
    thread = threading.Thread(target=server.serve_forever, name="flaky-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
