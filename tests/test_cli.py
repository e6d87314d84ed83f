"""The ``softcon`` command: help for newcomers, and bad input refused before any work starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import EvaluateConfig, IngestConfig, PreprocessConfig, TrainConfig

runner = CliRunner()
STAGES = [
    "ingest",
    "labels",
    "preprocess",
    "import-ssl4eo",
    "train",
    "evaluate",
    "finetune",
    "predict",
    "export",
    "embed",
    "pipeline",
    "demo",
    "sample-data",
]


def test_top_level_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in STAGES:
        assert command in result.output


def _help(command: str) -> str:
    """The rendered ``--help`` of a command, wide and without colour, as a user's terminal shows it."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("command", "model", "field", "option"),
    [
        ("ingest", IngestConfig, "resolution", "--resolution"),
        ("ingest", IngestConfig, "tile_size", "--tile-size"),
        ("ingest", IngestConfig, "max_cloud", "--max-cloud"),
        ("ingest", IngestConfig, "max_tile_nodata", "--max-tile-nodata"),
        ("preprocess", PreprocessConfig, "patch_size", "--patch-size"),
        ("preprocess", PreprocessConfig, "samples_per_block", "--samples-per-block"),
        ("train", TrainConfig, "steps", "--steps"),
        ("train", TrainConfig, "backbone", "--backbone"),
        ("evaluate", EvaluateConfig, "knn_k", "--knn-k"),
    ],
)
def test_help_shows_each_default_and_description_from_the_config(
    command: str, model: type[BaseModel], field: str, option: str
) -> None:
    """The defaults were once written into help strings by hand and swallowed as rich markup ("metres ."):
    now each option's help is its config field's description and its default the field's default."""
    text = _help(command)
    info = model.model_fields[field]
    after = text[text.index(option + " ") :]
    assert after.split(option, 1)[1].lstrip().split(" ", 1)[1].startswith(info.description.split()[0])
    assert f"[default: ({info.default})]" in after[: after.index("--", len(option))]


def test_help_of_a_list_default_joins_its_values() -> None:
    assert "[default: (sentinel-2-l2a,sentinel-1-rtc)]" in _help("ingest")


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
    assert "give the encoder: --model" in result.output and "--weights FILE" in result.output


def test_pipeline_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        "ingest: {stac: x, bbox: [1, 2, 3], start: 2024-01-02, end: 2024-01-01}\nlabels: {source: x}\n"
    )
    result = runner.invoke(app, ["pipeline", "--config", str(config_file)])
    assert result.exit_code == 2
    assert "ingest.bbox" in result.output


def test_labels_passes_sign_and_header_names_to_its_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import softcon.flows.labels as labels_flow_module
    from softcon.flows.result import StageResult

    seen = []

    def labels_flow(config: object, **_: object) -> StageResult:
        seen.append(config)
        return StageResult(stage="labels", run_id="run", output=str(tmp_path / "cube.zarr"))

    monkeypatch.setattr(labels_flow_module, "labels_flow", labels_flow)
    args = ["labels", "--cube", str(tmp_path / "cube.zarr"), "--source", "https://stac.example/api"]
    result = runner.invoke(app, [*args, "--sign", "none", "--header", "Authorization=STAC_TOKEN"])
    assert result.exit_code == 0, result.output
    assert seen[0].sign == "none" and seen[0].headers == {"Authorization": "STAC_TOKEN"}

    bad = runner.invoke(app, [*args, "--header", "Authorization"])
    assert bad.exit_code == 2 and "are not NAME=ENV_VAR" in bad.output


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"softcon {version('softcon-pipeline')}"


def _fake_labels(monkeypatch: pytest.MonkeyPatch, outcome: object) -> None:
    import softcon.flows.labels as labels_flow_module

    def labels_flow(config: object, **_: object) -> object:
        print("🏃 View run labels at: http://127.0.0.1:5000/#/experiments/1/runs/abc123")  # as MLflow does, on stdout
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(labels_flow_module, "labels_flow", labels_flow)


LABELS_ARGS = ["labels", "--cube", "cube.zarr", "--source", "lulc.gpkg", "--class-field", "LULC_ID"]


def test_json_prints_the_outcome_as_one_object_on_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripts read the run id, output, metrics and warning from stdout instead of scraping "MLflow run id:"."""
    from softcon.flows.result import StageResult

    outcome = StageResult(stage="labels", run_id="abc123", output="cube.zarr", metrics={"tiles": 2.0}, warning="hm")
    _fake_labels(monkeypatch, outcome)
    result = CliRunner().invoke(app, [*LABELS_ARGS, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == outcome.model_dump(mode="json")
    assert "View run labels" in result.stderr  # what the run printed moved to stderr: stdout is the JSON alone
    plain = CliRunner().invoke(app, LABELS_ARGS)
    assert "MLflow run id: abc123" in plain.stdout and "warning: hm" in plain.stderr


def test_a_known_error_prints_one_line_and_exit_1_and_verbose_adds_the_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_labels(monkeypatch, ValueError("4096 pixels of lulc.gpkg carry codes outside scheme worldcover"))
    monkeypatch.delenv("SOFTCON_DEBUG", raising=False)
    result = CliRunner().invoke(app, LABELS_ARGS)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: 4096 pixels of lulc.gpkg carry codes outside scheme worldcover"
    verbose = CliRunner().invoke(app, ["--verbose", *LABELS_ARGS])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "ValueError" in verbose.stderr
    os.environ.pop("SOFTCON_DEBUG")  # --verbose set it for this process; monkeypatch would restore it at teardown


def test_an_unexpected_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_labels(monkeypatch, KeyError("a bug"))
    result = CliRunner().invoke(app, LABELS_ARGS)
    assert result.exit_code != 0 and isinstance(result.exception, KeyError)


def test_no_help_text_writes_a_default_by_hand() -> None:
    """A "[default: …]" inside a help string is rich markup and vanishes; defaults go through show_default."""
    import typer

    group = typer.main.get_command(app)
    written = [
        f"{name} {param.name}"
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for param in command.params
        if "[default" in (getattr(param, "help", None) or "")
    ]
    assert written == []


@pytest.mark.parametrize(("flag", "active"), [([], False), (["--daily"], True)])
def test_serve_says_what_it_starts_and_leaves_the_daily_schedule_paused_unless_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: list[str], active: bool
) -> None:
    """`softcon serve` printed nothing for a minute and turned on a schedule that reaches Earth Search at 06:00."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from softcon import serve as servers

    class Stopped:
        def poll(self) -> int:
            return 0  # the services "stop" at once, so the command returns

    @contextmanager
    def serve(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        yield SimpleNamespace(
            prefect_api_url="http://127.0.0.1:4200/api", prefect_ui_url="http://127.0.0.1:4200",
            mlflow_url="http://127.0.0.1:5000", work_pool="softcon-process", env={}, processes={"worker": Stopped()},
        )  # fmt: skip

    schedules: list[tuple[str, bool]] = []
    monkeypatch.setattr(servers, "serve", serve)
    monkeypatch.setattr(servers, "deploy", lambda *args, **kwargs: "")
    monkeypatch.setattr(servers, "set_schedule_active", lambda url, name, active: schedules.append((name, active)))
    result = CliRunner().invoke(app, ["serve", *flag], env={"COLUMNS": "200"})
    out = " ".join(result.stdout.split())
    assert out.startswith("starting the Prefect server (port 4200), the MLflow server (port 5000) and a process worker")
    assert schedules == [(servers.DAILY_DEPLOYMENT, active)]
    assert ("daily ingest schedule: on" in out) is active and ("paused (turn it on with --daily" in out) is not active
    assert "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning" in out
    assert result.exit_code == 1 and "worker stopped" in result.stderr
