"""Evaluate flow: frozen-encoder linear probe and kNN on multi-label targets."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task

from flows.caching import cache_options
from flows.result import StageResult
from flows.tracking import stage_run
from softcon.config import EvaluateConfig
from tasks.evaluate import run_evaluation

evaluate_task = task(run_evaluation, name="probe-frozen-encoder", **cache_options("evaluate"))


def resolve_checkpoint(model: str) -> Path:
    """A checkpoint file, or the checkpoint logged by the MLflow train run with that id."""
    from flows.train import CHECKPOINT_ARTIFACT

    path = Path(model)
    if path.is_file():
        return path
    try:
        folder = mlflow.artifacts.download_artifacts(run_id=model, artifact_path=CHECKPOINT_ARTIFACT)
    except Exception as error:  # MLflow raises several types for an unknown run or a missing artifact
        raise ValueError(
            f"model {model!r} is neither a checkpoint file nor an MLflow train run with a "
            f"'{CHECKPOINT_ARTIFACT}' artifact: {error}"
        ) from error
    checkpoints = sorted(Path(folder).glob("*.pt"))
    if not checkpoints:
        raise ValueError(f"MLflow run {model} has no checkpoint under '{CHECKPOINT_ARTIFACT}'")
    return checkpoints[-1]


@flow(name="evaluate")
def evaluate_flow(
    config: EvaluateConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Probe the encoder of ``config.model`` on the store's held-out split; log mAP micro/macro and F1."""
    logger = get_run_logger()
    if config.model is None:
        raise ValueError("evaluate needs a model: pass --model MLFLOW_RUN_ID_OR_CHECKPOINT")
    with stage_run("evaluate", config, parent_run_id=parent_run_id, experiment=experiment) as run:
        checkpoint = resolve_checkpoint(config.model)
        result = evaluate_task.with_options(refresh_cache=refresh)(config, checkpoint)
        mlflow.log_metrics(result.metrics)
        mlflow.log_dict(result.per_class_ap, "per_class_ap.json")
        logger.info(
            "linear-probe mAP micro %.3f macro %.3f, kNN mAP micro %.3f",
            result.metrics["linear_map_micro"],
            result.metrics["linear_map_macro"],
            result.metrics["knn_map_micro"],
        )
        dataset = config.store or config.bigearthnet or ""
        return StageResult(stage="evaluate", run_id=run.info.run_id, output=dataset, metrics=result.metrics)
