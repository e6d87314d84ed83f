"""Preprocess flow: cut the cube into patches with Dask and write the training store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlflow
from prefect import flow, get_run_logger

from softcon.config import PreprocessConfig
from softcon.flows.caching import stage_task
from softcon.flows.result import StageResult
from softcon.flows.tracking import stage_run
from softcon.tasks.preprocess import DashboardCallback, ProgressCallback, run_preprocess

# run_preprocess itself reuses a complete store and resumes an incomplete one; the Prefect cache (keyed on the
# config, the code and the cube's metadata, callbacks excluded: flows/caching.py) also skips the cluster start.
preprocess_task = stage_task(
    run_preprocess, "preprocess", name="write-training-store", retries=1, retry_delay_seconds=10
)


@dataclass(frozen=True)
class Listener:
    """Where a caller in the same process (the CLI) wants progress and the dashboard link."""

    on_progress: ProgressCallback | None = None
    on_dashboard: DashboardCallback | None = None


_listeners: list[Listener] = []


@contextmanager
def listen(
    on_progress: ProgressCallback | None = None, on_dashboard: DashboardCallback | None = None
) -> Iterator[None]:
    """Forward the flow's progress and Dask dashboard link to these callbacks while the block runs."""
    listener = Listener(on_progress, on_dashboard)
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class FlowProgress:
    """Progress into the flow-run log (every ~10 %) and to the listeners; the dashboard link into MLflow."""

    def __init__(self, run_id: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.run_id = run_id
        self.logger = logger
        self.last_logged: dict[str, int] = {}

    def progress(self, step: str, done: int, total: int) -> None:
        every = max(total // 10, 1)
        if done == total or done - self.last_logged.get(step, -every) >= every:
            self.last_logged[step] = done
            self.logger.info("%s %d/%d", step, done, total)
        for listener in list(_listeners):
            if listener.on_progress is not None:
                listener.on_progress(step, done, total)

    def dashboard(self, link: str) -> None:
        # Logged as soon as the cluster is up, so the link is in MLflow while the work runs; by run id,
        # because the task may run in another thread than the flow's active run.
        mlflow.MlflowClient().set_tag(self.run_id, "dask.dashboard", link)
        self.logger.info("Dask dashboard: %s", link)
        for listener in list(_listeners):
            if listener.on_dashboard is not None:
                listener.on_dashboard(link)


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
    logger = get_run_logger()
    with stage_run("preprocess", config, parent_run_id=parent_run_id, experiment=experiment) as run:
        observer = FlowProgress(run.info.run_id, logger)
        report = preprocess_task.with_options(refresh_cache=refresh)(
            config, on_progress=observer.progress, on_dashboard=observer.dashboard
        ).value
        metrics = report.metrics()
        mlflow.log_metrics(metrics)
        mlflow.log_metrics(norm_stat_metrics(report.norm_stats))
        mlflow.log_dict(report.norm_stats, "norm_stats.json")
        if report.dashboard_link:
            mlflow.set_tag("dask.dashboard", report.dashboard_link)
        logger.info("wrote %s (%s)", config.out, ", ".join(f"{k}={v:g}" for k, v in metrics.items()))
        return StageResult(stage="preprocess", run_id=run.info.run_id, output=config.out, metrics=metrics)
