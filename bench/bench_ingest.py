"""Ingest benchmark: MB/s against a raw rasterio + zarr baseline, and peak RSS as the area grows.

1. Throughput: ``run_ingest`` of a sample area (static ItemCollection, no server) against a baseline in
   the same process: plain ``rasterio`` reads of the same windows (each band read onto the tile's 10 m
   grid, bilinear for 20/60 m) plus a plain ``zarr`` write of the same arrays, one chunk per tile-date.
   Target: ingest time <= 1.5x the baseline.
2. Memory: ``run_ingest`` over 1x, 4x and 16x the tiles, each in its own subprocess (peak RSS per size).
   Target: peak RSS at 16x within 20 % of 1x.

Run: ``python bench/bench_ingest.py`` (a few minutes); prints a table to paste into the README.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio.enums import Resampling
from rasterio.windows import from_bounds

from softcon.config import IngestConfig
from tasks.grid import tiles_for_bbox
from tasks.ingest import read_static_items, run_ingest
from tasks.sample_data import write_sample_data

TILE_SIZE, DATES = 256, 3
REPEATS = 5
"""Interleaved ingest/baseline pairs; the best of each is compared (the machine is shared and noisy)."""
S2_KEYS = ("coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
           "swir16", "swir22")  # fmt: skip


def _config(sample, cube: Path) -> IngestConfig:  # type: ignore[no-untyped-def]
    return IngestConfig(
        stac=str(sample.items_file), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=TILE_SIZE,
        cube=str(cube), max_cloud=100, max_tile_cloud=1.0, max_tile_nodata=1.0, retry_delay=0,
    )  # fmt: skip


def baseline(sample, cube: Path) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Plain rasterio window reads onto each tile grid + plain zarr writes; (seconds, pixel bytes)."""
    started = time.perf_counter()
    items = read_static_items(sample.items_file)
    root = zarr.open_group(str(cube), mode="w", zarr_format=3)
    written = 0
    for tile in tiles_for_bbox(sample.bbox, resolution=10, tile_size=TILE_SIZE):
        s2_items = [i for i in items if i["collection"] == "sentinel-2-l2a"]
        s1_items = [i for i in items if i["collection"] == "sentinel-1-rtc"]
        group = root.create_group(tile.tile_id)
        s2 = group.create_array("s2", shape=(len(s2_items), len(S2_KEYS), TILE_SIZE, TILE_SIZE), dtype="uint16",
                                chunks=(1, len(S2_KEYS), TILE_SIZE, TILE_SIZE))  # fmt: skip
        scl = group.create_array("scl", shape=(len(s2_items), TILE_SIZE, TILE_SIZE), dtype="uint8",
                                 chunks=(1, TILE_SIZE, TILE_SIZE))  # fmt: skip
        s1 = group.create_array("s1", shape=(len(s1_items), 2, TILE_SIZE, TILE_SIZE), dtype="float32",
                                chunks=(1, 2, TILE_SIZE, TILE_SIZE))  # fmt: skip
        for t, item in enumerate(s2_items):
            bands = np.stack([_read(item["assets"][k]["href"], tile, Resampling.bilinear) for k in S2_KEYS])
            s2[t] = bands.astype(np.uint16)
            scl[t] = _read(item["assets"]["scl"]["href"], tile, Resampling.nearest).astype(np.uint8)
            written += bands.size * 2 + TILE_SIZE * TILE_SIZE
        for t, item in enumerate(s1_items):
            pols = np.stack([_read(item["assets"][k]["href"], tile, Resampling.bilinear) for k in ("vv", "vh")])
            s1[t] = pols.astype(np.float32)
            written += pols.size * 4
    return time.perf_counter() - started, written


def _read(href: str, tile, resampling: Resampling) -> np.ndarray:  # type: ignore[no-untyped-def]
    with rasterio.open(href) as src:
        window = from_bounds(*tile.bounds, transform=src.transform)
        return src.read(1, window=window, out_shape=(TILE_SIZE, TILE_SIZE), resampling=resampling, boundless=True)


def throughput(work: Path, tiles: int = 4, repeats: int = REPEATS) -> dict[str, Any]:
    sample = write_sample_data(work / f"sample{tiles}", tiles=tiles, tile_size=TILE_SIZE, dates=DATES)
    ingest_s, base_s, ingest_bytes, base_bytes = [], [], 0, 0
    for k in range(repeats):  # interleaved, best of each: the machine is shared and noisy
        cube = work / f"cube{k}.zarr"
        report = run_ingest(_config(sample, cube))
        ingest_s.append(report.seconds)
        ingest_bytes = report.pixel_bytes
        shutil.rmtree(cube)
        seconds, base_bytes = baseline(sample, work / f"base{k}.zarr")
        base_s.append(seconds)
        shutil.rmtree(work / f"base{k}.zarr")
    best_i, best_b = min(ingest_s), min(base_s)
    return {
        "tiles": tiles, "ingest_s": best_i, "baseline_s": best_b, "ingest_mb_s": ingest_bytes / 1e6 / best_i,
        "baseline_mb_s": base_bytes / 1e6 / best_b, "time_ratio": best_i / best_b, "ingest_all": ingest_s,
        "baseline_all": base_s,
    }  # fmt: skip


def peak_rss_child(work: Path, tiles: int) -> None:
    """In a subprocess: ingest ``tiles`` tiles, print peak RSS in MB."""
    sample = write_sample_data(work / f"sample{tiles}", tiles=tiles, tile_size=TILE_SIZE, dates=DATES)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = run_ingest(_config(sample, work / f"rss{tiles}.zarr"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tiles": tiles, "peak_rss_mb": peak, "rss_before_ingest_mb": before,
                      "tile_dates": report.tile_dates_written}))  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--rss":
        peak_rss_child(Path(sys.argv[2]), int(sys.argv[3]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        # Write the inputs first (sample generation is not measured, and its memory stays out of the children).
        for tiles in (1, 4, 16):
            write_sample_data(work / f"sample{tiles}", tiles=tiles, tile_size=TILE_SIZE, dates=DATES)
        speed = throughput(work)
        rss = []
        for tiles in (1, 4, 16):
            out = subprocess.run([sys.executable, __file__, "--rss", str(work), str(tiles)], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            rss.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nthroughput ({speed['tiles']} tiles of {TILE_SIZE}px, {DATES} dates, S2+SCL+S1, best of {REPEATS})")
    print("| measure | ingest | baseline (rasterio + zarr) | ratio |")
    print("|---|---|---|---|")
    print(f"| time, s | {speed['ingest_s']:.2f} | {speed['baseline_s']:.2f} | {speed['time_ratio']:.2f}x |")
    print(f"| pixel MB/s | {speed['ingest_mb_s']:.1f} | {speed['baseline_mb_s']:.1f} | |")
    print("every run, s: ingest", [round(t, 2) for t in speed["ingest_all"]], "baseline",
          [round(t, 2) for t in speed["baseline_all"]])  # fmt: skip
    print("\npeak RSS per area (separate subprocesses)")
    print("| tiles | tile-dates | peak RSS MB | vs 1x |")
    print("|---|---|---|---|")
    for row in rss:
        print(f"| {row['tiles']} | {row['tile_dates']} | {row['peak_rss_mb']:.0f} | "
              f"{row['peak_rss_mb'] / rss[0]['peak_rss_mb']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
