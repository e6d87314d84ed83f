"""Preprocess flow: cut the cube into patches with Dask and write the training store."""

from __future__ import annotations

import mlflow
from prefect import flow

from softcon.config import PreprocessConfig
from softcon.flows.caching import stage_task
from softcon.flows.datasets import data_dataset, log_datasets
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.preprocess import DASHBOARD_LINK, empty_split_warning, run_preprocess

# run_preprocess itself reuses a complete store and resumes an incomplete one; the Prefect cache (keyed on the
# config, the code and the cube's metadata: flows/caching.py) also skips the cluster start.
preprocess_task = stage_task(
    run_preprocess, "preprocess", name="write-training-store", retries=1, retry_delay_seconds=10
)


def norm_stat_metrics(norm_stats: dict) -> dict[str, float]:
    """Per-band statistics as flat MLflow metrics: ``norm.s2.B04.mean`` (bands without data left out)."""
    metrics: dict[str, float] = {}
    for sensor, stats in norm_stats.items():
        names = stats.get("names") or [str(i) for i in range(len(stats["mean"]))]
        for key in ("mean", "std", "p01", "p99"):
            for name, value in zip(names, stats[key], strict=True):
                if value is not None:
                    metrics[f"norm.{sensor}.{name}.{key}"] = float(value)
    return metrics


@flow(name="preprocess")
def preprocess_flow(
    config: PreprocessConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Patches, quality checks, targets, spatial split and normalization statistics, into one store."""
    with run_stage("preprocess", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        report = stage.call(preprocess_task, config)
        log_datasets([data_dataset(config.cube, "cube")], [data_dataset(config.out, "store")])
        metrics = report.metrics()
        mlflow.log_metrics(norm_stat_metrics(report.norm_stats))
        mlflow.log_dict(report.norm_stats, "norm_stats.json")
        if report.cube_fingerprint:  # the exact cube version the store was built from
            mlflow.set_tag("softcon.cube_fingerprint", report.cube_fingerprint)
        if report.dashboard_link:
            mlflow.set_tag(DASHBOARD_LINK, report.dashboard_link)
        stage.logger.info("wrote %s (%s)", config.out, ", ".join(f"{k}={v:g}" for k, v in metrics.items()))
        return stage.result(config.out, metrics, warning=empty_split_warning(config, report.counts))
