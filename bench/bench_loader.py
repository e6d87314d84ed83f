"""Loader benchmark: training store (Zarr v3 shards) against per-patch GeoTIFFs, in the same run.

The baseline is how SSL4EO-S12 and BigEarthNet are distributed: one GeoTIFF per band per patch, opened
and read with rasterio (13 files per sample). Two comparisons, each side delivering the same tensors
(checked at start-up):

- raw read: 13 x 264 x 264 uint16 patches, batched, nothing else (store: ``defer_augment=True`` items);
- full loader: 13 x 224 x 224 random crops, normalised, flipped, turned, float32, with the store's
  augmentation draws (same seed, same crop, same flips) on both sides; for the store batch-level in the
  workers (``StoreDataset.__getitems__``: decoded straight into one batch, no stacking), or batched after
  the loader (``GpuAugment``, here on the CPU).

Rows "0 workers + 2 decode threads" decode each batch on two threads in the main process
(``StoreDataset(decode_threads=2)``) and are compared with the baseline on 2 worker processes: two cores
each.

The store's previous per-item path (``__getitem__`` per sample, then the default collate's
``torch.stack``) runs in the same rounds as "per item + stack" rows, so the batch path's gain is measured
against it on the same machine state.

Throughput is counted from the first batch on (worker start-up excluded on both sides). Rounds alternate
store and baseline so that the shared machine's noise hits both. Per row: the best round's samples/s and its
ratio to the baseline's best, the median of the per-round ratios, and samples per CPU-second (this process
plus its workers, whole pass; median over rounds) with its ratio: CPU time does not depend on what else
the shared machine runs, and with every core busy throughput is cores / CPU-seconds per sample.

Peak memory: a child process per (store size, buffer size) reads the store with num_workers=0 and reports
its ru_maxrss, so the figure is the loader's own.

    python bench/bench_loader.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

# As importing the `models` package does, before torch allocates anything (the sys.path set-up comes later).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from rasterio.transform import from_origin
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcon.models import training_store  # noqa: E402
from softcon.models.data import (  # noqa: E402
    BlockShuffleSampler,
    GpuAugment,
    StoreDataset,
    apply_view_params,
    draw_view_params,
    make_loader,
)
from softcon.models.training_store import SamplePlan  # noqa: E402

BANDS_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
PATCH, CROP, BLOCK = 264, 224, 64


def synthetic_patches(n: int, seed: int) -> np.ndarray:
    """(n, 13, 264, 264) uint16 with band offsets, smooth structure and noise (compresses like imagery)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(1500, 400, (n, len(BANDS_13), 1, 1))
    ramp = np.linspace(0, 6, PATCH)
    field = 400 * np.sin(ramp[:, None] * rng.uniform(0.5, 2, (n, 1, 1, 1)) + ramp[None, :])
    return np.clip(base + field + rng.normal(0, 50, (n, len(BANDS_13), PATCH, PATCH)), 1, 10_000).astype(np.uint16)


def write_store(path: Path, n_samples: int, block: np.ndarray) -> None:
    """A 13-band training store of ``n_samples``: one block written, its shard file copied to the others.

    Every shard holds the same bytes as a real one (same compression, same decode cost); copying instead
    of compressing each block keeps the benchmark's set-up short.
    """
    locations = np.arange(n_samples) // 2  # two dates per location
    plan = SamplePlan(
        location=locations.astype(np.int64),
        tile=np.zeros(n_samples, np.int32),
        time=np.datetime64("2024-06-01", "ns") + (np.arange(n_samples) % 2) * np.timedelta64(10, "D"),
        row=np.zeros(n_samples, np.int32),
        col=np.zeros(n_samples, np.int32),
        split=np.zeros(n_samples, np.uint8),
        labels=np.zeros((n_samples, 4), np.uint8),
        fractions=np.zeros((n_samples, 4), np.float32),
        labelled=np.ones(n_samples, bool),
    )
    mean = block.reshape(len(block), len(BANDS_13), -1).mean(axis=(0, 2))
    std = block.reshape(len(block), len(BANDS_13), -1).std(axis=(0, 2))
    attrs = {
        "bands": list(BANDS_13),
        "pols": ["VV", "VH"],
        "class_names": ["a", "b", "c", "d"],
        "split_names": ["train", "val", "test"],
        "norm_stats": {"s2": {"mean": mean.tolist(), "std": std.tolist()}},
    }
    training_store.create_store(
        str(path), plan, n_bands=13, n_pols=2, patch_size=PATCH, samples_per_block=BLOCK, attrs=attrs
    )
    training_store.write_images(str(path), 0, block, np.full((BLOCK, 2, PATCH, PATCH), np.nan, np.float32))
    shard = path / "s2" / "c" / "0" / "0" / "0" / "0"
    for index in range(1, n_samples // BLOCK):
        target = path / "s2" / "c" / str(index) / "0" / "0" / "0"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, target)


def write_geotiffs(folder: Path, patches: np.ndarray) -> None:
    """One GeoTIFF per band per patch, as SSL4EO-S12 ships them (uncompressed, 10 m UTM grid)."""
    for i, patch in enumerate(patches):
        patch_dir = folder / f"patch_{i:05d}"
        patch_dir.mkdir(parents=True)
        for band, name in enumerate(BANDS_13):
            profile = dict(driver="GTiff", width=PATCH, height=PATCH, count=1, dtype="uint16", crs="EPSG:32632",
                           transform=from_origin(500_000, 5_000_000, 10, 10))  # fmt: skip
            with rasterio.open(patch_dir / f"{name}.tif", "w", **profile) as dst:
                dst.write(patch[band][None])


class PerItemStoreDataset(StoreDataset):
    """The store read item by item, then stacked by the default collate (the loader before batch loading)."""

    __getitems__ = None  # the DataLoader falls back to [dataset[i] for i in batch] when this is falsy


class GeoTiffDataset(Dataset):
    """The baseline: read 13 band files per patch with rasterio, then the same normalise/augment code."""

    def __init__(self, folder: Path, mean: list[float], std: list[float], seed: int = 0, *, raw: bool = False) -> None:
        self.patches = sorted(folder.iterdir())
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.seed = seed
        self.raw = raw

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = np.stack([rasterio.open(self.patches[i] / f"{name}.tif").read(1) for name in BANDS_13])
        if self.raw:
            return {"image": torch.from_numpy(raw)}
        rng = np.random.default_rng([self.seed, 0, i])  # StoreDataset's draws for sample i, epoch 0
        params, _ = draw_view_params(rng, 13, PATCH, PATCH, crop_size=CROP, augment=True, channel_dropout=0.0)
        x = torch.from_numpy(raw.astype(np.float32))
        x = ((x - self.mean) / self.std).masked_fill(x == 0, 0.0)
        return {"image": apply_view_params(x, torch.from_numpy(params), CROP)}


@dataclass
class Speed:
    """One pass of a loader: wall-clock samples/s and samples per CPU-second (this process and its workers)."""

    wall: float
    cpu: float


def measure(loader: DataLoader, limit: int, augment: GpuAugment | None = None) -> Speed:
    """Samples/s from the first batch on (worker start-up and the first batch excluded), and samples per
    CPU-second over the whole pass (this process plus its DataLoader workers, counted once they exit).

    The CPU figure does not depend on what else the machine runs: with every core busy, throughput is
    cores / (CPU-seconds per sample), so its ratio is the throughput ratio on a machine of one's own.
    """
    cpu_self, cpu_children = time.process_time(), _children_cpu()
    iterator = iter(loader)
    started, seen, total = 0.0, -1, 0
    for batch in iterator:
        if augment is not None:
            batch = augment(batch)
        size = len(batch["image"] if "image" in batch else batch["raw"])
        total += size
        if seen < 0:
            started, seen = time.perf_counter(), 0
            continue
        seen += size
        if seen >= limit:
            break
    wall = seen / (time.perf_counter() - started)
    del iterator  # shuts the workers down, so their CPU time is in RUSAGE_CHILDREN
    gc.collect()
    cpu = time.process_time() - cpu_self + _children_cpu() - cpu_children
    return Speed(wall, total / cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_same_tensors(store: Path, tif_folder: Path, stats: dict) -> None:
    """Both sides deliver equal tensors for the same sample (raw patches and augmented crops)."""
    for raw in (True, False):
        tif = GeoTiffDataset(tif_folder, stats["mean"], stats["std"], raw=raw)
        dataset = StoreDataset(store, two_views=False, crop_size=None if raw else CROP, defer_augment=raw)
        batch = dataset.__getitems__([0, 1, 2]).batch["raw" if raw else "image"]
        for i in range(3):
            got = dataset[i]["raw" if raw else "image"]
            assert torch.equal(got, tif[i]["image"]), f"store and GeoTIFF sample {i} differ (raw={raw})"
            assert torch.equal(batch[i], got), f"store batch and per-item sample {i} differ (raw={raw})"


def store_loader(
    store: Path, workers: int, *, defer: bool, crop: int | None = CROP, per_item: bool = False, threads: int = 1
) -> DataLoader:
    dataset = (PerItemStoreDataset if per_item else StoreDataset)(
        store, two_views=False, crop_size=crop, defer_augment=defer, decode_threads=threads
    )
    return make_loader(dataset, 32, sampler=BlockShuffleSampler(dataset, buffer_blocks=2), num_workers=workers)


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so
    a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_child(store: str, buffer_blocks: int, limit: int) -> None:
    """Child process: read ``limit`` samples of ``store`` through the loader and print peak RSS in MiB."""
    torch.set_num_threads(1)
    dataset = StoreDataset(store, two_views=False, crop_size=CROP, defer_augment=True, cache_blocks=1)
    sampler = BlockShuffleSampler(dataset, buffer_blocks=buffer_blocks)
    baseline = _peak_rss_mib()
    seen = 0
    for batch in make_loader(dataset, 32, sampler=sampler):
        seen += len(batch["raw"])
        if seen >= limit:
            break
    peak = _peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "before_mib": baseline, "samples": seen}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=256, help="samples of the small store")
    parser.add_argument("--large", type=int, default=1024, help="samples of the large store")
    parser.add_argument("--tif-patches", type=int, default=128, help="patches of the GeoTIFF baseline")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # One torch thread in this process, as in DataLoader workers: with 0 workers both sides then run their
    # tensor ops single-threaded (two intra-op threads on two loaded cores slowed the baseline's float ops).
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        block = synthetic_patches(BLOCK, seed=0)
        started = time.perf_counter()
        small, large = work / "small.zarr", work / "large.zarr"
        write_store(small, args.small, block)
        write_store(large, args.large, block)
        write_geotiffs(work / "tif", np.concatenate([block] * (args.tif_patches // BLOCK + 1))[: args.tif_patches])
        print(f"set-up {time.perf_counter() - started:.1f} s in {work}")
        stats = StoreDataset(small).attrs["norm_stats"]["s2"]
        check_same_tensors(small, work / "tif", stats)
        tif = GeoTiffDataset(work / "tif", stats["mean"], stats["std"])
        tif_raw = GeoTiffDataset(work / "tif", stats["mean"], stats["std"], raw=True)

        rows: dict[str, list[Speed]] = {}
        for _ in range(args.rounds):
            for workers in (0, 2):
                rows.setdefault(f"raw: geotiff, {workers} workers", []).append(
                    measure(DataLoader(tif_raw, batch_size=32, shuffle=True, num_workers=workers),
                                       args.tif_patches)
                )  # fmt: skip
                rows.setdefault(f"raw: store, {workers} workers", []).append(
                    measure(store_loader(small, workers, defer=True, crop=None), args.small)
                )
                rows.setdefault(f"raw: store per item + stack, {workers} workers", []).append(
                    measure(store_loader(small, workers, defer=True, crop=None, per_item=True), args.small)
                )
                tif_loader = DataLoader(tif, batch_size=32, shuffle=True, num_workers=workers)
                rows.setdefault(f"geotiff, {workers} workers", []).append(measure(tif_loader, args.tif_patches))
                rows.setdefault(f"store, CPU augment, batch path, {workers} workers", []).append(
                    measure(store_loader(small, workers, defer=False), args.small)
                )
                rows.setdefault(f"store, CPU augment per item + stack, {workers} workers", []).append(
                    measure(store_loader(small, workers, defer=False, per_item=True), args.small)
                )
                deferred = store_loader(small, workers, defer=True)
                rows.setdefault(f"store, batched augment after loader, {workers} workers", []).append(
                    measure(deferred, args.small, GpuAugment(deferred.dataset, device="cpu"))
                )
            # Two cores through decode threads in one process, against the baseline on two worker processes.
            rows.setdefault("raw: store, 0 workers + 2 decode threads, 2 workers", []).append(
                measure(store_loader(small, 0, defer=True, crop=None, threads=2), args.small)
            )
            rows.setdefault("store, CPU augment, 0 workers + 2 decode threads, 2 workers", []).append(
                measure(store_loader(small, 0, defer=False, threads=2), args.small)
            )
        print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"\n{'loader (raw: 13x264x264 uint16; else 224 crops float32)':<58} {'samples/s':>9} {'x tif':>6} "
              f"{'x tif/round':>11} {'per CPU-s':>9} {'x tif':>6}  samples/s per round")  # fmt: skip
        for name, speeds in rows.items():
            workers = name.rsplit(", ", 1)[1]
            base = rows[f"raw: geotiff, {workers}" if name.startswith("raw") else f"geotiff, {workers}"]
            wall, cpu = max(s.wall for s in speeds), float(np.median([s.cpu for s in speeds]))
            per_round = float(np.median([s.wall / b.wall for s, b in zip(speeds, base, strict=True)]))
            print(
                f"{name:<58} {wall:>9.0f} {wall / max(b.wall for b in base):>6.1f} {per_round:>11.1f} {cpu:>9.0f} "
                f"{cpu / float(np.median([b.cpu for b in base])):>6.1f}  {' '.join(f'{s.wall:.0f}' for s in speeds)}"
            )

        print(f"\n{'peak memory (num_workers=0, batch 32)':<40} {'store samples':>14} {'buffer blocks':>14} {'MiB':>8}")
        for store, n in ((small, args.small), (large, args.large)):
            for buffer_blocks in (1, 4):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(store), str(buffer_blocks), str(n)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
                print(f"{'':<40} {n:>14} {buffer_blocks:>14} {peak:>8.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        peak_memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
