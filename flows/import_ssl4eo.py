"""Import flow: an extracted SSL4EO-S12 tree (with SSL4EO-S12-ML labels) into a training store."""

from __future__ import annotations

import mlflow
from prefect import flow, task

from softcon.config import ImportSSL4EOConfig
from softcon.flows.caching import retry_unless_lasting
from softcon.flows.datasets import data_dataset, folder_dataset, log_datasets
from softcon.flows.preprocess import norm_stat_metrics
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.ssl4eo_import import ImportReport, run_import_ssl4eo


# Not cached by Prefect: fingerprinting a 1.5 TB tree costs what the importer's own check does (it scans the tree,
# then reuses a complete store with the same fingerprint and resumes an incomplete one).
@task(name="import-ssl4eo", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_lasting)
def import_task(config: ImportSSL4EOConfig) -> ImportReport:
    """The import itself (``tasks/ssl4eo_import.py``)."""
    return run_import_ssl4eo(config)


@flow(name="import-ssl4eo")
def import_ssl4eo_flow(
    config: ImportSSL4EOConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """SSL4EO-S12 seasons, S1 pairs and SSL4EO-S12-ML targets, split by location, into one store."""
    with run_stage(
        "import-ssl4eo", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh
    ) as stage:
        report = import_task(config)
        corpus = folder_dataset(
            config.root, "ssl4eo-s12", {"root": config.root, "s2": config.s2, "counts": report.counts}
        )
        inputs = [corpus, *([data_dataset(config.labels, "labels")] if config.labels else [])]
        log_datasets(inputs, [data_dataset(config.out, "store")])
        mlflow.log_metrics(norm_stat_metrics(report.norm_stats))
        mlflow.log_dict(report.norm_stats, "norm_stats.json")
        if report.incomplete:
            mlflow.log_text("\n".join(report.incomplete), "incomplete_seasons.txt")
        stage.logger.info("wrote %s (%s)", config.out, ", ".join(f"{k}={v}" for k, v in report.counts.items()))
        return stage.result(config.out, report.metrics(), warning=report.warning)
