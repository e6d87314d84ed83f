"""Ingest flow: search a STAC source and load Sentinel-2/-1 scenes into the Zarr cube."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import mlflow
from prefect import State, flow

from softcon.config import IngestConfig
from softcon.flows.caching import retry_unless_lasting, stage_task
from softcon.flows.datasets import data_dataset, log_datasets, stac_dataset
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.cube_store import CubeDamageError, StoreFullError
from softcon.tasks.ingest import run_ingest


def _retry_unless_lasting(task: object, task_run: object, state: State) -> bool:
    """Retry the ingest task on failure, except on a full disk, a damaged cube or bad input: waiting fixes none."""
    lasting = isinstance(state.result(raise_on_failure=False), StoreFullError | CubeDamageError)
    return not lasting and retry_unless_lasting(task, task_run, state)


ingest_task = stage_task(
    run_ingest, "ingest", name="ingest-items", retries=2, retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_unless_lasting,
)  # fmt: skip


@flow(name="ingest")
def ingest_flow(
    config: IngestConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Ingest every item matching the request onto the tile grid; re-running adds only new dates."""
    with run_stage("ingest", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        report = stage.call(ingest_task, config)
        query = {"bbox": config.bbox, "start": config.start, "end": config.end}
        log_datasets([stac_dataset(config.stac, config.collections, query)], [data_dataset(config.cube, "cube")])
        with tempfile.TemporaryDirectory() as folder:
            # The run's record: every item and what happened to it, the failed ones with their reason.
            files = {
                "ingest_report.json": dataclasses.asdict(report),
                "items.json": report.items,
                "failed_items.json": report.failures,
            }
            for name, content in files.items():
                path = Path(folder) / name
                path.write_text(json.dumps(content, indent=2, default=str, sort_keys=True))
                mlflow.log_artifact(str(path))
        if report.items_failed:
            stage.logger.warning("%d items failed and were skipped: %s", len(report.items_failed), report.failures)
        stage.logger.info(
            "ingested %d items into %d tiles of %s (%d tile-dates written, %.1f MB/s)",
            report.items_ingested,
            len(report.tiles),
            config.cube,
            report.tile_dates_written,
            report.mb_per_s,
        )
        return stage.result(config.cube, report.metrics(), warning=report.warning(config))
