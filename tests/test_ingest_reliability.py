"""Ingest under failure: transient errors retried, bad items skipped and reported, SIGKILL mid-write, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from data_fixtures import sample_ingest_config

import softcon.tasks.scene_load as scene_load
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_access import is_transient, with_retries

CHILD = Path(__file__).resolve().parent / "ingest_child.py"
ROOT = Path(__file__).resolve().parents[1]


def _open(cube: Path, tile_id: str) -> xr.Dataset:
    return xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False)


def test_transient_error_is_retried_with_doubling_delays() -> None:
    calls, waits = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise rasterio.errors.RasterioIOError("CURL error: HTTP response code: 503")
        return "pixels"

    assert with_retries(flaky, what="read", retries=3, delay=0.5, sleep=waits.append) == "pixels"
    assert waits == [0.5, 1.0]


def test_permanent_error_is_not_retried() -> None:
    waits: list[float] = []
    error = rasterio.errors.RasterioIOError("/data/x.tif: No such file or directory")
    assert not is_transient(error)
    with pytest.raises(rasterio.errors.RasterioIOError):
        with_retries(lambda: (_ for _ in ()).throw(error), what="read", retries=3, delay=1, sleep=waits.append)
    assert waits == []


def test_flaky_reads_are_retried_and_the_cube_is_complete(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, data_stac_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    reference, first = data_cube
    real_load = scene_load.odc.stac.load
    failures = {"left": 3}

    def flaky_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise rasterio.errors.RasterioIOError("CURL error: Connection reset by peer")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(scene_load.odc.stac, "load", flaky_load)
    cube = tmp_path / "cube.zarr"
    report = run_ingest(sample_ingest_config(data_sample, data_stac_url, cube, retries=3, retry_delay=0.0))
    assert failures["left"] == 0 and report.items_failed == []
    assert report.tile_dates_written == first.tile_dates_written
    for tile_id in report.tiles:
        xr.testing.assert_identical(_open(cube, tile_id).load(), _open(reference, tile_id).load())


def test_corrupt_file_is_skipped_reported_and_the_rest_ingested(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, _ = data_cube
    items = json.loads(data_sample.items_file.read_text())
    s2 = [i for i in items["features"] if i["collection"] == "sentinel-2-l2a"]
    broken = s2[0]
    source = Path(broken["assets"]["nir"]["href"])
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(source.read_bytes()[: source.stat().st_size // 3])  # header fine, pixel data cut off
    broken["assets"]["nir"]["href"] = str(corrupt)
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    report = run_ingest(sample_ingest_config(data_sample, str(path), tmp_path / "cube.zarr", retry_delay=0.0))
    assert report.items_failed == [broken["id"]]
    assert broken["id"] in report.failures and report.items[broken["id"]] == "failed"
    assert report.metrics()["items_failed"] == 1
    day = broken["properties"]["datetime"][:10]
    for tile_id in report.tiles:
        ds, want = _open(tmp_path / "cube.zarr", tile_id), _open(reference, tile_id)
        assert day in want.attrs["s2_items"]
        # Every other tile-date of the clean cube is there; only the failed item's day is missing.
        assert ds.attrs["s2_items"] == {d: ids for d, ids in want.attrs["s2_items"].items() if d != day}
        assert ds.attrs["s1_items"] == want.attrs["s1_items"]


def _child(config: dict, *extra: str) -> subprocess.Popen:
    config_file = Path(config["cube"]).with_suffix(f".{time.monotonic_ns()}.json")
    config_file.write_text(json.dumps(config, default=str))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(config_file), *extra], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _config_dict(sample: SampleData, stac: str, cube: Path, **overrides: object) -> dict:
    return sample_ingest_config(sample, stac, cube, **overrides).model_dump(mode="json")


@pytest.mark.slow
@pytest.mark.parametrize("pause_at", ["grow", "commit"], ids=["chunks-written-ahead", "data-grown-time-not"])
def test_sigkill_mid_write_then_rerun_completes_with_no_partial_step(
    pause_at: str, data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, _ = data_cube
    cube = tmp_path / "cube.zarr"
    marker = tmp_path / "paused"
    child = _child(
        _config_dict(data_sample, str(data_sample.items_file), cube), "--pause-at", pause_at, "--marker", str(marker)
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "child never reached the write"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    tile_id = data_sample.tile_ids[0]
    # Killed mid-append: the time coordinate never grew, so no step, partial or whole, is visible.
    import zarr

    group = zarr.open_group(str(cube), path=f"tiles/{tile_id}", mode="r")
    assert group["time"].shape[0] == 0
    if pause_at == "grow":
        assert _open(cube, tile_id).sizes["time"] == 0
    else:  # data arrays longer than time: xarray refuses the tile rather than show a partial step
        assert group["s2"].shape[0] > 0
        with pytest.raises(ValueError, match="conflicting sizes"):
            _open(cube, tile_id)
    report = run_ingest(sample_ingest_config(data_sample, str(data_sample.items_file), cube))
    assert report.tile_dates_written > 0
    for tile in data_sample.tile_ids:
        xr.testing.assert_identical(_open(cube, tile).load(), _open(reference, tile).load())


@pytest.mark.slow
def test_concurrent_runs_over_overlapping_dates_leave_a_correct_store(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, _ = data_cube
    cube = tmp_path / "cube.zarr"
    items = str(data_sample.items_file)
    middle = data_sample.s2_dates[1]
    # Different, overlapping date ranges; each append sleeps holding the lock so the runs interleave.
    first = _child(_config_dict(data_sample, items, cube, end=middle.isoformat()), "--slow-append", "0.3")
    second = _child(_config_dict(data_sample, items, cube, start=middle.isoformat()), "--slow-append", "0.3")
    for child in (first, second):
        _out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
    for tile in data_sample.tile_ids:
        got = _open(cube, tile).load()
        want = _open(reference, tile).load()
        assert got.sizes == want.sizes  # no time step duplicated or lost
        assert got.attrs["s2_items"] == want.attrs["s2_items"] and got.attrs["s1_items"] == want.attrs["s1_items"]
        xr.testing.assert_identical(got.sortby("time").sortby("time_s1"), want.sortby("time").sortby("time_s1"))
        assert np.isfinite(got.s1.values).any()
