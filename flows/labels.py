"""Labels flow: bring a land-cover product onto every tile of the cube."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow

from softcon.config import LabelsConfig
from softcon.flows.caching import stage_task
from softcon.flows.datasets import data_dataset, log_datasets, stac_dataset
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.label_figures import class_histogram_figure, class_histogram_table, cube_quicklook
from softcon.tasks.labels import run_labels

labels_task = stage_task(run_labels, "labels", name="rasterize-labels", retries=2, retry_delay_seconds=[5, 30])


@flow(name="labels")
def labels_flow(
    config: LabelsConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Write each tile's ``landcover`` array; log the class histogram (table + bar chart) and a quick-look."""
    with run_stage("labels", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        report = stage.call(labels_task, config)
        source = (
            stac_dataset(config.source, [config.collection], {"year": config.year})
            if config.source.startswith(("http://", "https://")) and not Path(config.source).suffix
            else data_dataset(config.source, "labels")
        )
        log_datasets([source], [data_dataset(config.cube, "cube")])
        mlflow.log_dict(
            {"scheme": report.scheme, "class_pixels": report.class_pixels, "unknown_codes": report.unknown_codes,
             "excluded_codes": report.excluded_codes, "resampling": report.resampling},
            "class_histogram.json",
        )  # fmt: skip
        table = class_histogram_table(report.class_pixels, report.class_codes)
        mlflow.log_table(table, "class_histogram_table.json")
        mlflow.log_figure(class_histogram_figure(table, title=f"{report.product} · {report.scheme}"),
                          "class_histogram.png")  # fmt: skip
        mlflow.log_figure(cube_quicklook(config.cube, report.tiles), "quicklook.png")
        if report.unknown_codes:
            stage.logger.warning("codes outside scheme %s (written as nodata): %s", report.scheme, report.unknown_codes)
        stage.logger.info("labelled %d tiles of %s", len(report.tiles), config.cube)
        return stage.result(config.cube, report.metrics())
