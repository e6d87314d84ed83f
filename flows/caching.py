"""Cache policies of the stage tasks: a re-run with the same inputs, code and data skips finished work.

A stage task's cache key is made of three parts:

* ``INPUTS``: the task's arguments (the stage config), minus callbacks and per-run paths;
* ``TASK_SOURCE``: the source of the wrapped function, so changed code runs again;
* :class:`DataFingerprint`: the state of the data the task reads, so that a cube that gained dates or a
  store that was rewritten runs again even with the same config. For a Zarr store (cube, training store)
  the fingerprint hashes the *contents* of every ``zarr.json`` in it (array shapes, dtypes, attributes:
  the cube's time coordinates' lengths and STAC item ids, the store's ``fingerprint``/``complete`` attrs),
  not modification times, so a stage that rewrites the same bytes (labels into the cube) keys the same
  afterwards. A plain file (a raster source, pretrained weights, a checkpoint) is hashed by content up to
  64 MiB and by size + mtime above that. A Zarr store on object storage (``s3://``, ``gs://``, ``az://`` …) is
  fingerprinted the same way, from the metadata of every node read through zarr (one request per group or
  array, never a listing of the chunks), so a cube on S3 that gained dates runs preprocess again; any other URL
  (a STAC API, an HTTP raster), or a store that cannot be read, contributes its text only.

Results are persisted (``persist_result=True``) under ``<SOFTCON_HOME>/prefect/results``
(``configure_runtime`` sets ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``), so a later process — the CLI again, a
deployment run on a worker — finds them. ``--refresh`` (the flows' ``refresh`` parameter) sets Prefect's
``refresh_cache`` and forces the work.

A key alone cannot tell whether the work is still there: an absent cube always looks the same, so deleting
a cube or a training store and running the stage again used to return the old result over nothing. So a
stage task (``stage_task``) returns :class:`flows.outputs.Produced`, the result with the state of its
outputs when it finished (Zarr node metadata and chunk files, a file's digest) and the MLflow run it ran
under, and :class:`ValidOutputs` uses a cached result only while every output is as it was left and that
MLflow run still holds its artifacts. Otherwise it logs why ("output … is missing / changed since the
cached run …: running again"), expires the record, and the stage runs again and records its new outputs.
Since a cube is ingest's output, ingest and labels key on their request and source only: the cube's state
is checked as their output, so a second run over an untouched cube is a cache hit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import State, Task, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy, Inputs
from prefect.context import TaskRunContext
from pydantic import BaseModel

from softcon.flows.outputs import Produced, restore_from_mlflow, stale_reason, states
from softcon.tasks.cube_store import quiet_lock_folder
from softcon.tasks.stac_access import is_url

FULL_HASH_LIMIT = 64 * 2**20
"""Files up to this size are hashed by content; larger ones by size and modification time."""
OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
"""fsspec protocols whose URLs are fingerprinted as Zarr stores (zarr.json contents), not by their text."""

logger = logging.getLogger(__name__)


def _zarr_url_fingerprint(url: str) -> str | None:
    """Hash of the metadata of every group and array of the Zarr store at ``url``; None when it is unreadable."""
    import zarr

    try:
        root = zarr.open_group(url, mode="r", use_consolidated=False)
        with quiet_lock_folder():
            nodes = [("", root), *sorted(root.members(max_depth=None), key=lambda pair: pair[0])]
    except Exception as error:  # an absent store, missing credentials, an unreachable endpoint: key on the URL
        logger.debug("no Zarr fingerprint for %s (%s); keying on the URL", url, type(error).__name__)
        return None
    digest = hashlib.sha256()
    for path, node in nodes:
        digest.update(path.encode())
        digest.update(json.dumps(node.metadata.to_dict(), sort_keys=True, default=str).encode())
    return f"zarr:{digest.hexdigest()[:16]}"


def path_fingerprint(location: str | Path | None) -> str:
    """A short hash of the data at ``location``: Zarr metadata contents, a file's bytes, or the URL."""
    if location is None:
        return "none"
    text = str(location)
    if is_url(text):
        if text.split("://", 1)[0].lower() in OBJECT_STORE_PROTOCOLS:
            return _zarr_url_fingerprint(text) or f"url:{text}"
        return f"url:{text}"
    path = Path(text)
    digest = hashlib.sha256()
    if path.is_file():
        stat = path.stat()
        if stat.st_size <= FULL_HASH_LIMIT:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"file:{digest.hexdigest()[:16]}"
    if path.is_dir():
        metadata = sorted(path.rglob("zarr.json"))
        if metadata:
            for meta in metadata:
                digest.update(str(meta.relative_to(path)).encode())
                digest.update(meta.read_bytes())
            return f"zarr:{digest.hexdigest()[:16]}"
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"dir:{digest.hexdigest()[:16]}"
    return "absent"


@dataclass
class DataFingerprint(CachePolicy):
    """Cache-key part from the data behind the path fields of the task's config (and path arguments).

    Args:
        fields: config attributes that name data the task reads (``cube``, ``store``, ``source`` …).
        path_args: task arguments that are paths themselves (the evaluate task's ``checkpoint``).
    """

    fields: tuple[str, ...] = ()
    path_args: tuple[str, ...] = ()
    config_arg: str = "config"

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        parts: list[str] = []
        config = inputs.get(self.config_arg)
        if isinstance(config, BaseModel):
            for name in self.fields:
                parts.append(f"{name}={path_fingerprint(getattr(config, name, None))}")
        for name in self.path_args:
            parts.append(f"{name}={path_fingerprint(inputs.get(name))}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _mlflow_run_problem(run_id: str | None, artifact_path: str | None) -> str | None:
    """Why the MLflow run that recorded a cached result no longer stands for it, or None."""
    if run_id is None:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
        if run.info.lifecycle_stage != "active":
            return f"MLflow run {run_id} that recorded the cached result was deleted"
        if artifact_path and not client.list_artifacts(run_id, artifact_path):
            return f"MLflow run {run_id} that recorded the cached result has lost its '{artifact_path}' artifacts"
    except MlflowException as error:
        return f"MLflow run {run_id} that recorded the cached result cannot be read ({error.message})"
    return None


def _ingested_parts(node: str) -> bool:
    """Ingest's share of the cube: the tiles' data arrays and coordinates, not land cover or the root (whose
    attributes hold the backfill ledger, written after each period)."""
    return node != "" and node.rsplit("/", 1)[-1] != "landcover"


def _landcover_parts(node: str) -> bool:
    """Labels' share of the cube: each tile's ``landcover`` array."""
    return node.rsplit("/", 1)[-1] == "landcover"


@dataclass
class _Policy:
    """What one stage task keys on, what it writes, and how to find that in its result.

    ``policy()`` builds the Prefect cache policy; ``outputs(result)`` lists the output locations of a result,
    ``parts`` picks the nodes of a shared Zarr store that belong to this stage, and ``mlflow_artifacts`` names
    the artifact folder the stage's MLflow run must still hold.
    """

    data_fields: tuple[str, ...]
    outputs: Callable[[Any], Iterable[str | Path]]
    exclude_inputs: tuple[str, ...] = ()
    path_args: tuple[str, ...] = ()
    parts: Callable[[str], bool] | None = None
    mlflow_artifacts: str | None = None

    def policy(self) -> CachePolicy:
        inputs: CachePolicy = Inputs(exclude=list(self.exclude_inputs)) if self.exclude_inputs else INPUTS
        key = inputs + TASK_SOURCE + DataFingerprint(fields=self.data_fields, path_args=self.path_args)
        return ValidOutputs(key=key, check=self.stale_reason)

    def stale_reason(self, produced: Any) -> str | None:
        if not isinstance(produced, Produced):
            return "the cached result predates output checks"
        reason = stale_reason(produced, self.parts)
        if reason and self.mlflow_artifacts and (restored := restore_from_mlflow(produced, self.mlflow_artifacts)):
            _run_logger().info("restored %s from MLflow run %s", ", ".join(restored), produced.mlflow_run_id)
            reason = stale_reason(produced, self.parts)
        return reason or _mlflow_run_problem(produced.mlflow_run_id, self.mlflow_artifacts)

    def produced(self, value: Any) -> Produced[Any]:
        import mlflow

        active = mlflow.active_run()
        return Produced(
            value=value,
            outputs=states(self.outputs(value), self.parts),
            mlflow_run_id=active.info.run_id if active else None,
        )


@dataclass
class ValidOutputs(CachePolicy):
    """A cache policy that answers with ``key``'s record only while ``check`` finds its outputs intact.

    A stale record is expired in place (rewritten with an expiration in the past, through the task's own
    result store, local or remote), so Prefect runs the task and overwrites it under the same key.
    """

    key: CachePolicy = field(kw_only=True)
    check: Callable[[Any], str | None] = field(kw_only=True)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        key = self.key.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is None or task_ctx is None or task_ctx.task.refresh_cache:
            return key
        store = task_ctx.result_store
        if not store.exists(key):
            return key
        try:
            reason = self.check(store.read(key).result)
        except Exception as error:  # an unreadable record (other code, a torn write) is no answer either
            reason = f"the cached result cannot be read ({type(error).__name__}: {error})"
        if reason:
            _run_logger().warning("%s: running again", reason)
            expired = datetime.now(UTC) - timedelta(seconds=1)  # an aware datetime is what Prefect's DateTime holds
            store.write(None, key=key, expiration=expired)  # type: ignore[arg-type]
        return key


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (its lines reach the flow-run log and the CLI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


STAGE_POLICIES: dict[str, _Policy] = {
    # Ingest reads the cube (which days it holds) and writes it: its state is checked as ingest's output, not
    # keyed, so an untouched cube gives a cache hit and a deleted or damaged one runs again.
    "ingest": _Policy(data_fields=(), outputs=lambda report: [report.cube], parts=_ingested_parts),
    "labels": _Policy(data_fields=("source",), outputs=lambda report: [report.cube], parts=_landcover_parts),
    "preprocess": _Policy(
        data_fields=("cube",),
        outputs=lambda report: [report.store],
        exclude_inputs=("client",),
    ),
    "train": _Policy(
        data_fields=("store", "weights"),
        outputs=lambda result: [result.checkpoint],
        exclude_inputs=("on_metrics",),
        mlflow_artifacts="checkpoint",
    ),
    # As train's: the data (a store or folder, a weights:FILE) and the pretraining checkpoint by their bytes; the
    # epoch logger is not an input. A hit needs the model file, the example patches and the run's artifact.
    "finetune": _Policy(
        data_fields=("store", "bigearthnet", "weights_file"),
        outputs=lambda report: [report.checkpoint, *([report.examples] if report.examples else [])],
        exclude_inputs=("checkpoint", "on_epoch"),
        path_args=("checkpoint",),
        mlflow_artifacts="finetuned",
    ),
    # A checkpoint's path says nothing of its contents (a file rewritten in place; one run cached under each
    # project home): key on its bytes, not its path.
    "evaluate": _Policy(
        data_fields=("store", "bigearthnet", "eurosat", "weights"),
        outputs=lambda result: [path for r in result.results for path in (*r.feature_files, r.scores_file)],
        exclude_inputs=("checkpoint",),
        path_args=("checkpoint",),
        mlflow_artifacts="features",
    ),
}


def stage_cache_policy(stage: str) -> CachePolicy:
    """The cache policy of a stage task: inputs + task source + fingerprint of the data it reads.

    Raises:
        ValueError: for an unknown stage name.
    """
    if stage not in STAGE_POLICIES:
        raise ValueError(f"no cache policy for stage {stage!r}; known: {sorted(STAGE_POLICIES)}")
    return STAGE_POLICIES[stage].policy()


def cache_options(stage: str) -> dict[str, Any]:
    """Keyword arguments for ``task(...)``: the stage's cache policy, with results persisted (to the object store
    named by ``SOFTCON_RESULTS_URL`` when set: flows/result_storage.py)."""
    from softcon.flows.result_storage import task_result_storage

    options: dict[str, Any] = {"cache_policy": stage_cache_policy(stage), "persist_result": True}
    if (storage := task_result_storage()) is not None:
        options["result_storage"] = storage
    return options


LASTING_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotImplementedError)
"""Errors a stage raises on purpose about its input (bad input, a missing file or store): running the same task
again gives the same error, so they are not retried, and the CLI prints them as one line."""


def retry_unless_lasting(_task: object, _task_run: object, state: State) -> bool:
    """Retry a failed stage task unless its error is one that waiting does not fix (``LASTING_ERRORS``)."""
    return not isinstance(state.result(raise_on_failure=False), LASTING_ERRORS)


def stage_task(fn: Callable[..., Any], stage: str, **options: Any) -> Task[..., Produced[Any]]:
    """``fn`` as the stage's Prefect task: cached under the stage's policy, returning :class:`Produced`.

    The wrapper keeps ``fn``'s signature and source for Prefect (parameters, ``TASK_SOURCE``), so the key
    changes when ``fn``'s code does; callers take ``.value`` of what it returns. Retries (``options``) skip
    ``LASTING_ERRORS`` unless a ``retry_condition_fn`` is given.
    """
    spec = STAGE_POLICIES[stage]

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Produced[Any]:
        return spec.produced(fn(*args, **kwargs))

    options.setdefault("retry_condition_fn", retry_unless_lasting)
    return task(run, **options, **cache_options(stage))
