"""Many writers on one cube: ingest fanned out over Dask workers (2 and 4) writes what one process writes, locally
and on S3; concurrent runs over overlapping periods on S3 lose and duplicate nothing; concurrent ledger records
all land; a worker killed mid-tile leaves a cube check-store passes, and the run or a re-run completes it.

The S3-compatible server is the tests' SeaweedFS (``s3_fixtures.py``), which honours ``If-None-Match`` and
``If-Match`` as AWS S3 does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
import xarray as xr
import zarr
from s3_fixtures import BUCKET

from softcon.config import IngestConfig
from softcon.tasks.backfill import DateWindow, read_ledger, record_window
from softcon.tasks.check_store import check_store
from softcon.tasks.digest import array_digests
from softcon.tasks.ingest import run_ingest
from softcon.tasks.object_writes import object_lease
from softcon.tasks.sample_data import SampleData, write_sample_data

TILES, TILE_SIZE, DATES = 4, 64, 3
CHILD = Path(__file__).with_name("ingest_child.py")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("workers-sample"), tiles=TILES, tile_size=TILE_SIZE, dates=DATES)


def _config(sample: SampleData, cube: str, **overrides: object) -> IngestConfig:
    values: dict[str, object] = {
        "stac": str(sample.items_file), "bbox": sample.bbox, "start": sample.start, "end": sample.end,
        "tile_size": TILE_SIZE, "cube": cube, "max_cloud": 100.0, "max_tile_cloud": 0.5, "n_workers": 1,
    }  # fmt: skip
    return IngestConfig(**(values | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(sample: SampleData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The digests of the cube one process writes (``n_workers`` 1: no cluster)."""
    cube = str(tmp_path_factory.mktemp("one-process") / "cube.zarr")
    report = run_ingest(_config(sample, cube))
    assert len(report.tiles) == TILES and report.tile_dates_written > TILES
    return array_digests(cube)


def _s3_cube(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{os.urandom(4).hex()}/cube.zarr"


def _assert_sorted_time(cube: str) -> None:
    root = zarr.open_group(cube, mode="r")
    for tile_id in root["tiles"].group_keys():
        times = root[f"tiles/{tile_id}/time"][:]
        assert list(times) == sorted(times), tile_id


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_write_the_cube_one_process_writes(
    workers: int, sample: SampleData, reference: dict[str, str], tmp_path: Path
) -> None:
    cube = str(tmp_path / "cube.zarr")
    report = run_ingest(_config(sample, cube, n_workers=workers))
    assert report.tile_dates_written > TILES and not report.items_failed
    assert array_digests(cube) == reference
    _assert_sorted_time(cube)
    assert check_store(cube).ok
    again = run_ingest(_config(sample, cube, n_workers=workers))
    assert again.tile_dates_written == 0 and again.tile_dates_skipped["exists"] == report.tile_dates_written


@pytest.mark.slow
def test_workers_write_the_cube_one_process_writes_on_s3(
    s3_env: object, sample: SampleData, reference: dict[str, str]
) -> None:
    for workers in (2, 4):
        cube = _s3_cube(f"workers-{workers}")
        run_ingest(_config(sample, cube, n_workers=workers))
        assert array_digests(cube) == reference, workers
        _assert_sorted_time(cube)
        assert check_store(cube).ok


@pytest.mark.slow
def test_concurrent_runs_over_overlapping_periods_on_s3_lose_and_repeat_nothing(
    s3_env: object, sample: SampleData, reference: dict[str, str], tmp_path: Path
) -> None:
    cube = _s3_cube("concurrent")
    middle = sample.s2_dates[1]
    # Overlapping ranges; every append sleeps holding the tile's lease, so the two runs interleave.
    children = []
    for part, overrides in enumerate(({"end": middle}, {"start": middle})):
        config = tmp_path / f"config-{part}.json"
        config.write_text(_config(sample, cube, **overrides).model_dump_json())
        children.append(
            subprocess.Popen(
                [sys.executable, str(CHILD), str(config), "--slow-append", "0.3"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
        )
    for child in children:
        _out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
    assert array_digests(cube) == reference
    root = zarr.open_group(cube, mode="r")
    for tile_id in root["tiles"].group_keys():
        attrs = dict(root[f"tiles/{tile_id}"].attrs)
        assert len(attrs["s2_items"]) == root[f"tiles/{tile_id}/time"].shape[0]  # each day once
    assert check_store(cube).ok


BACKFILL_WITH_SLOW_APPENDS = """
import runpy, sys, time
import softcon.tasks.ingest as ingest

real = ingest.append_steps

def slow_append(*args, **kwargs):  # holds the tile's lease a while, so that the two backfills interleave
    time.sleep(0.3)
    return real(*args, **kwargs)

ingest.append_steps = slow_append
sys.argv = ["softcon", *sys.argv[1:]]
runpy.run_module("softcon", run_name="__main__")
"""


@pytest.mark.slow
def test_two_concurrent_backfills_over_overlapping_periods_on_s3_lose_and_repeat_nothing(
    s3_env: object, sample: SampleData, reference: dict[str, str], tmp_path: Path
) -> None:
    """Two ``softcon backfill`` processes (each with its own Prefect and MLflow home), day periods, ranges that
    share a day with items, on one S3 cube: the cube is the one-process cube, each day is written once, and the
    ledger holds every day with items once."""
    import yaml

    cube = _s3_cube("backfills")
    middle = sample.s2_dates[-1]  # a day both backfills have, with tile-dates to write (the second S2 day is cloudy)
    config = tmp_path / "backfill.yaml"
    request = _config(sample, cube).model_dump(mode="json", exclude={"start", "end", "cube"})
    config.write_text(yaml.safe_dump({"ingest": request}))
    children = []
    for part, (start, end) in enumerate(((sample.start, middle), (middle, sample.end))):
        home = tmp_path / f"home-{part}"
        env = os.environ | {
            "SOFTCON_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        }  # fmt: skip
        command = [sys.executable, "-c", BACKFILL_WITH_SLOW_APPENDS, "backfill", "--config", str(config), "--cube",
                   cube, "--start", start.isoformat(), "--end", end.isoformat(), "--period", "day"]  # fmt: skip
        children.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for child in children:
        out, _ = child.communicate(timeout=900)
        assert child.returncode == 0, out[-4000:]
    assert array_digests(cube) == reference
    cube_days: set[str] = set()
    for tile_id in zarr.open_group(cube, mode="r")["tiles"].group_keys():
        tile = xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False)
        assert len(tile.time) == len(set(tile.time.values)) == len(tile.attrs["s2_items"]), tile_id  # each day once
        cube_days |= {str(t)[:10] for name in ("time", "time_s1") if name in tile.coords for t in tile[name].values}
    days = [entry["start"] for entry in read_ledger(cube)]
    assert sorted(days) == sorted(cube_days) and middle.isoformat() in days  # every day once, the shared one too
    assert check_store(cube).ok


def _record_concurrently(config: IngestConfig, windows: list[DateWindow]) -> None:
    errors: list[BaseException] = []

    def record(window: DateWindow) -> None:
        try:
            record_window(config, window, tile_dates={}, writer=window.start.isoformat())
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=record, args=(window,)) for window in windows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_ledger_records_all_land(where: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if where == "s3":
        request.getfixturevalue("s3_env")
        cube = _s3_cube("ledger")
    else:
        cube = str(tmp_path / "cube.zarr")
    zarr.open_group(cube, mode="w", zarr_format=3, attributes={"keep": "me"})
    config = IngestConfig(stac="items.json", bbox=(11.0, 46.4, 11.1, 46.5), start=date(2024, 6, 1),
                          end=date(2024, 6, 30), cube=cube)  # fmt: skip
    windows = [DateWindow(date(2024, 6, 1) + timedelta(days=k), date(2024, 6, 1) + timedelta(days=k)) for k in range(8)]
    _record_concurrently(config, windows)
    ledger = read_ledger(cube)
    assert sorted(entry["start"] for entry in ledger) == [w.start.isoformat() for w in windows]
    assert dict(zarr.open_group(cube, mode="r").attrs)["keep"] == "me"  # the rest of the root attributes kept
    record_window(config, windows[0], tile_dates={}, writer="again")  # the same window replaces its entry
    assert len(read_ledger(cube)) == len(windows)


def test_a_lease_is_exclusive_and_a_stale_one_is_taken_over(s3_env: object) -> None:
    url = f"s3://{BUCKET}/leases-{os.urandom(4).hex()}/tile.lock"
    order: list[str] = []

    def second() -> None:
        with object_lease(url, wait_seconds=60):
            order.append("second")

    with object_lease(url):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)
        order.append("first")  # the second writer is waiting now
    thread.join(60)
    assert order == ["first", "second"]
    # A holder that died left its lease: a writer takes it over once it is older than the lease time.
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, b'{"pid": 0}', mode="create")
    with object_lease(url, lease_seconds=0.0, wait_seconds=30):
        assert fs.cat_file(path) != b'{"pid": 0}'
    assert not fs.exists(path)


KILL_HOOK = """
import os, signal
from pathlib import Path
import softcon.tasks.cube_store as cube_store

def install(marker):
    real = cube_store.write_ahead

    def write_then_die(writes):
        real(writes)
        if not Path(marker).exists():  # the first append of the run: chunks written ahead, no array grown
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    cube_store.write_ahead = write_then_die
"""


@pytest.mark.slow
@pytest.mark.parametrize("retried", [False, True], ids=["rerun-completes", "dask-retry-completes"])
def test_a_worker_killed_mid_tile_leaves_a_sound_cube_that_completes(
    retried: bool, sample: SampleData, reference: dict[str, str], tmp_path: Path
) -> None:
    """The first append of the run SIGKILLs its worker after writing its chunks ahead. Without retries the run
    fails naming the lost worker, check-store passes the cube (no partial step is visible) and a re-run completes
    it; with Dask's retries the run itself completes on the restarted worker."""
    import dask
    from distributed import Client, LocalCluster

    hook = tmp_path / "kill_hook.py"
    hook.write_text(KILL_HOOK)
    marker = tmp_path / "killed"
    cube = str(tmp_path / "cube.zarr")
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 3 if retried else 0}),
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        client.upload_file(str(hook))
        client.run(lambda: __import__("kill_hook").install(str(marker)))
        config = _config(sample, cube, dask_address=cluster.scheduler_address)
        if retried:
            run_ingest(config)
        else:
            with pytest.raises(Exception, match=r"(?i)worker"):
                run_ingest(config)
    assert marker.exists()
    assert check_store(cube).ok, check_store(cube).problems
    if not retried:
        report = run_ingest(_config(sample, cube))
        assert report.tile_dates_written > 0
    assert array_digests(cube) == reference


def test_tiles_with_more_items_go_to_the_workers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Longest first: a long tile started last would run alone at the end of the run."""
    from distributed import LocalCluster

    import softcon.tasks.ingest as ingest
    from softcon.tasks.grid import Tile

    def record(config: IngestConfig, work: ingest.TileWork) -> ingest._RunState:
        return ingest._RunState(written=len(work.items))  # the task runs on a copy: it reports what it got

    monkeypatch.setattr(ingest, "ingest_one_tile", record)
    work = [
        ingest.TileWork(Tile(32632, 600_000.0 + 640 * k, 5_000_000.0, 10.0, 64), [{"id": str(k)}] * n, (), None)
        for k, n in enumerate([1, 4, 2, 5, 3])
    ]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        config = IngestConfig(
            stac="items.json", bbox=(11.0, 46.0, 11.01, 46.01), start=date(2024, 6, 1), end=date(2024, 6, 2),
            cube="cube.zarr", dask_address=cluster.scheduler_address,
        )  # fmt: skip
        done = [state.written for _, state in ingest._run_tiles(config, work, read=None)]  # type: ignore[arg-type]
    assert done == [5, 4, 3, 2, 1]  # one worker thread: tiles finish in the order they started
