"""Preprocess flow: cut the cube into patches with Dask and write the training store."""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task

from flows.result import StageResult
from flows.tracking import stage_run
from softcon.config import PreprocessConfig
from tasks.preprocess import run_preprocess

preprocess_task = task(run_preprocess, name="write-training-store", retries=1, retry_delay_seconds=10)


@flow(name="preprocess")
def preprocess_flow(
    config: PreprocessConfig, parent_run_id: str | None = None, experiment: str | None = None
) -> StageResult:
    """Patches, quality checks, targets, spatial split and normalization statistics, into one store."""
    logger = get_run_logger()
    with stage_run("preprocess", config, parent_run_id=parent_run_id, experiment=experiment) as run:
        report = preprocess_task(config)
        metrics = report.metrics()
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report.norm_stats, "norm_stats.json")
        if report.dashboard_link:
            mlflow.set_tag("dask.dashboard", report.dashboard_link)
        logger.info("wrote %s (%s)", config.out, ", ".join(f"{k}={v:g}" for k, v in metrics.items()))
        return StageResult(stage="preprocess", run_id=run.info.run_id, output=config.out, metrics=metrics)
