"""Predict stage: class maps of whole cube tiles as Cloud-Optimized GeoTIFFs on the tile's grid, equal to the model's
argmax on a window read straight from the cube, nodata where the cube is nodata or cloudy, seamless blending of
overlapping windows, the refusal of a multi-label model, and the flow through the CLI with its MLflow record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from affine import Affine
from cube_factory import CLASS_CODES, CLASS_NAMES, SyntheticCube, write_cube, write_masked_store
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import FinetuneConfig, PredictConfig
from softcon.tasks.finetune import FINETUNED_FORMAT, load_finetuned, run_finetune
from softcon.tasks.predict import NODATA, PredictReport, predict_logits, run_predict, window_starts

torch.set_num_threads(2)
PATCH = 16


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCube:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


@pytest.fixture(scope="module")
def finetuned(cube: SyntheticCube, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmentation model of one epoch on a 16 px store of the cube (its window: 16 px)."""
    store = str(tmp_path_factory.mktemp("store") / "store.zarr")
    write_masked_store(cube, store, patch_size=PATCH)
    finetune = FinetuneConfig(model="random", backbone="test_resnet", store=store, epochs=1, batch_size=8,
                              device="cpu", out=str(tmp_path_factory.mktemp("finetuned")))  # fmt: skip
    return run_finetune(finetune, None).checkpoint


@pytest.fixture(scope="module")
def predicted(cube: SyntheticCube, finetuned: Path, tmp_path_factory: pytest.TempPathFactory) -> PredictReport:
    """Every tile and date, windows side by side (overlap 0): each pixel is one window's prediction."""
    out = tmp_path_factory.mktemp("maps")
    config = PredictConfig(model=str(finetuned), cube=cube.path, time="all", overlap=0, device="cpu", out=str(out))
    return run_predict(config, finetuned)


def _map(report: PredictReport, tile_id: str, time: np.datetime64) -> Path:
    (path,) = [path for path in report.files if path.name == f"{tile_id}_{str(time)[:10]}.tif"]
    return path


def test_one_cog_per_tile_and_date_on_the_tiles_grid(cube: SyntheticCube, predicted: PredictReport) -> None:
    assert len(predicted.files) == len(cube.tile_ids) * len(cube.times)
    for tile_id in cube.tile_ids:
        tile = xr.open_zarr(cube.path, group=f"tiles/{tile_id}", consolidated=False)
        x, y = tile["x"].values, tile["y"].values
        expected = Affine(x[1] - x[0], 0, x[0] - (x[1] - x[0]) / 2, 0, y[1] - y[0], y[0] - (y[1] - y[0]) / 2)
        with rasterio.open(_map(predicted, tile_id, cube.times[0])) as dataset:
            assert dataset.crs == rasterio.crs.CRS.from_wkt(tile["spatial_ref"].attrs["crs_wkt"])
            assert dataset.transform.almost_equals(expected)
            assert (dataset.width, dataset.height, dataset.count, dataset.dtypes[0]) == (cube.size, cube.size, 1,
                                                                                          "uint8")  # fmt: skip


def test_the_file_is_a_cloud_optimized_geotiff_with_the_class_scheme(predicted: PredictReport) -> None:
    with rasterio.open(predicted.files[0]) as dataset:
        assert dataset.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # GDAL's COG driver wrote the layout
        assert dataset.profile["tiled"] and dataset.block_shapes == [(256, 256)]
        assert dataset.overviews(1) == [2]  # 64 px: one level, down to 32 px
        assert dataset.nodata == NODATA
        tags = dataset.tags()
        assert json.loads(tags["CLASS_NAMES"]) == list(CLASS_NAMES)
        assert json.loads(tags["CLASS_CODES"]) == list(CLASS_CODES)
        assert tags["CLASS_3"] == "water (code 80)"
        colours = dataset.colormap(1)
        assert colours[0] == (0, 100, 0, 255) and colours[3] == (0, 100, 200, 255)  # WorldCover tree cover, water
        assert colours[NODATA][3] == 0
        assert dataset.read(1, out_shape=(32, 32)).max() <= NODATA  # the overview reads


def test_prediction_is_the_models_argmax_on_a_window_read_from_the_cube(
    cube: SyntheticCube, finetuned: Path, predicted: PredictReport
) -> None:
    model, meta = load_finetuned(finetuned)
    tile_id, time = cube.tile_ids[1], cube.times[2]
    tile = xr.open_zarr(cube.path, group=f"tiles/{tile_id}", consolidated=False)
    top, left = 16, 32
    raw = tile["s2"].sel(time=time).values[:, top : top + PATCH, left : left + PATCH].astype(np.float32)
    mean = np.asarray(meta["norm_stats"]["mean"], np.float32)[:, None, None]
    std = np.asarray(meta["norm_stats"]["std"], np.float32)[:, None, None]
    image = np.where(raw == 0, 0.0, (raw - mean) / std).astype(np.float32)  # the store's normalisation
    with torch.no_grad():
        expected = model(torch.from_numpy(image)[None]).argmax(1)[0].numpy()
    with rasterio.open(_map(predicted, tile_id, time)) as dataset:
        got = dataset.read(1)[top : top + PATCH, left : left + PATCH]
    np.testing.assert_array_equal(got, expected)


def test_nodata_where_the_cube_is_nodata_or_cloudy(cube: SyntheticCube, predicted: PredictReport) -> None:
    nodata_tile, nodata_step = cube.nodata
    with rasterio.open(_map(predicted, nodata_tile, cube.times[nodata_step])) as dataset:
        classes = dataset.read(1)
    assert (classes[:16, :16] == NODATA).all()  # the S2 nodata corner
    assert (classes[16:] != NODATA).all() and (classes[:, 16:] != NODATA).all()
    cloudy_tile, cloudy_step = cube.cloudy
    with rasterio.open(_map(predicted, cloudy_tile, cube.times[cloudy_step])) as dataset:
        assert (dataset.read(1) == NODATA).all()  # SCL cloud everywhere
    metrics = predicted.metrics()
    assert sum(metrics[f"fraction/{name}"] for name in CLASS_NAMES) == pytest.approx(1.0)
    assert metrics["nodata_fraction"] == pytest.approx((64 * 64 + 16 * 16) / (6 * 64 * 64))


def test_overlapping_windows_blend_without_seams() -> None:
    """A model that sees each pixel alone (a 1 x 1 convolution) gives the same logits in every window that covers a
    pixel: the blend of overlapping windows must equal the model run on the whole image at once."""
    assert window_starts(64, 16, 0) == [0, 16, 32, 48]
    assert window_starts(40, 16, 4) == [0, 12, 24]  # the last window flush with the edge
    assert window_starts(16, 16, 8) == [0]
    with pytest.raises(ValueError, match="smaller than the model's 16 px window"):
        window_starts(12, 16, 4)
    model = torch.nn.Conv2d(3, 5, 1)
    image = torch.randn(3, 40, 44, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(image[None])[0]
    blended = predict_logits(model, image, window=16, overlap=6, batch_size=4)
    torch.testing.assert_close(blended, whole, rtol=1e-5, atol=1e-5)


def test_a_multilabel_model_is_refused(cube: SyntheticCube, tmp_path: Path) -> None:
    path = tmp_path / "finetuned.pt"
    torch.save({"format": FINETUNED_FORMAT, "task": "multilabel"}, path)
    config = PredictConfig(model=str(path), cube=cube.path, out=str(tmp_path / "maps"))
    with pytest.raises(ValueError, match=r"is a multilabel model: .* predict needs a segmentation model"):
        run_predict(config, path)


def test_a_day_without_data_and_an_unknown_tile_are_errors(
    cube: SyntheticCube, finetuned: Path, tmp_path: Path
) -> None:
    config = PredictConfig(model=str(finetuned), cube=cube.path, time="2020-01-01", out=str(tmp_path))
    with pytest.raises(ValueError, match="matches time '2020-01-01'"):
        run_predict(config, finetuned)
    with pytest.raises(ValueError, match="has no tiles \\['nowhere'\\]"):
        run_predict(config.model_copy(update={"tiles": ["nowhere"]}), finetuned)


def test_cli_predicts_a_finetune_runs_model_and_records_the_maps(
    cube: SyntheticCube, finetuned: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from softcon.flows.tracking import use_experiment

    with mlflow.start_run(experiment_id=use_experiment("predict-test"), tags={"softcon.stage": "finetune"}) as run:
        mlflow.log_artifact(str(finetuned), artifact_path="finetuned")
    out = tmp_path / "maps"
    day = str(cube.times[0])[:10]
    args = ["predict", run.info.run_id, "--cube", cube.path, "--tiles", cube.tile_ids[1], "--time", day, "--out",
            str(out), "--device", "cpu", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["output"] == str(out) and outcome["metrics"]["files"] == 1
    assert sorted(path.name for path in out.iterdir()) == [f"{cube.tile_ids[1]}_{day}.tif"]
    client = MlflowClient()
    recorded = client.get_run(outcome["run_id"])
    assert recorded.data.tags["softcon.stage"] == "predict" and "fraction/water" in recorded.data.metrics
    listed = mlflow.artifacts.load_dict(f"runs:/{outcome['run_id']}/predict.json")
    assert listed["files"] == [str(out / f"{cube.tile_ids[1]}_{day}.tif")]
    assert listed["class_names"] == list(CLASS_NAMES)

    bad = CliRunner().invoke(app, ["predict", "x.pt", "--time", "yesterday", "--out", str(out)])
    assert bad.exit_code == 2 and "predict.time" in bad.stderr
