"""What every stage flow does around its work: one MLflow run per stage, nested under the pipeline's run.

Each stage run carries the stage's full configuration as params, the Prefect flow-run id and the code
version as tags, so any record in MLflow leads back to the Prefect run and the commit that made it.
``run_stage`` is the one skeleton of a stage flow: it opens that run, writes the work's progress
(``softcon.progress``) to the flow-run log, runs the stage's cached task and hands on a ``StageResult``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from prefect import Task, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import BaseModel

from softcon import progress
from softcon.flows.result import StageResult
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


def runs_table_url(mlflow_url: str, experiment_id: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment (or the experiment list), in its model-training view.

    MLflow 3's UI opens an experiment on its GenAI overview (traces, evaluations) unless the browser chose "Model
    training" before; the ``workflowType`` parameter of the link chooses it.
    """
    base = mlflow_url.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


WARNING_TAG = "softcon.warning"
"""MLflow run tag holding a stage's warning (it wrote nothing, a split is empty)."""


def completed_with_warning(result: Any) -> Any:
    """A flow's return value: ``result`` itself, or a Completed state whose message is ``result.warning``.

    Prefect shows a returned state's message on the flow run, and a caller of the flow still gets ``result``.
    The warning is also logged and tagged on ``result.run_id``'s MLflow run.
    """
    if not result.warning:
        return result
    get_run_logger().warning(result.warning)
    mlflow.MlflowClient().set_tag(result.run_id, WARNING_TAG, result.warning[:5000])
    return Completed(message=result.warning, data=result)


@dataclass
class ProgressLog:
    """The work's progress into the flow-run log, about every tenth of each step; links as MLflow run tags."""

    run_id: str
    logger: logging.Logger | logging.LoggerAdapter
    quiet: frozenset[str] = frozenset()
    """Steps the flow logs itself (train's per-window loss lines): not repeated here."""
    last_logged: dict[str, int] = field(default_factory=dict)

    def on_progress(self, step: str, done: int, total: int) -> None:
        every = max(total // 10, 1)
        if step in self.quiet:
            return
        if done == total or done // every > self.last_logged.get(step, 0) // every:
            self.last_logged[step] = done
            self.logger.info("%s %d/%d", step, done, total)

    def on_link(self, name: str, url: str) -> None:
        # Tagged as soon as it is announced, so the link is in MLflow while the work runs; by run id, because
        # the task may run in another thread than the flow's active run.
        mlflow.MlflowClient().set_tag(self.run_id, name, url)
        self.logger.info("%s: %s", name, url)


@dataclass(frozen=True)
class Stage:
    """An open stage run: its MLflow run, the flow-run logger, and whether the cache is bypassed."""

    name: str
    run_id: str
    logger: logging.Logger | logging.LoggerAdapter
    refresh: bool

    def call(self, task: Task, *args: Any, **kwargs: Any) -> Any:
        """Run one of the stage's tasks (``flows/caching.py`` ``stage_task``) through the Prefect cache; its value."""
        return task.with_options(refresh_cache=self.refresh)(*args, **kwargs).value

    def result(self, output: str, metrics: dict[str, float], *, warning: str | None = None) -> Any:
        """Log the stage's metrics on its run and hand its outcome on, as the flow returns it.

        A ``warning`` (the stage wrote nothing, a split is empty: why, and what to change) goes to the flow-run
        log, onto the MLflow run as the tag ``softcon.warning``, and into the flow run's final state as its
        message, which the Prefect UI shows on the run; callers of the flow still receive the ``StageResult``.
        """
        mlflow.log_metrics(metrics)
        result = StageResult(stage=self.name, run_id=self.run_id, output=output, metrics=metrics, warning=warning)
        return completed_with_warning(result)


@contextmanager
def run_stage(
    name: str,
    config: BaseModel,
    *,
    parent_run_id: str | None = None,
    experiment: str | None = None,
    refresh: bool = False,
    quiet_progress: frozenset[str] = frozenset(),
) -> Iterator[Stage]:
    """The skeleton of a stage flow: its MLflow run (``stage_run``) with the work's progress in the flow-run log.

    Example (a stage flow)::

        with run_stage("labels", config, parent_run_id=..., experiment=..., refresh=refresh) as stage:
            report = stage.call(labels_task, config)
            return stage.result(config.cube, report.metrics())
    """
    logger = get_run_logger()
    with stage_run(name, config, parent_run_id=parent_run_id, experiment=experiment) as run:
        log = ProgressLog(run.info.run_id, logger, quiet_progress)
        with progress.listen(log.on_progress, log.on_link):
            yield Stage(name=name, run_id=run.info.run_id, logger=logger, refresh=refresh)
