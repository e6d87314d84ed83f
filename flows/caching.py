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
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy, Inputs
from prefect.context import TaskRunContext
from pydantic import BaseModel

FULL_HASH_LIMIT = 64 * 2**20
"""Files up to this size are hashed by content; larger ones by size and modification time."""
OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
"""fsspec protocols whose URLs are fingerprinted as Zarr stores (zarr.json contents), not by their text."""

logger = logging.getLogger(__name__)


def _is_url(location: str) -> bool:
    return "://" in location


def _zarr_url_fingerprint(url: str) -> str | None:
    """Hash of the metadata of every group and array of the Zarr store at ``url``; None when it is unreadable."""
    import zarr

    try:
        root = zarr.open_group(url, mode="r", use_consolidated=False)
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
    if _is_url(text):
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


@dataclass
class _Policy:
    """What one stage task keys on; ``policy()`` builds the Prefect cache policy."""

    data_fields: tuple[str, ...]
    exclude_inputs: tuple[str, ...] = ()
    path_args: tuple[str, ...] = ()

    def policy(self) -> CachePolicy:
        inputs: CachePolicy = Inputs(exclude=list(self.exclude_inputs)) if self.exclude_inputs else INPUTS
        return inputs + TASK_SOURCE + DataFingerprint(fields=self.data_fields, path_args=self.path_args)


STAGE_POLICIES: dict[str, _Policy] = {
    # The cube is both what ingest reads (which days it already holds) and what it writes.
    "ingest": _Policy(data_fields=("cube",), exclude_inputs=("on_progress",)),
    "labels": _Policy(data_fields=("cube", "source")),
    "preprocess": _Policy(data_fields=("cube",), exclude_inputs=("client", "on_progress", "on_dashboard")),
    "train": _Policy(data_fields=("store", "weights"), exclude_inputs=("on_metrics",)),
    # A checkpoint's path says nothing of its contents (a file rewritten in place; one run cached under each
    # project home): key on its bytes, not its path.
    "evaluate": _Policy(
        data_fields=("store", "bigearthnet"), exclude_inputs=("checkpoint",), path_args=("checkpoint",)
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
    """Keyword arguments for ``task(...)``: the stage's cache policy, with results persisted."""
    return {"cache_policy": stage_cache_policy(stage), "persist_result": True}


def data_fingerprints(config: BaseModel, fields: Iterable[str]) -> dict[str, str]:
    """The fingerprint of each named path field (for logging what a cache key saw)."""
    return {name: path_fingerprint(getattr(config, name, None)) for name in fields}
