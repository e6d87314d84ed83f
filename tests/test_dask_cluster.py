"""Preprocess on an existing Dask cluster (scheduler and two workers started from the CLI) writes the same
store as on the default LocalCluster.

Ingest does not use Dask (it loads tile by tile with odc-stac in the calling process), so only preprocess
is routed to the cluster; the cube it reads is written by ``cube_factory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr
from cube_factory import write_cube
from distributed import Client

from softcon.config import PreprocessConfig
from softcon.tasks.digest import array_digests
from softcon.tasks.preprocess import run_preprocess

REPO = Path(__file__).resolve().parents[1]
STAGE_TASKS = {"summarize_tile", "write_sample_block", "block_train_stats"}


def _dask_cli(*args: str) -> list[str]:
    """The ``dask`` command of this interpreter's environment."""
    return [str(Path(sys.executable).with_name("dask")), *args]


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` + two `dask worker` processes (one thread each) on loopback; yields the address."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DASK_LOGGING__DISTRIBUTED": "warning"}
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "worker-0", "worker-1")]  # noqa: SIM115
    scheduler = _dask_cli(
        "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)
    )  # fmt: skip
    processes = [subprocess.Popen(scheduler, env=env, cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert processes[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "dask scheduler did not write its address within 60 s"
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for index in range(2):
            worker = _dask_cli(
                "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-nanny", "--no-dashboard",
                "--name", f"worker-{index}",
            )  # fmt: skip
            processes.append(
                subprocess.Popen(worker, env=env, cwd=tmp_path, stdout=logs[index + 1], stderr=subprocess.STDOUT)
            )
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def test_preprocess_on_an_existing_cluster_writes_the_same_store_as_a_local_cluster(tmp_path, cli_cluster):
    cube = write_cube(tmp_path / "cube.zarr")
    common = dict(cube=cube.path, patch_size=16, split_block=32, val_fraction=0.2, test_fraction=0.2,
                  max_nodata_fraction=0.5, samples_per_block=8)  # fmt: skip

    remote = run_preprocess(PreprocessConfig(out=str(tmp_path / "remote.zarr"), dask_address=cli_cluster, **common))
    local = run_preprocess(PreprocessConfig(out=str(tmp_path / "local.zarr"), n_workers=2, **common))

    with Client(cli_cluster) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert len(executed) == 2 and sum(executed.values()) >= remote.blocks_written + len(cube.tile_ids)
    assert prefixes >= STAGE_TASKS  # all three passes ran on the CLI-started workers

    assert remote.counts == local.counts and remote.counts["kept"] > 0
    assert remote.norm_stats == local.norm_stats
    remote_digests, local_digests = array_digests(remote.store), array_digests(local.store)
    assert {"s2", "s1", "labels", "split"} <= set(remote_digests)
    assert remote_digests == local_digests
    assert zarr.open_group(remote.store, mode="r").attrs["complete"] is True


def test_softcon_dask_address_is_the_default_scheduler(monkeypatch):
    from softcon.settings import get_settings

    monkeypatch.setenv("SOFTCON_DASK_ADDRESS", "tcp://dask-scheduler:8786")
    get_settings.cache_clear()
    try:
        assert PreprocessConfig().dask_address == "tcp://dask-scheduler:8786"
        assert PreprocessConfig(dask_address="tcp://other:8786").dask_address == "tcp://other:8786"
        monkeypatch.delenv("SOFTCON_DASK_ADDRESS")
        get_settings.cache_clear()
        assert PreprocessConfig().dask_address is None  # a LocalCluster per run
    finally:
        get_settings.cache_clear()
