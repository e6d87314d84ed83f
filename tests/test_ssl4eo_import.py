"""``softcon import-ssl4eo``: an SSL4EO-S12 tree in the released layout (cut from real patches) into a training store
that check-store passes and training reads; labels, S1 pairing, location split, subsets, resuming, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from distributed import Client
from ssl4eo_tree import BEN_S1, L1C, LOCATIONS, PATCH, SEASON_DATES, build_tree, build_zarr_release, s2_season
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import ImportSSL4EOConfig, TrainConfig
from softcon.tasks.check_store import check_store
from softcon.tasks.ssl4eo_import import run_import_ssl4eo
from softcon.tasks.ssl4eo_labels import read_ssl4eo_labels
from softcon.tasks.ssl4eo_layout import band_file, season_time
from softcon.tasks.train import run_training

LABELS = {
    "0000000": [["water", "trees"], []],  # per season, in time order, by class name; the second has no label
    # the published form (zhu-xlab/softcon README): season folder -> Dynamic World label values as strings
    "0000001": {s2_season(SEASON_DATES[0]): ["6"], s2_season(SEASON_DATES[1]): ["4", "5"]},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("ssl4eo") / "SSL4EO-S12")


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "ssl4eo-s12-ml.json"
    path.write_text(json.dumps(LABELS))
    return path


@pytest.fixture(scope="module")
def client() -> Client:
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as dask:
        yield dask


def _config(tree: Path, out: Path, **overrides: object) -> ImportSSL4EOConfig:
    values = dict(root=str(tree), out=str(out), patch_size=PATCH, samples_per_block=3, val_fraction=0.25,
                  test_fraction=0.25)  # fmt: skip
    return ImportSSL4EOConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def imported(tree: Path, labels_file: Path, client: Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "ssl4eo.zarr"
    report = run_import_ssl4eo(_config(tree, out, labels=str(labels_file)), client=client)
    assert report.counts["samples"] == 8 and report.blocks_written == 3
    return out


def _read(path: Path, window: rasterio.windows.Window | None = None) -> np.ndarray:
    with rasterio.open(path) as dataset:
        return dataset.read(1, window=window)


def test_samples_hold_the_tree_pixels_at_10_m_with_coarser_bands_resized(imported: Path) -> None:
    store = zarr.open_group(str(imported), mode="r")
    assert store.attrs["bands"] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                                    "B11", "B12"]  # fmt: skip
    assert store["s2"].shape == (8, 13, PATCH, PATCH) and store["s2"].dtype == np.uint16
    # sample 0 = location 0000000, first season = the Virginia L1C crop's top-left quadrant
    window = rasterio.windows.Window(0, 0, PATCH, PATCH)
    b02 = store["s2"][0, 1]
    np.testing.assert_array_equal(b02, _read(L1C / "s2_B02_crop.tif", window))
    b10 = store["s2"][0, 10].astype(np.float64)  # 60 m, 20 px -> 120 px
    source = _read(L1C / "s2_B10_crop.tif", rasterio.windows.Window(0, 0, PATCH // 6, PATCH // 6))
    assert abs(b10.mean() - source.mean()) < 0.02 * source.mean() and b10.std() > 0
    # its S1 is the BigEarthNet patch put at that location, 10 days later, in dB as the file holds it
    vv = _read(next(sorted(BEN_S1.iterdir())[0].glob("*_VV.tif")))
    np.testing.assert_allclose(store["s1"][0, 0], vv, rtol=1e-6)


def test_times_labels_split_and_s1_pairing(imported: Path) -> None:
    store = zarr.open_group(str(imported), mode="r")
    location = store["location"][:]
    np.testing.assert_array_equal(location, [0, 0, 1, 1, 2, 2, 3, 3])
    times = store["time"][:].astype("datetime64[ns]")
    np.testing.assert_array_equal(times[:2], [season_time(s2_season(date)) for date in SEASON_DATES])
    names = list(store.attrs["class_names"])
    hot = store["labels"][:]
    assert [names[i] for i in np.flatnonzero(hot[0])] == ["water", "trees"]
    assert not hot[1].any() and not store["labelled"][1]  # an empty list is no label
    assert [names[i] for i in np.flatnonzero(hot[2])] == ["built"]
    assert [names[i] for i in np.flatnonzero(hot[3])] == ["crops", "shrub_and_scrub"]  # label values "4", "5"
    assert not store["labelled"][4:].any()  # locations the file does not name
    np.testing.assert_allclose(store["fractions"][0], hot[0] / 2)
    split = store["split"][:]
    assert all(len(set(split[location == loc])) == 1 for loc in range(4))  # a location is never split
    assert set(split) == {0, 1, 2}
    s1_missing = np.isnan(store["s1"][:]).reshape(8, -1).all(axis=1)
    np.testing.assert_array_equal(s1_missing, [False] * 6 + [True] * 2)  # location 3 has no S1 folder


def test_check_store_passes_and_training_reads_the_store(imported: Path, tmp_path: Path) -> None:
    assert check_store(str(imported)).problems == []
    config = TrainConfig(store=str(imported), out=str(tmp_path / "ckpt"), steps=2, batch_size=4, warmup_steps=1,
                         mask_patch=4, embed_dim=16, device="cpu", crop_size=64)  # fmt: skip
    result = run_training(config)
    assert result.checkpoint.is_file()


def test_a_second_run_reuses_the_store_and_reports_the_skipped_season(
    tree: Path, labels_file: Path, imported: Path, client: Client
) -> None:
    report = run_import_ssl4eo(_config(tree, imported, labels=str(labels_file)), client=client)
    assert report.reused
    assert report.warning is not None and "s2c/0000004/" in report.warning


def test_s2a_and_a_subset_of_locations(tree: Path, client: Client, tmp_path: Path) -> None:
    config = _config(tree, tmp_path / "s2a.zarr", s2="s2a", with_s1=False, locations=["0000003", "0000001"])
    report = run_import_ssl4eo(config, client=client)
    store = zarr.open_group(config.out, mode="r")
    assert "B10" not in store.attrs["bands"] and store["s2"].shape == (4, 12, PATCH, PATCH)
    np.testing.assert_array_equal(store["location"][:], [1, 1, 3, 3])
    assert np.isnan(store["s1"][:]).all() and report.counts["without_s1"] == 4
    assert not store["labelled"][:].any()


def test_bad_input_is_refused_before_a_store_is_written(tree: Path, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "never.zarr"
    with pytest.raises(ValueError, match=r"0000099.*not folders"):
        run_import_ssl4eo(_config(tree, out, locations=["0000099"]), client=client)
    with pytest.raises(ValueError, match=r"has no s2c/ folder.*--s2"):
        run_import_ssl4eo(_config(tree / "s1", out), client=client)
    bad_labels = tmp_path / "bad.json"
    bad_labels.write_text(json.dumps({"0000000": [["forest"]]}))
    with pytest.raises(ValueError, match=r"location 0000000.*'forest' is not a Dynamic World class"):
        run_import_ssl4eo(_config(tree, out, labels=str(bad_labels)), client=client)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_import_ssl4eo(_config(tree, out, labels=str(tmp_path / "none.json")), client=client)
    assert not out.exists()


def test_labels_as_csv(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("location,season,labels\n42,20200320T160021_x,water;built\n43,,trees\n")
    labels = read_ssl4eo_labels(str(path))
    time = season_time("20200320T160021")
    assert labels.lookup("0000042", "20200320T160021_20200320T160021_T1", time) == ("water", "built")
    assert labels.lookup("0000043", "anything_20200101T000000", time) == ("trees",)
    assert labels.lookup("0000044", "x_20200101T000000", time) is None


CHILD = """
import os, signal, sys
from distributed import Client
from softcon import progress
from softcon.config import ImportSSL4EOConfig
from softcon.tasks.ssl4eo_import import run_import_ssl4eo

def on_progress(step, done, total):
    if step == "blocks" and done == 1:
        os.kill(os.getpid(), signal.SIGKILL)

with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client:
    with progress.listen(on_progress):
        run_import_ssl4eo(ImportSSL4EOConfig.model_validate_json(sys.argv[1]), client=client)
"""


def test_a_killed_import_resumes_and_ends_equal_to_one_run(
    tree: Path, labels_file: Path, imported: Path, client: Client, tmp_path: Path
) -> None:
    config = _config(tree, tmp_path / "killed.zarr", labels=str(labels_file))
    child = subprocess.run([sys.executable, "-c", CHILD, config.model_dump_json()], capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert check_store(config.out).problems  # incomplete, as check-store says
    report = run_import_ssl4eo(config, client=client)
    assert report.blocks_written == 2  # the block marked done before the kill is not written again
    assert check_store(config.out).problems == []
    done, once = zarr.open_group(config.out, mode="r"), zarr.open_group(str(imported), mode="r")
    for name in ("s2", "s1", "labels", "location", "time", "split"):
        np.testing.assert_array_equal(done[name][:], once[name][:])


@pytest.mark.slow
def test_cli_imports_with_progress_and_records_an_mlflow_run(tree: Path, labels_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    locations = tmp_path / "locations.txt"
    locations.write_text("\n".join(LOCATIONS[:2]) + "\n")
    result = CliRunner().invoke(app, [
        "import-ssl4eo", str(tree), "--labels", str(labels_file), "--out", str(out), "--patch-size", str(PATCH),
        "--locations", f"@{locations}", "--n-workers", "1", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["output"] == str(out) and outcome["metrics"]["samples"] == 4.0
    assert "import blocks" in result.stderr  # the progress bar
    from mlflow.tracking import MlflowClient

    from softcon.settings import get_settings

    run = MlflowClient(get_settings().tracking_uri).get_run(outcome["run_id"])
    assert run.data.tags["softcon.stage"] == "import-ssl4eo" and run.data.params["s2"] == "s2c"


def test_the_v1_1_zarr_release_imports_to_the_same_store(
    tree: Path, labels_file: Path, imported: Path, client: Client, tmp_path: Path
) -> None:
    """The same images in v1.1's Zarr files give the same samples, labels (keyed by file_id) and splits; S1 as
    float16 dB in the file; a location whose S1 times are NaT has none."""
    release = build_zarr_release(tmp_path / "SSL4EO-S12-v1.1", tree)
    config = _config(release, tmp_path / "v11.zarr", labels=str(labels_file))
    report = run_import_ssl4eo(config, client=client)
    assert report.counts["samples"] == 8 and report.counts["without_s1"] == 2
    assert report.warning is not None and "val/S1GRD/ssl4eos12_val_seasonal_data_000001.zarr.zip::1::" in report.warning
    v11, v10 = zarr.open_group(config.out, mode="r"), zarr.open_group(str(imported), mode="r")
    for name in ("s2", "labels", "labelled", "location", "time", "split"):
        np.testing.assert_array_equal(v11[name][:], v10[name][:], err_msg=name)
    np.testing.assert_allclose(v11["s1"][:], v10["s1"][:], rtol=1e-3, atol=1e-2)  # float16 in the file
    assert check_store(config.out).problems == []
    subset = run_import_ssl4eo(config.model_copy(update={"out": str(tmp_path / "sub.zarr"), "locations": ["0000002"]}),
                               client=client)  # fmt: skip
    assert subset.counts["samples"] == 2
    with pytest.raises(ValueError, match=r"0000042.*in no S2L1C file"):
        run_import_ssl4eo(config.model_copy(update={"out": str(tmp_path / "x.zarr"), "locations": ["0000042"]}),
                          client=client)  # fmt: skip


def test_band_file_names_follow_ssl4eo() -> None:
    assert [band_file(b) for b in ("B01", "B8A", "B10", "VV")] == ["B1.tif", "B8A.tif", "B10.tif", "VV.tif"]
