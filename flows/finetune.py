"""Finetune flow: a pretrained encoder fine-tuned on the user's labels (per-pixel land cover or multi-label).

The finetune run holds the configuration as params; per epoch the train loss, lr and val metric (step = epoch); the
best epoch's val and test metrics (``tasks/finetune.py`` names them); the fine-tuned model as the artifact
``finetuned/finetuned.pt``; the confusion matrix of the test split and, for segmentation, a few test patches' predicted
masks beside the truth as figures; the epoch history and class names as ``finetune.json``.
"""

from __future__ import annotations

import os

import mlflow
from prefect import flow

from softcon.config import FINETUNE_RANDOM, FINETUNE_WEIGHTS, FinetuneConfig
from softcon.flows.caching import stage_task
from softcon.flows.datasets import data_dataset, folder_dataset, log_datasets
from softcon.flows.evaluate import resolve_checkpoint
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.finetune import confusion_figure, finetune_rank, prediction_figure, run_finetune

FINETUNED_ARTIFACT = "finetuned"
"""Artifact folder of the fine-tuned model in a finetune run."""


def encoder_checkpoint(model: str) -> str | None:
    """The training checkpoint behind ``model`` (run id, file, ``models:/…``); None for ``random`` and
    ``weights:FILE``, which ``run_finetune`` builds itself."""
    if model == FINETUNE_RANDOM or model.startswith(FINETUNE_WEIGHTS):
        return None
    return str(resolve_checkpoint(model))


# Cached as train is (flows/caching.py): the same config on the same data and checkpoint reuses the model while its
# file, its examples and the run's artifact are intact; --refresh trains again.
finetune_task = stage_task(run_finetune, "finetune", name="finetune-encoder")


class EpochLogger:
    """Each epoch's metrics into the MLflow run ``run_id``, by id: the task may run in another thread than the
    flow's active run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch, run_id=self.run_id)


def finetune_on_this_rank(config: FinetuneConfig, *, refresh: bool = False) -> StageResult | None:
    """The finetune stage as each process of a ``torchrun`` job runs it (one process alone is rank 0).

    Rank 0 runs ``finetune_flow``, which records to MLflow and writes the model; the other ranks train their shard
    in step with it (``finetune_rank``) and return None. Under torchrun the cache is bypassed, as for train: a
    cached result on rank 0 would leave the other ranks waiting.
    """
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1 and rank != 0:
        finetune_rank(config, encoder_checkpoint(config.model))
        return None
    return finetune_flow(config, refresh=refresh or world_size > 1)


@flow(name="finetune")
def finetune_flow(
    config: FinetuneConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Fine-tune the encoder of ``config.model`` with a segmentation or multi-label head; log the metrics, the model,
    the confusion matrix and example predictions."""
    with run_stage("finetune", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh) as stage:
        report = stage.call(finetune_task, config, encoder_checkpoint(config.model), on_epoch=EpochLogger(stage.run_id))
        if config.store is not None:
            read = data_dataset(config.store, "store")
        else:
            assert config.bigearthnet is not None  # FinetuneConfig requires a store or a folder
            read = folder_dataset(config.bigearthnet, "bigearthnet", {"location": config.bigearthnet})
        log_datasets([read], [data_dataset(str(report.checkpoint), "finetuned")])
        mlflow.log_artifact(str(report.checkpoint), artifact_path=FINETUNED_ARTIFACT)
        mlflow.log_dict({"class_names": report.class_names, "history": report.history}, "finetune.json")
        mlflow.log_figure(confusion_figure(report.confusion, report.class_names, report.task), "confusion_matrix.png")
        if report.examples is not None:
            mlflow.log_figure(prediction_figure(report.examples, report.class_names), "predictions.png")
        metric = "miou" if report.task == "segmentation" else "map_micro"
        split = "test" if f"test/{metric}" in report.metrics else "val"
        stage.logger.info(
            "fine-tuned (%s, %s) for %d epochs, best epoch %d: %s %s %.3f",
            report.task, config.freeze, report.epochs_run, report.best_epoch, split, metric,
            report.metrics[f"{split}/{metric}"],
        )  # fmt: skip
        return stage.result(str(report.checkpoint), report.metrics)
