"""Train flow: SoftCon pretraining of an encoder, every step recorded in MLflow."""

from __future__ import annotations

import logging

import mlflow
import torch
from prefect import flow, get_run_logger, task

from flows.result import StageResult
from flows.tracking import stage_run
from softcon.config import TrainConfig
from tasks.train import load_encoder, run_training

CHECKPOINT_ARTIFACT = "checkpoint"
"""Artifact folder of the final checkpoint in a train run; the evaluate stage reads it from there."""


class StepLogger:
    """Per-step metrics into one MLflow run, by id (the task may run in another thread than the flow),
    and a progress line in the flow-run log every ``every`` steps."""

    def __init__(self, run_id: str, total_steps: int, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.run_id = run_id
        self.total_steps = total_steps
        self.logger = logger
        self.every = max(total_steps // 10, 1)
        self.last_logged = 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=step, run_id=self.run_id)
        if step - self.last_logged >= self.every or step == self.total_steps:
            self.last_logged = step
            self.logger.info(
                "step %d/%d: loss %.4f (instance %.4f, soft %.4f), %.0f samples/s",
                step,
                self.total_steps,
                metrics.get("loss", float("nan")),
                metrics.get("instance", float("nan")),
                metrics.get("soft", float("nan")),
                metrics.get("samples_per_second", float("nan")),
            )


train_task = task(run_training, name="soft-contrastive-training")


def log_encoder(checkpoint: str) -> None:
    """Log the evaluation encoder as an MLflow model with an input/output signature."""
    encoder, meta = load_encoder(checkpoint)
    encoder.eval()
    size = int(meta.get("patch_size") or 32)
    example = torch.zeros(1, int(meta["in_chans"]), size, size)
    with torch.no_grad():
        output = encoder(example)
    signature = mlflow.models.infer_signature(example.numpy(), output.numpy())
    mlflow.pytorch.log_model(
        encoder, name="encoder", signature=signature, input_example=example.numpy(), pip_requirements=["torch", "timm"]
    )


@flow(name="train")
def train_flow(config: TrainConfig, parent_run_id: str | None = None, experiment: str | None = None) -> StageResult:
    """Pretrain on the training store; log loss terms per step, the checkpoint and the encoder."""
    logger = get_run_logger()
    with stage_run("train", config, parent_run_id=parent_run_id, experiment=experiment) as run:
        result = train_task(config, on_metrics=StepLogger(run.info.run_id, config.steps, logger))
        mlflow.log_metrics(
            {f"final_{name}": value for name, value in result.metrics.items()}
            | {"seconds": result.seconds, "samples_per_second": result.samples_per_second}
        )
        mlflow.log_artifact(str(result.checkpoint), artifact_path=CHECKPOINT_ARTIFACT)
        log_encoder(str(result.checkpoint))
        logger.info("trained %s for %d steps: loss %.4f", config.backbone, result.steps, result.metrics["loss"])
        return StageResult(stage="train", run_id=run.info.run_id, output=str(result.checkpoint), metrics=result.metrics)
