"""Reproduce one stage run from its MLflow record and check that it made the same thing.

``softcon reproduce <run id>`` reads the stage (tag ``softcon.stage``) and its full configuration (the run's
params) from MLflow, runs that stage again with the same parameters and the same inputs (the same cube,
store or train run id), with ``refresh`` so the Prefect cache cannot answer for it, and compares:

* ingest: a fresh cube under ``<home>/data/reproductions/<run id>/``; every tile-date it holds must have the
  same bytes as in the original cube (which may since have gained dates);
* labels: a copy of the cube, labelled again; its ``landcover`` arrays must equal the original's;
* preprocess: a fresh training store; every array must equal the original store's;
* train: a fresh checkpoint folder; the student and teacher weights must equal the original run's logged
  checkpoint bit for bit (expected on CPU; GPU kernels need not be deterministic);
* evaluate: the same metrics;
* finetune: a fresh model folder; the fine-tuned encoder and head weights must equal the original run's logged
  ``finetuned.pt`` bit for bit (expected on CPU, as for train).

The new MLflow run is tagged ``softcon.reproduction_of=<old id>`` and ``softcon.reproduced=true|false``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from pydantic import BaseModel

from softcon.config import (
    EvaluateConfig,
    FinetuneConfig,
    IngestConfig,
    LabelsConfig,
    PreprocessConfig,
    TrainConfig,
)
from softcon.flows.registry import REGISTRY_PREFIX, registry_run_id
from softcon.settings import get_settings
from softcon.tasks.digest import array_digests, compare_digests, state_dict_digests
from softcon.tasks.stac_access import is_url

STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "ingest": IngestConfig,
    "labels": LabelsConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "finetune": FinetuneConfig,
}


@dataclass
class Reproduction:
    """The original run, the new one, and what differs (nothing, when reproduced)."""

    stage: str
    original_run_id: str
    run_id: str
    output: str
    compared: int
    """How many arrays, tensors or metrics were compared."""
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences and self.compared > 0


def _param_value(text: str) -> Any:
    """Undo ``flows.tracking.flatten_params``: JSON for lists and numbers, ``None``/booleans, else the text."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_params(stage: str, params: dict[str, str]) -> BaseModel:
    """The stage config an MLflow run was logged with (``a.b`` params become nested mappings).

    Raises:
        ValueError: for a stage that cannot be reproduced, or params that no longer validate.
    """
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"cannot reproduce a {stage!r} run; reproducible stages: {', '.join(STAGE_CONFIGS)}")
    data: dict[str, Any] = {}
    for key, text in params.items():
        *parents, leaf = key.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = _param_value(text)
    model = STAGE_CONFIGS[stage]
    # Strings that look like numbers (a run id of digits, a date) stay strings where the field says str.
    return model.model_validate(data)


def _stage_flow(stage: str) -> Any:
    from softcon.flows.evaluate import evaluate_flow
    from softcon.flows.finetune import finetune_flow
    from softcon.flows.ingest import ingest_flow
    from softcon.flows.labels import labels_flow
    from softcon.flows.preprocess import preprocess_flow
    from softcon.flows.train import train_flow

    return {
        "ingest": ingest_flow,
        "labels": labels_flow,
        "preprocess": preprocess_flow,
        "train": train_flow,
        "evaluate": evaluate_flow,
        "finetune": finetune_flow,
    }[stage]


def _original_checkpoint(run_id: str, artifact: str | None = None) -> Path:
    from softcon.flows.evaluate import resolve_checkpoint

    return resolve_checkpoint(run_id, artifact)


def reproduce_run(run_id: str, *, workdir: Path | None = None) -> Reproduction:
    """Run the stage of MLflow run ``run_id`` again with the same configuration and compare the outputs.

    Args:
        run_id: an MLflow stage run (ingest, labels, preprocess, train, evaluate or finetune), or
            ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` for the train run of a registered encoder.
        workdir: where fresh outputs go; default ``<home>/data/reproductions/<run_id>``.

    Raises:
        ValueError: for an unknown run id, a run that is not a stage run, or params that do not validate.
    """
    if run_id.startswith(REGISTRY_PREFIX):  # a registered encoder: its train run
        run_id = registry_run_id(run_id)
    if not re.fullmatch(r"[A-Za-z0-9][\w-]{0,255}", run_id):  # MLflow's run id rule; it becomes a folder name
        raise ValueError(f"{run_id!r} is not an MLflow run id (letters, digits, '_' and '-' only)")
    client = mlflow.MlflowClient()
    try:
        original = client.get_run(run_id)
    except Exception as error:  # MLflow raises several types for an unknown id
        raise ValueError(f"no MLflow run {run_id!r} at {mlflow.get_tracking_uri()}: {error}") from error
    stage = original.data.tags.get("softcon.stage", "")
    config: Any = config_from_params(stage, original.data.params)
    experiment = client.get_experiment(original.info.experiment_id).name
    workdir = Path(workdir or get_settings().data_dir / "reproductions" / run_id)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    compare: Any
    if stage == "ingest":
        old_cube = config.cube
        config = config.model_copy(update={"cube": str(workdir / "cube.zarr")})

        def compare(result: Any) -> tuple[int, list[str]]:
            if not Path(result.output).exists() and not is_url(result.output):
                # The run wrote nothing (every tile-date skipped), so no cube was created: that reproduces a run
                # that wrote nothing too, and nothing else. One thing compared: the count of tile-dates written.
                written = original.data.metrics.get("tile_dates_written", 0.0)
                differs = [f"the original wrote {written:g} tile-dates; this run wrote none"] if written else []
                return 1, differs
            new = array_digests(result.output)
            return len(new), compare_digests(new, array_digests(old_cube), subset=True)

    elif stage == "labels":
        old_cube = config.cube
        shutil.copytree(old_cube, workdir / "cube.zarr")
        config = config.model_copy(update={"cube": str(workdir / "cube.zarr")})

        def landcover(cube: str) -> dict[str, str]:
            return {key: value for key, value in array_digests(cube).items() if key.endswith("/landcover")}

        def compare(result: Any) -> tuple[int, list[str]]:
            new = landcover(result.output)
            return len(new), compare_digests(new, landcover(old_cube))

    elif stage == "preprocess":
        old_store = config.out
        config = config.model_copy(update={"out": str(workdir / "store.zarr")})

        def compare(result: Any) -> tuple[int, list[str]]:
            new = array_digests(result.output)
            return len(new), compare_digests(new, array_digests(old_store))

    elif stage == "train":
        config = config.model_copy(update={"out": str(workdir / "checkpoints"), "resume": False})

        def compare(result: Any) -> tuple[int, list[str]]:
            new = state_dict_digests(result.output)
            return len(new), compare_digests(new, state_dict_digests(_original_checkpoint(run_id)))

    elif stage == "finetune":
        from softcon.flows.finetune import FINETUNED_ARTIFACT

        config = config.model_copy(update={"out": str(workdir / "finetune")})
        weights = ("encoder", "head")

        def compare(result: Any) -> tuple[int, list[str]]:
            new = state_dict_digests(result.output, keys=weights)
            old = state_dict_digests(_original_checkpoint(run_id, FINETUNED_ARTIFACT), keys=weights)
            return len(new), compare_digests(new, old)

    else:  # evaluate

        def compare(result: Any) -> tuple[int, list[str]]:
            old = original.data.metrics
            names = sorted(result.metrics)
            return len(names), [
                f"{name}: {old.get(name)} -> {result.metrics[name]}"
                for name in names
                if old.get(name) is None or abs(old[name] - result.metrics[name]) > 1e-9
            ]

    result = _stage_flow(stage)(config, experiment=experiment, refresh=True)
    compared, differences = compare(result)
    reproduction = Reproduction(stage, run_id, result.run_id, result.output, compared, differences)
    client.set_tag(result.run_id, "softcon.reproduction_of", run_id)
    client.set_tag(result.run_id, "softcon.reproduced", str(reproduction.identical).lower())
    if differences:
        client.log_dict(result.run_id, {"differences": differences}, "reproduction_differences.json")
    return reproduction
