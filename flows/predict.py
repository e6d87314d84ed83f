"""Predict flow: a fine-tuned segmentation model's class map of every chosen cube tile and date, as Cloud-Optimized
GeoTIFFs.

The predict run holds the configuration as params, the cube as its input dataset and the folder of maps as its output,
``files``, ``pixels``, ``nodata_fraction`` and ``fraction/<class>`` (each class's share of the predicted pixels) as
metrics, and ``predict.json``: each map's path and the class scheme. The maps stay in ``config.out`` (a tile's map
is as large as its label raster): the run records where they are, not copies.
"""

from __future__ import annotations

import mlflow
from prefect import flow, task

from softcon.config import PredictConfig
from softcon.flows.caching import retry_unless_lasting
from softcon.flows.datasets import data_dataset, log_datasets
from softcon.flows.evaluate import resolve_checkpoint
from softcon.flows.finetune import FINETUNED_ARTIFACT
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.predict import PredictReport, run_predict

# Not cached: the maps are rewritten whole from the cube and the model.
predict_task = task(name="predict-tiles", retry_condition_fn=retry_unless_lasting)(run_predict)


def resolve_finetuned(model: str) -> str:
    """The ``finetuned.pt`` file of ``model``: the file itself, or the one a finetune run logged (downloaded once)."""
    return str(resolve_checkpoint(model, FINETUNED_ARTIFACT))


@flow(name="predict")
def predict_flow(
    config: PredictConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Class maps of the chosen tiles and dates of ``config.cube`` by the fine-tuned model ``config.model``."""
    with run_stage("predict", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        report: PredictReport = predict_task(config, resolve_finetuned(config.model))
        log_datasets([data_dataset(config.cube, "cube")], [data_dataset(config.out, "predictions")])
        mlflow.log_dict(
            {"files": [str(path) for path in report.files], "class_names": report.class_names}, "predict.json"
        )
        stage.logger.info("wrote %d class maps to %s", len(report.files), config.out)
        return stage.result(config.out, report.metrics())
