"""Coordinated writes to one object store by many processes: an exclusive lease per tile and compare-and-swap
commits of shared metadata, both by S3 conditional writes (``If-None-Match: *``, ``If-Match: <etag>``).

Object storage has no ``flock``; what it has (AWS S3 since 2024, MinIO, SeaweedFS, Ceph, R2) is a PUT that
succeeds only if the object is absent, or only if it is still the version read. That is enough for the cube
(``docs/design.md``, "Concurrent writers"):

- ``object_lease(url)``: a lock object created with ``If-None-Match: *``; whoever creates it holds the lease, the
  others wait with backoff. It records its holder and is deleted on release. A holder that died leaves it
  behind: after ``lease_seconds`` (from the object's own ``LastModified``, the server's clock) another writer
  takes it over with ``If-Match`` on the stale version, so exactly one of several waiters wins.
- ``swap_object(url, change)``: read an object and its ETag, write ``change(old)`` with ``If-Match`` on that
  ETag, and read again and retry when another writer committed in between: no update is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec

__all__ = ["LEASE_SECONDS", "LeaseTimeoutError", "conditional_writes", "object_lease", "swap_object"]

log = logging.getLogger(__name__)

LEASE_SECONDS = 600.0
"""A lease older than this is taken to belong to a dead writer. An ingest holds a tile's lease for one append
(seconds); the margin covers slow appends of large tiles."""
WAIT_SECONDS = 1800.0
"""How long a writer waits for a lease before it gives up."""


class LeaseTimeoutError(TimeoutError):
    """A lease stayed held by another writer for longer than the wait allowed."""


def conditional_writes(url: str) -> bool:
    """Whether the store at ``url`` is S3-compatible, where this module's leases and swaps are implemented. Other
    object stores (``gs://``, ``az://``) get no coordination: one writer per cube there."""
    fs, _ = fsspec.core.url_to_fs(url)
    return hasattr(fs, "call_s3")


def _lost_race(error: BaseException) -> bool:
    """Whether a conditional write failed because its condition did not hold (412), or because another
    conditional write to the same key was in flight (409, AWS's ``ConditionalRequestConflict``), or a versioned read
    met another writer's commit (s3fs's ``FileExpired``: the object changed between its HEAD and its GET)."""
    if isinstance(error, FileExistsError) or type(error).__name__ == "FileExpired":
        return True
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {409, 412}


def _put_if_match(fs: fsspec.AbstractFileSystem, path: str, data: bytes, etag: str) -> None:
    """Write ``data`` to ``path`` only if the object is still the version ``etag`` (raises when it is not); an
    S3-compatible store only (``conditional_writes``)."""
    bucket, _, key = path.partition("/")
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
    fs.invalidate_cache(path)


def _read_versioned(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    """The object's bytes and the ETag of exactly that version (s3fs reads with ``If-Match`` on the ETag its
    HEAD saw, so a write in between fails the read instead of mixing two versions)."""
    fs.invalidate_cache(path)
    with fs.open(path, "rb", cache_type="none") as handle:
        return handle.read(), str(handle.details["ETag"])


def _holder() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": time.time()}
    ).encode()


def _age_seconds(info: dict[str, Any]) -> float:
    modified = info.get("LastModified")
    if isinstance(modified, datetime):
        return (datetime.now(UTC) - modified.astimezone(UTC)).total_seconds()
    return 0.0


@contextlib.contextmanager
def object_lease(
    url: str, *, lease_seconds: float = LEASE_SECONDS, wait_seconds: float = WAIT_SECONDS
) -> Iterator[None]:
    """Hold the lease at ``url`` (an object-store URL, e.g. ``s3://bucket/cube.zarr/.ingest-locks/T.lock``).

    Raises:
        LeaseTimeoutError: when another writer held it for ``wait_seconds``.
    """
    fs, path = fsspec.core.url_to_fs(url)
    mine = _holder()
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            fs.pipe_file(path, mine, mode="create")
            break
        except OSError as error:
            if not _lost_race(error):
                raise
        try:
            fs.invalidate_cache(path)
            info = fs.info(path)
        except FileNotFoundError:
            continue  # released in between: try again at once
        if _age_seconds(info) > lease_seconds:
            try:
                _put_if_match(fs, path, mine, str(info["ETag"]))
                log.warning("took over the lease %s: its holder left it %.0f s ago", url, _age_seconds(info))
                break
            except OSError as error:
                if not _lost_race(error):
                    raise
                continue  # another waiter took it over first
        if time.monotonic() > deadline:
            raise LeaseTimeoutError(
                f"{url} is held by another writer for more than {wait_seconds:.0f} s ({fs.cat_file(path)!r}). If no "
                f"ingest is running on this cube, delete that object; a lease older than {lease_seconds:.0f} s is "
                "taken over on its own"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.invalidate_cache(path)
            if fs.cat_file(path) == mine:  # not taken over after it went stale
                fs.rm_file(path)


def swap_object(url: str, change: Callable[[bytes], bytes], *, attempts: int = 50) -> None:
    """Replace the object at ``url`` by ``change(current bytes)`` atomically: a write that meets another
    writer's commit reads again and re-applies ``change``.

    Raises:
        FileNotFoundError: when there is no object at ``url``.
        RuntimeError: when ``attempts`` rounds all met another commit.
    """
    fs, path = fsspec.core.url_to_fs(url)
    for attempt in range(attempts):
        try:
            current, etag = _read_versioned(fs, path)
            _put_if_match(fs, path, change(current), etag)
            return
        except FileNotFoundError:
            raise
        except OSError as error:
            if not _lost_race(error):
                raise
            time.sleep(min(0.01 * 2**attempt, 0.5))
    raise RuntimeError(f"{url}: {attempts} conditional writes in a row met another writer's commit")
