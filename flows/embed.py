"""Embed flow: a trained encoder's features for every patch of a training store, or every window of a cube, as
GeoParquet."""

from __future__ import annotations

import mlflow
from prefect import flow, task

from softcon.config import EmbedConfig
from softcon.flows.caching import retry_unless_lasting
from softcon.flows.datasets import data_dataset, log_datasets
from softcon.flows.evaluate import resolve_checkpoint
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.embed import EmbedReport, run_embed


# Not cached by Prefect: the file is rewritten whole from the store (or cube) and the checkpoint (a few minutes per
# million patches on a cluster); retried once for a lost worker.
@task(name="embed-patches", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_lasting)
def embed_task(config: EmbedConfig, checkpoint: str) -> EmbedReport:
    """The embedding itself (``tasks/embed.py``)."""
    return run_embed(config, checkpoint)


@flow(name="embed")
def embed_flow(
    config: EmbedConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """One row per store patch (footprint, tile, time, split, labels) or per cube window and time step (footprint,
    tile, time, quality), each with the encoder's embedding."""
    with run_stage("embed", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        checkpoint = resolve_checkpoint(config.model)
        report = embed_task(config, str(checkpoint))
        kind, source = ("cube", config.cube) if config.cube is not None else ("store", str(config.store))
        log_datasets([data_dataset(source, kind)], [data_dataset(config.out, "embeddings")])
        mlflow.set_tag("softcon.embeddings", config.out)
        stage.logger.info("wrote %s: %d rows, %d-d", config.out, report.rows, report.dimension)
        return stage.result(config.out, report.metrics())
