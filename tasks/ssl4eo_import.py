"""SSL4EO-S12 → training store: the paper's own corpus in the store layout preprocess writes.

The tree (SSL4EO-S12 v1.0 as released on mediaTUM and Hugging Face, ``zhu-xlab/SSL4EO-S12``)::

    ROOT/s2c/0000042/20200311T160021_20200311T160021_T17SQA/B1.tif … B8A.tif … B12.tif   (L1C, 13 bands)
    ROOT/s2a/0000042/<season>/B1.tif … B12.tif                                          (L2A, 12 bands, no B10)
    ROOT/s1/0000042/S1A_IW_GRDH_1SDV_20200309T…/VV.tif, VH.tif                           (dB, float32)

one folder per location, one per season inside it (the source product's id, which starts with or holds the
acquisition time), one GeoTIFF per band at its own resolution: 264 px at 10 m, 132 px at 20 m, 44 px at 60 m.
Each band is resized to ``patch_size`` (bilinear, as SSL4EO-S12's own loader does with ``cv2.resize``), S2 kept
as digital numbers (uint16) and S1 as dB (float32).

A sample is one (location, S2 season); its S1 image is the location's S1 season nearest in time (within
``s1_max_gap_days``; NaN when there is none). The location is the split unit: all seasons of a location go to
one split. Targets are the SSL4EO-S12-ML multi-labels (see ``ssl4eo_labels``), in the Dynamic World scheme.

Writing is preprocess's: the plan first, then one block of samples per Dask task (one shard each), blocks
marked done by the driver, statistics of the training split, then ``complete``. A killed run resumes: the tree
is scanned again, and a store with the same fingerprint (parameters and the scanned tree) is completed, not
rewritten. Season folders without every band file are skipped and reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time as timer
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from softcon import progress as stage_progress
from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS, ImportSSL4EOConfig
from softcon.models import training_store
from softcon.models.training_store import SamplePlan
from softcon.progress import ProgressCallback
from softcon.tasks import split
from softcon.tasks.preprocess import DASHBOARD_LINK, existing_store, open_dask_client, train_stats
from softcon.tasks.schemes import DYNAMIC_WORLD
from softcon.tasks.ssl4eo_labels import SeasonLabels, read_ssl4eo_labels

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

MODALITY_BANDS: dict[str, tuple[str, ...]] = {"s2c": S2_L1C_BANDS, "s2a": S2_L2A_BANDS, "s1": S1_POLARIZATIONS}
"""Bands of each SSL4EO-S12 modality, in the project's names and SSL4EO-S12's order."""
RESOLUTION_M = 10
LOCATIONS_PER_SCAN_TASK = 256
_ACQUISITION = re.compile(r"(\d{8}T\d{6})")


def band_file(band: str) -> str:
    """SSL4EO-S12's file name of a band: ``B01`` → ``B1.tif``, ``B8A`` → ``B8A.tif``, ``VV`` → ``VV.tif``."""
    return (band[0] + band[2:] if re.fullmatch(r"B0\d", band) else band) + ".tif"


def season_time(season: str) -> np.datetime64:
    """Acquisition time of a season folder, from the first ``YYYYMMDDTHHMMSS`` in its name.

    Raises:
        ValueError: the name holds no such time (naming the folder).
    """
    match = _ACQUISITION.search(season)
    if match is None:
        raise ValueError(f"season folder {season!r} holds no acquisition time YYYYMMDDTHHMMSS")
    text = match.group(1)
    return np.datetime64(f"{text[:4]}-{text[4:6]}-{text[6:8]}T{text[9:11]}:{text[11:13]}:{text[13:15]}", "ns")


@dataclass(frozen=True)
class LocationScan:
    """What one location folder holds: its complete seasons per modality, and the incomplete ones."""

    location: str
    seasons: dict[str, list[str]]
    """modality → season folders with every band file, sorted by time."""
    incomplete: list[str] = field(default_factory=list)
    """``modality/location/season`` folders missing a band file (or without a time in their name)."""


def scan_locations(root: str, locations: Sequence[str], modalities: Sequence[str]) -> list[LocationScan]:
    """The seasons of ``locations`` in each of ``modalities`` (one listing per folder, no file opened)."""
    scans = []
    for location in locations:
        seasons: dict[str, list[str]] = {}
        incomplete: list[str] = []
        for modality in modalities:
            folder = Path(root, modality, location)
            if not folder.is_dir():
                seasons[modality] = []
                continue
            needed = {band_file(band) for band in MODALITY_BANDS[modality]}
            complete = []
            for season in sorted(entry.name for entry in folder.iterdir() if entry.is_dir()):
                has_time = _ACQUISITION.search(season) is not None
                if has_time and needed <= {entry.name for entry in (folder / season).iterdir()}:
                    complete.append(season)
                else:
                    incomplete.append(f"{modality}/{location}/{season}")
            seasons[modality] = sorted(complete, key=season_time)
        scans.append(LocationScan(location, seasons, incomplete))
    return scans


def list_locations(root: str, modality: str, only: Sequence[str] | None) -> list[str]:
    """The location folders of ``modality`` (numbered, sorted by number), or ``only`` checked against them.

    Raises:
        ValueError: the tree has no ``modality`` folder, a folder name is not a location number, or a location
            asked for is not in the tree (each naming what to pass instead).
    """
    folder = Path(root, modality)
    if not folder.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise ValueError(
            f"{root} has no {modality}/ folder (it holds {present or 'nothing'}); pass the folder that holds "
            f"SSL4EO-S12's s2c/, s2a/ and s1/, or choose the S2 modality it has with --s2"
        )
    found = [entry.name for entry in folder.iterdir() if entry.is_dir()]
    if only is not None:
        missing = sorted(set(only) - set(found))
        if missing:
            raise ValueError(f"locations {missing[:5]} are not folders of {folder} ({len(found)} locations there)")
        found = list(dict.fromkeys(only))
    odd = [name for name in found if not name.isdigit()]
    if odd:
        raise ValueError(f"{folder}: folders {odd[:5]} are not SSL4EO-S12 location numbers (e.g. 0000042)")
    if not found:
        raise ValueError(f"{folder} holds no location folder")
    return sorted(found, key=int)


@dataclass(frozen=True)
class ImportPlan:
    """The samples to write: the store's plan plus, per sample, the season folders to read."""

    plan: SamplePlan
    s2_folders: list[str]
    """``modality/location/season`` of each sample's S2 image, relative to the root."""
    s1_folders: list[str | None]
    counts: dict[str, int]
    incomplete: list[str]


def nearest_season(time: np.datetime64, seasons: Sequence[str], max_gap: np.timedelta64) -> str | None:
    """The season of ``seasons`` nearest to ``time``, if within ``max_gap``."""
    if not seasons:
        return None
    gaps = [abs(season_time(season) - time) for season in seasons]
    best = int(np.argmin(gaps))
    return seasons[best] if gaps[best] <= max_gap else None


def build_import_plan(
    config: ImportSSL4EOConfig, scans: Sequence[LocationScan], labels: SeasonLabels | None
) -> ImportPlan:
    """One sample per (location, complete S2 season), locations in number order, seasons in time order."""
    n_classes = len(DYNAMIC_WORLD.class_names)
    max_gap = np.timedelta64(int(config.s1_max_gap_days * 86400), "s")
    splits = split.assign_splits(
        [scan.location for scan in scans if scan.seasons[config.s2]],
        config.val_fraction,
        config.test_fraction,
        config.seed,
    )
    rows: list[tuple[int, np.datetime64, int, np.ndarray, bool]] = []
    s2_folders: list[str] = []
    s1_folders: list[str | None] = []
    counts = {"locations": 0, "samples": 0, "labelled": 0, "without_s1": 0, "locations_without_s2": 0}
    for scan in scans:
        s2_seasons = scan.seasons[config.s2]
        if not s2_seasons:
            counts["locations_without_s2"] += 1
            continue
        counts["locations"] += 1
        for season in s2_seasons:
            time = season_time(season)
            s1 = nearest_season(time, scan.seasons.get("s1", []), max_gap)
            names = labels.lookup(scan.location, season, time, s2_seasons) if labels is not None else None
            hot = np.zeros(n_classes, np.uint8)
            if names:
                hot[[DYNAMIC_WORLD.class_names.index(name) for name in names]] = 1
            rows.append((int(scan.location), time, splits[scan.location], hot, bool(names)))
            s2_folders.append(f"{config.s2}/{scan.location}/{season}")
            s1_folders.append(None if s1 is None else f"s1/{scan.location}/{s1}")
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
    for name, code in zip(split.SPLIT_NAMES, range(len(split.SPLIT_NAMES)), strict=True):
        counts[name] = int((plan.split == code).sum())
    incomplete = [folder for scan in scans for folder in scan.incomplete]
    counts["incomplete_seasons"] = len(incomplete)
    return ImportPlan(plan, s2_folders, s1_folders, counts, incomplete)


def read_band(path: Path, size: int) -> np.ndarray:
    """One band file resized to ``size`` x ``size`` (bilinear; a file already that size is read as it is)."""
    with rasterio.open(path) as dataset:
        if dataset.shape == (size, size):
            return dataset.read(1)
        return dataset.read(1, out_shape=(size, size), resampling=Resampling.bilinear)


def read_season(root: str, folder: str, bands: Sequence[str], size: int) -> np.ndarray:
    """(band, size, size) image of one season folder."""
    return np.stack([read_band(Path(root, folder, band_file(band)), size) for band in bands])


def write_import_block(
    root: str,
    out: str,
    start: int,
    s2_folders: Sequence[str],
    s1_folders: Sequence[str | None],
    s2_bands: Sequence[str],
    size: int,
) -> int:
    """Read one block's season folders and write its S2 and S1 images at sample ``start``; returns start."""
    s2 = np.zeros((len(s2_folders), len(s2_bands), size, size), np.uint16)
    s1 = np.full((len(s2_folders), len(S1_POLARIZATIONS), size, size), np.nan, np.float32)
    for i, (s2_folder, s1_folder) in enumerate(zip(s2_folders, s1_folders, strict=True)):
        s2[i] = np.clip(read_season(root, s2_folder, s2_bands, size), 0, np.iinfo(np.uint16).max)
        if s1_folder is not None:
            s1[i] = read_season(root, s1_folder, S1_POLARIZATIONS, size)
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
        {"params": params, "s2": plan.s2_folders, "s1": plan.s1_folders, "labels": labels_digest}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _scan(config: ImportSSL4EOConfig, locations: list[str], client: Client, progress: ProgressCallback) -> list:
    """Scan the location folders on the cluster, in batches, reporting progress per location."""
    from distributed import as_completed

    modalities = [config.s2, *(["s1"] if config.with_s1 and Path(config.root, "s1").is_dir() else [])]
    batches = [locations[i : i + LOCATIONS_PER_SCAN_TASK] for i in range(0, len(locations), LOCATIONS_PER_SCAN_TASK)]
    futures = client.map(scan_locations, [config.root] * len(batches), batches, modalities=modalities, pure=False)
    done = 0
    progress("scan", 0, len(locations))
    for future in as_completed(futures):
        done += len(future.result())
        progress("scan", done, len(locations))
    return [scan for batch in client.gather(futures) for scan in batch]


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
    locations = list_locations(config.root, config.s2, config.locations)
    labels = read_ssl4eo_labels(config.labels) if config.labels else None
    with open_dask_client(config, client) as dask_client:
        stage_progress.announce(DASHBOARD_LINK, dask_client.dashboard_link)
        scans = _scan(config, locations, dask_client, progress)
        plan = build_import_plan(config, scans, labels)
        if plan.counts["samples"] == 0:
            raise ValueError(
                f"no location of {config.root}/{config.s2} has a season folder with every band file "
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
    from distributed import as_completed

    todo = [i for i in range(len(bounds)) if i not in done]
    bands = MODALITY_BANDS[config.s2]
    futures = {
        client.submit(
            write_import_block,
            config.root,
            config.out,
            start,
            plan.s2_folders[start:stop],
            plan.s1_folders[start:stop],
            bands,
            config.patch_size,
            pure=False,
        ): i
        for i, (start, stop) in enumerate(bounds)
        if i in todo
    }
    finished = len(bounds) - len(todo)
    progress("blocks", finished, len(bounds))
    for future in as_completed(futures):
        future.result()
        training_store.mark_blocks_done(config.out, [futures[future]])
        finished += 1
        progress("blocks", finished, len(bounds))
    return len(todo)
