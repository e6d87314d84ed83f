"""Evaluate flow: frozen-encoder linear probe and kNN on multi-label targets, baselines, comparison report."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from prefect import flow, task

from softcon.config import EvaluateConfig
from softcon.flows.caching import stage_task
from softcon.flows.datasets import data_dataset, folder_dataset, log_datasets
from softcon.flows.registry import REGISTRY_PREFIX, record_evaluation, registry_run_id
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.settings import get_settings
from softcon.tasks.compare import comparison_table, write_report
from softcon.tasks.evaluate import run_evaluation

evaluate_task = stage_task(run_evaluation, "evaluate", name="probe-frozen-encoder")
report_task = task(name="comparison-report")(write_report)


def resolve_checkpoint(model: str, artifact: str | None = None) -> Path:
    """A checkpoint file, the checkpoint logged by the MLflow train run with that id, or by the run behind a
    registered model version (``models:/name/version``, ``models:/name@alias``); with ``artifact``, the ``.pt`` file
    a run logged in that artifact folder instead (a finetune run's ``finetuned``).

    A run's checkpoint is downloaded once into ``<home>/checkpoints/<run id>`` and reused from there: MLflow's
    default is a new temporary folder per call, never removed, which filled /tmp with GBs of checkpoints.
    """
    from softcon.flows.train import CHECKPOINT_ARTIFACT

    artifact = artifact or CHECKPOINT_ARTIFACT
    run = "train run" if artifact == CHECKPOINT_ARTIFACT else "run"
    if model.startswith(REGISTRY_PREFIX):
        model = registry_run_id(model)
    path = Path(model)
    if path.is_file():
        return path
    if not model or model.startswith(".") or any(char in model for char in "/\\\0"):  # a folder name, no more
        raise ValueError(f"model {model!r} is neither a checkpoint file nor an MLflow train run id")

    def checkpoints(folder: Path) -> list[Path]:
        return sorted(folder.glob("*.pt"))

    cache = get_settings().root / "checkpoints"
    final = cache / model
    if not checkpoints(final):
        cache.mkdir(parents=True, exist_ok=True)
        # Download next to the final folder, then rename: a crash leaves only a dot-folder, never a partial run.
        staging = Path(tempfile.mkdtemp(dir=cache, prefix="."))
        try:
            try:
                folder = mlflow.artifacts.download_artifacts(
                    run_id=model, artifact_path=artifact, dst_path=str(staging)
                )
            except Exception as error:  # MLflow raises several types for an unknown run or a missing artifact
                raise ValueError(
                    f"model {model!r} is neither a checkpoint file nor an MLflow {run} with a '{artifact}' "
                    f"artifact: {error}"
                ) from error
            if not checkpoints(Path(folder)):
                raise ValueError(f"MLflow run {model} has no checkpoint under '{artifact}'")
            try:
                os.replace(folder, final)
            except OSError:
                if not checkpoints(final):  # not another process's complete download: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return checkpoints(final)[-1]


def resolve_baseline(spec: str) -> str:
    """A baseline spec with an MLflow train run id replaced by its checkpoint file (others unchanged)."""
    name, _, value = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    if value in ("random", "image-stats") or value.startswith(("weights:", "checkpoint:")) or Path(value).is_file():
        return spec
    checkpoint = str(resolve_checkpoint(value))
    return f"{name}={checkpoint}" if name else checkpoint


@flow(name="evaluate")
def evaluate_flow(
    config: EvaluateConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Probe the frozen encoder of ``config.model`` and the baselines on each dataset; log metrics, the
    cached features, the comparison table and the plots."""
    if config.model is None and config.weights is None:
        raise ValueError("evaluate needs a model: pass --model (run id, checkpoint, models:/…) or --weights FILE")
    with run_stage("evaluate", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        checkpoint = resolve_checkpoint(config.model) if config.model is not None else None
        baselines = [resolve_baseline(spec) for spec in config.baselines]
        result = stage.call(evaluate_task, config, checkpoint, baselines)
        read = [data_dataset(config.store, "store")] if config.store else []
        for kind, location in (("bigearthnet", config.bigearthnet), ("eurosat", config.eurosat)):
            if location:  # thousands of files: identified by location and patch counts, not walked
                counts = {key: value for key, value in result.metrics.items() if key.startswith(f"{kind}/n_")}
                read.append(folder_dataset(location, kind, {"location": location, **counts}))
        log_datasets(read)
        mlflow.log_dict(result.per_class_ap, "per_class_ap.json")
        for path in sorted({path for r in result.results for path in r.feature_files}):
            mlflow.log_artifact(str(path), artifact_path="features")
        report = report_task(result, Path(config.out) / "reports" / stage.run_id, plots=config.plots)
        for path in report:
            mlflow.log_artifact(str(path), artifact_path="report")
        for r in result.results:
            stage.logger.info(
                "%s on %s: linear-probe mAP micro %.3f macro %.3f, kNN mAP micro %.3f%s",
                r.encoder,
                r.dataset,
                r.metrics["linear_map_micro"],
                r.metrics["linear_map_macro"],
                r.metrics["knn_map_micro"],
                " — COLLAPSED features" if r.collapsed else "",
            )
        stage.logger.info(
            "comparison table (MLflow artifact report/comparison.md):\n%s", comparison_table(result.results)
        )
        if config.model is not None:
            record_evaluation(config.model, result.metrics, stage.run_id, config.best_metric)
        dataset = config.store or config.bigearthnet or config.eurosat or ""
        return stage.result(dataset, result.metrics)
