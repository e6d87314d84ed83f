"""What each stage run read and wrote, as MLflow datasets (the runs table's Dataset column, the run page's inputs).

A dataset here is metadata only (``mlflow.data.meta_dataset.MetaDataset``): a name, a digest and the source's
location. Digests: a store's ``fingerprint`` attribute (the parameters and inputs it was built from), otherwise
the Zarr metadata hash the Prefect cache keys on (``caching.path_fingerprint``); a STAC search's, the hash of the
API URL, collections, area and dates. Inputs are logged with ``context="input"``, outputs with ``"output"`` (MLflow's
``log_outputs`` takes models only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset

from softcon.flows.caching import path_fingerprint
from softcon.models.training_store import read_store_attrs


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset(source: DatasetSource, name: str, digest: str) -> MetaDataset:
    """A metadata-only dataset (MLflow's stubs declare ``profile`` abstract; ``MetaDataset`` implements it)."""
    return MetaDataset(source, name=name, digest=digest)  # type: ignore[abstract]


def data_dataset(location: str, kind: str) -> MetaDataset:
    """A cube, store, folder or file by its location; ``kind`` names it (``cube``, ``store``, ``bigearthnet`` …)."""
    attrs = read_store_attrs(location) if kind == "store" else None
    digest = (attrs or {}).get("fingerprint") or path_fingerprint(location)
    name = f"{kind}:{Path(location.rstrip('/')).name}"
    return _dataset(resolve_dataset_source(location), name, str(digest)[:36])


def folder_dataset(location: str, kind: str, identity: Any) -> MetaDataset:
    """A large input folder (a corpus of many files), digested by ``identity`` instead of a walk over its files."""
    return _dataset(resolve_dataset_source(location), f"{kind}:{Path(location).name}", _digest(identity))


def stac_dataset(url: str, collections: Sequence[str], query: dict[str, Any]) -> MetaDataset:
    """A STAC API search: the API, its collections and the query's area and dates."""
    name = f"stac:{','.join(collections)}"
    return _dataset(HTTPDatasetSource(url), name, _digest({"url": url, "collections": list(collections), **query}))


def log_datasets(inputs: Sequence[MetaDataset] = (), outputs: Sequence[MetaDataset] = ()) -> None:
    """Log a stage's datasets on the active run."""
    for context, datasets in (("input", inputs), ("output", outputs)):
        for dataset in datasets:
            mlflow.log_input(dataset, context=context)
