"""Shards on object storage shared with DataLoader workers (``models/remote_shards.py``), against an in-memory
object store: the main process fetches and writes each shard once, a worker reads the file instead of fetching,
files go once no batch in flight can need them, and a full directory leaves the workers to fetch their own."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from softcon.models import remote_shards
from softcon.models.remote_shards import EMPTY_CHUNK, RemoteShards, read_shard_file, write_shard_file

PER_SHARD = 4


def shard_object(chunks: Sequence[bytes | None]) -> bytes:
    """A Zarr shard's bytes: the inner chunks, then the index (offset, size per chunk; empty ones all ones) + CRC32C."""
    index = np.full((len(chunks), 2), EMPTY_CHUNK, np.uint64)
    body, offset = b"", 0
    for position, chunk in enumerate(chunks):
        if chunk is not None:
            index[position] = offset, len(chunk)
            body, offset = body + chunk, offset + len(chunk)
    raw = index.astype("<u8").tobytes()
    return body + raw + google_crc32c.value(raw).to_bytes(4, "little")


class MemoryReads:
    """``RangeReads`` over a dict of objects, counting GETs; ``refuse`` makes every GET fail."""

    name = "memory"

    def __init__(self, objects: dict[str, bytes], refuse: bool = False) -> None:
        self.objects, self.refuse, self.gets = objects, refuse, 0

    def _object(self, path: str) -> bytes:
        if self.refuse:
            raise AssertionError(f"fetched {path}: a worker should have read the shared file")
        self.gets += 1
        if path not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[path]

    def suffix(self, path: str, size: int) -> bytes:
        return self._object(path)[-size:]

    def ranges(self, path: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        data = self._object(path)
        return [data[start:end] for start, end in zip(starts, ends, strict=True)]


def shards(reads: MemoryReads) -> RemoteShards:
    return RemoteShards(reads, lambda shard: f"array/c/{shard}", PER_SHARD, wanted=None)


@pytest.fixture
def objects() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        f"array/c/{shard}": shard_object([None if (shard, p) == (1, 2) else rng.bytes(50 + 10 * p) for p in range(4)])
        for shard in range(4)
    }  # shard 4 was never written


def as_bytes(chunks: dict[int, memoryview]) -> dict[int, bytes]:
    return {position: bytes(view) for position, view in chunks.items()}


def test_a_shard_file_reads_back_the_fetched_shard(objects: dict[str, bytes], tmp_path: Path) -> None:
    fetched = shards(MemoryReads(objects)).get(1)
    assert sorted(fetched.chunks) == [0, 1, 3]  # position 2 is empty
    write_shard_file(tmp_path / "1", fetched)
    again = read_shard_file(tmp_path / "1", PER_SHARD)
    assert again is not None and np.array_equal(again.index, fetched.index)
    assert as_bytes(again.chunks) == as_bytes(fetched.chunks)
    unwritten = shards(MemoryReads(objects)).get(4)
    write_shard_file(tmp_path / "4", unwritten)
    assert read_shard_file(tmp_path / "4", PER_SHARD) == unwritten  # no index, no chunks
    assert read_shard_file(tmp_path / "missing", PER_SHARD) is None
    assert not list(tmp_path.glob("*.part"))
    (tmp_path / "bad").write_bytes(b"not a shard file at all")
    with pytest.raises(ValueError, match="bad is not a shared shard file"):
        read_shard_file(tmp_path / "bad", PER_SHARD)


def test_a_worker_reads_the_shards_the_main_process_published(objects: dict[str, bytes], tmp_path: Path) -> None:
    reads = MemoryReads(objects)
    main = shards(reads)
    main.start_publishing(tmp_path / "s2")
    main.prefetch([0, 1, 4])
    main.hand_out([0, 1, 4], batch=0, keep=2)  # waits for the files
    assert reads.gets == 2 + 2 + 1  # index and chunks of 0 and 1; the index GET of 4 finds nothing
    assert sorted(p.name for p in (tmp_path / "s2").iterdir()) == ["0", "1", "4"]
    assert main.get(0).chunks == {}  # the main process decodes nothing: it keeps only the index

    worker = shards(MemoryReads(objects, refuse=True))
    worker.shared = tmp_path / "s2"
    for shard in (0, 1):
        assert as_bytes(worker.get(shard).chunks) == as_bytes(shards(MemoryReads(objects)).get(shard).chunks)
    assert worker.get(4).index is None


def test_a_shard_file_is_deleted_keep_batches_after_its_last_use(objects: dict[str, bytes], tmp_path: Path) -> None:
    main = shards(MemoryReads(objects))
    main.start_publishing(tmp_path)
    main.hand_out([0], batch=0, keep=1)
    main.hand_out([0, 1], batch=1, keep=1)
    main.hand_out([1], batch=2, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]  # batch 1 read shard 0: it may be in flight
    main.hand_out([2], batch=3, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    main.start_publishing(tmp_path)  # the next epoch: the last one's files go
    assert list(tmp_path.iterdir()) == []


def test_a_full_directory_leaves_the_workers_to_fetch_their_own(
    objects: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(path: Path, shard: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(remote_shards, "write_shard_file", full)
    reads = MemoryReads(objects)
    main = shards(reads)
    main.start_publishing(tmp_path)
    with caplog.at_level(logging.WARNING, logger="softcon.models.remote_shards"):
        fetched = main.get(0)
    assert "cannot share fetched shards" in caplog.text and "TMPDIR" in caplog.text
    assert len(fetched.chunks) == PER_SHARD  # what was fetched is still whole
    gets = reads.gets
    main.prefetch([1, 2])
    main.hand_out([1, 2], batch=0, keep=1)
    assert reads.gets == gets  # the main process stops fetching for workers that fetch their own
    worker = shards(MemoryReads(objects))
    worker.shared = tmp_path
    assert len(worker.get(2).chunks) == PER_SHARD  # no file: the worker fetches


def test_share_directories_left_by_a_killed_process_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from softcon.models.remote_shards import remove_orphaned_shard_dirs

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"softcon-shards-{int(gone.stdout)}-abc"
    mine = tmp_path / f"softcon-shards-{os.getpid()}-def"
    other = tmp_path / "softcon-shards-notapid-x"
    for folder in (orphan, mine, other):
        folder.mkdir()
        (folder / "0").write_bytes(b"x")
    remove_orphaned_shard_dirs(tmp_path)
    assert not orphan.exists() and mine.exists() and other.exists()
