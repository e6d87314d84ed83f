"""The ``softcon`` command: one subcommand per stage, plus ``pipeline``, ``demo`` and ``sample-data``.

Every option can also come from a YAML file (``--config``, one section per stage) or from
``SOFTCON_<STAGE>__<FIELD>`` environment variables; options given here win. Each stage prints the MLflow
run id it logged to.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from softcon.config import (
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    LabelsConfig,
    PipelineConfig,
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


_refresh_requested = False


def _remember_refresh(value: bool) -> bool:
    global _refresh_requested
    _refresh_requested = value
    return value


RefreshOption = Annotated[
    bool,
    typer.Option("--refresh", callback=_remember_refresh, help="Ignore cached task results; do the work again."),
]

SignOption = Annotated[str | None, typer.Option(help="URL signing: auto, planetary-computer or none (default: auto).")]
HeaderOption = Annotated[
    list[str] | None,
    typer.Option("--header", help="NAME=ENV_VAR: send header NAME with the value of $ENV_VAR (repeatable)."),
]


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


def _run(stage_flow: Any, config: Any) -> Any:
    """Run a stage flow, turning the errors users can fix into a message instead of a traceback."""
    try:
        result = stage_flow(config, **({"refresh": True} if _refresh_requested else {}))
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    except OSError as error:  # a full disk: the stage's message says where and what to do
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    return result


def _print_result(result: Any) -> None:
    console.print(f"MLflow run id: [bold]{result.run_id}[/bold]   output: {result.output}")
    for name, value in sorted(result.metrics.items()):
        console.print(f"  {name} = {value:g}")


@app.command()
def ingest(
    stac: Annotated[str | None, typer.Option(help="STAC API URL, static catalog or ItemCollection file.")] = None,
    collection: Annotated[
        list[str] | None, typer.Option("--collection", help="Collection to search (repeat for several).")
    ] = None,
    bbox: Annotated[str | None, typer.Option(help="Area as lon/lat W,S,E,N, e.g. 11.0,46.4,11.1,46.5.")] = None,
    area: Annotated[str | None, typer.Option(help="Area as a GeoJSON/GeoPackage file (instead of --bbox).")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    end: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD (inclusive).")] = None,
    bands: Annotated[str | None, typer.Option(help="Sentinel-2 bands, e.g. B02,B03,B04,B08.")] = None,
    resolution: Annotated[float | None, typer.Option(help="Pixel size in metres [default: 10].")] = None,
    tile_size: Annotated[int | None, typer.Option(help="Tile side in pixels [default: 1056, 4 x 264 px].")] = None,
    epsg: Annotated[
        int | None,
        typer.Option(help="UTM EPSG code of the grid, e.g. 32632 [default: the zone of the area's centre]."),
    ] = None,
    max_cloud: Annotated[float | None, typer.Option(help="Max item cloud cover, percent [default: 80].")] = None,
    max_tile_cloud: Annotated[
        float | None, typer.Option(help="Skip tile-dates with a larger SCL cloud fraction [default: 0.8].")
    ] = None,
    max_tile_nodata: Annotated[
        float | None, typer.Option(help="Skip tile-dates with a larger nodata fraction [default: 0.5].")
    ] = None,
    sign: SignOption = None,
    header: HeaderOption = None,
    cube: Annotated[str | None, typer.Option(help="Cube path or URL [default: .softcon/data/cube.zarr].")] = None,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Search a STAC source and load Sentinel-2 L2A / Sentinel-1 onto a UTM tile grid in a Zarr cube."""
    import logging

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from softcon.tasks.ingest import PROGRESS_EXTRA

    headers = _parse_headers(header)
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
        "headers": headers,
        "cube": cube,
    }
    settings_config = _build(IngestConfig, "ingest", config, overrides)
    configure_runtime()
    from softcon.flows.ingest import ingest_flow

    # The progress bar follows the ingest task's per-tile log records (flow parameters stay plain data).
    progress = Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("tiles"), TimeElapsedColumn(),
        console=err_console, transient=True,
    )  # fmt: skip
    bar = progress.add_task("tiles", total=None)

    class _TileProgress(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            done_total = getattr(record, PROGRESS_EXTRA, None)
            if done_total is not None:
                progress.update(bar, completed=done_total[0], total=done_total[1])

    ingest_logger = logging.getLogger("softcon.tasks.ingest")
    handler = _TileProgress(level=logging.INFO)
    previous_level = ingest_logger.level
    ingest_logger.addHandler(handler)
    if ingest_logger.getEffectiveLevel() > logging.INFO:
        ingest_logger.setLevel(logging.INFO)
    try:
        with progress:
            result = _run(ingest_flow, settings_config)
    finally:
        ingest_logger.removeHandler(handler)
        ingest_logger.setLevel(previous_level)
    _print_result(result)


@app.command()
def labels(
    cube: Annotated[str | None, typer.Option(help="Cube written by `softcon ingest`.")] = None,
    source: Annotated[str | None, typer.Option(help="STAC API URL or file, a local raster, or a vector file.")] = None,
    scheme: Annotated[str | None, typer.Option(help="worldcover, dynamic-world, io-lulc, … or a YAML file.")] = None,
    class_field: Annotated[str | None, typer.Option(help="Class attribute of a vector source.")] = None,
    collection: Annotated[str | None, typer.Option(help="Collection when source is STAC.")] = None,
    year: Annotated[int | None, typer.Option(help="Product year of a STAC collection (default: the latest).")] = None,
    all_touched: Annotated[
        bool | None, typer.Option("--all-touched/--pixel-centre", help="Vector pixel coverage (default: pixel centre).")
    ] = None,
    overlap: Annotated[str | None, typer.Option(help="Overlapping polygons: last or smallest wins.")] = None,
    unknown_codes: Annotated[
        str | None, typer.Option(help="Codes outside the scheme: report (write nodata) or error.")
    ] = None,
    sign: SignOption = None,
    header: HeaderOption = None,
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
        "collection": collection,
        "year": year,
        "all_touched": all_touched,
        "overlap": overlap,
        "unknown_codes": unknown_codes,
    }
    stage_config = _build(LabelsConfig, "labels", config, overrides)
    configure_runtime()
    from softcon.flows.labels import labels_flow

    _print_result(_run(labels_flow, stage_config))


@app.command()
def preprocess(
    cube: Annotated[str | None, typer.Option(help="Cube with s2, scl, s1 and landcover.")] = None,
    out: Annotated[str | None, typer.Option(help="Training store to write.")] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch side in pixels [default: 264].")] = None,
    stride: Annotated[int | None, typer.Option(help="Patch stride in pixels [default: patch size].")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Existing Dask scheduler address.")] = None,
    samples_per_block: Annotated[int | None, typer.Option(help="Samples per Zarr shard [default: 64].")] = None,
    s1_max_gap_days: Annotated[float | None, typer.Option(help="S1-S2 date matching window [default: 3].")] = None,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Cut tiles into patches with Dask: quality checks, targets, split, statistics → training store."""
    overrides = {
        "cube": cube,
        "out": out,
        "patch_size": patch_size,
        "stride": stride,
        "dask_address": dask_address,
        "samples_per_block": samples_per_block,
        "s1_max_gap_days": s1_max_gap_days,
    }
    stage_config = _build(PreprocessConfig, "preprocess", config, overrides)
    configure_runtime()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from softcon.flows.preprocess import listen, preprocess_flow

    # One bar per pass: tiles summarized, blocks (shards) written, statistics reduced.
    with Progress(
        TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=False,
    ) as bars:  # fmt: skip
        bar_ids: dict[str, Any] = {}

        def on_progress(step: str, done: int, total: int) -> None:
            if step not in bar_ids:
                bar_ids[step] = bars.add_task(step, total=total)
            bars.update(bar_ids[step], completed=done, total=total)

        def on_dashboard(link: str) -> None:
            bars.console.print(f"Dask dashboard: [link={link}]{link}[/link]")

        with listen(on_progress, on_dashboard):
            result = _run(preprocess_flow, stage_config)
    _print_result(result)


@app.command()
def train(
    store: Annotated[str | None, typer.Option(help="Training store written by `softcon preprocess`.")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm model name [default: resnet18].")] = None,
    weights: Annotated[str | None, typer.Option(help="Local pretrained weights file.")] = None,
    lambda_soft: Annotated[
        float | None, typer.Option(help="Weight of the soft term; 0 = hard contrastive [default: 1].")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps [default: 300].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [default: 64].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """SoftCon pretraining of an encoder on the training store (GPU when there is one)."""
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
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1 and rank != 0:
        # Under torchrun only rank 0 runs the Prefect flow and records to MLflow; the other ranks run the same
        # training loop, which joins the process group and leaves logging and checkpoints to rank 0.
        from softcon.tasks.train import run_training

        run_training(stage_config)
        return
    if world_size > 1:
        global _refresh_requested
        _refresh_requested = True  # a cached result on rank 0 would leave the other ranks waiting for it
    from softcon.flows.train import train_flow

    _print_result(_run(train_flow, stage_config))


@app.command()
def evaluate(
    model: Annotated[str | None, typer.Option(help="MLflow run id of a train stage, or a checkpoint.")] = None,
    store: Annotated[str | None, typer.Option(help="Training store; its held-out split is evaluated.")] = None,
    bigearthnet: Annotated[str | None, typer.Option(help="BigEarthNet-format folder.")] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="Also evaluate: random, image-stats, a checkpoint / MLflow train run id, weights:FILE "
            "(NAME=SPEC names the row); repeatable."
        ),
    ] = None,
    train_fraction: Annotated[
        float | None, typer.Option(help="Fraction of the train split, drawn without replacement (0.1 = 10%).")
    ] = None,
    knn_k: Annotated[int | None, typer.Option(help="kNN neighbours.")] = None,
    out: Annotated[str | None, typer.Option(help="Feature cache and report folder.")] = None,
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """Linear probe and kNN of the frozen encoder (and baselines): mAP micro/macro and F1 on multi-label targets."""
    overrides = {
        "model": model,
        "store": store,
        "bigearthnet": bigearthnet,
        "baselines": baseline or None,
        "train_fraction": train_fraction,
        "knn_k": knn_k,
        "out": out,
    }
    stage_config = _build(EvaluateConfig, "evaluate", config, overrides)
    if stage_config.model is None:
        err_console.print("[red]error:[/red] --model is required (an MLflow train run id or a checkpoint file)")
        raise typer.Exit(2)
    configure_runtime()
    from softcon.flows.evaluate import evaluate_flow

    result = _run(evaluate_flow, stage_config)
    _print_result(result)
    table = Path(stage_config.out) / "reports" / result.run_id / "comparison.md"
    if table.is_file():
        console.print(table.read_text())


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
    refresh: RefreshOption = False,
    config: ConfigOption = None,
) -> None:
    """SoftCon vs hard contrastive vs random init vs image statistics (vs published weights), one protocol."""
    baselines = ["random", "image-stats"]
    if hard is not None:
        baselines.append(f"hard contrastive (λ=0)={hard}")
    baselines += [f"weights:{path}" for path in weights or []]
    evaluate(
        model=model,
        store=store,
        bigearthnet=bigearthnet,
        baseline=baselines,
        train_fraction=train_fraction,
        knn_k=None,
        out=None,
        refresh=refresh,
        config=config,
    )


@app.command()
def pipeline(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML file with one section per stage.")],
    refresh: RefreshOption = False,
) -> None:
    """Run every stage in order under one MLflow parent run."""
    pipeline_config = _build(PipelineConfig, None, config, {})
    configure_runtime()
    from softcon.flows.pipeline import pipeline_flow

    results = _run(pipeline_flow, pipeline_config)
    print_summary(results, pipeline_config)


@app.command("sample-data")
def sample_data(
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the sample COGs and STAC items [default: .softcon/sample]."),
    ] = None,
    tiles: Annotated[int, typer.Option(min=1, help="Number of tiles.")] = 4,
    tile_size: Annotated[int, typer.Option(min=16, help="Tile side in pixels.")] = 256,
    dates: Annotated[int, typer.Option(min=1, help="Sentinel-2 acquisition dates.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write deterministic Sentinel-like sample scenes, a land-cover COG and STAC Items to a folder."""
    from softcon.tasks.sample_data import write_sample_data

    out = out or get_settings().root / "sample"
    sample = write_sample_data(out, tiles=tiles, tile_size=tile_size, dates=dates, seed=seed)
    console.print(f"wrote sample catalog to {sample.root}")
    console.print(f"  items: {sample.items_file}")
    console.print(f"  bbox: {','.join(f'{v:.5f}' for v in sample.bbox)}   dates: {sample.start} .. {sample.end}")
    console.print(f"serve it with: rustac serve {sample.items_file} --create-collections")


@app.command()
def demo(
    tiles: Annotated[int, typer.Option(min=1, help="Number of sample tiles.")] = 4,
    tile_size: Annotated[int, typer.Option(min=64, help="Tile side in pixels.")] = 256,
    dates: Annotated[int, typer.Option(min=2, help="Sentinel-2 acquisition dates.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 300,
    refresh: RefreshOption = False,
) -> None:
    """Run the whole pipeline on generated sample scenes behind a local STAC API, with no server to start."""
    settings = configure_runtime()
    from softcon.demo import demo_config
    from softcon.flows.pipeline import pipeline_flow
    from softcon.tasks.sample_data import write_sample_data
    from softcon.tasks.stac_server import serve_stac

    console.rule("softcon demo")
    sample = write_sample_data(settings.root / "sample", tiles=tiles, tile_size=tile_size, dates=dates)
    console.print(f"sample scenes: {sample.root}")
    with serve_stac([sample.items_file]) as stac_url:
        console.print(f"local STAC API: {stac_url}")
        config = demo_config(
            stac_url,
            sample.bbox,
            str(sample.start),
            str(sample.end),
            settings,
            steps=steps,
            tile_size=tile_size,
        )
        results = _run(pipeline_flow, config)
    print_summary(results, config)


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
    console.print(f"MLflow experiment '{config.name}', parent run {pipeline_result.run_id}, in {settings.tracking_uri}")
    console.print(f"  open it:  mlflow ui --backend-store-uri {settings.tracking_uri} --port 5000")
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
        str | None, typer.Option(help="Prefect database URL, e.g. postgresql+asyncpg://user@host/db [default: SQLite].")
    ] = None,
    mlflow_backend: Annotated[
        str | None, typer.Option(help="MLflow store, e.g. postgresql+psycopg2://user@host/db [default: SQLite].")
    ] = None,
    deploy_flows: Annotated[bool, typer.Option("--deploy/--no-deploy", help="Register infra/prefect.yaml.")] = True,
) -> None:
    """Start a Prefect server, a process worker and an MLflow server on 127.0.0.1; Ctrl-C stops all three."""
    import time

    from softcon import serve as servers

    settings = get_settings()
    try:
        with servers.serve(
            settings.root,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            prefect_database_url=prefect_database,
            mlflow_backend_uri=mlflow_backend,
        ) as services:
            if deploy_flows:
                servers.deploy(services.prefect_api_url, env=services.env)
            console.print(f"Prefect UI:  {services.prefect_ui_url}   (API {services.prefect_api_url})")
            console.print(f"MLflow UI:   {services.mlflow_url}")
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
        str | None, typer.Option(help="Prefect API [default: $PREFECT_API_URL or http://127.0.0.1:4200/api].")
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
        str, typer.Argument(help="MLflow run id of an ingest, labels, preprocess, train or evaluate run.")
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
    from softcon.tasks.backfill import PERIODS

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
            request, period=period, max_in_flight=max_in_flight, deployment=deployment, refresh=refresh
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
    sys.exit(main())
