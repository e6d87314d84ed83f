"""The demo's configuration on each sample world, and the comparison it prints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from softcon.cli import evaluation_summary
from softcon.demo import demo_config
from softcon.settings import get_settings
from softcon.tasks.sample_data import SampleData, write_sample_data


@pytest.fixture(scope="module")
def painted(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("sample"), tiles=1, tile_size=32, dates=2)


def test_structured_world_pretrains_on_dynamic_world_labels_and_evaluates_on_its_bigearthnet_set(
    painted: SampleData, tmp_path: Path
) -> None:
    structured = replace(
        painted, world="structured", dynamic_world=tmp_path / "dw.tif", bigearthnet=tmp_path / "bigearthnet"
    )
    config = demo_config("http://127.0.0.1:1/", structured, get_settings())
    assert config.labels.source == str(tmp_path / "dw.tif") and config.labels.scheme == "dynamic-world"
    assert config.evaluate.bigearthnet == str(tmp_path / "bigearthnet")
    assert config.evaluate.baselines == ["random", "image-stats"]
    assert config.ingest.cube.endswith("demo-structured-cube.zarr")
    assert config.evaluate.store == config.preprocess.out  # the pipeline still evaluates its own store


def test_painted_world_keeps_the_worldcover_labels_and_its_own_cube(painted: SampleData) -> None:
    config = demo_config("http://127.0.0.1:1/", painted, get_settings())
    assert config.labels.source == "http://127.0.0.1:1/" and config.labels.scheme == "worldcover"
    assert config.evaluate.bigearthnet is None and config.evaluate.baselines == []
    assert config.ingest.cube.endswith("demo-painted-cube.zarr")


def test_evaluation_summary_lays_out_each_encoder_on_each_dataset() -> None:
    metrics = {
        "linear_map_micro": 0.9,
        "linear_map_macro": 0.8,
        "baselines/random/linear_map_micro": 0.5,
        "baselines/random/linear_map_macro": 0.4,
        "bigearthnet/linear_map_micro": 0.7,
        "bigearthnet/linear_map_macro": 0.6,
        "bigearthnet/baselines/image-stats/linear_map_micro": 0.74,
        "bigearthnet/baselines/image-stats/linear_map_macro": 0.73,
        "bigearthnet/knn_map_micro": 0.1,
    }
    table = evaluation_summary(metrics)
    assert [column.header for column in table.columns] == ["encoder", "store", "bigearthnet"]
    assert list(table.columns[0].cells) == ["model", "random", "image-stats"]
    assert list(table.columns[1].cells) == ["0.900 / 0.800", "0.500 / 0.400", "–"]
    assert list(table.columns[2].cells) == ["0.700 / 0.600", "–", "0.740 / 0.730"]
    assert evaluation_summary({"linear_map_micro": 0.9, "linear_map_macro": 0.8}).row_count == 0
