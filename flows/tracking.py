"""MLflow bookkeeping shared by the stage flows: one run per stage, nested under the pipeline's run.

Each stage run carries the stage's full configuration as params, the Prefect flow-run id and the code
version as tags, so any record in MLflow leads back to the Prefect run and the commit that made it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from prefect.runtime import flow_run
from pydantic import BaseModel

from softcon.flows.result_storage import check_result_storage
from softcon.settings import get_settings

MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on one param value


def code_version() -> str:
    """The git commit of the code (with ``+dirty`` when it has local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}+dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        try:
            return version("softcon-pipeline")
        except PackageNotFoundError:
            return "unknown"


def flatten_params(config: BaseModel, prefix: str = "") -> dict[str, str]:
    """A config as flat MLflow params (``train.lr``), lists as JSON."""
    params: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                visit(inner, f"{key}.{name}" if key else str(name))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            params[key] = text[:MAX_PARAM_LENGTH]

    visit(config.model_dump(mode="json"), prefix)
    return params


def use_experiment(name: str | None = None) -> str:
    """Select (creating if needed) the MLflow experiment, with artifacts under the project folder."""
    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = name or settings.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=f"{settings.artifact_root}/{name}")
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def stage_run(
    stage: str,
    config: BaseModel,
    *,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage (or of the pipeline when ``stage == "pipeline"``).

    A stage run of the pipeline is nested under ``parent_run_id``; one run alone is a top-level run.

    Raises:
        ResultStorageError: before anything is recorded or run, when ``SOFTCON_RESULTS_URL`` names a store this
            process cannot write (flows/result_storage.py).
    """
    check_result_storage()
    experiment_id = use_experiment(experiment)
    run_tags = {
        "softcon.stage": stage,
        "softcon.code_version": code_version(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_name": str(flow_run.name or ""),
        **(tags or {}),
    }
    with mlflow.start_run(
        run_name=stage,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags=run_tags,
    ) as run:
        mlflow.log_params(flatten_params(config))
        yield run
