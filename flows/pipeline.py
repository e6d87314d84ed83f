"""Pipeline flow: every stage in order under one MLflow parent run."""

from __future__ import annotations

import time
from collections.abc import Callable

import mlflow
from prefect import flow, get_run_logger

from softcon.config import PipelineConfig
from softcon.flows.evaluate import evaluate_flow
from softcon.flows.ingest import ingest_flow
from softcon.flows.labels import labels_flow
from softcon.flows.preprocess import preprocess_flow
from softcon.flows.result import PipelineResult, StageResult
from softcon.flows.tracking import stage_run
from softcon.flows.train import train_flow


@flow(name="pipeline")
def pipeline_flow(config: PipelineConfig, refresh: bool = False) -> PipelineResult:
    """ingest → labels → preprocess → train → evaluate; each stage a subflow and a nested MLflow run."""
    logger = get_run_logger()
    results: dict[str, StageResult] = {}
    with stage_run("pipeline", config, experiment=config.name) as parent:
        stage_args = {"parent_run_id": parent.info.run_id, "experiment": config.name, "refresh": refresh}

        def timed(stage: str, run: Callable[[], StageResult]) -> None:
            start = time.perf_counter()
            result = run()
            results[stage] = result.model_copy(update={"seconds": time.perf_counter() - start})
            mlflow.set_tag(f"softcon.run.{stage}", result.run_id)
            mlflow.log_metrics({f"{stage}.{name}": value for name, value in result.metrics.items()})
            mlflow.log_metric(f"{stage}.seconds", results[stage].seconds)

        timed("ingest", lambda: ingest_flow(config.ingest, **stage_args))
        timed("labels", lambda: labels_flow(config.labels, **stage_args))
        timed("preprocess", lambda: preprocess_flow(config.preprocess, **stage_args))
        timed("train", lambda: train_flow(config.train, **stage_args))
        evaluate = config.evaluate.model_copy(update={"model": results["train"].run_id})
        timed("evaluate", lambda: evaluate_flow(evaluate, **stage_args))
        logger.info("pipeline finished: MLflow parent run %s", parent.info.run_id)
    return PipelineResult(run_id=parent.info.run_id, stages=results)
