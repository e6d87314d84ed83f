"""Labels flow: bring a land-cover product onto every tile of the cube."""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task

from flows.result import StageResult
from flows.tracking import stage_run
from softcon.config import LabelsConfig
from tasks.labels import run_labels

labels_task = task(run_labels, name="rasterize-labels", retries=2, retry_delay_seconds=[5, 30])


@flow(name="labels")
def labels_flow(config: LabelsConfig, parent_run_id: str | None = None, experiment: str | None = None) -> StageResult:
    """Write each tile's ``landcover`` array and log the class histogram."""
    logger = get_run_logger()
    with stage_run("labels", config, parent_run_id=parent_run_id, experiment=experiment) as run:
        report = labels_task(config)
        metrics = report.metrics()
        mlflow.log_metrics(metrics)
        mlflow.log_dict(
            {"class_pixels": report.class_pixels, "unknown_codes": report.unknown_codes},
            "class_histogram.json",
        )
        logger.info("labelled %d tiles of %s", len(report.tiles), config.cube)
        return StageResult(stage="labels", run_id=run.info.run_id, output=config.cube, metrics=metrics)
