"""The ``softcon`` command: one subcommand per stage, plus ``pipeline``, ``demo`` and ``sample-data``.

Every option can also come from a YAML file (``--config``, one section per stage) or from
``SOFTCON_<STAGE>__<FIELD>`` environment variables; options given here win. Each stage prints the MLflow
run id it logged to.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from softcon import progress
from softcon.config import (
    ConfigError,
    EmbedConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneBudgetsConfig,
    FinetuneConfig,
    ImportSSL4EOConfig,
    IngestConfig,
    LabelsConfig,
    PipelineConfig,
    PredictConfig,
    PreprocessConfig,
    TrainConfig,
    load_config,
)
from softcon.settings import configure_runtime, get_settings

app = typer.Typer(
    help="Sentinel-1/2 + land cover → SoftCon pretraining, each stage a Prefect flow and an MLflow run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Piped output (CI logs, `| tee`) gets a readable width instead of rich's 80-column fallback.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file with one section per stage.", show_default=False),
]
RefreshOption = Annotated[bool, typer.Option("--refresh", help="Ignore cached task results; do the work again.")]
WorldOption = Annotated[
    Literal["structured", "painted"],
    typer.Option(
        help="Sample world: structured (classes share spectra and differ by spatial layout; Dynamic-World-like "
        "pretraining labels and a BigEarthNet-format evaluation set, docs/sample_world.md) or painted (each "
        "pixel painted with its class's spectrum; WorldCover labels)."
    ),
]


def _shown_default(value: Any) -> str | bool:
    """A config default as ``--help`` shows it; False (nothing shown) for a default the description explains."""
    if value is None or value == {} or value == []:
        return False
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_option(model: type[BaseModel], name: str, *param_decls: str, form: str | None = None, **kwargs: Any) -> Any:
    """The option of one config field: help from the field's description, the shown default from its default.

    The option's own value defaults to None, so that a ``--config`` file or a ``SOFTCON_<STAGE>__<FIELD>``
    variable applies when the option is not given; ``--help`` still shows the field's default, read from the
    config model, so the two cannot drift. ``form`` says how the command line spells a value of that field.
    """
    field = model.model_fields[name]
    text = escape(field.description or name.replace("_", " "))
    if form:
        text = f"{text} ({escape(form)})"
    shown = False if field.is_required() else _shown_default(field.get_default(call_default_factory=True))
    return typer.Option(*param_decls, help=text, show_default=shown, **kwargs)


HEADER_FORM = "NAME=ENV_VAR: send header NAME with the value of $ENV_VAR; repeatable"


def _parse_headers(header: list[str] | None) -> dict[str, str] | None:
    """``--header NAME=ENV_VAR`` options as the config's ``headers`` mapping (names only, never values)."""
    if not header:
        return None
    bad = [h for h in header if "=" not in h]
    if bad:
        raise typer.BadParameter(f"{bad} are not NAME=ENV_VAR", param_hint="--header")
    return dict(h.split("=", 1) for h in header)


def _split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _parse_bbox(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not four numbers W,S,E,N", param_hint="--bbox") from None
    if len(values) != 4:
        raise typer.BadParameter(f"{text!r} has {len(values)} numbers, expected W,S,E,N", param_hint="--bbox")
    return values


def _build(model: type, section: str | None, config_file: Path | None, overrides: dict[str, Any]) -> Any:
    try:
        return load_config(model, section=section, config_file=config_file, overrides=overrides)
    except ConfigError as error:
        err_console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


DEBUG_ENV = "SOFTCON_DEBUG"
"""Set (to anything but empty or 0) by ``--verbose``: errors the project raises on purpose show their traceback."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _WithoutKnownErrors(logging.Filter):
    """Keeps the console free of the tracebacks Prefect logs for errors the CLI prints as one ``error:`` line.

    Only the console handler drops them: the flow-run log in the Prefect UI and API keeps every record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from softcon.flows.caching import LASTING_ERRORS

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, LASTING_ERRORS)


def _quiet_known_errors() -> None:
    """Attach ``_WithoutKnownErrors`` to the console handlers (once), unless ``--verbose``."""
    if _debug():
        return
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # Prefect's console handler is the root's
        for handler in logging.getLogger(name).handlers:
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if is_console and not any(isinstance(f, _WithoutKnownErrors) for f in handler.filters):
                handler.addFilter(_WithoutKnownErrors())


def run_stage_flow(stage_flow: Any, config: Any, *, as_json: bool = False, **options: Any) -> Any:
    """Run a stage flow, turning the errors users can fix into a message instead of a traceback.

    Exit codes: 1 for an error the project raises on purpose (bad input, a missing file, a full disk), printed as
    one ``error:`` line (``--verbose`` or ``SOFTCON_DEBUG=1`` adds the traceback); anything else is a bug and
    propagates with its traceback. With ``as_json`` whatever the run writes to stdout (MLflow prints "View run …
    at" there for a tracking server) goes to stderr, so stdout holds only the JSON outcome.
    """
    from softcon.flows.caching import LASTING_ERRORS

    _quiet_known_errors()
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            result = stage_flow(config, **options)
    except Exception as error:
        full_disk = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if not isinstance(error, LASTING_ERRORS) and not full_disk:  # a full disk's message says what to do
            raise
        if _debug():
            err_console.print_exception()
        err_console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    return result


@contextmanager
def progress_bars(stage: str) -> Iterator[None]:
    """One bar per step the stage reports (``softcon.progress``), and its links, on stderr while the block runs."""
    with Progress(
        TextColumn(f"{stage} {{task.description:>6}}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=False,
    ) as bars:  # fmt: skip
        bar_ids: dict[str, TaskID] = {}

        def on_progress(step: str, done: int, total: int) -> None:
            if step not in bar_ids:
                bar_ids[step] = bars.add_task(step, total=total)
            bars.update(bar_ids[step], completed=done, total=total)

        def on_link(name: str, url: str) -> None:
            bars.console.print(f"{name}: [link={url}]{url}[/link]")

        with progress.listen(on_progress, on_link):
            yield


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"softcon {version('softcon-pipeline')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help=f"Show the traceback of every error (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Sentinel-1/2 + land cover → SoftCon pretraining, each stage a Prefect flow and an MLflow run."""
    if verbose:
        os.environ[DEBUG_ENV] = "1"


JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print the outcome (MLflow run id, output, metrics, warning) as one JSON object."),
]


def _print_result(result: Any, *, as_json: bool = False) -> None:
    """The stage's outcome on stdout: readable lines, or one JSON object for scripts (logs stay on stderr)."""
    if as_json:
        print(result.model_dump_json())
        return
    console.print(f"MLflow run id: [bold]{result.run_id}[/bold]   output: {result.output}")
    for name, value in sorted(result.metrics.items()):
        console.print(f"  {name} = {value:g}")
    if getattr(result, "warning", None):
        err_console.print(f"[yellow]warning:[/yellow] {escape(result.warning)}")


@app.command()
def ingest(
    stac: Annotated[str | None, field_option(IngestConfig, "stac")] = None,
    collection: Annotated[
        list[str] | None, field_option(IngestConfig, "collections", "--collection", form="repeat for several")
    ] = None,
    bbox: Annotated[str | None, field_option(IngestConfig, "bbox", form="W,S,E,N, e.g. 11.0,46.4,11.1,46.5")] = None,
    area: Annotated[str | None, field_option(IngestConfig, "area")] = None,
    start: Annotated[str | None, field_option(IngestConfig, "start", form="YYYY-MM-DD")] = None,
    end: Annotated[str | None, field_option(IngestConfig, "end", form="YYYY-MM-DD")] = None,
    bands: Annotated[str | None, field_option(IngestConfig, "bands", form="comma-separated")] = None,
    resolution: Annotated[float | None, field_option(IngestConfig, "resolution")] = None,
    tile_size: Annotated[int | None, field_option(IngestConfig, "tile_size")] = None,
    epsg: Annotated[int | None, field_option(IngestConfig, "epsg")] = None,
    max_cloud: Annotated[float | None, field_option(IngestConfig, "max_cloud")] = None,
    max_tile_cloud: Annotated[float | None, field_option(IngestConfig, "max_tile_cloud")] = None,
    max_tile_nodata: Annotated[float | None, field_option(IngestConfig, "max_tile_nodata")] = None,
    sign: Annotated[str | None, field_option(IngestConfig, "sign")] = None,
    header: Annotated[list[str] | None, field_option(IngestConfig, "headers", "--header", form=HEADER_FORM)] = None,
    cube: Annotated[str | None, field_option(IngestConfig, "cube")] = None,
    dask_address: Annotated[str | None, field_option(IngestConfig, "dask_address")] = None,
    n_workers: Annotated[int | None, field_option(IngestConfig, "n_workers")] = None,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Search a STAC source and load Sentinel-2 L2A / Sentinel-1 onto a UTM tile grid in a Zarr cube."""
    overrides = {
        "stac": stac,
        "collections": collection,
        "bbox": _parse_bbox(bbox),
        "area": area,
        "start": start,
        "end": end,
        "bands": _split_list(bands),
        "resolution": resolution,
        "tile_size": tile_size,
        "epsg": epsg,
        "max_cloud": max_cloud,
        "max_tile_cloud": max_tile_cloud,
        "max_tile_nodata": max_tile_nodata,
        "sign": sign,
        "headers": _parse_headers(header),
        "cube": cube,
        "dask_address": dask_address,
        "n_workers": n_workers,
    }
    stage_config = _build(IngestConfig, "ingest", config, overrides)
    configure_runtime()
    from softcon.flows.ingest import ingest_flow

    with progress_bars("ingest"):
        result = run_stage_flow(ingest_flow, stage_config, refresh=refresh, as_json=as_json)
    _print_result(result, as_json=as_json)


@app.command()
def labels(
    cube: Annotated[str | None, field_option(LabelsConfig, "cube")] = None,
    source: Annotated[str | None, field_option(LabelsConfig, "source")] = None,
    scheme: Annotated[str | None, field_option(LabelsConfig, "scheme")] = None,
    class_field: Annotated[str | None, field_option(LabelsConfig, "class_field")] = None,
    name_field: Annotated[str | None, field_option(LabelsConfig, "name_field")] = None,
    collection: Annotated[str | None, field_option(LabelsConfig, "collection")] = None,
    year: Annotated[int | None, field_option(LabelsConfig, "year")] = None,
    all_touched: Annotated[
        bool | None, field_option(LabelsConfig, "all_touched", "--all-touched/--pixel-centre")
    ] = None,
    overlap: Annotated[str | None, field_option(LabelsConfig, "overlap", form="last or smallest")] = None,
    unknown_codes: Annotated[
        str | None, field_option(LabelsConfig, "unknown_codes", form="auto, report or error")
    ] = None,
    sign: Annotated[str | None, field_option(LabelsConfig, "sign")] = None,
    header: Annotated[list[str] | None, field_option(LabelsConfig, "headers", "--header", form=HEADER_FORM)] = None,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Bring a land-cover product onto every tile of the cube (the ``landcover`` array)."""
    overrides = {
        "sign": sign,
        "headers": _parse_headers(header),
        "cube": cube,
        "source": source,
        "scheme": scheme,
        "class_field": class_field,
        "name_field": name_field,
        "collection": collection,
        "year": year,
        "all_touched": all_touched,
        "overlap": overlap,
        "unknown_codes": unknown_codes,
    }
    stage_config = _build(LabelsConfig, "labels", config, overrides)
    configure_runtime()
    from softcon.flows.labels import labels_flow

    _print_result(run_stage_flow(labels_flow, stage_config, refresh=refresh, as_json=as_json), as_json=as_json)


@app.command()
def preprocess(
    cube: Annotated[str | None, field_option(PreprocessConfig, "cube")] = None,
    out: Annotated[str | None, field_option(PreprocessConfig, "out")] = None,
    patch_size: Annotated[int | None, field_option(PreprocessConfig, "patch_size")] = None,
    stride: Annotated[int | None, field_option(PreprocessConfig, "stride")] = None,
    split_block: Annotated[int | None, field_option(PreprocessConfig, "split_block")] = None,
    dask_address: Annotated[str | None, field_option(PreprocessConfig, "dask_address")] = None,
    samples_per_block: Annotated[int | None, field_option(PreprocessConfig, "samples_per_block")] = None,
    s1_max_gap_days: Annotated[float | None, field_option(PreprocessConfig, "s1_max_gap_days")] = None,
    masks: Annotated[bool | None, field_option(PreprocessConfig, "masks", "--masks/--no-masks")] = None,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Cut tiles into patches with Dask: quality checks, targets, split, statistics → training store."""
    overrides = {
        "cube": cube,
        "out": out,
        "patch_size": patch_size,
        "stride": stride,
        "split_block": split_block,
        "dask_address": dask_address,
        "samples_per_block": samples_per_block,
        "s1_max_gap_days": s1_max_gap_days,
        "masks": masks,
    }
    stage_config = _build(PreprocessConfig, "preprocess", config, overrides)
    configure_runtime()
    from softcon.flows.preprocess import preprocess_flow

    with progress_bars("preprocess"):
        result = run_stage_flow(preprocess_flow, stage_config, refresh=refresh, as_json=as_json)
    _print_result(result, as_json=as_json)


def _read_locations(text: str | None) -> list[str] | None:
    """``--locations``: location folders as a comma list, or ``@FILE`` with one per line."""
    if text and text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file (one location folder per line)", param_hint="--locations")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return _split_list(text)


@app.command(name="import-ssl4eo")
def import_ssl4eo(
    root: Annotated[str, typer.Argument(help=ImportSSL4EOConfig.model_fields["root"].description)],
    labels: Annotated[str | None, field_option(ImportSSL4EOConfig, "labels")] = None,
    out: Annotated[str | None, field_option(ImportSSL4EOConfig, "out")] = None,
    s2: Annotated[str | None, field_option(ImportSSL4EOConfig, "s2")] = None,
    with_s1: Annotated[bool | None, field_option(ImportSSL4EOConfig, "with_s1", "--s1/--no-s1")] = None,
    locations: Annotated[
        str | None,
        typer.Option(help="Only these location folders: a comma list (0000042,0000043) or @FILE, one per line."),
    ] = None,
    patch_size: Annotated[int | None, field_option(ImportSSL4EOConfig, "patch_size")] = None,
    dask_address: Annotated[str | None, field_option(ImportSSL4EOConfig, "dask_address")] = None,
    n_workers: Annotated[int | None, field_option(ImportSSL4EOConfig, "n_workers")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """SSL4EO-S12 (s2c/s2a/s1 folders) + SSL4EO-S12-ML labels → training store, with Dask; resumable."""
    overrides = {
        "root": root,
        "labels": labels,
        "out": out,
        "s2": s2,
        "with_s1": with_s1,
        "locations": _read_locations(locations),
        "patch_size": patch_size,
        "dask_address": dask_address,
        "n_workers": n_workers,
    }
    stage_config = _build(ImportSSL4EOConfig, "import_ssl4eo", config, overrides)
    configure_runtime()
    from softcon.flows.import_ssl4eo import import_ssl4eo_flow

    with progress_bars("import"):
        result = run_stage_flow(import_ssl4eo_flow, stage_config, as_json=as_json)
    _print_result(result, as_json=as_json)


@app.command()
def train(
    store: Annotated[str | None, field_option(TrainConfig, "store")] = None,
    backbone: Annotated[str | None, field_option(TrainConfig, "backbone")] = None,
    weights: Annotated[str | None, field_option(TrainConfig, "weights")] = None,
    lambda_soft: Annotated[float | None, field_option(TrainConfig, "lambda_soft")] = None,
    steps: Annotated[int | None, field_option(TrainConfig, "steps")] = None,
    batch_size: Annotated[int | None, field_option(TrainConfig, "batch_size")] = None,
    resume: Annotated[bool, typer.Option("--resume", help=TrainConfig.model_fields["resume"].description)] = False,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """SoftCon pretraining of an encoder on the training store (GPU when there is one; torchrun for several)."""
    overrides = {
        "store": store,
        "backbone": backbone,
        "weights": weights,
        "lambda_soft": lambda_soft,
        "steps": steps,
        "batch_size": batch_size,
        "resume": resume or None,
    }
    stage_config = _build(TrainConfig, "train", config, overrides)
    configure_runtime()
    from softcon.flows.train import train_on_this_rank

    with progress_bars("train"):
        result = run_stage_flow(train_on_this_rank, stage_config, refresh=refresh, as_json=as_json)
    if result is not None:
        _print_result(result, as_json=as_json)


@app.command()
def evaluate(
    model: Annotated[str | None, field_option(EvaluateConfig, "model")] = None,
    weights: Annotated[str | None, field_option(EvaluateConfig, "weights")] = None,
    backbone: Annotated[str | None, field_option(EvaluateConfig, "backbone")] = None,
    sensor: Annotated[str | None, field_option(EvaluateConfig, "sensor")] = None,
    store: Annotated[str | None, field_option(EvaluateConfig, "store")] = None,
    bigearthnet: Annotated[str | None, field_option(EvaluateConfig, "bigearthnet")] = None,
    eurosat: Annotated[str | None, field_option(EvaluateConfig, "eurosat")] = None,
    input_contract: Annotated[str | None, field_option(EvaluateConfig, "input_contract")] = None,
    vit_features: Annotated[str | None, field_option(EvaluateConfig, "vit_features")] = None,
    protocol: Annotated[str | None, field_option(EvaluateConfig, "protocol")] = None,
    split: Annotated[str | None, field_option(EvaluateConfig, "split")] = None,
    best_metric: Annotated[str | None, field_option(EvaluateConfig, "best_metric")] = None,
    baseline: Annotated[
        list[str] | None, field_option(EvaluateConfig, "baselines", "--baseline", form="repeatable")
    ] = None,
    train_fraction: Annotated[float | None, field_option(EvaluateConfig, "train_fraction")] = None,
    knn_k: Annotated[int | None, field_option(EvaluateConfig, "knn_k")] = None,
    out: Annotated[str | None, field_option(EvaluateConfig, "out")] = None,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> Any:
    """Linear probe and kNN of the frozen encoder (and baselines): mAP micro/macro and F1; top-1 on EuroSAT."""
    overrides = {
        "model": model,
        "weights": weights,
        "backbone": backbone,
        "sensor": sensor,
        "store": store,
        "bigearthnet": bigearthnet,
        "eurosat": eurosat,
        "input_contract": input_contract,
        "vit_features": vit_features,
        "protocol": protocol,
        "split": split,
        "best_metric": best_metric,
        "baselines": baseline or None,
        "train_fraction": train_fraction,
        "knn_k": knn_k,
        "out": out,
    }
    stage_config = _build(EvaluateConfig, "evaluate", config, overrides)
    if stage_config.model is None and stage_config.weights is None:
        err_console.print(
            "[red]error:[/red] give the encoder: --model (an MLflow train run id, a checkpoint file, "
            "models:/NAME/VERSION or models:/NAME@ALIAS) or --weights FILE --backbone NAME"
        )
        raise typer.Exit(2)
    configure_runtime()
    from softcon.flows.evaluate import evaluate_flow

    result = run_stage_flow(evaluate_flow, stage_config, refresh=refresh, as_json=as_json)
    _print_result(result, as_json=as_json)
    table = Path(stage_config.out) / "reports" / result.run_id / "comparison.md"
    if table.is_file() and not as_json:
        console.print(table.read_text())
    return result


@app.command()
def export(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help=ExportConfig.model_fields["model"].description, show_default=False)
    ],
    export_format: Annotated[str | None, field_option(ExportConfig, "format", "--format")] = None,
    out: Annotated[str | None, field_option(ExportConfig, "out")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """A trained encoder as a timm folder, ONNX or TorchScript, with a model card and a STAC (mlm) Item."""
    stage_config = _build(ExportConfig, "export", config, {"model": model, "format": export_format, "out": out})
    configure_runtime()
    from softcon.flows.export import export_flow

    _print_result(run_stage_flow(export_flow, stage_config, as_json=as_json), as_json=as_json)


@app.command()
def embed(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help=EmbedConfig.model_fields["model"].description, show_default=False)
    ],
    store: Annotated[str | None, field_option(EmbedConfig, "store")] = None,
    cube: Annotated[str | None, field_option(EmbedConfig, "cube")] = None,
    out: Annotated[str | None, field_option(EmbedConfig, "out")] = None,
    dask_address: Annotated[str | None, field_option(EmbedConfig, "dask_address")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Every patch of a training store (--store), or every window of a cube (--cube), embedded by a trained encoder
    → GeoParquet with footprints (EPSG:4326)."""
    overrides = {"model": model, "store": store, "cube": cube, "out": out, "dask_address": dask_address}
    stage_config = _build(EmbedConfig, "embed", config, overrides)
    configure_runtime()
    from softcon.flows.embed import embed_flow

    with progress_bars("embed"):
        result = run_stage_flow(embed_flow, stage_config, as_json=as_json)
    _print_result(result, as_json=as_json)


@app.command()
def finetune(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help=FinetuneConfig.model_fields["model"].description, show_default=False)
    ],
    task: Annotated[str | None, field_option(FinetuneConfig, "task", form="segmentation or multilabel")] = None,
    store: Annotated[str | None, field_option(FinetuneConfig, "store")] = None,
    bigearthnet: Annotated[str | None, field_option(FinetuneConfig, "bigearthnet")] = None,
    backbone: Annotated[str | None, field_option(FinetuneConfig, "backbone")] = None,
    sensor: Annotated[str | None, field_option(FinetuneConfig, "sensor")] = None,
    freeze: Annotated[str | None, field_option(FinetuneConfig, "freeze", form="frozen, partial or full")] = None,
    layer_decay: Annotated[float | None, field_option(FinetuneConfig, "layer_decay")] = None,
    lr: Annotated[float | None, field_option(FinetuneConfig, "lr")] = None,
    epochs: Annotated[int | None, field_option(FinetuneConfig, "epochs")] = None,
    batch_size: Annotated[int | None, field_option(FinetuneConfig, "batch_size")] = None,
    patience: Annotated[int | None, field_option(FinetuneConfig, "patience")] = None,
    train_fraction: Annotated[float | None, field_option(FinetuneConfig, "train_fraction")] = None,
    crop_size: Annotated[int | None, field_option(FinetuneConfig, "crop_size")] = None,
    seed: Annotated[int | None, field_option(FinetuneConfig, "seed")] = None,
    device: Annotated[str | None, field_option(FinetuneConfig, "device")] = None,
    out: Annotated[str | None, field_option(FinetuneConfig, "out")] = None,
    as_json: JsonOption = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Fine-tune a pretrained encoder on your labels: per-pixel land cover (a store written with --masks) or
    multi-label classes, with a frozen, partly or fully trained encoder; val and test metrics, the fine-tuned model
    (torchrun for several GPUs)."""
    overrides = {
        "model": model,
        "task": task,
        "store": store,
        "bigearthnet": bigearthnet,
        "backbone": backbone,
        "sensor": sensor,
        "freeze": freeze,
        "layer_decay": layer_decay,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "patience": patience,
        "train_fraction": train_fraction,
        "crop_size": crop_size,
        "seed": seed,
        "device": device,
        "out": out,
    }
    stage_config = _build(FinetuneConfig, "finetune", config, overrides)
    configure_runtime()
    from softcon.flows.finetune import finetune_on_this_rank

    result = run_stage_flow(finetune_on_this_rank, stage_config, refresh=refresh, as_json=as_json)
    if result is not None:
        _print_result(result, as_json=as_json)


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Argument(metavar="FINETUNED", help=PredictConfig.model_fields["model"].description, show_default=False),
    ],
    cube: Annotated[str | None, field_option(PredictConfig, "cube")] = None,
    tiles: Annotated[str | None, field_option(PredictConfig, "tiles", form="comma-separated tile ids")] = None,
    time: Annotated[str | None, field_option(PredictConfig, "time")] = None,
    overlap: Annotated[int | None, field_option(PredictConfig, "overlap")] = None,
    batch_size: Annotated[int | None, field_option(PredictConfig, "batch_size")] = None,
    device: Annotated[str | None, field_option(PredictConfig, "device")] = None,
    out: Annotated[str | None, field_option(PredictConfig, "out")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Class maps of whole cube tiles by a fine-tuned segmentation model: one Cloud-Optimized GeoTIFF per tile and
    date (class indices, 255 = nodata or cloud), in the tile's CRS, with the class scheme and a colour table."""
    overrides = {
        "model": model,
        "cube": cube,
        "tiles": _split_list(tiles),
        "time": time,
        "overlap": overlap,
        "batch_size": batch_size,
        "device": device,
        "out": out,
    }
    stage_config = _build(PredictConfig, "predict", config, overrides)
    configure_runtime()
    from softcon.flows.predict import predict_flow

    with progress_bars("predict"):
        result = run_stage_flow(predict_flow, stage_config, as_json=as_json)
    _print_result(result, as_json=as_json)


@app.command()
def compare(
    model: Annotated[str, typer.Option(help="The SoftCon model: MLflow train run id or checkpoint.")],
    hard: Annotated[
        str | None, typer.Option(help="The hard-contrastive (lambda=0) model: MLflow train run id or checkpoint.")
    ] = None,
    weights: Annotated[
        list[str] | None, typer.Option(help="Local weights file of a published encoder; repeatable.")
    ] = None,
    store: Annotated[str | None, typer.Option(help="Training store; its held-out split is evaluated.")] = None,
    bigearthnet: Annotated[str | None, typer.Option(help="BigEarthNet-format folder.")] = None,
    train_fraction: Annotated[
        float | None, typer.Option(help="Fraction of the train split, drawn without replacement (0.1 = 10%).")
    ] = None,
    finetune_task: Annotated[
        str | None,
        typer.Option(
            help="Also fine-tune (segmentation or multilabel) the model, a random init of its backbone and, for "
            "multilabel, image statistics at each label budget and seed: did pretraining help. Other fine-tuning "
            "settings come from the finetune section of --config."
        ),
    ] = None,
    budgets: Annotated[
        str | None, field_option(FinetuneBudgetsConfig, "budgets", form="comma-separated, with --finetune-task")
    ] = None,
    seeds: Annotated[
        str | None, field_option(FinetuneBudgetsConfig, "seeds", form="comma-separated, with --finetune-task")
    ] = None,
    epochs: Annotated[int | None, field_option(FinetuneConfig, "epochs")] = None,
    freeze: Annotated[str | None, field_option(FinetuneConfig, "freeze", form="frozen, partial or full")] = None,
    lr: Annotated[float | None, field_option(FinetuneConfig, "lr")] = None,
    batch_size: Annotated[int | None, field_option(FinetuneConfig, "batch_size")] = None,
    crop_size: Annotated[int | None, field_option(FinetuneConfig, "crop_size")] = None,
    device: Annotated[str | None, field_option(FinetuneConfig, "device")] = None,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """SoftCon vs hard contrastive vs random init vs image statistics (vs published weights), one protocol; with
    --finetune-task, also fine-tuned at label budgets (a table and a plot in a nested MLflow run)."""
    budgets_config = None
    if finetune_task is not None:
        overrides = {"model": model, "task": finetune_task, "store": store, "bigearthnet": bigearthnet,
                     "epochs": epochs, "freeze": freeze, "lr": lr, "batch_size": batch_size, "crop_size": crop_size,
                     "device": device}  # fmt: skip
        finetune_config = _build(FinetuneConfig, "finetune", config, overrides)
        budgets_config = _build(FinetuneBudgetsConfig, "compare", None, {
            "finetune": finetune_config.model_dump(), "budgets": _split_list(budgets), "seeds": _split_list(seeds),
        })  # fmt: skip
    baselines = ["random", "image-stats"]
    if hard is not None:
        baselines.append(f"hard contrastive (λ=0)={hard}")
    baselines += [f"weights:{path}" for path in weights or []]
    result = evaluate(
        model=model,
        store=store,
        bigearthnet=bigearthnet,
        eurosat=None,
        input_contract=None,
        vit_features=None,
        protocol=None,
        baseline=baselines,
        train_fraction=train_fraction,
        weights=None,
        backbone=None,
        sensor=None,
        knn_k=None,
        out=None,
        as_json=False,
        refresh=refresh,
        config=config,
    )
    if budgets_config is not None:
        from softcon.flows.finetune_budgets import finetune_budgets_flow

        nested = run_stage_flow(finetune_budgets_flow, budgets_config, parent_run_id=result.run_id)
        console.print(f"fine-tuning at label budgets: MLflow run id [bold]{nested.run_id}[/bold] under {result.run_id}")
        console.print(budgets_summary(Path(nested.output)))


def budgets_summary(report: Path) -> Table:
    """The fine-tuning table of a finetune-budgets report folder (``tasks/finetune_budgets``) for the terminal."""
    from softcon.tasks.finetune_budgets import FILES, budget_summary, read_budget_runs

    task, runs = read_budget_runs(report / FILES[1])
    header, rows = budget_summary(runs, task)
    table = Table(*header, title=f"{task} fine-tuning at label budgets: test metrics (%), mean ± 95 % t-interval")
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def pipeline(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML file with one section per stage.")],
    refresh: RefreshOption = False,
) -> None:
    """Run every stage in order under one MLflow parent run."""
    pipeline_config = _build(PipelineConfig, None, config, {})
    configure_runtime()
    from softcon.flows.pipeline import pipeline_flow

    results = run_stage_flow(pipeline_flow, pipeline_config, refresh=refresh)
    print_summary(results, pipeline_config)


@app.command("sample-data")
def sample_data(
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the sample COGs and STAC items.", show_default="$SOFTCON_HOME/sample-<world>"),
    ] = None,
    tiles: Annotated[int, typer.Option(min=1, help="Number of tiles.")] = 4,
    tile_size: Annotated[int, typer.Option(min=16, help="Tile side in pixels.")] = 256,
    dates: Annotated[int, typer.Option(min=1, help="Sentinel-2 acquisition dates.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    world: WorldOption = "structured",
) -> None:
    """Write deterministic Sentinel-like sample scenes, a land-cover COG and STAC Items to a folder."""
    from softcon.tasks.sample_data import write_sample_data

    out = out or get_settings().root / f"sample-{world}"
    sample = write_sample_data(out, tiles=tiles, tile_size=tile_size, dates=dates, seed=seed, world=world)
    console.print(f"wrote sample catalog to {sample.root}")
    console.print(f"  items: {sample.items_file}")
    if sample.dynamic_world is not None:
        console.print(f"  pretraining labels (Dynamic-World-like, --scheme dynamic-world): {sample.dynamic_world}")
        console.print(f"  evaluation set (BigEarthNet format, CORINE labels): {sample.bigearthnet}")
    console.print(f"  bbox: {','.join(f'{v:.5f}' for v in sample.bbox)}   dates: {sample.start} .. {sample.end}")
    console.print(f"serve it with: rustac serve {sample.items_file} --create-collections")


@app.command()
def demo(
    tiles: Annotated[int, typer.Option(min=1, help="Number of sample tiles.")] = 4,
    tile_size: Annotated[int, typer.Option(min=64, help="Tile side in pixels.")] = 256,
    dates: Annotated[int, typer.Option(min=2, help="Sentinel-2 acquisition dates.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 300,
    world: WorldOption = "structured",
    refresh: RefreshOption = False,
) -> None:
    """Run the whole pipeline on generated sample scenes behind a local STAC API, with no server to start."""
    settings = configure_runtime()
    from softcon.demo import demo_config
    from softcon.flows.pipeline import pipeline_flow
    from softcon.tasks.sample_data import write_sample_data
    from softcon.tasks.stac_server import serve_stac

    console.rule("softcon demo")
    sample = write_sample_data(
        settings.root / f"sample-{world}", tiles=tiles, tile_size=tile_size, dates=dates, world=world
    )
    console.print(f"sample scenes ({world} world): {sample.root}")
    with serve_stac([sample.items_file]) as stac_url:
        console.print(f"local STAC API: {stac_url}")
        config = demo_config(stac_url, sample, settings, steps=steps, tile_size=tile_size)
        results = run_stage_flow(pipeline_flow, config, refresh=refresh)
    print_summary(results, config)


def mlflow_experiment_id(run_id: str) -> str:
    """The experiment of an MLflow run (for links to its runs table)."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).info.experiment_id


def evaluation_summary(metrics: dict[str, float]) -> Table:
    """Linear-probe mAP of the model and each baseline on each dataset, from the evaluate run's metric names
    (``[dataset/][baselines/<name>/]linear_map_micro``); empty when no baseline was evaluated."""
    table = Table(title="linear-probe mAP micro / macro (held-out split)", show_header=True)
    rows: dict[str, dict[str, str]] = {}
    datasets: list[str] = []
    for name, value in metrics.items():
        if not name.endswith("linear_map_micro"):
            continue
        prefix = name.removesuffix("linear_map_micro")
        parts = prefix.strip("/").split("/") if prefix else []
        dataset = parts.pop(0) if parts and parts[0] != "baselines" else "store"
        encoder = parts[1] if len(parts) == 2 else "model"
        datasets += [] if dataset in datasets else [dataset]
        macro = metrics.get(f"{prefix}linear_map_macro", float("nan"))
        rows.setdefault(encoder, {})[dataset] = f"{value:.3f} / {macro:.3f}"
    if len(rows) < 2:
        return Table()
    table.add_column("encoder")
    for label in datasets:
        table.add_column(label, justify="right")
    for encoder, cells in rows.items():
        table.add_row(encoder, *(cells.get(label, "–") for label in datasets))
    return table


def print_summary(pipeline_result: Any, config: PipelineConfig) -> None:
    """What the pipeline made, how good it is, how long each stage took, and where the records are."""
    settings = get_settings()
    results = pipeline_result.stages
    ingest_metrics = results["ingest"].metrics
    preprocess_metrics = results["preprocess"].metrics
    train_metrics = results["train"].metrics
    evaluate_metrics = results["evaluate"].metrics
    table = Table(title="softcon pipeline", show_header=True)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("MLflow run")
    table.add_column("result")
    lines = {
        "ingest": f"{ingest_metrics.get('tiles', 0):g} tiles, {ingest_metrics.get('dates', 0):g} dates, "
        f"{ingest_metrics.get('tile_dates_written', 0):g} tile-dates written now",
        "labels": f"{sum(1 for k, v in results['labels'].metrics.items() if k.startswith('fraction_') and v > 0)}"
        " classes present",
        "preprocess": f"{preprocess_metrics.get('kept', 0):g} patches kept of {preprocess_metrics.get('patches', 0):g} "
        f"({preprocess_metrics.get('train', 0):g} train / {preprocess_metrics.get('val', 0):g} val / "
        f"{preprocess_metrics.get('test', 0):g} test)",
        "train": f"final loss {train_metrics.get('loss', float('nan')):.4f}",
        "evaluate": f"linear-probe mAP micro {evaluate_metrics.get('linear_map_micro', float('nan')):.3f} "
        f"macro {evaluate_metrics.get('linear_map_macro', float('nan')):.3f}",
    }
    for stage, result in results.items():
        table.add_row(stage, f"{result.seconds:.1f}", result.run_id, lines.get(stage, ""))
    console.print(table)
    comparison = evaluation_summary(evaluate_metrics)
    if comparison.row_count:
        console.print(comparison)
    from softcon.flows.tracking import runs_table_url

    experiment_id = mlflow_experiment_id(pipeline_result.run_id)
    console.print(f"MLflow experiment '{config.name}', parent run {pipeline_result.run_id}, in {settings.tracking_uri}")
    if settings.tracking_uri.startswith(("http://", "https://")):
        console.print(f"  open it:  {runs_table_url(settings.tracking_uri, experiment_id)}")
    else:
        console.print(f"  open it:  mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000")
        console.print(f"            then {runs_table_url('http://127.0.0.1:5000', experiment_id)}")
    console.print(f"  Prefect flow runs in {settings.root / 'prefect'}")
    console.print(f"  open it:  PREFECT_HOME={settings.root / 'prefect'} prefect server start")
    console.print(
        f"  cube: {config.ingest.cube}   store: {config.preprocess.out}   checkpoint: {results['train'].output}"
    )


@app.command()
def serve(
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    prefect_database: Annotated[
        str | None,
        typer.Option(help="Prefect database URL, e.g. postgresql+asyncpg://user@host/db.", show_default="SQLite"),
    ] = None,
    mlflow_backend: Annotated[
        str | None,
        typer.Option(help="MLflow store, e.g. postgresql+psycopg2://user@host/db.", show_default="SQLite"),
    ] = None,
    deploy_flows: Annotated[bool, typer.Option("--deploy/--no-deploy", help="Register infra/prefect.yaml.")] = True,
    daily: Annotated[
        bool,
        typer.Option(
            "--daily/--no-daily",
            help="Turn on the daily ingest schedule (06:00 Europe/Rome, Earth Search): it needs internet access, "
            "so it is registered paused unless asked for.",
        ),
    ] = False,
) -> None:
    """Start a Prefect server, a process worker and an MLflow server on 127.0.0.1; Ctrl-C stops all three."""
    import time

    from softcon import serve as servers
    from softcon.flows.tracking import runs_table_url

    settings = get_settings()
    console.print(
        f"starting the Prefect server (port {prefect_port}), the MLflow server (port {mlflow_port}) and a process "
        f"worker on 127.0.0.1, logs in {settings.root / 'logs'}; this takes about a minute"
    )
    try:
        with servers.serve(
            settings.root,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            prefect_database_url=prefect_database,
            mlflow_backend_uri=mlflow_backend,
        ) as services:
            if deploy_flows:
                console.print(f"registering the deployments of {servers.PREFECT_YAML}")
                servers.deploy(services.prefect_api_url, env=services.env)
                servers.set_schedule_active(services.prefect_api_url, servers.DAILY_DEPLOYMENT, active=daily)
                state = "on" if daily else "paused (turn it on with --daily, or in the UI: Deployments → daily)"
                console.print(f"daily ingest schedule: {state}")
            console.print(f"Prefect UI:  {services.prefect_ui_url}   (API {services.prefect_api_url})")
            console.print(f"MLflow UI:   {runs_table_url(services.mlflow_url)}")
            console.print(f"worker on pool '{services.work_pool}'; logs in {settings.root / 'logs'}")
            console.print(
                f"point a shell at them:  export PREFECT_API_URL={services.prefect_api_url} "
                f"SOFTCON_MLFLOW_TRACKING_URI={services.mlflow_url}"
            )
            console.print("Ctrl-C stops all three.")
            while all(process.poll() is None for process in services.processes.values()):
                time.sleep(1)
            stopped = [name for name, process in services.processes.items() if process.poll() is not None]
            err_console.print(f"[red]error:[/red] {', '.join(stopped)} stopped; see {settings.root / 'logs'}")
            raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopped")
    except RuntimeError as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None


@app.command()
def deploy(
    api_url: Annotated[
        str | None, typer.Option(help="Prefect API.", show_default="$PREFECT_API_URL or http://127.0.0.1:4200/api")
    ] = None,
    name: Annotated[list[str] | None, typer.Option(help="Only this deployment (repeatable), e.g. backfill.")] = None,
) -> None:
    """Register the deployments of infra/prefect.yaml (each stage, pipeline, backfill, daily) with a Prefect server."""
    from softcon import serve as servers

    url = api_url or os.environ.get("PREFECT_API_URL") or "http://127.0.0.1:4200/api"
    try:
        servers.wait_for_http(f"{url}/health", timeout=10)
        output = servers.deploy(url, names=name)
    except RuntimeError as error:
        err_console.print(f"[red]error:[/red] {error}\nstart the servers first: softcon serve")
        raise typer.Exit(1) from None
    console.print(output)


@app.command()
def reproduce(
    run_id: Annotated[
        str, typer.Argument(help="MLflow run id of an ingest, labels, preprocess, train, evaluate or finetune run.")
    ],
) -> None:
    """Run one stage again with the parameters and inputs of an MLflow run and check it made the same thing."""
    configure_runtime()
    from softcon.flows.reproduce import reproduce_run

    try:
        result = reproduce_run(run_id)
    except (ValueError, FileNotFoundError) as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    verdict = "[green]identical[/green]" if result.identical else "[red]different[/red]"
    console.print(
        f"{result.stage} run {run_id} reproduced as MLflow run [bold]{result.run_id}[/bold]: {verdict} "
        f"({result.compared} compared)   output: {result.output}"
    )
    for difference in result.differences[:20]:
        console.print(f"  differs: {difference}")
    if not result.identical:
        raise typer.Exit(3)


@app.command()
def backfill(
    stac: Annotated[str | None, typer.Option(help="STAC API URL, static catalog or ItemCollection file.")] = None,
    collection: Annotated[list[str] | None, typer.Option("--collection", help="Collection (repeatable).")] = None,
    bbox: Annotated[str | None, typer.Option(help="Area as lon/lat W,S,E,N.")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    end: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD (inclusive).")] = None,
    cube: Annotated[str | None, typer.Option(help="Cube path or URL.")] = None,
    period: Annotated[str, typer.Option(help="One child run per day, week or month.")] = "day",
    deployment: Annotated[
        str | None, typer.Option(help="Run each period on the work pool as a run of this deployment (ingest/ingest).")
    ] = None,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Child runs at once (with --deployment).")] = 2,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Ingest a date range over an area as one child flow run per period, skipping periods already ingested."""
    from softcon.tasks.backfill import PERIODS, Period

    if period not in PERIODS:
        err_console.print(f"[red]error:[/red] --period {period!r} is not one of {', '.join(PERIODS)}")
        raise typer.Exit(2)
    overrides = {
        "stac": stac,
        "collections": collection,
        "bbox": _parse_bbox(bbox),
        "start": start,
        "end": end,
        "cube": cube,
    }
    request = _build(IngestConfig, "ingest", config, overrides)
    configure_runtime()
    from softcon.flows.backfill import backfill_flow

    try:
        result = backfill_flow(
            request, period=cast(Period, period), max_in_flight=max_in_flight, deployment=deployment, refresh=refresh
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    table = Table(title=f"backfill (MLflow parent run {result.run_id})")
    for column in ("period", "status", "MLflow run", "tile-dates written", "note"):
        table.add_column(column)
    for window in result.windows:
        label = str(window.start) if window.start == window.end else f"{window.start}..{window.end}"
        table.add_row(
            label, window.status, window.mlflow_run_id or "", f"{window.tile_dates_written:g}", window.reason or ""
        )
    console.print(table)
    if result.warning:
        err_console.print(f"[yellow]warning:[/yellow] {escape(result.warning)}")


@app.command("check-store")
def check_store(
    path: Annotated[str, typer.Argument(help="A cube (softcon ingest --cube) or a training store (preprocess --out).")],
) -> None:
    """Check a cube or training store against the data contracts; exit 1 listing each problem and its fix."""
    from softcon.tasks.check_store import check_store as run_check

    result = run_check(path)
    if result.summary:
        table = Table(title=f"{result.kind} {path}")
        for column in result.summary[0]:
            table.add_column(column)
        for row in result.summary:
            table.add_row(*row.values())
        console.print(table)
    if result.ok:
        console.print(f"[green]ok[/green]: {result.kind} {path} follows the contract")
        return
    problems = Table(title=f"{len(result.problems)} problem(s) in {path}", show_lines=True)
    for column in ("where", "what is wrong", "fix"):
        problems.add_column(column, overflow="fold")
    for problem in result.problems:
        problems.add_row(problem.path or "(root)", problem.what, problem.fix)
    err_console.print(problems)
    raise typer.Exit(1)


def main() -> None:
    """Entry point for ``python -m softcon``."""
    app(prog_name="softcon")


if __name__ == "__main__":
    main()
