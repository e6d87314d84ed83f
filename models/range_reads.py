"""Byte ranges of objects on object storage: what the loader's shard path (``models/data.py``) fetches.

Two clients behind one small interface: obstore (Rust's ``object_store``) for ``s3://``, and fsspec for every
other URL (and for ``s3://`` where obstore is not installed). Against the tests' S3 server on loopback a bare 64 MB
GET cost 1.4 ms of client CPU per MB through obstore and 2.2-7 through s3fs; the loader's main-process path read
1.16-1.32x the samples/s with obstore (``bench/bench_loader_s3.py``, ``docs/scaling.md``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import fsspec

if TYPE_CHECKING:
    from obstore.store import S3Config, S3Credential, S3Store

__all__ = ["FsspecRanges", "ObstoreRanges", "RangeReads", "range_reads"]


class RangeReads(Protocol):
    """Ranged GETs of one filesystem's objects, by fsspec path (``bucket/key`` on S3)."""

    name: str
    """What fetches the bytes (for benchmarks and logs)."""

    def suffix(self, path: str, size: int) -> bytes | memoryview:
        """The last ``size`` bytes of the object; FileNotFoundError when it does not exist."""
        ...

    def ranges(self, path: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes | memoryview]:
        """Bytes [start, end) of the object for each pair, in the order given."""
        ...


class FsspecRanges:
    """Range reads through an fsspec filesystem (s3fs, gcsfs, adlfs, memory...)."""

    name = "fsspec"

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    def suffix(self, path: str, size: int) -> bytes:
        return self.fs.cat_file(path, start=-size)

    def ranges(self, path: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes | memoryview]:
        return list(self.fs.cat_ranges([path] * len(starts), list(starts), list(ends), on_error="raise"))


_runtime_pid: int | None = None
"""The process that started obstore's runtime (tokio, shared by the process): it does not survive a fork."""


def _obstore_usable() -> bool:
    """Whether obstore can run here: not in a forked child (a DataLoader worker) of a process that used it, where
    its runtime's threads are gone and a request would hang."""
    global _runtime_pid
    if _runtime_pid is None:
        _runtime_pid = os.getpid()
    return _runtime_pid == os.getpid()


class ObstoreRanges:
    """Range reads of ``s3://`` objects through obstore, with the credentials, region and endpoint that s3fs uses
    (botocore's chain: the ``AWS_*`` variables, a profile, the instance role; ``AWS_ENDPOINT_URL`` for a
    non-AWS server). Its buffers are read without a copy on the Python side. In a forked child of a process that
    used obstore, it reads through fsspec instead."""

    name = "obstore"

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs
        self._stores: dict[str, S3Store] = {}
        self._fallback = FsspecRanges(fs)

    def suffix(self, path: str, size: int) -> bytes | memoryview:
        import obstore

        if not _obstore_usable():
            return self._fallback.suffix(path, size)
        bucket, key = self._split(path)
        with _as_python_errors(path):
            return memoryview(obstore.get(self._store(bucket), key, options={"range": {"suffix": size}}).bytes())

    def ranges(self, path: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes | memoryview]:
        import obstore

        if not _obstore_usable():
            return self._fallback.ranges(path, starts, ends)
        bucket, key = self._split(path)
        with _as_python_errors(path):
            blobs = obstore.get_ranges(self._store(bucket), key, starts=list(starts), ends=list(ends))
        return [memoryview(blob) for blob in blobs]

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.removeprefix("s3://").partition("/")
        return bucket, key

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            store = self._stores[bucket] = _s3_store(self.fs, bucket)
        return store


def _s3_store(fs: Any, bucket: str) -> S3Store:
    """An obstore S3Store for ``bucket`` configured like the s3fs filesystem ``fs``."""
    import botocore.session
    from obstore.store import S3Store

    session = botocore.session.get_session()
    endpoint = (
        fs.endpoint_url
        or fs.client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = fs.client_kwargs.get("region_name") or session.get_config_variable("region") or "us-east-1"
    config: S3Config = {"region": region}
    if endpoint:
        config["endpoint"] = endpoint
    if fs.key and fs.secret:  # given to s3fs explicitly
        config |= {"access_key_id": fs.key, "secret_access_key": fs.secret}
        if fs.token:
            config["session_token"] = fs.token
        return S3Store(bucket, config=config, client_options={"allow_http": bool(endpoint)})
    credentials = session.get_credentials()
    if credentials is None:  # anonymous, as botocore would be
        config["skip_signature"] = True
        return S3Store(bucket, config=config, client_options={"allow_http": bool(endpoint)})

    def provide() -> S3Credential:
        frozen = credentials.get_frozen_credentials()  # refreshed by botocore when they expire
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": None}  # fmt: skip

    return S3Store(bucket, config=config, client_options={"allow_http": bool(endpoint)}, credential_provider=provide)


@contextlib.contextmanager
def _as_python_errors(path: str) -> Iterator[None]:
    """obstore's access errors as the PermissionError fsspec raises (a missing object is already a
    FileNotFoundError), naming where the credentials come from and never the secret."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    try:
        yield
    except (PermissionDeniedError, UnauthenticatedError):
        raise PermissionError(
            f"access to s3://{path.removeprefix('s3://')} was denied; check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the AWS profile) and AWS_ENDPOINT_URL"
        ) from None


def range_reads(fs: fsspec.AbstractFileSystem) -> RangeReads:
    """obstore for an s3fs filesystem where obstore is installed, else fsspec's own range reads (also what obstore
    falls back on in a forked child of a process that used it)."""
    is_s3 = "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if is_s3 and importlib.util.find_spec("obstore") is not None:
        return ObstoreRanges(fs)
    return FsspecRanges(fs)
