"""The typed configuration: precedence of YAML < environment < overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from softcon.config import (
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    PipelineConfig,
    PreprocessConfig,
    TrainConfig,
    load_config,
)

INGEST = {"stac": "http://127.0.0.1:1/", "bbox": [11.0, 46.4, 11.1, 46.5], "start": "2024-06-01", "end": "2024-06-30"}


def ingest_error(**changes: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(IngestConfig, section="ingest", overrides={**INGEST, **changes})
    return str(caught.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bbox": [11.1, 46.4, 11.0, 46.5]}, "west < east"),
        ({"bbox": [11.0, 46.5, 11.1, 46.4]}, "south < north"),
        ({"bbox": [-190.0, 46.4, 11.1, 46.5]}, "outside lon [-180, 180]"),
        ({"bbox": [11.0, 46.4, 11.1, 95.0]}, "lat [-90, 90]"),
        ({"end": "2024-05-01"}, "end 2024-05-01 is before start 2024-06-01"),
        ({"bands": ["B02", "B13"]}, "ingest.bands.1: Input should be 'B01', 'B02'"),
        (
            {"collections": ["landsat-c2-l2"]},
            "'sentinel-2-l2a', 'sentinel-2-c1-l2a', 'sentinel-2-l1c', 'sentinel-1-rtc' or 'sentinel-1-grd'",
        ),
        ({"tile_size": 0}, "ingest.tile_size: Input should be greater than 0"),
        ({"resolution": -10}, "ingest.resolution: Input should be greater than 0"),
        ({"max_cloud": 120}, "ingest.max_cloud: Input should be less than or equal to 100"),
        ({"tile_sise": 64}, "ingest.tile_sise: Extra inputs are not permitted"),
    ],
    ids=[
        "west>east",
        "south>north",
        "lon-range",
        "lat-range",
        "end<start",
        "unknown-band",
        "unknown-collection",
        "zero-tile",
        "negative-resolution",
        "cloud>100",
        "typo-field",
    ],
)
def test_invalid_ingest_values_name_the_field_and_allowed_values(changes: dict, expected: str) -> None:
    assert expected in ingest_error(**changes)


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.stac: Field required"):
        load_config(IngestConfig, section="ingest", overrides={k: v for k, v in INGEST.items() if k != "stac"})


def test_precedence_yaml_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "softcon.yaml"
    config_file.write_text("train:\n  steps: 11\n  lr: 0.5\n  batch_size: 8\n")
    monkeypatch.setenv("SOFTCON_TRAIN__LR", "0.25")
    monkeypatch.setenv("SOFTCON_TRAIN__BATCH_SIZE", "16")
    config = load_config(TrainConfig, section="train", config_file=config_file, overrides={"batch_size": 32})
    assert (config.steps, config.lr, config.batch_size) == (11, 0.25, 32)


def test_env_list_values_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTCON_INGEST__BANDS", '["B04", "B08"]')
    assert load_config(IngestConfig, section="ingest", overrides=INGEST).bands == ["B04", "B08"]


def test_pipeline_links_stages_to_one_cube_and_store(tmp_path: Path) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        "name: test\n"
        "ingest: {stac: x, bbox: [11.0, 46.4, 11.1, 46.5], start: 2024-06-01, end: 2024-06-30,"
        f" cube: {tmp_path}/c.zarr}}\n"
        "labels: {source: x, cube: /elsewhere.zarr}\n"
        f"preprocess: {{out: {tmp_path}/s.zarr, patch_size: 32}}\n"
    )
    config = load_config(PipelineConfig, config_file=config_file)
    assert config.labels.cube == config.preprocess.cube == f"{tmp_path}/c.zarr"
    assert config.train.store == config.evaluate.store == f"{tmp_path}/s.zarr"


def test_pipeline_env_override_reaches_a_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTCON_TRAIN__STEPS", "7")
    config = load_config(PipelineConfig, overrides={"ingest": INGEST, "labels": {"source": "x"}})
    assert config.train.steps == 7


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, section="train", config_file=config_file)


def test_missing_yaml_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, section="train", config_file=tmp_path / "nope.yaml")


def test_preprocess_split_must_leave_training_data() -> None:
    with pytest.raises(ConfigError, match="leaves no training split"):
        load_config(PreprocessConfig, section="preprocess", overrides={"val_fraction": 0.5, "test_fraction": 0.5})


def test_evaluate_needs_a_dataset() -> None:
    with pytest.raises(ConfigError, match="give a dataset to evaluate on"):
        load_config(EvaluateConfig, section="evaluate", overrides={"model": "abc"})


def test_configs_are_frozen() -> None:
    config = load_config(TrainConfig, section="train")
    with pytest.raises(ValueError, match="frozen"):
        config.steps = 3  # type: ignore[misc]


def test_stage_configs_have_json_schemas_for_the_prefect_ui() -> None:
    schema = PipelineConfig.model_json_schema()
    ingest = schema["$defs"]["IngestConfig"]["properties"]
    assert ingest["bbox"]["description"].startswith("Area as lon/lat")
    assert "B8A" in str(ingest["bands"])


def test_base_values_sit_below_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTCON_TRAIN__STEPS", "5")
    config = load_config(TrainConfig, section="train", base={"steps": 300, "batch_size": 8})
    assert (config.steps, config.batch_size) == (5, 8)


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "pipeline.example.yaml"
    config = load_config(PipelineConfig, config_file=example)
    assert config.labels.cube == config.ingest.cube
    assert config.evaluate.store == config.preprocess.out
