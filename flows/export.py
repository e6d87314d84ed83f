"""Export flow: a trained encoder, or a fine-tuned model, as a timm folder, ONNX or TorchScript, with its model card
and STAC Item, logged as artifacts of the export's own MLflow run."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from prefect import flow, task

from softcon.config import ExportConfig
from softcon.flows.caching import retry_unless_lasting
from softcon.flows.evaluate import resolve_checkpoint
from softcon.flows.finetune import FINETUNED_ARTIFACT
from softcon.flows.registry import REGISTRY_PREFIX, registry_run_id
from softcon.flows.result import StageResult
from softcon.flows.tracking import run_stage
from softcon.tasks.export import run_export
from softcon.tasks.model_card import Evaluation, TrainRecord

EXPORT_ARTIFACT = "export"
"""Artifact folder of the exported files in the export run."""
SOURCE_PARAMS: dict[str, tuple[str, ...]] = {
    "ingest": ("stac", "collections", "bbox", "start", "end"),
    "labels": ("source", "scheme", "collection", "year"),
}
"""The params of a pipeline's ingest and labels runs that say where the training data came from."""

# Not cached: an export rewrites a few files from the checkpoint in seconds.
export_task = task(name="export-encoder", retry_condition_fn=retry_unless_lasting)(run_export)


def _evaluations(model: str) -> list[Evaluation]:
    """The evaluate runs (any experiment) whose ``model`` param is ``model``, with the model's own metrics."""
    if "'" in model:  # not a run id or a registry URI: nothing to search for
        return []
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"params.model = '{model}' and tags.`softcon.stage` = 'evaluate'",
        output_format="list",
    )
    return [
        Evaluation(run.info.run_id, {k: v for k, v in run.data.metrics.items() if not k.startswith("baselines/")})
        for run in runs
    ]


def run_stage_of(model: str) -> str | None:
    """The ``softcon.stage`` tag of the MLflow run ``model`` names; None when it names no run (a file, a
    ``models:/`` URI, text that is no run id, a run MLflow does not know)."""
    if model.startswith(REGISTRY_PREFIX) or Path(model).is_file() or not re.fullmatch(r"[A-Za-z0-9][\w-]*", model):
        return None
    try:
        return mlflow.MlflowClient().get_run(model).data.tags.get("softcon.stage")
    except Exception:  # MLflow raises several types for an unknown id; resolve_checkpoint says what is wrong
        return None


def resolve_model(model: str) -> Path:
    """The file behind ``model``: a checkpoint or ``finetuned.pt`` file itself, a finetune run's ``finetuned.pt``,
    or a train run's (or registered version's) checkpoint."""
    return resolve_checkpoint(model, FINETUNED_ARTIFACT if run_stage_of(model) == "finetune" else None)


def train_record(model: str) -> TrainRecord | None:
    """What MLflow holds of the train (or finetune) run behind ``model`` (a run id or ``models:/…``); None for a
    checkpoint file: its code version, the STAC and label sources of its pipeline run, and the evaluate runs of the
    model."""
    registered = model if model.startswith(REGISTRY_PREFIX) else None
    if registered is None and Path(model).is_file():
        return None
    run_id = registry_run_id(model) if registered else model
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    sources: dict[str, dict[str, str]] = {}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        for sibling in client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"):
            stage = sibling.data.tags.get("softcon.stage", "")
            params = {k: sibling.data.params[k] for k in SOURCE_PARAMS.get(stage, ()) if k in sibling.data.params}
            if params:
                sources[stage] = params
    evaluations = _evaluations(run_id) + (_evaluations(registered) if registered else [])
    return TrainRecord(
        run_id=run_id,
        code_version=run.data.tags.get("softcon.code_version"),
        registered=registered,
        sources=sources,
        evaluations=tuple(evaluations),
    )


@flow(name="export")
def export_flow(config: ExportConfig, parent_run_id: str | None = None, experiment: str | None = None) -> StageResult:
    """Export ``config.model`` in ``config.format`` to ``config.out``, checked against the model, with its model
    card and STAC Item; log the written files as the run's ``export`` artifacts."""
    with run_stage("export", config, parent_run_id=parent_run_id, experiment=experiment) as stage:
        checkpoint = resolve_model(config.model)
        record = train_record(config.model)
        report = export_task(config, str(checkpoint), record)
        for name in report.files:
            mlflow.log_artifact(str(Path(report.out) / name), artifact_path=EXPORT_ARTIFACT)
        if record is not None:
            mlflow.set_tag(f"softcon.{run_stage_of(record.run_id) or 'train'}_run_id", record.run_id)
        stage.logger.info(
            "exported %s as %s to %s (%d features, largest difference from the model %.2g)",
            config.model, config.format, report.out, report.num_features, report.max_abs_diff,
        )  # fmt: skip
        return stage.result(report.out, report.metrics())
