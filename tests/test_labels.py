from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pytest
import xarray as xr
from real_data import REAL

from softcon.config import LabelsConfig
from softcon.tasks.cube_store import read_cube_tiles
from softcon.tasks.ingest import IngestReport
from softcon.tasks.label_figures import cube_quicklook
from softcon.tasks.labels import run_labels
from softcon.tasks.sample_data import SampleData, read_truth_classes

REAL_WORLDCOVER = (
    REAL / "worldcover"
    / "ESA_WorldCover_10m_2021_v200_N00E006" / "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif"
)  # fmt: skip


@pytest.fixture
def labels_cube(data_cube: tuple[Path, IngestReport], tmp_path: Path) -> Path:
    cube = tmp_path / "cube.zarr"
    shutil.copytree(data_cube[0], cube)
    return cube


def test_labels_from_stac_match_the_source_map(labels_cube: Path, data_sample: SampleData, data_stac_url: str) -> None:
    report = run_labels(LabelsConfig(cube=str(labels_cube), source=data_stac_url))
    assert report.tiles == data_sample.tile_ids and not report.unknown_codes
    for tile in read_cube_tiles(str(labels_cube)):
        ds = xr.open_zarr(labels_cube, group=f"tiles/{tile.tile_id}", consolidated=False)
        land_cover = ds.landcover.values
        assert ds.landcover.dims == ("y", "x") and land_cover.dtype == np.uint8
        assert ds.landcover.attrs["class_scheme"] == "worldcover" and ds.landcover.attrs["year"] == "2021"
        truth = read_truth_classes(data_sample, tile)
        for code in np.unique(truth):
            assert abs((land_cover == code).mean() - (truth == code).mean()) < 0.02, code
        assert (land_cover == truth).mean() > 0.97


def test_local_raster_gives_the_same_labels_and_rerun_same_bytes(
    labels_cube: Path,
    data_sample: SampleData,
    data_stac_url: str,
) -> None:
    run_labels(LabelsConfig(cube=str(labels_cube), source=str(data_sample.worldcover)))
    chunk_files = sorted(labels_cube.glob("tiles/*/landcover/c/**/*"))
    first = [p.read_bytes() for p in chunk_files if p.is_file()]
    report = run_labels(LabelsConfig(cube=str(labels_cube), source=str(data_sample.worldcover)))
    assert [p.read_bytes() for p in chunk_files if p.is_file()] == first
    assert sum(report.class_pixels.values()) == len(report.tiles) * 64 * 64
    assert report.metrics()["tiles"] == len(report.tiles)


def test_product_not_overlapping_a_tile_is_an_error(labels_cube: Path) -> None:
    with pytest.raises(ValueError, match="does not overlap tile 32632_"):
        run_labels(LabelsConfig(cube=str(labels_cube), source=str(REAL_WORLDCOVER)))


@pytest.mark.slow
def test_flow_logs_histogram_table_bar_chart_and_quicklook(labels_cube: Path, data_stac_url: str) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from softcon.flows.labels import labels_flow

    # The temporary Prefect API can take a while to start on a busy machine.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        result = labels_flow(LabelsConfig(cube=str(labels_cube), source=data_stac_url), experiment="labels-test")
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"class_histogram.png", "quicklook.png", "class_histogram_table.json", "class_histogram.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(result.run_id, "class_histogram_table.json")).read_text())
    assert table["columns"] == ["code", "class", "pixels", "fraction"] and len(table["data"]) == 11
    assert sum(row[3] for row in table["data"]) == pytest.approx(1.0)
    quicklook = plt.imread(client.download_artifacts(result.run_id, "quicklook.png"))
    assert quicklook.shape[1] > quicklook.shape[0] > 200  # two panels side by side
    assert result.metrics["labelled_fraction"] == pytest.approx(1.0)


def test_quicklook_shows_rgb_beside_the_label_map(labels_cube: Path, data_stac_url: str) -> None:
    report = run_labels(LabelsConfig(cube=str(labels_cube), source=data_stac_url))
    figure = cube_quicklook(str(labels_cube), report.tiles)
    left, right = figure.axes[:2]
    assert left.get_title().startswith("Sentinel-2 RGB") and right.get_title().startswith("land cover")
    rgb = left.get_images()[0].get_array()
    assert rgb.shape == (64, 64, 3) and 0 <= rgb.min() < rgb.max() <= 1
    assert right.get_legend() is not None and len(right.get_legend().get_texts()) >= 2
    plt.close(figure)
