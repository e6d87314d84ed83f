"""What a stage left behind, recorded with its cached result, so a cache hit never stands in for missing output.

A stage task returns :class:`Produced`: its own result plus the :class:`OutputState` of every output it
wrote, taken when it finished, and the MLflow run it ran under. Before a cached result is used
(``flows/caching.py``), :func:`stale_reason` compares those states with what is there now: an output that
is missing, lost chunk files, changed metadata or a changed file makes the stage run again, and the reason
is logged.

The state of a Zarr store (cube, training store) is one :class:`PartState` per group or array: a digest of
its ``zarr.json`` and the count and total size of the chunk (shard) files under it, read from one listing
(local disk or any fsspec URL, e.g. ``s3://``), no chunk decoded. A file (a checkpoint, cached features) is
its SHA-256 and size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

from softcon.tasks.stac_access import is_url

R = TypeVar("R")

FILE_PART = "<file>"
"""The one part of a plain file's state (a Zarr store's root group is the part "")."""
SHOWN_CHANGES = 4
"""How many changed parts a stale-output message names before it says "and N more"."""


@dataclass(frozen=True)
class PartState:
    """One group or array of a Zarr store (or a whole file): its metadata digest, files and bytes."""

    metadata: str
    """SHA-256 (16 hex digits) of the node's ``zarr.json``, or of a file's bytes."""
    files: int
    """Chunk or shard files under the node (not under its child nodes); 1 for a file."""
    size: int
    """Their total size in bytes."""


@dataclass(frozen=True)
class OutputState:
    """What was at ``location``: ``parts`` by node path (``tiles/32632_0_0/s2``), empty when absent."""

    location: str
    exists: bool
    parts: dict[str, PartState] = field(default_factory=dict)


@dataclass(frozen=True)
class Produced(Generic[R]):
    """A stage task's result, the state of its outputs when it finished and the MLflow run it ran under."""

    value: R
    outputs: tuple[OutputState, ...]
    mlflow_run_id: str | None = None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()[:16]


def _list_files(location: str) -> dict[str, int] | None:
    """Every file under ``location`` (relative POSIX path → size); None when nothing is there."""
    if not is_url(location):
        root = Path(location)
        if not root.is_dir():
            return None
        files: dict[str, int] = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                files[path.relative_to(root).as_posix()] = path.stat().st_size
        return files
    import fsspec

    fs, root_path = fsspec.core.url_to_fs(location)
    fs.invalidate_cache(root_path)  # a listing cached earlier in this process would hide a deletion
    found = fs.find(root_path, detail=True)
    if not found:
        return None
    prefix = root_path.rstrip("/") + "/"
    return {path[len(prefix) :]: int(info.get("size") or 0) for path, info in found.items() if path.startswith(prefix)}


def _node(path: PurePosixPath) -> str:
    """A node's path as zarr names it: "" for the root."""
    return "" if str(path) == "." else str(path)


def _metadata_file(node: str) -> str:
    return f"{node}/zarr.json" if node else "zarr.json"


def _read_metadata(location: str, names: Sequence[str]) -> dict[str, bytes]:
    if not is_url(location):
        return {name: (Path(location) / name).read_bytes() for name in names}
    import fsspec

    fs, root_path = fsspec.core.url_to_fs(location)
    paths = {f"{root_path.rstrip('/')}/{name}": name for name in names}
    return {paths[path]: content for path, content in fs.cat(list(paths)).items()}


def output_state(location: str | Path, include: Callable[[str], bool] | None = None) -> OutputState:
    """The state of the file or Zarr store at ``location`` now; ``include`` keeps only some node paths.

    Raises:
        OSError: when the location exists but cannot be listed or read (permissions, network).
    """
    text = str(location)
    if not is_url(text) and Path(text).is_file():
        path = Path(text)
        return OutputState(text, True, {FILE_PART: PartState(_file_digest(path), 1, path.stat().st_size)})
    files = _list_files(text)
    if files is None:
        return OutputState(text, False)
    nodes = sorted(_node(PurePosixPath(name).parent) for name in files if PurePosixPath(name).name == "zarr.json")
    if not nodes:  # a plain folder: one part per file
        return OutputState(text, True, {name: PartState("", 1, size) for name, size in sorted(files.items())})
    node_set = set(nodes)
    counts = {node: [0, 0] for node in nodes}
    for name, size in files.items():
        file = PurePosixPath(name)
        if file.name == "zarr.json" and _node(file.parent) in node_set:
            continue
        parent = file.parent
        while _node(parent) not in node_set and _node(parent):
            parent = parent.parent
        if _node(parent) in counts:
            counts[_node(parent)][0] += 1
            counts[_node(parent)][1] += size
    kept = [node for node in nodes if include is None or include(node)]
    metadata = _read_metadata(text, [_metadata_file(node) for node in kept])
    parts = {node: PartState(_digest(metadata[_metadata_file(node)]), *counts[node]) for node in kept}
    return OutputState(text, True, parts)


def describe_changes(recorded: OutputState, now: OutputState) -> list[str]:
    """What differs between the recorded state of an output and its state now, part by part."""
    if not now.exists:
        return ["missing"]
    changes = []
    for name, before in recorded.parts.items():
        where = name or "root"
        after = now.parts.get(name)
        if after is None:
            changes.append(f"{where} is gone")
        elif name == FILE_PART:
            if after != before:
                changes.append(f"contents changed ({after.size} bytes, was {before.size})")
        elif after.metadata != before.metadata:
            changes.append(f"{where}: metadata changed")
        elif after.files < before.files:
            changes.append(f"{where}: {after.files} chunk files, was {before.files}")
        elif after != before:
            changes.append(f"{where}: chunk files changed ({after.size} bytes, was {before.size})")
    changes.extend(f"{name or 'root'} is new" for name in now.parts if name not in recorded.parts)
    return changes


def stale_reason(produced: Produced[Any], include: Callable[[str], bool] | None = None) -> str | None:
    """Why a cached result no longer stands for what is on disk, or None when every output is as it was left."""
    for recorded in produced.outputs:
        try:
            now = output_state(recorded.location, include)
        except OSError as error:
            return f"output {recorded.location} cannot be read ({error})"
        changes = describe_changes(recorded, now)
        if changes == ["missing"]:
            return f"output {recorded.location} is missing"
        if changes:
            shown = "; ".join(changes[:SHOWN_CHANGES])
            more = f"; and {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
            return f"output {recorded.location} changed since the cached run ({shown}{more})"
    return None


def restore_from_mlflow(produced: Produced[Any], artifact_path: str) -> list[str]:
    """Bring back each missing output file from the MLflow run that logged it under ``artifact_path``.

    Where the work runs in short-lived pods the checkpoint a cached train result names is gone with the pod
    that wrote it, while the run's artifact is not: a file is restored only when the artifact has the
    recorded digest, so what comes back is what was produced. Returns the restored paths.
    """
    if produced.mlflow_run_id is None:
        return []
    import mlflow
    from mlflow.exceptions import MlflowException

    restored = []
    for recorded in produced.outputs:
        path = Path(recorded.location)
        if is_url(recorded.location) or path.exists() or set(recorded.parts) != {FILE_PART}:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".restore-") as staging:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=produced.mlflow_run_id, artifact_path=f"{artifact_path}/{path.name}", dst_path=staging
                )
            except (MlflowException, OSError):
                continue
            if output_state(local).parts.get(FILE_PART) == recorded.parts[FILE_PART]:
                os.replace(local, path)
                restored.append(str(path))
    return restored


def states(locations: Iterable[str | Path], include: Callable[[str], bool] | None = None) -> tuple[OutputState, ...]:
    """The state of each output location now (each once, in order)."""
    return tuple(output_state(location, include) for location in dict.fromkeys(str(loc) for loc in locations))
