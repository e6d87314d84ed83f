"""MLflow's system-metrics monitor, started and stopped for one run (``flows/train.py``'s ``system_metrics``).

Checked against mlflow 3.17.2 (pinned ``mlflow>=3.1,<4`` in pyproject.toml). Internal APIs wrapped here:

- ``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor(run_id, sampling_interval=...,
  tracking_uri=...)`` with its ``start()`` and ``finish()`` (MLflow itself only starts it through
  ``mlflow.start_run(log_system_metrics=True)``, for every run of the process);
- its ``collect_metrics()``, ``aggregate_metrics()``, ``publish_metrics(metrics)`` and ``mlflow_logger.flush()``:
  one last sample logged when the monitor stops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

__all__ = ["finish_system_metrics", "start_system_metrics"]


def start_system_metrics(run_id: str, interval: float, *, tracking_uri: str | None = None) -> SystemMetricsMonitor:
    """Start sampling this process's system metrics (CPU, memory, disk, network, GPU) into run ``run_id``, every
    ``interval`` seconds (MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it), in a thread.

    ``tracking_uri``: the run's tracking server; default MLflow's current one.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def finish_system_metrics(monitor: SystemMetricsMonitor) -> None:
    """Stop the monitor's thread, then take, log and flush one last sample: even a run shorter than the sampling
    interval has its system metrics."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
