"""Loader on object storage: the same training store read from local disk and from an S3 server, same process.

The store is ``bench_loader.py``'s (13 x 264 x 264 uint16 synthetic patches in the preprocess layout: shards of 64
samples, inner chunks of one sample, LZ4HC), written to a temporary folder and uploaded to a SeaweedFS S3 gateway
on 127.0.0.1 (the test suite's server, ``tests/s3_fixtures.py``; credentials in the ``AWS_*`` variables, as the
project reads them). Both sides go through ``make_loader`` with the same options and seed, so they deliver the same
batches (checked at start-up); the S3 side takes the loader's shard path (``SampleReader.remote``: per shard one
ranged GET of its index and one of its chunks, fetched a buffer ahead), its ranges fetched by obstore (the
loader's default for ``s3://``) and, as a second S3 side, by s3fs (``--no-s3fs`` leaves it out).

Rows, each at 2 cores' worth of loading: "0 workers + 2 decode threads" (the main-process path training uses) and "2
workers" (DataLoader processes, one decode thread each; each pass in a new spawned process, as ``softcon train``'s
main process before it forks its workers). With workers the main process fetches each shard once and shares it with
them through a directory in /dev/shm (``models/remote_shards.py``); the "unshared" side is the same loader with the
sharing failing (as when /dev/shm and TMPDIR are full), so that each worker fetches the shards of its own batches,
as every worker did before the sharing (a worker forked from a process that used obstore fetches through s3fs,
``models/range_reads.py``; these are forked before the main process fetches anything). "raw" batches
13 x 264 x 264 uint16 as training with ``augment_on_device`` reads them, "CPU augment" one normalised 224 px crop
per sample. Rounds alternate local and S3 so that the shared machine's noise hits both; a pass is ``--epochs``
epochs of the store through one loader, timed from its first batch request (the first fetches included). Per row:
the best round's samples/s on each side, the median of the per-round S3/local ratios (the target: at least 0.7), the
CPU-seconds of this process and of the S3 server per 1,000 samples (the server shares the machine's cores), and the
CPU ratio: local CPU-seconds per sample over S3's (client + server), the throughput ratio when every core is busy.

    python bench/bench_loader_s3.py                            # about 13 minutes on 2 cores (10 with --no-s3fs)
    python bench/bench_loader_s3.py --real tests/data/real     # patches cut from real Sentinel-2 (0.56 MB each)
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as importing the `models` package does

import fsspec
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from bench_compression import read_s2  # noqa: E402
from bench_loader import BLOCK, CROP, PATCH, synthetic_patches, write_store  # noqa: E402
from gpu_train import EpochsSampler  # noqa: E402
from s3_fixtures import BUCKET, aws_env, seaweedfs  # noqa: E402

import softcon.models.data  # noqa: E402
import softcon.models.remote_shards  # noqa: E402
from softcon.models.data import StoreDataset, make_loader  # noqa: E402
from softcon.models.range_reads import FsspecRanges, range_reads  # noqa: E402

CLIENTS = {"obstore": range_reads, "s3fs": FsspecRanges}
"""How the S3 side fetches its ranges: the loader's default for s3:// (obstore), and fsspec's s3fs."""


@dataclass(frozen=True)
class Speed:
    """One pass: samples/s, and CPU-seconds per 1,000 samples of this process (with its workers) and the server."""

    rate: float
    cpu: float
    server_cpu: float


def dataset(store: str, *, raw: bool, threads: int) -> StoreDataset:
    """The training dataset over ``store``: raw 264 px patches, or one augmented 224 px crop per sample."""
    return StoreDataset(
        store, two_views=False, crop_size=None if raw else CROP, defer_augment=raw, decode_threads=threads
    )


def real_patches(folder: Path, n: int) -> np.ndarray:
    """(n, 13, 264, 264) uint16 cut from the real Sentinel-2 L1C crop (240 px, 12 bands; B10, absent there, repeated
    from B09), reflected out to 264 px and varied by the 8 flips and turns and by shifts, so that a shard
    compresses like real imagery (the synthetic patches' noise does not)."""
    s2 = read_s2(folder)  # (12, 240, 240)
    thirteen = np.concatenate([s2[:10], s2[9:10], s2[10:]])  # B01..B09, B10 := B09, B11, B12
    pad = (PATCH - thirteen.shape[1]) // 2
    patch = np.pad(thirteen, ((0, 0), (pad, PATCH - thirteen.shape[1] - pad), (pad, PATCH - thirteen.shape[2] - pad)),
                   mode="reflect")  # fmt: skip
    out = np.empty((n, *patch.shape), np.uint16)
    for k in range(n):
        turned = np.rot90(patch[:, :, ::-1] if k % 2 else patch, k // 2 % 4, axes=(1, 2))
        out[k] = np.roll(turned, (k // 8 * 29, k // 8 * 17), axis=(1, 2))
    return out


def measure(
    store: str, server: psutil.Process, *, raw: bool, workers: int, threads: int, epochs: int, client: str = "obstore",
    shared: bool = True,
) -> Speed:  # fmt: skip
    """One pass of ``epochs`` epochs through a loader over a freshly opened store (opening it is not timed), an
    S3 store's ranges fetched by ``client``; with ``shared`` False the workers cannot be handed the main process's
    shards and fetch their own (forked workers use ``client`` too, obstore only where this process has not used it:
    ``measure_in_new_process``)."""
    softcon.models.data.range_reads = CLIENTS[client]  # type: ignore[assignment]
    if not shared:
        logging.getLogger("softcon.models.remote_shards").setLevel(logging.ERROR)
        softcon.models.remote_shards.write_shard_file = _no_room  # type: ignore[assignment]
    data = dataset(store, raw=raw, threads=threads)
    me = psutil.Process()
    cpu_self, cpu_server = _cpu(me), _cpu(server)
    started, seen = time.perf_counter(), 0
    for batch in make_loader(data, 32, sampler=EpochsSampler(data, epochs), num_workers=workers):
        seen += len(batch["raw" if raw else "image"])
    seconds = time.perf_counter() - started
    return Speed(seen / seconds, 1000 * (_cpu(me) - cpu_self) / seen, 1000 * (_cpu(server) - cpu_server) / seen)


def _no_room(*args: Any) -> None:
    raise OSError(28, "No space left on device (bench_loader_s3: the unshared side)")


def measure_in_new_process(store: str, server_pid: int, **options: Any) -> Speed:
    """``measure`` in a spawned process that has not used obstore, as ``softcon train``'s main process has not when
    it forks its DataLoader workers: so they fetch through obstore (a worker forked from a process that used it
    falls back on s3fs, ``models/range_reads.py``)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_by_pid, store, server_pid, options).result()


def _measure_by_pid(store: str, server_pid: int, options: dict[str, Any]) -> Speed:
    from softcon.models import range_reads

    assert range_reads._runtime_pid is None, "obstore was used before the workers fork: they would fall back on s3fs"
    multiprocessing.set_start_method("fork", force=True)  # as training's workers on Linux (a spawned child spawns)
    torch.set_num_threads(1)
    return measure(store, psutil.Process(server_pid), **options)


def _cpu(process: psutil.Process) -> float:
    """CPU-seconds of ``process`` and of its children that have exited (DataLoader workers)."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def check_same_batches(local: str, url: str) -> None:
    """The S3 store delivers the local store's batches, through the shard path."""
    for raw in (True, False):
        data = [dataset(store, raw=raw, threads=2) for store in (local, url)]
        for one, other in zip(*(make_loader(d, 32) for d in data), strict=True):
            assert all(torch.equal(one[key], other[key]) for key in one), f"local and S3 batches differ (raw={raw})"
        remote = data[1].reader.remote
        assert remote is not None and remote.requests > 0, "the S3 store was not read by shards"
        assert remote.reads.name == "obstore", f"the S3 store was read by {remote.reads.name}, not obstore"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the store (shards of 64)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real", type=Path, metavar="DIR",
                        help="patches cut from the real S2 crop in DIR/sentinel2_l1c_virginia (tests/data/real) "
                             "instead of synthetic ones")  # fmt: skip
    parser.add_argument("--no-s3fs", action="store_true", help="leave out the S3 side read through s3fs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in bench_loader.py: the decode threads are the parallelism measured

    with tempfile.TemporaryDirectory(prefix="bench_loader_s3_") as folder:
        work = Path(folder)
        (work / "seaweedfs").mkdir()
        with seaweedfs(work / "seaweedfs") as s3:
            os.environ.update(aws_env(s3, s3.secret_key))
            server = next(p for p in psutil.Process().children() if "weed" in p.name())
            started = time.perf_counter()
            local = work / "store.zarr"
            block = (
                real_patches(args.real / "sentinel2_l1c_virginia", BLOCK) if args.real else synthetic_patches(BLOCK, 0)
            )
            write_store(local, args.samples, block)
            url = f"s3://{BUCKET}/store.zarr"
            fsspec.filesystem("s3").put(str(local), url, recursive=True)
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            print(f"store: {args.samples} samples, {size / 2**20:.0f} MiB, written and uploaded in "
                  f"{time.perf_counter() - started:.1f} s")  # fmt: skip
            check_same_batches(str(local), url)

            rows = {
                ("raw", "0 workers + 2 decode threads"): dict(raw=True, workers=0, threads=2),
                ("raw", "2 workers"): dict(raw=True, workers=2, threads=1),
                ("CPU augment", "0 workers + 2 decode threads"): dict(raw=False, workers=0, threads=2),
                ("CPU augment", "2 workers"): dict(raw=False, workers=2, threads=1),
            }
            sides = [("local", str(local), "obstore", True), ("s3", url, "obstore", True)]
            sides += [("unshared", url, "obstore", False)] + ([] if args.no_s3fs else [("s3fs", url, "s3fs", True)])
            results: dict[tuple[str, str], dict[str, list[Speed]]] = {}
            for _ in range(args.rounds):
                for row, options in rows.items():
                    for side, store, client, shared in sides:
                        if side == "unshared" and not options["workers"]:
                            continue
                        run = measure_in_new_process if options["workers"] else measure
                        speed = run(store, server if run is measure else server.pid, **options,  # type: ignore[operator]
                                    epochs=args.epochs, client=client, shared=shared)  # fmt: skip
                        results.setdefault(row, {}).setdefault(side, []).append(speed)

    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; batch 32, buffer 4 shards of {BLOCK}")
    print(f"{'loader':<46} {'client':<17} {'local/s':>8} {'S3/s':>8} {'S3/local':>9} {'CPU-s/1k':>9} "
          f"{'S3 CPU-s/1k':>12} {'server CPU-s/1k':>16} {'CPU ratio':>9}  S3/local per round")  # fmt: skip
    for (kind, how), sides in results.items():
        local = sides["local"]
        for side, client in (("s3", "obstore"), ("unshared", "obstore, unshared"), ("s3fs", "s3fs")):
            if side not in sides:
                continue
            s3 = sides[side]
            ratios = [there.rate / here.rate for there, here in zip(s3, local, strict=True)]
            cpu_local, cpu_s3 = float(np.median([s.cpu for s in local])), float(np.median([s.cpu for s in s3]))
            cpu_server = float(np.median([s.server_cpu for s in s3]))
            print(
                f"{kind + ', ' + how:<46} {client:<17} {max(s.rate for s in local):>8.0f} "
                f"{max(s.rate for s in s3):>8.0f} {float(np.median(ratios)):>9.2f} {cpu_local:>9.2f} "
                f"{cpu_s3:>12.2f} {cpu_server:>16.2f} "
                f"{cpu_local / (cpu_s3 + cpu_server):>9.2f}  " + " ".join(f"{r:.2f}" for r in ratios)
            )


if __name__ == "__main__":
    main()
