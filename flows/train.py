"""Train flow: SoftCon pretraining of an encoder, every step recorded in MLflow.

The train run holds: the stage's configuration as params; per-window loss terms (loss, instance, soft),
lr, samples/s, embedding std and the collapse flag, and on CUDA the GPU memory, as step metrics; MLflow's
system metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU ones when pynvml is
installed) sampled in the background; the final checkpoint as an artifact; and the EMA teacher encoder as
an MLflow model with an input/output signature, registered under ``config.registered_model_name``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

import mlflow
import torch
from prefect import flow

from softcon.config import TrainConfig
from softcon.flows.caching import stage_task
from softcon.flows.datasets import data_dataset, log_datasets
from softcon.flows.result import StageResult
from softcon.flows.tracking import code_version, run_stage
from softcon.models.training_store import read_store_attrs
from softcon.tasks.train import load_encoder, read_checkpoint, run_training

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


train_task = stage_task(run_training, "train", name="soft-contrastive-training")


SYSTEM_METRICS_INTERVAL_S = 10.0
"""Seconds between system-metric samples (MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)."""


@contextmanager
def system_metrics(run_id: str, *, enabled: bool = True) -> Iterator[None]:
    """MLflow system metrics (CPU, memory, disk, network, GPU) of this process for the run, in a thread.

    Started here rather than by ``mlflow.start_run(log_system_metrics=True)`` so that only the train run is
    monitored, not the pipeline's other stages; one last sample is taken at the end, so even a run shorter
    than the sampling interval has its system metrics.
    """
    if not enabled:
        yield
        return
    from softcon.compat.mlflow_monitor import finish_system_metrics, start_system_metrics

    monitor = start_system_metrics(run_id, SYSTEM_METRICS_INTERVAL_S)
    try:
        yield
    finally:
        finish_system_metrics(monitor)


def log_encoder(checkpoint: str, registered_model_name: str | None = None) -> str:
    """Log the evaluation encoder as an MLflow model with an input/output signature; return its URI.

    With ``registered_model_name`` the model is also registered (a new version of that name) in the
    tracking server's model registry (the embedded SQLite backend has one).
    """
    encoder, meta = load_encoder(checkpoint)
    encoder.eval()
    size = int(meta.get("img_size") or 32)
    example = torch.zeros(1, int(meta["in_chans"]), size, size)
    with torch.no_grad():
        output = encoder(example)
    signature = mlflow.models.infer_signature(example.numpy(), output.numpy())
    info = mlflow.pytorch.log_model(
        encoder,
        name="encoder",
        signature=signature,
        input_example=example.numpy(),
        pip_requirements=[f"{name}=={version(name)}" for name in ("torch", "timm")],  # as pip has them installed
        metadata=model_metadata(meta, read_checkpoint(checkpoint)["config"]),
        registered_model_name=registered_model_name,
    )
    return info.model_uri


def model_metadata(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What a user of the MLflow model needs to feed it and trace it: input contract (from the checkpoint's meta)
    and lineage (its training config's store, and what that store records of its source)."""
    store = config.get("store")
    attrs = read_store_attrs(store) if store else None
    return {
        "backbone": meta.get("backbone"),
        "sensor": meta.get("sensor"),
        "bands": list(meta.get("bands") or []),
        "normalisation": {"rule": "z-score per band; nodata (S2 0, S1 NaN) -> 0 after it", **meta["norm_stats"]},
        "image_size": meta.get("img_size"),
        "class_names": list(meta.get("class_names") or []),
        "lineage": {
            "store": store,
            "store_fingerprint": (attrs or {}).get("fingerprint"),
            "cube": (attrs or {}).get("cube"),
            "source": (attrs or {}).get("source", "cube"),
            "code_version": code_version(),
        },
    }


@flow(name="train")
def train_flow(
    config: TrainConfig, parent_run_id: str | None = None, experiment: str | None = None, refresh: bool = False
) -> StageResult:
    """Pretrain on the training store; log loss terms per step, the checkpoint and the encoder."""
    with run_stage(
        "train", config, parent_run_id=parent_run_id, experiment=experiment, refresh=refresh,
        quiet_progress=frozenset({"steps"}),  # StepLogger logs every tenth with the loss terms
    ) as stage:  # fmt: skip
        with system_metrics(stage.run_id, enabled=config.log_system_metrics):
            result = stage.call(train_task, config, on_metrics=StepLogger(stage.run_id, config.steps, stage.logger))
        mlflow.log_metrics(
            {f"final_{name}": value for name, value in result.metrics.items()}
            | {"seconds": result.seconds, "samples_per_second": result.samples_per_second}
        )
        mlflow.log_artifact(str(result.checkpoint), artifact_path=CHECKPOINT_ARTIFACT)
        log_datasets([data_dataset(config.store, "store")])
        log_encoder(str(result.checkpoint), config.registered_model_name)
        stage.logger.info("trained %s for %d steps: loss %.4f", config.backbone, result.steps, result.metrics["loss"])
        return StageResult(stage="train", run_id=stage.run_id, output=str(result.checkpoint), metrics=result.metrics)


def train_on_this_rank(config: TrainConfig, *, refresh: bool = False) -> StageResult | None:
    """The train stage as each process of a ``torchrun`` job runs it (one process alone is rank 0).

    Rank 0 runs ``train_flow``, which records to MLflow; the other ranks run the same training loop, which joins
    the process group and leaves logging and checkpoints to rank 0, and return None. Under torchrun the cache is
    bypassed: a cached result on rank 0 would leave the other ranks waiting for it.
    """
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1 and rank != 0:
        run_training(config)
        return None
    return train_flow(config, refresh=refresh or world_size > 1)
