"""Ingest benchmark: time and MB/s against a raw rasterio + zarr baseline, and peak RSS as the area grows.

1. Throughput: ``run_ingest`` of a sample area (static ItemCollection, no server) against a baseline in
   the same process: plain ``rasterio`` reads of the same windows (each band read onto the tile's 10 m
   grid, bilinear for 20/60 m, one band after the other) plus a plain ``zarr`` write of the same arrays,
   one chunk per tile-date. At two tile sizes: 256 px (the demo's, where per-load set-up weighs most) and
   1056 px (the default). Ingest runs with its defaults (for local files one read at a time, like the
   baseline) and with ``read_threads=4`` (the default for assets read over the network), interleaved with
   the baseline. Reported: best wall time of each and its ratio to the baseline's best, the median of the
   per-round ratios, and the median CPU time (all threads) with its ratio: CPU time shows the work done,
   whatever else the shared machine runs. Target: ingest time <= 1.5x the baseline.
2. Memory: ``run_ingest`` over 1x, 4x and 16x the tiles (256 px), each in its own subprocess (peak RSS
   per size). Target: peak RSS at 16x within 20 % of 1x.

3. Workers: one ingest run fanned out over Dask workers, ``SCALING_TILES`` tiles of 256 px (or as given): in this
   process (``n_workers`` 1), on a LocalCluster of 1 worker and of 2 workers (a cluster per run, its start-up timed
   apart, warmed up by a 2-tile ingest so that the workers' imports are not timed). Interleaved rounds;
   reported: tiles/s (best and median), cores busy (CPU time of this process and its children over the run's
   wall time), and the ratios 2 workers / in process and 2 workers / 1 worker. The
   per-worker overhead is the 1-worker run's extra time over the in-process one, per tile, plus the cluster's
   start-up. Target: 2 workers >= 1.7x the tiles/s of one, on 2 cores.

Parts 1 and 2 run ingest in this process (``n_workers`` 1), as the baseline does.

Run: ``python bench/bench_ingest.py`` (a few minutes; ``--workers [TILES [PX]]`` runs part 3 only, on ``TILES`` tiles
of ``PX`` pixels, default 16 of 256);
prints tables to paste into the README.
"""

from __future__ import annotations

import contextlib
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
from softcon.tasks.grid import tiles_for_bbox
from softcon.tasks.ingest import run_ingest
from softcon.tasks.sample_data import write_sample_data
from softcon.tasks.stac_search import read_static_items

TILE_SIZE, DATES = 256, 3
SIZES = ((256, 4), (1056, 1))
"""(tile size in px, tiles) of the throughput runs: the demo's tiles and the default tile size."""
REPEATS = 5
"""Interleaved rounds of (ingest, ingest with 4 read threads, baseline); the machine is shared and noisy."""
S2_KEYS = ("coastal", "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "nir09",
           "swir16", "swir22")  # fmt: skip


def _config(sample, cube: Path, tile_size: int = TILE_SIZE, **overrides: Any) -> IngestConfig:  # type: ignore[no-untyped-def]
    return IngestConfig(
        stac=str(sample.items_file), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=tile_size,
        cube=str(cube), max_cloud=100, max_tile_cloud=1.0, max_tile_nodata=1.0, retry_delay=0,
        **({"n_workers": 1} | overrides),
    )  # fmt: skip


def baseline(sample, cube: Path, tile_size: int = TILE_SIZE) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Plain rasterio window reads onto each tile grid + plain zarr writes; (seconds, CPU seconds, pixel bytes)."""
    started, cpu = time.perf_counter(), time.process_time()
    items = read_static_items(sample.items_file)
    root = zarr.open_group(str(cube), mode="w", zarr_format=3)
    written = 0
    for tile in tiles_for_bbox(sample.bbox, resolution=10, tile_size=tile_size):
        s2_items = [i for i in items if i["collection"] == "sentinel-2-l2a"]
        s1_items = [i for i in items if i["collection"] == "sentinel-1-rtc"]
        group = root.create_group(tile.tile_id)
        n = tile_size
        s2 = group.create_array("s2", shape=(len(s2_items), len(S2_KEYS), n, n), dtype="uint16",
                                chunks=(1, len(S2_KEYS), n, n))  # fmt: skip
        scl = group.create_array("scl", shape=(len(s2_items), n, n), dtype="uint8", chunks=(1, n, n))
        s1 = group.create_array("s1", shape=(len(s1_items), 2, n, n), dtype="float32", chunks=(1, 2, n, n))
        for t, item in enumerate(s2_items):
            bands = np.stack([_read(item["assets"][k]["href"], tile, Resampling.bilinear) for k in S2_KEYS])
            s2[t] = bands.astype(np.uint16)
            scl[t] = _read(item["assets"]["scl"]["href"], tile, Resampling.nearest).astype(np.uint8)
            written += bands.size * 2 + n * n
        for t, item in enumerate(s1_items):
            pols = np.stack([_read(item["assets"][k]["href"], tile, Resampling.bilinear) for k in ("vv", "vh")])
            s1[t] = pols.astype(np.float32)
            written += pols.size * 4
    return time.perf_counter() - started, time.process_time() - cpu, written


def _read(href: str, tile, resampling: Resampling) -> np.ndarray:  # type: ignore[no-untyped-def]
    with rasterio.open(href) as src:
        window = from_bounds(*tile.bounds, transform=src.transform)
        return src.read(1, window=window, out_shape=(tile.size, tile.size), resampling=resampling, boundless=True)


def throughput(work: Path, tile_size: int, tiles: int, repeats: int = REPEATS) -> dict[str, Any]:
    """Interleaved rounds of ingest (defaults: one read at a time for local files), ingest with 4 concurrent
    reads (the default for network assets) and the baseline."""
    sample = write_sample_data(work / f"sample{tile_size}x{tiles}", tiles=tiles, tile_size=tile_size, dates=DATES)
    runs: dict[str, list[tuple[float, float]]] = {"ingest": [], "ingest, 4 read threads": [], "baseline": []}
    pixel_bytes: dict[str, int] = {}
    for k in range(repeats):
        for name, overrides in (("ingest", {}), ("ingest, 4 read threads", {"read_threads": 4})):
            cube = work / f"cube{k}.zarr"
            cpu = time.process_time()
            report = run_ingest(_config(sample, cube, tile_size, **overrides))
            runs[name].append((report.seconds, time.process_time() - cpu))
            pixel_bytes[name] = report.pixel_bytes
            shutil.rmtree(cube)
        seconds, cpu_seconds, pixel_bytes["baseline"] = baseline(sample, work / f"base{k}.zarr", tile_size)
        runs["baseline"].append((seconds, cpu_seconds))
        shutil.rmtree(work / f"base{k}.zarr")
    base = runs["baseline"]
    rows = []
    for name, values in runs.items():
        wall = min(v[0] for v in values)
        cpu = float(np.median([v[1] for v in values]))
        rows.append({
            "name": name, "wall_s": wall, "mb_s": pixel_bytes[name] / 1e6 / wall,
            "ratio": wall / min(b[0] for b in base),
            "round_ratio": float(np.median([v[0] / b[0] for v, b in zip(values, base, strict=True)])),
            "cpu_s": cpu, "cpu_ratio": cpu / float(np.median([b[1] for b in base])), "all": [v[0] for v in values],
        })  # fmt: skip
    return {"tile_size": tile_size, "tiles": tiles, "rows": rows}


SCALING_TILES, SCALING_ROUNDS = 16, 5


def workers_scaling(
    work: Path, tiles: int = SCALING_TILES, rounds: int = SCALING_ROUNDS, tile_size: int = TILE_SIZE
) -> dict[str, Any]:
    """Tiles/s of one ingest run in this process and fanned out over LocalClusters of 1 and 2 workers.

    Each Dask run gets a cluster of its own, started (and timed) before it, warmed up with a 2-tile ingest and
    closed after it: a cluster kept idle beside another setup's run costs that run about 0.05 cores per worker.
    """
    from distributed import Client

    from softcon.tasks.dask_cluster import local_cluster

    sample = write_sample_data(work / f"scaling{tiles}", tiles=tiles, tile_size=tile_size, dates=DATES)
    warm_sample = write_sample_data(work / "scaling-warm-up", tiles=2, tile_size=tile_size, dates=DATES)
    setups = {"in process": 0, "Dask, 1 worker": 1, "Dask, 2 workers": 2}
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    cores: dict[str, list[float]] = {name: [] for name in setups}
    startup: dict[int, list[float]] = {1: [], 2: []}
    tile_dates = 0
    for k in range(-1, rounds):  # round -1 warms this process up (imports, GDAL) and is not kept
        for name, workers in setups.items():
            cube = work / f"scaling-cube{k}.zarr"
            with contextlib.ExitStack() as stack:
                overrides: dict[str, Any] = {"n_workers": 1}
                if workers:
                    started = time.perf_counter()
                    cluster = stack.enter_context(local_cluster(workers, trim_memory=False, profile=False))
                    stack.enter_context(Client(cluster))
                    startup[workers].append(time.perf_counter() - started)
                    overrides = {"dask_address": cluster.scheduler_address}
                    run_ingest(_config(warm_sample, work / "warm-up.zarr", tile_size, **overrides))
                    shutil.rmtree(work / "warm-up.zarr")
                cpu_before = _tree_cpu_s()
                report = run_ingest(_config(sample, cube, tile_size, **overrides))
                busy = (_tree_cpu_s() - cpu_before) / report.seconds
            assert len(report.tiles) == tiles and report.tile_dates_written > 0
            tile_dates = report.tile_dates_written
            if k >= 0:
                seconds[name].append(report.seconds)
                cores[name].append(busy)
            shutil.rmtree(cube)
    rows = {
        name: {"best_s": min(v), "median_s": float(np.median(v)), "tiles_s": tiles / min(v),
               "median_tiles_s": tiles / float(np.median(v)), "cores": float(np.median(cores[name])), "all": v}
        for name, v in seconds.items()
    }  # fmt: skip
    per_round = [a / b for a, b in zip(seconds["in process"], seconds["Dask, 2 workers"], strict=True)]
    return {
        "tiles": tiles, "tile_size": tile_size, "tile_dates": tile_dates, "rows": rows,
        "startup_s": {n: float(np.median(v)) for n, v in startup.items()},
        "two_vs_in_process": rows["in process"]["best_s"] / rows["Dask, 2 workers"]["best_s"],
        "two_vs_in_process_median_round": float(np.median(per_round)),
        "two_vs_one_worker": rows["Dask, 1 worker"]["best_s"] / rows["Dask, 2 workers"]["best_s"],
        "two_vs_one_worker_median": rows["Dask, 1 worker"]["median_s"] / rows["Dask, 2 workers"]["median_s"],
        "overhead_per_tile_s": (rows["Dask, 1 worker"]["best_s"] - rows["in process"]["best_s"]) / tiles,
    }  # fmt: skip


def print_scaling(scaling: dict[str, Any]) -> None:
    print(f"\nworkers: {scaling['tiles']} tiles of {scaling['tile_size']} px ({scaling['tile_dates']} tile-dates: "
          f"S2+SCL and S1), {SCALING_ROUNDS} rounds")  # fmt: skip
    print("| run | best s | tiles/s (best) | tiles/s (median) | cores busy (median) | every round, s |")
    print("|---|---|---|---|---|---|")
    for name, row in scaling["rows"].items():
        print(f"| {name} | {row['best_s']:.2f} | {row['tiles_s']:.2f} | {row['median_tiles_s']:.2f} | "
              f"{row['cores']:.2f} | "
              f"{' '.join(f'{t:.2f}' for t in row['all'])} |")  # fmt: skip
    print(f"2 workers / in process: {scaling['two_vs_in_process']:.2f}x (best), "
          f"{scaling['two_vs_in_process_median_round']:.2f}x (median per round); "
          f"2 workers / 1 worker: {scaling['two_vs_one_worker']:.2f}x (best), "
          f"{scaling['two_vs_one_worker_median']:.2f}x (medians)")  # fmt: skip
    one = scaling["rows"]["Dask, 1 worker"]["median_s"]
    per = one / scaling["tile_dates"]
    print(f"per worker: {1 / per:.1f} tile-dates/s ({per * 1000:.0f} ms each, median)")
    print(f"per-worker overhead: {scaling['overhead_per_tile_s'] * 1000:.0f} ms per tile; cluster start-up (median) "
          f"{scaling['startup_s'][1]:.1f} s (1 worker), {scaling['startup_s'][2]:.1f} s (2 workers)")  # fmt: skip


def _tree_cpu_s() -> float:
    """CPU seconds so far of this process (the run, the scheduler, the nannies) and its children (the workers)."""
    import psutil

    total = 0.0
    for process in (psutil.Process(), *psutil.Process().children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss is carried over execve from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_child(work: Path, tiles: int) -> None:
    """In a subprocess: ingest ``tiles`` tiles, print peak RSS in MB."""
    sample = write_sample_data(work / f"sample{tiles}", tiles=tiles, tile_size=TILE_SIZE, dates=DATES)
    before = _peak_rss_mb()
    report = run_ingest(_config(sample, work / f"rss{tiles}.zarr"))
    peak = _peak_rss_mb()
    print(json.dumps({"tiles": tiles, "peak_rss_mb": peak, "rss_before_ingest_mb": before,
                      "tile_dates": report.tile_dates_written}))  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--rss":
        peak_rss_child(Path(sys.argv[2]), int(sys.argv[3]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    if sys.argv[1:2] == ["--workers"]:
        try:
            tiles = int(sys.argv[2]) if sys.argv[2:] else SCALING_TILES
            tile_size = int(sys.argv[3]) if sys.argv[3:] else TILE_SIZE
            print_scaling(workers_scaling(work, tiles, tile_size=tile_size))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        # Write the inputs first (sample generation is not measured, and its memory stays out of the children).
        for tiles in (1, 4, 16):
            write_sample_data(work / f"sample{tiles}", tiles=tiles, tile_size=TILE_SIZE, dates=DATES)
        speeds = [throughput(work, tile_size, tiles) for tile_size, tiles in SIZES]
        rss = []
        for tiles in (1, 4, 16):
            out = subprocess.run([sys.executable, __file__, "--rss", str(work), str(tiles)], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            rss.append(json.loads(out.strip().splitlines()[-1]))
        scaling = workers_scaling(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for speed in speeds:
        print(f"\n{speed['tiles']} tile(s) of {speed['tile_size']} px, {DATES} dates, S2+SCL+S1, {REPEATS} rounds")
        print("| run | best s | pixel MB/s | x baseline (best) | x baseline (median per round) | CPU s "
              "| x baseline CPU | every round, s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for row in speed["rows"]:
            print(f"| {row['name']} | {row['wall_s']:.2f} | {row['mb_s']:.1f} | {row['ratio']:.2f}x | "
                  f"{row['round_ratio']:.2f}x | {row['cpu_s']:.2f} | {row['cpu_ratio']:.2f}x | "
                  f"{' '.join(f'{t:.2f}' for t in row['all'])} |")  # fmt: skip
    print("\npeak RSS per area (separate subprocesses)")
    print("| tiles | tile-dates | peak RSS MB | vs 1x |")
    print("|---|---|---|---|")
    for row in rss:
        print(f"| {row['tiles']} | {row['tile_dates']} | {row['peak_rss_mb']:.0f} | "
              f"{row['peak_rss_mb'] / rss[0]['peak_rss_mb']:.2f}x |")  # fmt: skip
    print_scaling(scaling)


if __name__ == "__main__":
    main()
