"""A training store's shards on object storage, fetched ahead of use, and shared with DataLoader workers.

``RemoteShards`` fetches a shard of one array with ranged GETs (``models/range_reads.py``) and keeps it in an LRU;
``SampleReader`` (``models/data.py``) decodes samples from it. With DataLoader workers every worker would fetch
every shard its batches touch, so a buffer of shards would cross the network once per worker. Instead the main
process fetches each shard once and writes it to a file in a directory the workers share (``shared_shard_dir``:
``/dev/shm`` when it has room), and a worker reads the shard from that file, fetching it itself only when the file
is not there (a write that failed, a shard outside the prefetched ones).
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from softcon.models.range_reads import RangeReads

log = logging.getLogger(__name__)

EMPTY_CHUNK = np.uint64(2**64 - 1)
"""Offset and size of an inner chunk that was never written, in a shard's index."""
WHOLE_SHARD_FRACTION = 0.5
"""On object storage a shard's chunks are fetched in one GET of the whole shard when the samples the dataset can
ask for hold at least this fraction of its bytes; otherwise as coalesced byte ranges."""
MAX_RANGE_GAP = 1 << 20
"""Byte ranges of one shard closer than this are fetched as one (one request costs more than a MiB on the wire)."""
SHM_FREE_BYTES = 2 << 30
"""``/dev/shm`` holds the shared shards when it has at least this much free (a container's default 64 MB has not)."""
_FILE_MAGIC = b"softcon-shard-v1"
_DIR_PREFIX = "softcon-shards-"


def coalesce_ranges(starts: np.ndarray, stops: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted [start, stop) byte ranges, those at most ``max_gap`` apart merged into one."""
    order = np.argsort(starts, kind="stable")
    merged: list[tuple[int, int]] = []
    for start, stop in zip(starts[order].tolist(), stops[order].tolist(), strict=True):
        if merged and start - merged[-1][1] <= max_gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def check_shard_index(raw: bytes | memoryview, per_shard: int, where: str) -> np.ndarray:
    """(per_shard, 2) uint64 offsets and sizes from a shard's index bytes (CRC32C checked)."""
    raw = bytes(raw)  # 16 bytes per sample: the copy is nothing beside the fetch
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ValueError(f"shard index checksum mismatch in {where}: the training store is corrupt")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(per_shard, 2)


@dataclass(frozen=True)
class FetchedShard:
    """What was fetched of one shard on object storage: its index and the compressed bytes of its chunks."""

    index: np.ndarray | None
    """(per_shard, 2) offsets and sizes; None for a shard not written (every sample is the fill value)."""
    chunks: dict[int, memoryview]
    """Position in the shard -> that inner chunk's compressed bytes (the positions the dataset can ask for)."""


def write_shard_file(path: Path, shard: FetchedShard) -> None:
    """Write ``shard`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    positions = np.fromiter(shard.chunks, np.uint64, len(shard.chunks))
    sizes = np.array([view.nbytes for view in shard.chunks.values()], np.uint64)
    head = np.array([shard.index is not None, len(positions)], np.uint64)
    part = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with open(part, "wb") as file:
            file.writelines([_FILE_MAGIC, head.tobytes(), positions.tobytes(), sizes.tobytes()])
            if shard.index is not None:
                file.write(np.ascontiguousarray(shard.index, "<u8").tobytes())
            file.writelines(shard.chunks.values())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def read_shard_file(path: Path, per_shard: int) -> FetchedShard | None:
    """The shard ``write_shard_file`` wrote to ``path``, mapped (not copied: a worker touches only the pages of
    the samples it decodes); None when there is no such file. The mapping outlives the file's deletion."""
    try:
        with open(path, "rb") as file:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None
    if data[: len(_FILE_MAGIC)] != _FILE_MAGIC:
        raise ValueError(f"{path} is not a shared shard file: remove it and re-run")
    offset = len(_FILE_MAGIC)
    has_index, n = (int(v) for v in np.frombuffer(data, "<u8", 2, offset))
    positions = np.frombuffer(data, "<u8", n, offset + 16).tolist()
    sizes = np.frombuffer(data, "<u8", n, offset + 16 + 8 * n).tolist()
    offset += 16 + 16 * n
    index = None
    if has_index:
        index = np.frombuffer(data, "<u8", 2 * per_shard, offset).reshape(per_shard, 2)
        offset += 16 * per_shard
    view = memoryview(data)
    chunks = {}
    for position, size in zip(positions, sizes, strict=True):
        chunks[position] = view[offset : offset + size]
        offset += size
    return FetchedShard(index, chunks)


def shared_shard_dir() -> Path:
    """A new directory for the shards a loader's main process shares with its workers: in ``/dev/shm`` (memory)
    when it has ``SHM_FREE_BYTES`` free, else in the temporary directory (``TMPDIR``). The loader removes it; those
    left by a killed process (its pid is in the name) are removed here."""
    shm = Path("/dev/shm")
    roots = [shm] if shm.is_dir() and os.access(shm, os.W_OK) else []
    roots.append(Path(tempfile.gettempdir()))
    for root in roots:
        remove_orphaned_shard_dirs(root)
    in_memory = roots[0] == shm and shutil.disk_usage(shm).free >= SHM_FREE_BYTES
    return Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=shm if in_memory else None))


def remove_orphaned_shard_dirs(root: Path) -> None:
    """Remove the shared-shard directories in ``root`` whose process is gone."""
    for folder in root.glob(f"{_DIR_PREFIX}*-*"):
        pid = folder.name[len(_DIR_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RemoteShards:
    """The shards of one array on object storage, fetched ahead of use with ranged GETs and kept in an LRU.

    A shard costs one GET of its index (a suffix range: its size is known from the codec, 16 bytes per inner
    chunk + a CRC32C) and one GET of its chunks: the whole shard when the samples that can be asked for
    (``wanted``, the dataset's split) hold most of its bytes, else their byte ranges, coalesced. Fetches run on
    their own threads (``prefetch``), so the loader asks for the next shards while it decodes the current ones.
    ``reads`` fetches the bytes (``models/range_reads.py``: obstore for ``s3://``, else fsspec), with the
    credentials the rest of the project uses (the ``AWS_*`` variables for ``s3://``).

    Shared with DataLoader workers: in the main process ``publish`` is a directory where each fetched shard is
    written (the main process then keeps only its index: it decodes nothing), ``hand_out`` waits for a batch's
    shards and deletes the files no batch in flight can still need; in a worker ``shared`` is that directory,
    read before fetching.
    """

    def __init__(
        self, reads: RangeReads, path: Callable[[int], str], per_shard: int, wanted: np.ndarray | None
    ) -> None:
        self.reads = reads
        self.path = path
        self.per_shard = per_shard
        self.wanted = wanted
        self.capacity = 8
        self.requests = 0
        """GET requests made (index and chunk ranges): what the tests count."""
        self.shared: Path | None = None
        """In a DataLoader worker: the directory the main process writes the shards to."""
        self.publish: Path | None = None
        """In the main process, while a loader with workers runs: where each fetched shard is written."""
        self._handed: OrderedDict[int, int] = OrderedDict()  # published shard -> the last batch that used it
        self._unwritable = False
        self._shards: OrderedDict[int, Future[FetchedShard]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="softcon-fetch")

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start fetching ``shards`` (those not already held or in flight)."""
        if self._unshareable():
            return
        for shard in shards:
            self._future(shard)

    def get(self, shard: int) -> FetchedShard:
        """The fetched shard, waiting for it when it is still on its way."""
        return self._future(shard).result()

    def read_range(self, shard: int, start: int, stop: int) -> bytes | memoryview:
        """Bytes [start, stop) of a shard, one GET (a chunk that was not among the wanted ones)."""
        self._count(1)
        return self.reads.ranges(self.path(shard), [start], [stop])[0]

    def start_publishing(self, directory: Path | None) -> None:
        """Write every shard fetched from now on to ``directory`` (None: stop). Either way the shards held are
        forgotten, so that none is held without its file or without its chunks; starting again empties the
        directory (the last run's workers are gone)."""
        with self._lock:
            self._shards.clear()
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
                for file in directory.iterdir():
                    file.unlink(missing_ok=True)
                self._handed.clear()
            self.publish = directory
            self._unwritable = False

    def hand_out(self, shards: Iterable[int], batch: int, keep: int) -> None:
        """Batch number ``batch``, which reads ``shards``, goes to a worker: wait until they are written, and
        delete the files of the shards no batch since ``batch - keep`` has read (those workers are done)."""
        if self._unshareable():
            return
        for shard in shards:
            self.get(shard)  # a failed fetch raises here, in the main process
            with self._lock:
                self._handed[shard] = batch
                self._handed.move_to_end(shard)
        with self._lock:
            while self._handed and next(iter(self._handed.values())) < batch - keep:
                shard, _ = self._handed.popitem(last=False)
                self._shards.pop(shard, None)
                if self.publish is not None:
                    (self.publish / str(shard)).unlink(missing_ok=True)

    def _unshareable(self) -> bool:
        """Publishing, but a shard could not be written: the workers fetch their own, this process nothing."""
        return self.publish is not None and self._unwritable

    def _count(self, requests: int) -> None:
        with self._lock:
            self.requests += requests

    def _future(self, shard: int) -> Future[FetchedShard]:
        with self._lock:
            future = self._shards.get(shard)
            if future is None:
                future = self._shards[shard] = self._pool.submit(self._fetch, shard)
            self._shards.move_to_end(shard)
            while self.publish is None and len(self._shards) > self.capacity:  # published: ``hand_out`` evicts
                self._shards.popitem(last=False)
            return future

    def _fetch(self, shard: int) -> FetchedShard:
        if self.shared is not None:
            fetched = read_shard_file(self.shared / str(shard), self.per_shard)
            if fetched is not None:
                return fetched
        fetched = self._fetch_remote(shard)
        publish = self.publish
        if publish is None or self._unwritable:
            return fetched
        try:
            write_shard_file(publish / str(shard), fetched)
        except OSError as error:  # e.g. /dev/shm full: the workers fetch for themselves, as without sharing
            self._unwritable = True
            log.warning("cannot share fetched shards with the DataLoader workers through %s (%s); each worker "
                        "fetches its own (set TMPDIR to a disk with room)", publish, error)  # fmt: skip
            return fetched
        return FetchedShard(fetched.index, {})

    def _fetch_remote(self, shard: int) -> FetchedShard:
        path = self.path(shard)
        self._count(1)
        try:
            raw = self.reads.suffix(path, 16 * self.per_shard + 4)
        except FileNotFoundError:
            return FetchedShard(None, {})
        index = check_shard_index(raw, self.per_shard, path)
        written = np.flatnonzero(index[:, 0] != EMPTY_CHUNK)
        positions = written
        if self.wanted is not None:
            first = shard * self.per_shard
            lo, hi = np.searchsorted(self.wanted, [first, first + self.per_shard])
            positions = np.intersect1d(written, self.wanted[lo:hi] - first)
        if not len(positions):
            return FetchedShard(index, {})
        starts, sizes = index[positions, 0].astype(np.int64), index[positions, 1].astype(np.int64)
        all_bytes = int(index[written, 1].sum())
        if sizes.sum() >= WHOLE_SHARD_FRACTION * all_bytes:
            every = index[written].astype(np.int64)
            ranges = [(int(every[:, 0].min()), int((every[:, 0] + every[:, 1]).max()))]
        else:
            ranges = coalesce_ranges(starts, starts + sizes, MAX_RANGE_GAP)
        self._count(len(ranges))
        blobs = self.reads.ranges(path, [r[0] for r in ranges], [r[1] for r in ranges])
        range_starts = np.array([r[0] for r in ranges], np.int64)
        which = np.searchsorted(range_starts, starts, side="right") - 1  # the range holding each chunk
        chunks = {}
        for position, start, size, r in zip(positions.tolist(), starts.tolist(), sizes.tolist(), which.tolist(),
                                            strict=True):  # fmt: skip
            offset = start - ranges[r][0]
            chunks[position] = memoryview(blobs[r])[offset : offset + size]
        return FetchedShard(index, chunks)
