"""The ``softcon`` command: help for newcomers, and bad input refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from softcon.cli import app

runner = CliRunner()
STAGES = ["ingest", "labels", "preprocess", "train", "evaluate", "pipeline", "demo", "sample-data"]


def test_top_level_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in STAGES:
        assert command in result.output


@pytest.mark.parametrize("command", STAGES)
def test_each_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--bbox", "11.1,46.4,11.0,46.5"], "west < east"),
        (["--bbox", "11.0,46.4,11.1"], "expected W,S,E,N"),
        (["--end", "2024-01-01"], "is before start"),
        (["--bands", "B02,B13"], "ingest.bands.1"),
        (["--collection", "landsat"], "'sentinel-2-l2a'"),
        (["--tile-size", "0"], "greater than 0"),
    ],
    ids=["bbox-order", "bbox-short", "dates", "band", "collection", "tile-size"],
)
def test_ingest_refuses_bad_values_before_work(args: list[str], expected: str, tmp_path: Path) -> None:
    base = {
        "--stac": "http://127.0.0.1:9/",
        "--bbox": "11.0,46.4,11.1,46.5",
        "--start": "2024-06-01",
        "--end": "2024-06-30",
        "--cube": str(tmp_path / "cube.zarr"),
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = runner.invoke(app, ["ingest", *[part for pair in base.items() for part in pair]])
    assert result.exit_code == 2
    assert expected in result.output
    assert not (tmp_path / "cube.zarr").exists()


def test_evaluate_requires_a_model() -> None:
    result = runner.invoke(app, ["evaluate", "--store", "/nowhere.zarr"])
    assert result.exit_code == 2
    assert "--model is required" in result.output


def test_pipeline_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        "ingest: {stac: x, bbox: [1, 2, 3], start: 2024-01-02, end: 2024-01-01}\nlabels: {source: x}\n"
    )
    result = runner.invoke(app, ["pipeline", "--config", str(config_file)])
    assert result.exit_code == 2
    assert "ingest.bbox" in result.output


def test_labels_passes_sign_and_header_names_to_its_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import softcon.cli
    import softcon.flows.labels as labels_flow_module

    seen = []
    monkeypatch.setattr(labels_flow_module, "labels_flow", lambda config, **_: seen.append(config))
    monkeypatch.setattr(softcon.cli, "_print_result", lambda result: None)
    args = ["labels", "--cube", str(tmp_path / "cube.zarr"), "--source", "https://stac.example/api"]
    result = runner.invoke(app, [*args, "--sign", "none", "--header", "Authorization=STAC_TOKEN"])
    assert result.exit_code == 0, result.output
    assert seen[0].sign == "none" and seen[0].headers == {"Authorization": "STAC_TOKEN"}

    bad = runner.invoke(app, [*args, "--header", "Authorization"])
    assert bad.exit_code == 2 and "are not NAME=ENV_VAR" in bad.output
