"""A real local STAC API (``rustac serve``) over local Items and Collections, for tests and the demo.

The search-and-load path then is the one that runs against Earth Search or Planetary Computer:
pystac-client talks HTTP to ``/search``, with paging, bbox, datetime and collection filters.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def find_rustac() -> Path:
    """The ``rustac`` executable: next to the running Python first (a virtualenv), then on PATH.

    Raises:
        FileNotFoundError: when neither has one.
    """
    beside = Path(sys.executable).parent / "rustac"
    if beside.is_file():
        return beside
    found = shutil.which("rustac")
    if found:
        return Path(found)
    raise FileNotFoundError(f"rustac not found next to {sys.executable} nor on PATH; pip install rustac")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextmanager
def serve_stac(
    hrefs: Sequence[Path], *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 60
) -> Iterator[str]:
    """Serve Items, ItemCollections and Collections as a STAC API; yield its root URL.

    Args:
        hrefs: JSON files (Collections first or not: collections missing for Items are created).
        host: address to bind; keep the loopback default unless you mean to expose it.
        port: TCP port; a free one when ``None``.
        timeout: seconds to wait for ``/search`` to answer.

    Raises:
        FileNotFoundError: a missing href or no rustac.
        RuntimeError: the server exited or did not answer within ``timeout``.
    """
    missing = [str(h) for h in hrefs if not Path(h).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot serve missing STAC files: {missing}")
    port = port or free_port(host)
    address = f"{host}:{port}"
    root = f"http://{address}"
    command = [str(find_rustac()), "serve", *(str(Path(h).resolve()) for h in hrefs), "--create-collections",
               "--addr", address]  # fmt: skip
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(f"{root}/search?limit=1"):
                if process.poll() is not None:
                    stderr.seek(0)
                    raise RuntimeError(
                        f"rustac serve exited with {process.returncode}: {stderr.read().decode()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rustac serve did not answer on {root} within {timeout} s")
                time.sleep(0.1)
            log.info("STAC API at %s serving %d files", root, len(hrefs))
            yield root
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
