"""End-to-end preprocess on a synthetic 2-tile cube: store layout, quality drops, split, stats, resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from cube_factory import CLASS_CODES, CLASS_NAMES, SyntheticCube, write_cube
from distributed import Client

from softcon import progress
from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS, PreprocessConfig
from softcon.models import training_store
from softcon.tasks import split
from softcon.tasks.preprocess import PreprocessReport, run_preprocess

PATCH = 16
BLOCK = 32  # 4 split blocks per tile, 8 in all, so val and test both get one
SAMPLES_PER_BLOCK = 8


@dataclass(frozen=True)
class Written:
    cube: SyntheticCube
    config: PreprocessConfig
    report: PreprocessReport


@pytest.fixture(scope="module")
def client():
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def cube(tmp_path_factory) -> SyntheticCube:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


def _config(cube: SyntheticCube, out: Path, **changes) -> PreprocessConfig:
    values = dict(cube=cube.path, out=str(out), patch_size=PATCH, split_block=BLOCK, val_fraction=0.2,
                  test_fraction=0.2, max_nodata_fraction=0.5)  # fmt: skip
    return PreprocessConfig(**(values | changes))


@pytest.fixture(scope="module")
def written(cube, client, tmp_path_factory) -> Written:
    config = _config(cube, tmp_path_factory.mktemp("store") / "store.zarr")
    report = run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    return Written(cube=cube, config=config, report=report)


def test_store_arrays_dtypes_and_shapes(written):
    group = zarr.open_group(written.config.out, mode="r")
    n = written.report.counts["kept"]
    expected = {
        "s2": ((n, 12, PATCH, PATCH), np.uint16),
        "s1": ((n, 2, PATCH, PATCH), np.float32),
        "labels": ((n, 4), np.uint8),
        "fractions": ((n, 4), np.float32),
        "labelled": ((n,), np.bool_),
        "split": ((n,), np.uint8),
        "location": ((n,), np.int64),
        "tile": ((n,), np.int32),
        "time": ((n,), np.dtype("datetime64[ns]")),
        "row": ((n,), np.int32),
        "col": ((n,), np.int32),
    }
    assert sorted(group.array_keys()) == sorted(expected)
    for name, (shape, dtype) in expected.items():
        assert group[name].shape == shape, name
        assert group[name].dtype == dtype, name
    assert group["s2"].shards == (SAMPLES_PER_BLOCK, 12, PATCH, PATCH)
    assert group["s2"].chunks == (1, 12, PATCH, PATCH)
    assert group["labels"].chunks == (SAMPLES_PER_BLOCK, 4)


def test_store_attrs(written):
    attrs = zarr.open_group(written.config.out, mode="r").attrs
    assert attrs["schema_version"] == 1
    assert attrs["class_names"] == list(CLASS_NAMES)
    assert attrs["class_codes"] == list(CLASS_CODES)
    assert attrs["bands"] == list(S2_L2A_BANDS)
    assert attrs["pols"] == list(S1_POLARIZATIONS)
    assert attrs["tiles"] == list(written.cube.tile_ids)
    assert attrs["split_names"] == ["train", "val", "test"]
    assert attrs["cube"] == written.cube.path
    assert attrs["params"]["patch_size"] == PATCH
    assert attrs["norm_stats"] == written.report.norm_stats
    assert attrs["counts"] == written.report.counts
    assert attrs["complete"] is True


def test_store_opens_with_xarray(written):
    store = xr.open_zarr(written.config.out)
    assert store["s2"].dims == ("sample", "band", "h", "w")
    assert store["s1"].dims == ("sample", "pol", "h", "w")
    assert store["labels"].dims == ("sample", "class")
    assert store["time"].dtype == np.dtype("datetime64[ns]")
    assert store["s2"].encoding["shards"] == (SAMPLES_PER_BLOCK, 12, PATCH, PATCH)


def test_cloudy_and_nodata_patches_dropped(written):
    counts = written.report.counts
    per_date = (written.cube.size // PATCH) ** 2  # 16 patches per tile-date
    assert counts["patches"] == 2 * 3 * per_date
    assert counts["dropped_cloud"] == per_date  # the whole cloudy date of tile 0
    assert counts["dropped_nodata"] == 1  # the 16 px nodata corner: exactly one patch
    assert counts["kept"] == counts["patches"] - per_date - 1
    assert counts["train"] + counts["val"] + counts["test"] == counts["kept"]
    store = zarr.open_group(written.config.out, mode="r")
    cloudy_tile, cloudy_time = written.cube.cloudy
    on_cloudy = (store["tile"][:] == 0) & (store["time"][:] == written.cube.times[cloudy_time])
    assert cloudy_tile == written.cube.tile_ids[0] and not on_cloudy.any()


def test_samples_ordered_by_location_then_time(written):
    store = zarr.open_group(written.config.out, mode="r")
    location, times = store["location"][:], store["time"][:].astype(np.int64)
    order = np.lexsort((times, location))
    assert (order == np.arange(len(location))).all()
    # One location is one (tile, row, col).
    keys = {(int(loc), int(t), int(r), int(c)) for loc, t, r, c in
            zip(location, store["tile"][:], store["row"][:], store["col"][:], strict=True)}  # fmt: skip
    assert len({k[0] for k in keys}) == len(keys)


def test_fractions_sum_to_one_and_labels_follow(written):
    store = zarr.open_group(written.config.out, mode="r")
    fractions, labels, labelled = store["fractions"][:], store["labels"][:], store["labelled"][:]
    # The top-left 16 px of land cover are nodata: that patch has no labelled pixel, so no fractions.
    top_left = (store["row"][:] == 0) & (store["col"][:] == 0)
    np.testing.assert_allclose(fractions[~top_left].sum(axis=1), 1.0, rtol=1e-6)
    assert (fractions[top_left] == 0).all()
    assert (labels == (fractions > written.config.label_threshold)).all()
    assert not labelled[top_left].any() and labelled[~top_left].all()


def test_split_blocks_are_not_shared(written):
    store = zarr.open_group(written.config.out, mode="r")
    tiles = store.attrs["tiles"]
    blocks: dict[tuple, set[int]] = {}
    for tile, row, col, value in zip(store["tile"][:], store["row"][:], store["col"][:], store["split"][:],
                                     strict=True):  # fmt: skip
        blocks.setdefault(split.patch_block(tiles[tile], int(row), int(col), PATCH, BLOCK), set()).add(int(value))
    assert all(len(values) == 1 for values in blocks.values())
    assert {next(iter(v)) for v in blocks.values()} == {0, 1, 2}


def test_split_is_deterministic_by_seed(written, client, tmp_path):
    again = run_preprocess(_config(written.cube, tmp_path / "again.zarr"), client=client, samples_per_block=8)
    first = zarr.open_group(written.config.out, mode="r")["split"][:]
    assert (zarr.open_group(again.store, mode="r")["split"][:] == first).all()


def test_norm_stats_equal_numpy_over_training_split(written):
    store = zarr.open_group(written.config.out, mode="r")
    train = store["split"][:] == 0
    s2, s1 = store["s2"][:][train], store["s1"][:][train]
    stats = written.report.norm_stats
    for band in range(12):
        pixels = s2[:, band][s2[:, band] != 0].astype(np.float64)
        np.testing.assert_allclose(stats["s2"]["mean"][band], pixels.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats["s2"]["std"][band], pixels.std(), rtol=1e-10)
        assert stats["s2"]["p01"][band] == np.percentile(pixels, 1, method="inverted_cdf")
        assert stats["s2"]["p99"][band] == np.percentile(pixels, 99, method="inverted_cdf")
    for pol in range(2):
        pixels = s1[:, pol][np.isfinite(s1[:, pol])].astype(np.float64)
        np.testing.assert_allclose(stats["s1"]["mean"][pol], pixels.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats["s1"]["std"][pol], pixels.std(), rtol=1e-10)
        assert abs(stats["s1"]["p99"][pol] - np.percentile(pixels, 99, method="inverted_cdf")) <= 0.0051


def test_patches_equal_cube_pixels(written):
    store = xr.open_zarr(written.config.out)
    cube_tile = xr.open_zarr(written.cube.path, group=f"tiles/{written.cube.tile_ids[1]}")
    sample = int(np.nonzero(store["tile"].values == 1)[0][5])
    row, col, when = int(store["row"][sample]), int(store["col"][sample]), store["time"].values[sample]
    window = dict(y=slice(row, row + PATCH), x=slice(col, col + PATCH))
    np.testing.assert_array_equal(store["s2"][sample].values, cube_tile["s2"].sel(time=when).isel(window).values)
    # S1 is one day after each S2 date except the last, which has none within 3 days.
    if when == written.cube.times[-1]:
        assert np.isnan(store["s1"][sample].values).all()
    else:
        s1 = cube_tile["s1"].sel(time_s1=when + np.timedelta64(1, "D")).isel(window).values
        np.testing.assert_array_equal(store["s1"][sample].values, s1)


def test_patches_equal_cube_pixels_when_the_cube_dates_are_in_append_order(client, tmp_path):
    cube = write_cube(tmp_path / "cube.zarr", time_order=(2, 0, 1))  # a backfill wrote the last date first
    assert xr.open_zarr(cube.path, group=f"tiles/{cube.tile_ids[1]}")["time"].values[0] == cube.times[2]
    config = _config(cube, tmp_path / "store.zarr")
    run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    store = xr.open_zarr(config.out)
    tiles = {index: xr.open_zarr(cube.path, group=f"tiles/{tile}") for index, tile in enumerate(cube.tile_ids)}
    assert len(set(store["time"].values.tolist())) == 3
    for sample in range(store.sizes["sample"]):
        row, col, when = int(store["row"][sample]), int(store["col"][sample]), store["time"].values[sample]
        window = dict(y=slice(row, row + PATCH), x=slice(col, col + PATCH))
        cube_pixels = tiles[int(store["tile"][sample])]["s2"].sel(time=when).isel(window).values
        np.testing.assert_array_equal(store["s2"][sample].values, cube_pixels)


def test_complete_store_is_reused(written, client):
    started = time.perf_counter()
    report = run_preprocess(written.config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    assert report.reused and report.counts == written.report.counts
    assert report.norm_stats == written.report.norm_stats
    assert time.perf_counter() - started < 2


def test_resume_after_partial_write_equals_clean_run(written, client, tmp_path):
    config = written.config.model_copy(update={"out": str(tmp_path / "partial.zarr")})
    run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    # Simulate a kill: blocks 2.. never marked done, their images lost, statistics not yet written.
    group = zarr.open_group(config.out, mode="r+")
    group["s2"][2 * SAMPLES_PER_BLOCK :] = 0
    group["s1"][2 * SAMPLES_PER_BLOCK :] = np.nan
    group.attrs.update({"blocks_done": [0, 1], "complete": False, "norm_stats": None})
    zarr.consolidate_metadata(config.out)
    written_blocks = []
    with progress.listen(lambda step, done, total: written_blocks.append((step, done, total))):
        report = run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    n_blocks = len(training_store.block_bounds(report.counts["kept"], SAMPLES_PER_BLOCK))
    assert not report.reused
    assert ("tiles", 1, 2) not in written_blocks  # the plan was read back, not recomputed
    assert written_blocks[0] == ("blocks", 2, n_blocks)
    assert report.norm_stats == written.report.norm_stats
    xr.testing.assert_identical(
        xr.open_zarr(config.out, chunks=None).drop_attrs(), xr.open_zarr(written.config.out, chunks=None).drop_attrs()
    )


def test_changed_parameters_rewrite_the_store(written, client, tmp_path):
    config = written.config.model_copy(update={"out": str(tmp_path / "changed.zarr")})
    run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    changed = config.model_copy(update={"max_cloud_fraction": 1.0})
    report = run_preprocess(changed, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    assert not report.reused and report.counts["dropped_cloud"] == 0


def test_missing_landcover_names_labels_stage(tmp_path):
    cube = write_cube(tmp_path / "cube.zarr", n_tiles=1, size=32, n_dates=1, with_landcover=False)
    with pytest.raises(ValueError, match=r"no landcover; run `softcon labels"):
        run_preprocess(_config(cube, tmp_path / "store.zarr"))


def test_cube_without_tiles_names_ingest_stage(tmp_path):
    zarr.open_group(tmp_path / "empty.zarr", mode="w", zarr_format=3)
    config = PreprocessConfig(cube=str(tmp_path / "empty.zarr"), out=str(tmp_path / "store.zarr"))
    with pytest.raises(ValueError, match=r"has no tiles; run `softcon ingest"):
        run_preprocess(config)


def test_cube_without_s1_writes_nan(client, tmp_path):
    cube = write_cube(tmp_path / "cube.zarr", n_tiles=1, size=32, n_dates=2, with_s1=False)
    report = run_preprocess(_config(cube, tmp_path / "store.zarr"), client=client)
    assert np.isnan(zarr.open_group(report.store, mode="r")["s1"][:]).all()
    assert report.norm_stats["s1"]["mean"] == [None, None]
    assert report.metrics()["kept"] == report.counts["kept"]


@pytest.mark.slow
def test_default_local_cluster_in_processes(cube, tmp_path):
    report = run_preprocess(_config(cube, tmp_path / "store.zarr", n_workers=1), samples_per_block=SAMPLES_PER_BLOCK)
    assert report.dashboard_link and not report.reused
    assert report.counts["kept"] == 2 * 3 * 16 - 16 - 1


KILL_SCRIPT = """
import os, sys, time
from distributed import Client
from softcon import progress
from softcon.config import PreprocessConfig
from softcon.tasks.preprocess import run_preprocess

config = PreprocessConfig.model_validate_json(sys.argv[1])

def on_progress(step, done, total):
    print(step, done, total, flush=True)
    if step == "blocks" and done >= 1:
        time.sleep(0.5)  # slow the driver down so the parent's SIGKILL lands mid-write

with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client, \
        progress.listen(on_progress):
    run_preprocess(config, client=client)
print("finished", flush=True)
"""


def _shard_files(store: str, block: int) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of the S2 and S1 shard files of one write block."""
    files = {}
    for name in ("s2", "s1"):
        path = Path(store) / name / "c" / str(block) / "0" / "0" / "0"
        files[str(path)] = (path.stat().st_mtime_ns, path.read_bytes())
    return files


@pytest.mark.slow
def test_resume_after_sigkill_writes_only_unfinished_blocks(written, client, tmp_path):
    import signal
    import subprocess
    import sys

    config = written.config.model_copy(update={"out": str(tmp_path / "killed.zarr"), "samples_per_block": 8})
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, config.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = []
    for line in child.stdout:  # wait until two blocks are marked done, then kill -9
        lines.append(line.split())
        if lines[-1][:2] == ["blocks", "2"]:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, lines
    attrs = training_store.read_store_attrs(config.out)
    done = attrs["blocks_done"]
    n_blocks = int(lines[-1][2])
    assert attrs["complete"] is False and 2 <= len(done) < n_blocks
    before = {block: _shard_files(config.out, block) for block in done}

    report = run_preprocess(config, client=client)

    assert report.blocks_written == n_blocks - len(done)  # finished blocks are not recomputed
    for block in done:
        assert _shard_files(config.out, block) == before[block]  # nor rewritten
    assert report.norm_stats == written.report.norm_stats
    xr.testing.assert_identical(
        xr.open_zarr(config.out, chunks=None).drop_attrs(), xr.open_zarr(written.config.out, chunks=None).drop_attrs()
    )


def test_existing_scheduler_by_address(cube, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        links = []
        with progress.listen(on_link=lambda name, url: links.append((name, url))):
            report = run_preprocess(
                _config(cube, tmp_path / "store.zarr", dask_address=cluster.scheduler_address),
                samples_per_block=SAMPLES_PER_BLOCK,
            )
        port = cluster.dashboard_link.rsplit(":", 1)[1]  # the host part differs: localhost vs the interface
        assert report.dashboard_link.endswith(f":{port}") and links == [("dask.dashboard", report.dashboard_link)]
        assert cluster.scheduler.transition_counter > 0  # the work ran on this scheduler
    assert report.counts["kept"] == 2 * 3 * 16 - 16 - 1


def test_samples_per_block_from_config_sets_the_shards(cube, client, tmp_path):
    report = run_preprocess(_config(cube, tmp_path / "store.zarr", samples_per_block=5), client=client)
    group = zarr.open_group(report.store, mode="r")
    assert group["s2"].shards[0] == 5 and group.attrs["samples_per_block"] == 5
    assert report.blocks_written == -(-report.counts["kept"] // 5)


def test_s1_window_is_configurable(cube, client, tmp_path):
    # The cube's S1 is one day after each S2 date: a half-day window matches none of them.
    report = run_preprocess(_config(cube, tmp_path / "store.zarr", s1_max_gap_days=0.5), client=client)
    assert np.isnan(zarr.open_group(report.store, mode="r")["s1"][:]).all()
    assert zarr.open_group(report.store, mode="r").attrs["s1_max_gap_days"] == 0.5


def test_linear_s1_is_written_in_db(client, tmp_path):
    db_cube = write_cube(tmp_path / "db.zarr", n_tiles=1, size=32, n_dates=2)
    linear_cube = write_cube(tmp_path / "linear.zarr", n_tiles=1, size=32, n_dates=2, s1_units="linear")
    db = run_preprocess(_config(db_cube, tmp_path / "db_store.zarr"), client=client)
    linear = run_preprocess(_config(linear_cube, tmp_path / "linear_store.zarr"), client=client)
    s1_db = zarr.open_group(db.store, mode="r")["s1"][:]
    s1_from_linear = zarr.open_group(linear.store, mode="r")["s1"][:]
    assert (s1_db[np.isfinite(s1_db)] < 0).mean() > 0.9  # dB backscatter is mostly negative
    np.testing.assert_allclose(s1_from_linear, s1_db, atol=1e-4)  # NaN where NaN
    assert zarr.open_group(linear.store, mode="r").attrs["s1_units"] == "dB"


def test_unknown_s1_units_are_refused(tmp_path):
    cube = write_cube(tmp_path / "cube.zarr", n_tiles=1, size=32, n_dates=1)
    tile = zarr.open_group(cube.path, mode="r+")[f"tiles/{cube.tile_ids[0]}/s1"]
    tile.attrs["units"] = "sigma0_kelvin"
    with pytest.raises(ValueError, match=r"S1 units 'sigma0_kelvin' are not one of"):
        run_preprocess(_config(cube, tmp_path / "store.zarr"))


def test_cube_not_at_10_m_is_refused(tmp_path):
    cube = write_cube(tmp_path / "cube.zarr", n_tiles=1, size=32, n_dates=1, resolution=20.0)
    with pytest.raises(ValueError, match=r"has 20 m pixels; the store needs every S2 band at 10 m"):
        run_preprocess(_config(cube, tmp_path / "store.zarr"))


def test_default_patch_grid_is_ssl4eo():
    config = PreprocessConfig()
    assert config.patch_size == 264 and config.stride is None  # SSL4EO-S12: 264 px, random 224 px crops later


def test_norm_stats_named_and_flattened_for_mlflow(written):
    from softcon.flows.preprocess import norm_stat_metrics

    stats = written.report.norm_stats
    assert stats["s2"]["names"] == list(S2_L2A_BANDS) and stats["s1"]["names"] == list(S1_POLARIZATIONS)
    metrics = norm_stat_metrics(stats)
    assert metrics["norm.s2.B04.mean"] == stats["s2"]["mean"][S2_L2A_BANDS.index("B04")]
    assert metrics["norm.s1.VH.p99"] == stats["s1"]["p99"][1]
    assert len([key for key in metrics if key.startswith("norm.s2.")]) == 4 * 12


def test_an_empty_split_is_warned_with_what_to_change(tmp_path: Path) -> None:
    """Two tiles with one split block each put every sample in train: say so, and how to get val and test."""
    from softcon.tasks.preprocess import empty_split_warning

    config = PreprocessConfig(cube=str(tmp_path / "cube.zarr"), out=str(tmp_path / "store.zarr"))
    warning = empty_split_warning(config, {"kept": 32, "train": 32, "val": 0, "test": 0})
    assert warning is not None and warning.startswith("the val and test splits are empty (train 32, val 0, test 0")
    assert "blocks of one tile" in warning and "--split-block" in warning
    assert empty_split_warning(config, {"kept": 32, "train": 20, "val": 4, "test": 8}) is None
    no_val = config.model_copy(update={"val_fraction": 0.0, "split_block": 64})
    assert "the test split is empty" in (
        empty_split_warning(no_val, {"kept": 9, "train": 9, "val": 0, "test": 0}) or ""
    )
    assert "blocks of 64 px" in (empty_split_warning(no_val, {"kept": 9, "train": 9, "val": 0, "test": 0}) or "")


@pytest.mark.parametrize(
    "bands",
    [("B02", "B03", "B04", "B08"), S2_L1C_BANDS],
    ids=["4-band subset", "L1C 13 bands"],
)
def test_any_band_set_of_the_cube_goes_through_preprocess_and_training(
    client, tmp_path: Path, bands: tuple[str, ...]
) -> None:
    """A cube ingested with --bands B02,B03,B04,B08 was refused ("the store needs B01…B12"): the store keeps the
    cube's bands, its statistics name them, and training builds its first layer for them."""
    from softcon.config import TrainConfig
    from softcon.models.encoder import build_encoder
    from softcon.tasks.train import load_encoder, run_training

    cube = write_cube(tmp_path / "cube.zarr", n_tiles=2, size=64, n_dates=2, bands=bands)
    config = _config(cube, tmp_path / "store.zarr")
    report = run_preprocess(config, client=client, samples_per_block=SAMPLES_PER_BLOCK)
    store = zarr.open_group(config.out, mode="r")
    assert store.attrs["bands"] == list(bands) and store["s2"].shape[1] == len(bands)
    assert report.norm_stats["s2"]["names"] == list(bands)
    result = run_training(TrainConfig(store=config.out, out=str(tmp_path / "ckpt"), steps=2, batch_size=8,
                                      backbone="resnet18", log_system_metrics=False))  # fmt: skip
    encoder, meta = load_encoder(result.checkpoint)
    assert meta["bands"] == list(bands) and encoder.conv1.weight.shape[1] == len(bands)
    assert build_encoder("resnet18", len(bands), bands=bands).conv1.in_channels == len(bands)
