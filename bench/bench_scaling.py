"""Per-unit costs behind docs/scaling.md: ingest per tile-date, labels per tile, preprocess per patch, loader
and CPU training samples/s, measured on this machine at the SSL4EO-S12 patch size (264 px).

1. Sample scenes (``write_sample_data``: S2 L2A 12 bands + SCL, S1 VV/VH, WorldCover) for ``--tiles`` tiles of
   ``--tile-size`` px (default 2 x 1056 px = 4 x 4 patches of 264 px each) and ``--dates`` S2 dates.
2. ``run_ingest`` from the static ItemCollection into a new local cube: wall and CPU seconds, tile-dates
   written (S2 and S1 counted separately), compressed bytes on disk and pixel bytes.
3. ``run_labels`` from the WorldCover COG: seconds per tile.
4. ``run_preprocess`` at 264 px patches on an already started LocalCluster (``--workers`` processes, one
   thread each; the cluster start is timed apart): seconds per patch-date examined and per sample written,
   store bytes per sample.
5. The loader (``StoreDataset`` + ``make_loader``, two views, 224 px crops, 0 workers) over the store just
   written: samples/s.
6. SoftCon training steps on CPU (``tasks.train.build_trainer``; student forward/backward + EMA teacher) for
   ResNet-18 and ResNet-50 at 224 px, batch ``--batch-size``: median step time -> samples/s.

Run: ``python bench/bench_scaling.py --json scaling.json`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcon.config import IngestConfig, LabelsConfig, PreprocessConfig, TrainConfig  # noqa: E402
from softcon.tasks.ingest import run_ingest  # noqa: E402
from softcon.tasks.labels import run_labels  # noqa: E402
from softcon.tasks.preprocess import run_preprocess  # noqa: E402
from softcon.tasks.sample_data import write_sample_data  # noqa: E402

PATCH = 264
CROP = 224


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(function: Any) -> tuple[Any, float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - started, time.process_time() - cpu


def measure_data_stages(folder: Path, tiles: int, tile_size: int, dates: int, workers: int) -> dict[str, Any]:
    """Ingest, labels and preprocess of a fresh sample area; per-unit figures."""
    from distributed import Client, LocalCluster

    sample, sample_s, _ = _timed(lambda: write_sample_data(folder / "sample", tiles=tiles, tile_size=tile_size,
                                                           dates=dates))  # fmt: skip
    cube = folder / "cube.zarr"
    ingest_config = IngestConfig(
        stac=str(sample.items_file), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=tile_size,
        cube=str(cube), max_cloud=100, max_tile_cloud=1.0, max_tile_nodata=1.0, retry_delay=0,
    )  # fmt: skip
    report, ingest_s, ingest_cpu = _timed(lambda: run_ingest(ingest_config))
    tile_dates = report.tile_dates_written  # S2 and S1 tile-dates
    _, labels_s, labels_cpu = _timed(lambda: run_labels(LabelsConfig(cube=str(cube), source=str(sample.worldcover))))
    cube_bytes = _tree_bytes(cube)

    started = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    cluster_s = time.perf_counter() - started
    try:
        store = folder / "store.zarr"
        config = PreprocessConfig(cube=str(cube), out=str(store), patch_size=PATCH, max_cloud_fraction=0.1)
        pre, pre_s, _ = _timed(lambda: run_preprocess(config, client=client))
    finally:
        client.close()
        cluster.close()
    store_bytes = _tree_bytes(store)
    pixels = tile_size * tile_size
    return {
        "tiles": tiles, "tile_size": tile_size, "dates": dates, "sample_data_s": sample_s,
        "ingest_s": ingest_s, "ingest_cpu_s": ingest_cpu, "tile_dates_written": tile_dates,
        "ingest_s_per_tile_date": ingest_s / tile_dates, "ingest_cpu_s_per_tile_date": ingest_cpu / tile_dates,
        "ingest_s_per_mpx_date": ingest_s / tile_dates / (pixels / 1e6),
        "cube_bytes": cube_bytes, "cube_bytes_per_tile_date": cube_bytes / tile_dates,
        "cube_bytes_per_px_date": cube_bytes / tile_dates / pixels,
        "pixel_bytes_per_tile_date": report.pixel_bytes / tile_dates,
        "labels_s": labels_s, "labels_cpu_s": labels_cpu, "labels_s_per_tile": labels_s / tiles,
        "cluster_start_s": cluster_s, "preprocess_s": pre_s, "preprocess_workers": workers,
        "patch_dates": pre.counts["patches"], "samples": pre.counts["kept"],
        "preprocess_s_per_patch_date": pre_s / pre.counts["patches"],
        "preprocess_s_per_sample": pre_s / max(pre.counts["kept"], 1),
        "store_bytes": store_bytes, "store_bytes_per_sample": store_bytes / max(pre.counts["kept"], 1),
        "store": str(store),
    }  # fmt: skip


def measure_loader(store: str, batch_size: int, rounds: int = 3) -> dict[str, float]:
    """Two-view 224 px batches from the store, 0 workers, best of ``rounds`` passes: samples/s."""
    from softcon.models.data import StoreDataset, make_loader

    torch.set_num_threads(1)
    best = 0.0
    for _ in range(rounds):
        dataset = StoreDataset(store, "train", "s2", two_views=True, crop_size=CROP, seed=0)
        started, samples = time.perf_counter(), 0
        for batch in make_loader(dataset, batch_size, num_workers=0, drop_last=False):
            samples += len(batch["labels"])
        best = max(best, samples / (time.perf_counter() - started))
    torch.set_num_threads(os.cpu_count() or 1)
    return {"loader_samples_per_s": best, "loader_batch": batch_size}


def measure_training(folder: Path, backbone: str, batch_size: int, steps: int) -> dict[str, float]:
    """Median SoftCon step time on CPU at 224 px (after one warm-up step) and the samples/s it gives."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_train import load_batches, synthetic_store

    from softcon.tasks.train import build_trainer

    store = synthetic_store(folder / f"train-{backbone}", CROP, batch_size * 2)
    batches, _ = load_batches(store, CROP, batch_size, 2, torch.device("cpu"))
    config = TrainConfig(store=str(store), backbone=backbone, batch_size=batch_size, steps=steps + 1, warmup_steps=1,
                         device="cpu", embed_dim=128)  # fmt: skip
    first = batches[0]
    trainer = build_trainer(config, first["view_a"].shape[1], img_size=CROP, n_classes=first["labels"].shape[1],
                            device=torch.device("cpu"))  # fmt: skip
    trainer.step(batches[0], 0)
    times = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        float(trainer.step(batches[step % len(batches)], step)["loss"])
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {f"train_{backbone}_step_s": median, f"train_{backbone}_samples_per_s": batch_size / median}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=4 * PATCH)
    parser.add_argument("--dates", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster processes for preprocess")
    parser.add_argument("--batch-size", type=int, default=16, help="loader and CPU training batch")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="softcon-scaling-") as name:
        folder = Path(name)
        results |= measure_data_stages(folder, args.tiles, args.tile_size, args.dates, args.workers)
        results |= measure_loader(results.pop("store"), args.batch_size)
        for backbone in ("resnet18", "resnet50"):
            results |= measure_training(folder, backbone, args.batch_size, args.train_steps)
    results["load_average_end"] = os.getloadavg()[0]
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:{width}s}  {value:.6g}" if isinstance(value, float) else f"{key:{width}s}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
