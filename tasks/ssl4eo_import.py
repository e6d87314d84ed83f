"""SSL4EO-S12 → training store: the paper's own corpus in the store layout preprocess writes.

Two releases are read: v1.0's folder tree (GeoTIFF per band; ``tasks/ssl4eo_layout.py``) and v1.1's Zarr files
(``tasks/ssl4eo_zarr.py``), told apart by the root's folders. S2 is kept as digital numbers (uint16; v1.1's int16
values clipped at 0) and S1 as dB (float32), every band at ``patch_size``.

A sample is one (location, S2 image); its S1 image is the location's S1 image nearest in time (within
``s1_max_gap_days``; NaN when there is none). The location is the split unit: all seasons of a location go to
one split. Targets are the SSL4EO-S12-ML multi-labels (see ``ssl4eo_labels``), in the Dynamic World scheme.

Writing is preprocess's: the plan first, then one block of samples per Dask task (one shard each), blocks
marked done by the driver, statistics of the training split, then ``complete``. A killed run resumes: the tree
is scanned again, and a store with the same fingerprint (parameters and the scanned images) is completed, not
rewritten. Images without every band file or without a time are skipped and reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time as timer
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from softcon import progress as stage_progress
from softcon.config import S1_POLARIZATIONS, ImportSSL4EOConfig
from softcon.models import training_store
from softcon.models.training_store import SamplePlan
from softcon.progress import ProgressCallback
from softcon.tasks import split, ssl4eo_zarr
from softcon.tasks.dask_cluster import open_dask_client
from softcon.tasks.preprocess import DASHBOARD_LINK, collect_blocks, existing_store, train_stats
from softcon.tasks.schemes import DYNAMIC_WORLD
from softcon.tasks.ssl4eo_labels import SeasonLabels, read_ssl4eo_labels
from softcon.tasks.ssl4eo_layout import (
    MODALITY_BANDS,
    LocationScan,
    Season,
    list_locations,
    read_folder,
    scan_locations,
)

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

RESOLUTION_M = 10
LOCATIONS_PER_SCAN_TASK = 256


@dataclass(frozen=True)
class ImportPlan:
    """The samples to write: the store's plan plus, per sample, the images to read."""

    plan: SamplePlan
    s2_sources: list[str]
    """Where each sample's S2 image is, relative to the root (``Season.source``)."""
    s1_sources: list[str | None]
    counts: dict[str, int]
    incomplete: list[str]


def nearest_season(time: np.datetime64, seasons: Sequence[Season], max_gap: np.timedelta64) -> Season | None:
    """The season of ``seasons`` nearest to ``time``, if within ``max_gap``."""
    if not seasons:
        return None
    gaps = [abs(season.time - time) for season in seasons]
    best = int(np.argmin(gaps))
    return seasons[best] if gaps[best] <= max_gap else None


def build_import_plan(
    config: ImportSSL4EOConfig, scans: Sequence[LocationScan], labels: SeasonLabels | None
) -> ImportPlan:
    """One sample per (location, S2 season), locations in number order, seasons in time order."""
    n_classes = len(DYNAMIC_WORLD.class_names)
    max_gap = np.timedelta64(int(config.s1_max_gap_days * 86400), "s")
    scans = sorted(scans, key=lambda scan: int(scan.location))
    splits = split.assign_splits(
        [scan.location for scan in scans if scan.seasons[config.s2]],
        config.val_fraction,
        config.test_fraction,
        config.seed,
    )
    rows: list[tuple[int, np.datetime64, int, np.ndarray, bool]] = []
    s2_sources: list[str] = []
    s1_sources: list[str | None] = []
    counts = {"locations": 0, "samples": 0, "labelled": 0, "without_s1": 0, "locations_without_s2": 0}
    for scan in scans:
        s2_seasons = scan.seasons[config.s2]
        if not s2_seasons:
            counts["locations_without_s2"] += 1
            continue
        counts["locations"] += 1
        keys = [season.key for season in s2_seasons]
        for season in s2_seasons:
            s1 = nearest_season(season.time, scan.seasons.get("s1", []), max_gap)
            names = labels.lookup(scan.location, season.key, season.time, keys) if labels is not None else None
            hot = np.zeros(n_classes, np.uint8)
            if names:
                hot[[DYNAMIC_WORLD.class_names.index(name) for name in names]] = 1
            rows.append((int(scan.location), season.time, splits[scan.location], hot, bool(names)))
            s2_sources.append(season.source)
            s1_sources.append(None if s1 is None else s1.source)
            counts["samples"] += 1
            counts["labelled"] += bool(names)
            counts["without_s1"] += s1 is None
    n = len(rows)
    hot = np.stack([row[3] for row in rows]) if n else np.zeros((0, n_classes), np.uint8)
    sums = hot.sum(axis=1, keepdims=True)
    plan = SamplePlan(
        location=np.array([row[0] for row in rows], np.int64),
        tile=np.zeros(n, np.int32),
        time=np.array([row[1] for row in rows], "datetime64[ns]"),
        row=np.zeros(n, np.int32),
        col=np.zeros(n, np.int32),
        split=np.array([row[2] for row in rows], np.uint8),
        labels=hot,
        # SSL4EO-S12-ML gives presence only: the fractions spread each sample's classes evenly, so the
        # "fractions" label similarity equals "cosine" on this corpus.
        fractions=np.divide(hot, sums, out=np.zeros(hot.shape, np.float32), where=sums > 0).astype(np.float32),
        labelled=np.array([row[4] for row in rows], bool),
    )
    for code, name in enumerate(split.SPLIT_NAMES):
        counts[name] = int((plan.split == code).sum())
    incomplete = [folder for scan in scans for folder in scan.incomplete]
    counts["incomplete_seasons"] = len(incomplete)
    return ImportPlan(plan, s2_sources, s1_sources, counts, incomplete)


def write_import_block(
    root: str,
    out: str,
    start: int,
    s2_sources: Sequence[str],
    s1_sources: Sequence[str | None],
    s2_bands: Sequence[str],
    size: int,
) -> int:
    """Read one block's images and write its S2 and S1 patches at sample ``start``; returns start."""
    s2 = np.zeros((len(s2_sources), len(s2_bands), size, size), np.uint16)
    s1 = np.full((len(s2_sources), len(S1_POLARIZATIONS), size, size), np.nan, np.float32)
    opened: dict = {}  # v1.1 files this block reads, opened once

    def read(source: str, bands: Sequence[str]) -> np.ndarray:
        if ssl4eo_zarr.is_zarr_source(source):
            return ssl4eo_zarr.read_image(root, source, bands, size, opened)
        return read_folder(root, source, bands, size)

    for i, (s2_source, s1_source) in enumerate(zip(s2_sources, s1_sources, strict=True)):
        s2[i] = np.clip(read(s2_source, s2_bands), 0, np.iinfo(np.uint16).max)
        if s1_source is not None:
            s1[i] = read(s1_source, S1_POLARIZATIONS)
    training_store.write_images(out, start, s2, s1)
    return start


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: the store, its counts and statistics, and what it skipped."""

    store: str
    counts: dict[str, int]
    seconds: float
    norm_stats: dict[str, Any]
    incomplete: list[str] = field(default_factory=list)
    blocks_written: int = 0
    reused: bool = False
    dashboard_link: str | None = None

    def metrics(self) -> dict[str, float]:
        """Counts and wall time as MLflow metrics."""
        return {**{k: float(v) for k, v in self.counts.items()}, "seconds": self.seconds}

    @property
    def warning(self) -> str | None:
        """Season folders skipped for a missing band file, if any (named, the first five)."""
        if not self.incomplete:
            return None
        return (
            f"{len(self.incomplete)} season folder(s) lack a band file or a time in their name and were skipped: "
            f"{', '.join(self.incomplete[:5])}"
        )


def import_fingerprint(config: ImportSSL4EOConfig, plan: ImportPlan, labels_digest: str | None) -> str:
    """Digest of what decides the store's content: the parameters, the season folders read and the labels."""
    params = config.model_dump(mode="json", exclude={"out", "dask_address", "n_workers", "root", "labels"})
    payload = json.dumps(
        {"params": params, "s2": plan.s2_sources, "s1": plan.s1_sources, "labels": labels_digest}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _scan(config: ImportSSL4EOConfig, client: Client, progress: ProgressCallback) -> list[LocationScan]:
    """Scan the release on the cluster (batches of v1.0 location folders, or v1.1 files), reporting progress."""
    from distributed import as_completed

    if ssl4eo_zarr.is_zarr_release(config.root):
        files = ssl4eo_zarr.list_files(config.root, config.s2)
        futures = client.map(
            ssl4eo_zarr.scan_files,
            [config.root] * len(files),
            [[file] for file in files],
            s2_modality=config.s2,
            with_s1=config.with_s1,
            only=config.locations,
            pure=False,
        )
        unit, total = "files", len(files)
    else:
        locations = list_locations(config.root, config.s2, config.locations)
        modalities = [config.s2, *(["s1"] if config.with_s1 and Path(config.root, "s1").is_dir() else [])]
        step = LOCATIONS_PER_SCAN_TASK
        batches = [locations[i : i + step] for i in range(0, len(locations), step)]
        futures = client.map(scan_locations, [config.root] * len(batches), batches, modalities=modalities, pure=False)
        unit, total = "locations", len(locations)
    done = 0
    progress("scan", 0, total)
    for future in as_completed(futures):
        done += 1 if unit == "files" else len(future.result())
        progress("scan", done, total)
    scans = [scan for batch in client.gather(futures) for scan in batch]
    if config.locations is not None and unit == "files":
        missing = sorted(set(config.locations) - {scan.location for scan in scans})
        if missing:
            raise ValueError(f"locations {missing[:5]} are in no {ssl4eo_zarr.ZARR_MODALITIES[config.s2]} file")
    return scans


def run_import_ssl4eo(config: ImportSSL4EOConfig, *, client: Client | None = None) -> ImportReport:
    """Write the training store at ``config.out`` from the SSL4EO-S12 tree at ``config.root``.

    Progress goes to ``softcon.progress``: steps "scan" (locations), "blocks" and "stats", and the Dask
    dashboard link. A complete store with the same fingerprint is reused; an incomplete one is resumed.

    Raises:
        ValueError: the tree lacks the chosen S2 modality, a location asked for is not in it, the labels file
            cannot be read, no location has a complete season, or ``config.out`` holds something that is not
            a training store; all before any store is written.
        FileNotFoundError: the root or the labels file does not exist.
    """
    started = timer.perf_counter()
    progress = stage_progress.report
    if not Path(config.root).is_dir():
        raise FileNotFoundError(f"SSL4EO-S12 root {config.root} is not a folder")
    labels = read_ssl4eo_labels(config.labels) if config.labels else None
    with open_dask_client(config, client) as dask_client:
        stage_progress.announce(DASHBOARD_LINK, dask_client.dashboard_link)
        scans = _scan(config, dask_client, progress)
        plan = build_import_plan(config, scans, labels)
        if plan.counts["samples"] == 0:
            raise ValueError(
                f"no location of {config.root} has an {config.s2} image with every band and a time "
                f"({len(plan.incomplete)} incomplete, e.g. {plan.incomplete[:3]})"
            )
        fingerprint = import_fingerprint(config, plan, labels.digest if labels else None)
        attrs, _ = existing_store(config.out, fingerprint, source=f"the SSL4EO-S12 tree {config.root}")
        if attrs is not None and attrs.get("complete"):
            logger.info("training store %s is complete with the same tree and parameters; reusing it", config.out)
            return ImportReport(config.out, dict(attrs["counts"]), timer.perf_counter() - started,
                                attrs["norm_stats"], plan.incomplete, reused=True)  # fmt: skip
        if attrs is None:
            _create(config, plan, fingerprint, labels)
            done: set[int] = set()
        else:
            done = set(attrs["blocks_done"])
            logger.info("resuming training store %s (%d blocks done)", config.out, len(done))
        bounds = training_store.block_bounds(len(plan.plan), config.samples_per_block)
        written = _write_blocks(config, plan, bounds, done, dask_client, progress)
        stats = train_stats(config.out, bounds, dask_client, progress, MODALITY_BANDS[config.s2])
        training_store.finish_store(config.out, {"norm_stats": stats})
        link = dask_client.dashboard_link
    seconds = timer.perf_counter() - started
    logger.info("wrote %s: %s in %.1f s (%d blocks written now)", config.out, plan.counts, seconds, written)
    return ImportReport(config.out, plan.counts, seconds, stats, plan.incomplete, written, dashboard_link=link)


def _create(config: ImportSSL4EOConfig, plan: ImportPlan, fingerprint: str, labels: SeasonLabels | None) -> None:
    training_store.create_store(
        config.out,
        plan.plan,
        n_bands=len(MODALITY_BANDS[config.s2]),
        n_pols=len(S1_POLARIZATIONS),
        patch_size=config.patch_size,
        samples_per_block=config.samples_per_block,
        attrs={
            "fingerprint": fingerprint,
            "source": "ssl4eo-s12",
            "ssl4eo_root": config.root,
            "ssl4eo_labels": config.labels,
            "labels_digest": labels.digest if labels else None,
            "class_names": list(DYNAMIC_WORLD.class_names),
            "class_codes": list(DYNAMIC_WORLD.class_codes),
            "label_scheme": DYNAMIC_WORLD.name,
            "bands": list(MODALITY_BANDS[config.s2]),
            "pols": list(S1_POLARIZATIONS),
            "tiles": [f"ssl4eo-s12/{config.s2}"],
            "split_names": list(split.SPLIT_NAMES),
            "split_unit": "location",
            # A subset of 250k locations would make every attribute write megabytes: recorded by count and digest.
            "params": config.model_dump(mode="json", exclude={"locations"}),
            "locations_asked": None if config.locations is None else len(config.locations),
            "counts": plan.counts,
            "samples_per_block": config.samples_per_block,
            "s1_max_gap_days": config.s1_max_gap_days,
            "resolution_m": RESOLUTION_M,
            "s1_units": "dB",
        },
    )


def _write_blocks(
    config: ImportSSL4EOConfig,
    plan: ImportPlan,
    bounds: list[tuple[int, int]],
    done: set[int],
    client: Client,
    progress: ProgressCallback,
) -> int:
    """Write every block not yet done, marking each as it finishes; returns how many it wrote."""
    todo = [i for i in range(len(bounds)) if i not in done]
    bands = MODALITY_BANDS[config.s2]
    futures = {
        client.submit(
            write_import_block,
            config.root,
            config.out,
            start,
            plan.s2_sources[start:stop],
            plan.s1_sources[start:stop],
            bands,
            config.patch_size,
            pure=False,
        ): i
        for i, (start, stop) in enumerate(bounds)
        if i in todo
    }
    collect_blocks(config.out, futures, len(bounds), progress)
    return len(todo)
