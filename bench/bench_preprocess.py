"""Preprocess on cubes of many tiles: flat memory as the cube grows, and time with 1 and 2 Dask workers.

Issue 22 point 5. Synthetic cubes (``tests/cube_factory.write_cube``: 256 px tiles, 3 S2 + 2 S1 dates, land
cover), 64 px patches, the store written by ``run_preprocess`` as the stage runs it.

1. Memory: cubes of 4 and 16 tiles (4x the patches), each preprocessed in its own subprocess on a fresh
   LocalCluster of 2 workers; peak RSS (VmHWM) of the process that drives the run and of the largest worker.
   Target: both within 20 % at 16 tiles of their 4-tile figure (memory follows a task, not the cube).
2. Workers: the 16-tile cube on kept LocalClusters of 1 and 2 workers (start-up timed apart, one warm-up run
   each), interleaved rounds, the store deleted between runs; seconds per run and the ratio 1 worker / 2 workers.

Run: ``python bench/bench_preprocess.py`` (a few minutes on 2 cores); prints tables to paste into the README.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cube_factory import write_cube  # noqa: E402

from softcon.config import PreprocessConfig  # noqa: E402
from softcon.tasks.dask_cluster import local_cluster  # noqa: E402
from softcon.tasks.preprocess import run_preprocess  # noqa: E402

TILE_SIZE, PATCH, DATES, ROUNDS = 256, 64, 3, 3
SIZES = (4, 16)


def _config(cube: Path, out: Path, **overrides: Any) -> PreprocessConfig:
    values: dict[str, Any] = {"cube": str(cube), "out": str(out), "patch_size": PATCH, "split_block": 2 * PATCH,
                              "max_cloud_fraction": 1.0, "max_nodata_fraction": 1.0}  # fmt: skip
    return PreprocessConfig(**(values | overrides))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss_child(cube: Path, out: Path) -> None:
    """Child mode: preprocess ``cube`` on a fresh 2-worker cluster; print the driver's and workers' peak RSS."""
    from distributed import Client

    with local_cluster(2) as cluster, Client(cluster) as client:
        report = run_preprocess(_config(cube, out), client=client)
        workers = client.run(_peak_rss_mb)
    print(json.dumps({"samples": sum(report.counts.values()), "driver_mb": _peak_rss_mb(),
                      "worker_mb": max(workers.values())}))  # fmt: skip


def memory(work: Path) -> list[dict[str, Any]]:
    rows = []
    for tiles in SIZES:
        out = work / f"store{tiles}.zarr"
        line = subprocess.run([sys.executable, __file__, "--rss", str(work / f"cube{tiles}.zarr"), str(out)],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
        rows.append({"tiles": tiles, **json.loads(line)})
        shutil.rmtree(out)
    return rows


def workers_scaling(work: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """Seconds per run of the largest cube on kept clusters of 1 and 2 workers, interleaved rounds."""
    from distributed import Client

    cube, tiles = work / f"cube{SIZES[-1]}.zarr", SIZES[-1]
    clusters, clients, startup = {}, {}, {}
    for workers in (1, 2):
        started = time.perf_counter()
        clusters[workers] = local_cluster(workers)  # as preprocess starts its own
        clients[workers] = Client(clusters[workers])
        startup[workers] = time.perf_counter() - started
    seconds: dict[int, list[float]] = {1: [], 2: []}
    samples = 0
    try:
        for k in range(-1, rounds):  # round -1 warms the workers up (imports) and is not kept
            for workers in (1, 2) if k % 2 else (2, 1):
                out = work / f"scaling-{workers}-{k}.zarr"
                started = time.perf_counter()
                report = run_preprocess(_config(cube, out), client=clients[workers])
                if k >= 0:
                    seconds[workers].append(time.perf_counter() - started)
                samples = sum(report.counts.values())
                shutil.rmtree(out)
    finally:
        for workers in (1, 2):
            clients[workers].close()
            clusters[workers].close()
    median = {workers: statistics.median(v) for workers, v in seconds.items()}
    return {"tiles": tiles, "samples": samples, "seconds": seconds, "median": median, "startup_s": startup,
            "speedup": median[1] / median[2]}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--rss"]:
        peak_rss_child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        for tiles in SIZES:  # the cubes first: writing them is not measured
            write_cube(work / f"cube{tiles}.zarr", n_tiles=tiles, size=TILE_SIZE, n_dates=DATES)
        rss = memory(work)
        scaling = workers_scaling(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmemory: {TILE_SIZE} px tiles, {DATES} S2 dates, {PATCH} px patches, LocalCluster of 2 workers")
    print("| tiles | samples | driver peak RSS MB | largest worker peak RSS MB | driver ratio | worker ratio |")
    print("|---|---|---|---|---|---|")
    for row in rss:
        driver, worker = row["driver_mb"] / rss[0]["driver_mb"], row["worker_mb"] / rss[0]["worker_mb"]
        print(f"| {row['tiles']} | {row['samples']} | {row['driver_mb']:.0f} | {row['worker_mb']:.0f} | "
              f"{driver:.2f}x | {worker:.2f}x |")  # fmt: skip
    print(f"\nworkers: {scaling['tiles']} tiles, {scaling['samples']} samples, {ROUNDS} interleaved rounds")
    print("| workers | median s | every round, s | cluster start-up s |")
    print("|---|---|---|---|")
    for workers in (1, 2):
        rounds = " ".join(f"{s:.2f}" for s in scaling["seconds"][workers])
        print(f"| {workers} | {scaling['median'][workers]:.2f} | {rounds} | {scaling['startup_s'][workers]:.1f} |")
    print(f"2 workers / 1 worker: {scaling['speedup']:.2f}x the speed")


if __name__ == "__main__":
    main()
