"""Ingest: search a STAC source for Sentinel-2 L2A and Sentinel-1 and load them onto the tile grid.

This module is the run loop, and holds as little else as it can; each step is a function of the module named
for its concern:

- ``tasks/stac_access.py``: headers from environment variables, Planetary Computer URL signing, GDAL options
  and retries (shared with the labels stage);
- ``tasks/stac_search.py``: the area, the search (STAC API or static file) and the cloud filter;
- ``tasks/scene_load.py``: odc-stac loads of a tile's items, harmonised to the cube's units;
- ``tasks/cube_store.py``: the cube format: tile creation, locks, crash-safe appends, repair, roll-back on a full
  disk and damage checks.

A run: search and filter the items, check the existing tiles it will write before writing anything
(``check_tiles``; lost steps of days the run holds are loaded and written again, other damage stops the run with
``CubeDamageError``), then per tile load the new tile-dates (rounds of up to ``WRITE_BATCH`` days per sensor) and
append them under the tile's lock.

Idempotence and appends: a tile-date (solar day) already in the tile is never loaded or written again,
so a re-run writes nothing. New dates are appended along ``time`` in the order they are ingested (sorted
within one run); a backfill of earlier dates lands after later ones, so readers that need order use
``ds.sortby("time")``. A tile is created with its first time step: a run that writes nothing (no items, none
usable, every tile-date cloudy or empty) leaves no empty tile and no empty cube. Days another run appended
since this one loaded them are dropped under the lock, so concurrent runs never duplicate a step.

Failures: transient read errors are retried (``tasks/stac_access.py``); an item that still fails, or whose file
is corrupt or missing, is skipped, named in ``IngestReport.items_failed`` with the reason, and the other items
of its day are loaded.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import shapely
import shapely.ops
from pyproj import Transformer
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from softcon import progress as stage_progress
from softcon.config import IngestConfig
from softcon.tasks.collections import sensor_of, spec_for_item
from softcon.tasks.cube_store import (
    S1_POLS,
    SENSOR_ARRAYS,
    CubeDamageError,
    LostStep,
    NewSteps,
    OpenTile,
    append_steps,
    check_tiles,
    open_tile,
    rolled_back_on_full_disk,
    solar_day,
    tile_centre_lon,
    tile_exists,
    tile_lock,
    tile_path,
    write_lost_steps,
)
from softcon.tasks.dask_cluster import open_dask_client
from softcon.tasks.grid import Tile, tiles_for_bbox
from softcon.tasks.scene_load import ReadOptions, load_days, s2_day_quality
from softcon.tasks.stac_access import StacAccess, is_url
from softcon.tasks.stac_search import filter_cloudy_items, item_datetime, read_area, search_items

__all__ = [
    "WRITE_BATCH",
    "IngestReport",
    "group_by_solar_day",
    "rewrite_lost_steps",
    "run_ingest",
    "tiles_for_area",
]

log = logging.getLogger(__name__)

WRITE_BATCH = 8
"""Tile-dates held in memory before they are appended (bounds memory on long date ranges)."""


@dataclass(frozen=True)
class IngestReport:
    """What one ingest run found, skipped and wrote."""

    cube: str
    tiles: list[str]
    items_found: int
    """Items the search returned."""
    items_filtered: int
    """Items dropped by the eo:cloud_cover filter (client side)."""
    items_ingested: int
    """Items behind the tile-dates written in this run."""
    items_failed: list[str]
    """Items skipped because an asset is missing or could not be read (after retries)."""
    tile_dates_written: int
    tile_dates_skipped: dict[str, int] = field(default_factory=dict)
    """Reason (``exists``, ``cloud``, ``nodata``) -> count."""
    tile_dates_repaired: int = 0
    """Committed tile-dates whose lost chunk files this run wrote again (see ``tasks/cube_store.py``, "Damage")."""
    bytes_written: int = 0
    """Bytes added to the store on disk (compressed); 0 for object-storage URLs."""
    pixel_bytes: int = 0
    """Uncompressed bytes of the pixel arrays written (what MB/s is measured on)."""
    seconds: float = 0.0
    dates: int = 0
    """Distinct Sentinel-2 days in the cube's tiles after this run."""
    failures: dict[str, str] = field(default_factory=dict)
    """Failed item id -> why."""
    items: dict[str, str] = field(default_factory=dict)
    """Every item found -> what happened to it (``ingested``, ``filtered``, ``failed``, ``not written``)."""

    @property
    def mb_per_s(self) -> float:
        """Pixel megabytes (1e6 bytes) written per second of the whole run."""
        return self.pixel_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def wrote_nothing(self) -> bool:
        """No tile-date was written or repaired."""
        return self.tile_dates_written == 0 and self.tile_dates_repaired == 0

    def warning(self, config: IngestConfig) -> str | None:
        """Why a run that wrote nothing wrote nothing, and what to change; None when it wrote, or had nothing new.

        "Nothing new since the last run" (the cube holds tile-dates of the request already; the others were
        skipped before too) is not a warning: it is what a repeated scheduled run does. Everything skipped for
        nodata, cloud or failed items, with nothing of the request in the cube, is.
        """
        if not self.wrote_nothing:
            return None
        skipped = {reason: count for reason, count in self.tile_dates_skipped.items() if count}
        if skipped.get("exists") or not (skipped or self.items_failed):
            return None
        what = ", ".join(f"{count} for {reason}" for reason, count in sorted(skipped.items())) or "none"
        advice = []
        if skipped.get("nodata"):
            advice.append(
                f"nodata: a tile-date is skipped when more than {config.max_tile_nodata:g} of its pixels in the area "
                "have no data, so the scenes found cover less than that of the area on each tile: check the area "
                "against the collection's footprints (a coast, a swath edge, the end of the sample scenes), give an "
                "area the scenes cover, or raise --max-tile-nodata"
            )
        if skipped.get("cloud"):
            advice.append(
                f"cloud: a tile-date is skipped when its SCL cloud/shadow fraction is above {config.max_tile_cloud:g}: "
                "raise --max-tile-cloud or choose other dates"
            )
        if self.items_failed:
            advice.append(f"{len(self.items_failed)} items failed to load: see failed_items.json of the run")
        return (
            f"nothing written to {self.cube}: {sum(skipped.values())} tile-dates skipped ({what}) over "
            f"{len(self.tiles)} tiles. " + "; ".join(advice)
        )

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics for MLflow."""
        metrics = {
            "items_found": float(self.items_found),
            "items_filtered": float(self.items_filtered),
            "items_ingested": float(self.items_ingested),
            "items_failed": float(len(self.items_failed)),
            "tiles": float(len(self.tiles)),
            "tile_dates_written": float(self.tile_dates_written),
            "tile_dates_repaired": float(self.tile_dates_repaired),
            "dates": float(self.dates),
            "bytes_written": float(self.bytes_written),
            "pixel_bytes": float(self.pixel_bytes),
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
        }
        metrics.update({f"tile_dates_skipped_{k}": float(v) for k, v in self.tile_dates_skipped.items()})
        return metrics


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _intersecting(items: Iterable[dict[str, Any]], tile: Tile) -> list[dict[str, Any]]:
    footprint = box(*tile.lonlat_bounds)
    return [item for item in items if shape(item["geometry"]).intersects(footprint)]


def tiles_for_area(area: BaseGeometry, *, resolution: float, tile_size: int, epsg: int | None = None) -> list[Tile]:
    """Grid tiles of the area's bounding box that the area itself touches (all of them for a bbox)."""
    tiles = tiles_for_bbox(area.bounds, resolution=resolution, tile_size=tile_size, epsg=epsg)
    return [tile for tile in tiles if box(*tile.lonlat_bounds).intersects(area)]


@functools.lru_cache(maxsize=8)
def area_in_crs(area: BaseGeometry, epsg: int) -> BaseGeometry:
    """The lon/lat ``area`` in a tile CRS, once per CRS of a run (its edges densified to ~1 km first, since a
    straight lon/lat edge is curved in UTM)."""
    to_tile = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    return shapely.ops.transform(to_tile.transform, shapely.segmentize(area, 0.01))


def area_mask(tile: Tile, area: BaseGeometry) -> np.ndarray | None:
    """The tile's pixels whose centre lies in the lon/lat ``area``; None when that is every pixel."""
    projected = area_in_crs(area, tile.epsg)
    if projected.contains(box(*tile.bounds)):
        return None
    return rasterio.features.geometry_mask(
        [projected], out_shape=(tile.size, tile.size), transform=tile.transform, invert=True
    )


def group_by_solar_day(items: Iterable[dict[str, Any]], lon: float) -> dict[date, list[dict[str, Any]]]:
    """The items by the solar day at longitude ``lon`` of their acquisition (a tile-date each), in date order."""
    groups: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[solar_day(item_datetime(item), lon)].append(item)
    return dict(sorted(groups.items()))


@dataclass
class _TileBatch:
    """Tile-dates of one sensor loaded and waiting to be appended."""

    time_dim: str
    arrays: dict[str, list[np.ndarray]]
    times: list[datetime] = field(default_factory=list)
    days: list[date] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, day: date, values: dict[str, np.ndarray], when: datetime, ids: list[str]) -> None:
        for name, array in values.items():
            self.arrays[name].append(array)
        self.times.append(when)
        self.days.append(day)
        self.ids[day.isoformat()] = ids

    def __len__(self) -> int:
        return len(self.times)

    def clear(self) -> None:
        self.times.clear()
        self.days.clear()
        self.ids.clear()
        for values in self.arrays.values():
            values.clear()


@dataclass
class _RunState:
    """What ingest did to one tile (a worker's result) or to the run (the tiles' states merged)."""

    skipped: Counter[str] = field(default_factory=Counter)
    ingested: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    written: int = 0
    repaired: int = 0
    pixel_bytes: int = 0
    days: set[date] = field(default_factory=set)
    """Sentinel-2 days of the tile(s) afterwards."""
    messages: list[str] = field(default_factory=list)
    """What the tile's ingest said (skipped tile-dates, what it wrote), for the run's log."""
    records: list[logging.LogRecord] = field(default_factory=list)
    """What the project's loggers said on the worker that ingested the tile, to be logged again in the run."""

    def merge(self, other: _RunState) -> None:
        self.skipped.update(other.skipped)
        self.ingested |= other.ingested
        self.failures.update(other.failures)
        self.written += other.written
        self.repaired += other.repaired
        self.pixel_bytes += other.pixel_bytes
        self.days |= other.days


def _flush(
    cube: str, tile: Tile, bands: Sequence[str], batches: Sequence[_TileBatch], lon: float, state: _RunState, *,
    check_bands: bool = False,
) -> tuple[OpenTile | None, list[int]]:  # fmt: skip
    """Append the batches (S2, S1) under one hold of the tile lock, creating the tile if needed and dropping
    days another run wrote since they were loaded; returns the tile as left (``None`` when there was nothing
    to append) and steps per batch. ``check_bands`` when the run has not checked an existing tile's bands."""
    if not any(batches):
        return None, [0] * len(batches)
    appends, ingested = [], []
    with tile_lock(cube, tile.tile_id), rolled_back_on_full_disk(cube, tile):
        opened = open_tile(cube, tile, bands, check_bands=check_bands)
        for batch in batches:
            have = opened.days(batch.time_dim, lon)
            keep = [k for k, day in enumerate(batch.days) if day not in have]
            state.skipped["exists"] += len(batch) - len(keep)
            ids = {batch.days[k].isoformat(): batch.ids[batch.days[k].isoformat()] for k in keep}
            arrays = {name: [values[k] for k in keep] for name, values in batch.arrays.items()}
            appends.append(NewSteps(batch.time_dim, arrays, [batch.times[k] for k in keep], ids))
            ingested.append((len(keep), ids))
        state.pixel_bytes += append_steps(opened, appends)
    for written, ids in ingested:
        state.written += written
        for day_ids in ids.values():
            state.ingested.update(day_ids)
    for batch in batches:
        batch.clear()
    return opened, [written for written, _ in ingested]


def rewrite_lost_steps(cube: str, tile: Tile, bands: Sequence[str], lost: Sequence[LostStep], read: ReadOptions) -> int:
    """Load the lost steps again (the same items as when they were written) and write their lost chunk files in
    place (``cube_store.write_lost_steps``); returns the steps written.

    Raises:
        CubeDamageError: when an item of a lost step fails to load now (the step stays as it is).
    """
    loaded: list[tuple[LostStep, dict[str, np.ndarray]]] = []
    for step in lost:
        sensor = "s2" if step.time_dim == "time" else "s1"
        ((_, _, values, failed),) = load_days(sensor, {step.day: step.items}, tile, bands, read)
        if values is None or failed:
            raise CubeDamageError(
                f"tiles/{tile.tile_id}: lost step {step.step} ({step.day}) of {sensor} cannot be loaded again: "
                f"{failed or 'no pixels'}; re-run softcon ingest once the items read"
            )
        arrays = values if sensor == "s2" else (values,)  # (s2, scl) or s1
        loaded.append((step, dict(zip(SENSOR_ARRAYS[step.time_dim], arrays, strict=True))))
    write_lost_steps(cube, tile, bands, loaded)
    log.warning("tile %s: wrote %d lost step(s) again: %s", tile.tile_id, len(lost),
                [f"{step.day} {','.join(step.arrays)}" for step in lost])  # fmt: skip
    return len(lost)


def ingest_tile(
    config: IngestConfig, tile: Tile, items: list[dict[str, Any]], read: ReadOptions, state: _RunState,
    progress: Callable[[str], None], lost: Sequence[LostStep] = (), within: np.ndarray | None = None,
) -> set[date]:  # fmt: skip
    """Write the tile's ``lost`` steps again, load its new days and append them; returns the tile's Sentinel-2
    days afterwards.

    A tile-date's nodata and cloud fractions are measured over ``within`` (the tile's pixels in the requested
    area, ``area_mask``; None: the whole tile), so a small area on a large tile keeps its dates.

    A tile that does not exist yet is created only when a tile-date is appended, so a run that writes nothing
    (every tile-date cloudy or empty) leaves no empty tile, nor an empty cube.
    """
    lon = tile_centre_lon(tile)
    if lost:
        state.repaired += rewrite_lost_steps(config.cube, tile, config.bands, lost, read)
    opened: OpenTile | None = None
    if tile_exists(config.cube, tile):
        with tile_lock(config.cube, tile.tile_id):
            opened = open_tile(config.cube, tile, config.bands)
    new_days: dict[str, list[tuple[date, list[dict[str, Any]]]]] = {}
    for sensor, time_dim in (("s2", "time"), ("s1", "time_s1")):
        sensor_items = [i for i in items if sensor_of(i["collection"]) == sensor and i["id"] not in state.failures]
        have = opened.days(time_dim, lon) if opened is not None else set()
        new_days[sensor] = []
        for day, day_items in group_by_solar_day(sensor_items, lon).items():
            if day in have:
                state.skipped["exists"] += 1
            else:
                new_days[sensor].append((day, day_items))
    batches = {"s2": _TileBatch("time", {"s2": [], "scl": []}), "s1": _TileBatch("time_s1", {"s1": []})}
    counts = Counter[str]()
    # Rounds of up to WRITE_BATCH days per sensor: one load per sensor, one append of both under one lock
    # hold; bounded memory on long date ranges.
    rounds = max(len(days) for days in new_days.values())
    for first in range(0, rounds, WRITE_BATCH):
        for sensor, batch in batches.items():
            chunk = dict(new_days[sensor][first : first + WRITE_BATCH])
            for day, day_items, loaded, failed in load_days(sensor, chunk, tile, config.bands, read):
                for item_id, reason in failed.items():
                    log.warning("skipping item %s: %s", item_id, reason)
                state.failures.update(failed)
                if loaded is None:
                    continue
                what = f"{tile.tile_id} {day} {sensor.upper()}"
                if sensor == "s2":
                    s2, scl = loaded
                    cloud, nodata = s2_day_quality(s2, scl, within)
                    values = {"s2": s2, "scl": scl}
                else:
                    empty = np.isnan(loaded).all(axis=0)
                    cloud, nodata = 0.0, float((empty[within] if within is not None else empty).mean())
                    values = {"s1": loaded}
                if nodata > config.max_tile_nodata:
                    state.skipped["nodata"] += 1
                    progress(f"{what}: nodata {nodata:.2f} > {config.max_tile_nodata}; skipped")
                    continue
                if cloud > config.max_tile_cloud:
                    state.skipped["cloud"] += 1
                    progress(f"{what}: cloud {cloud:.2f} > {config.max_tile_cloud}; skipped")
                    continue
                batch.add(day, values, min(item_datetime(i) for i in day_items), sorted(i["id"] for i in day_items))
        flushed, written = _flush(
            config.cube, tile, config.bands, list(batches.values()), lon, state, check_bands=opened is None
        )
        opened = flushed or opened
        counts.update(dict(zip(batches, written, strict=True)))
    progress(f"{tile.tile_id}: wrote {counts['s2']} S2 and {counts['s1']} S1 dates")
    return opened.days("time", lon) if opened is not None else set()


@dataclass(frozen=True)
class TileWork:
    """One tile's share of a run: what a worker needs to ingest it."""

    tile: Tile
    items: list[dict[str, Any]]
    """The usable items whose footprint meets the tile."""
    lost: tuple[LostStep, ...]
    """Committed steps of the tile whose chunk files are lost (``check_tiles``), to write again."""
    within: np.ndarray | None
    """The tile's pixels in the requested area (``area_mask``)."""


def ingest_one_tile(config: IngestConfig, work: TileWork, read: ReadOptions | None = None) -> _RunState:
    """Ingest one tile into the cube and return what it did: the unit of work a Dask worker runs.

    Everything the tile writes is inside its own group, under its lock, and committed step by step (see
    ``tasks/cube_store.py``), so a worker that dies mid-tile leaves the committed steps and nothing partial
    visible; the tile's next ingest (Dask's retry of the task, or a re-run) repairs and completes it.
    ``read``: the run's read options (in process); a worker builds its own from ``config``.
    """
    state = _RunState()
    on_worker = read is None  # its log stays in the worker's process unless it is returned
    if read is None:
        read = ReadOptions.from_access(StacAccess.from_config(config), threads=config.read_threads)
    collect: contextlib.AbstractContextManager[list[logging.LogRecord]] = (
        _collected_records() if on_worker else contextlib.nullcontext([])
    )
    with collect as state.records:
        state.days = ingest_tile(config, work.tile, work.items, read, state, state.messages.append, work.lost,
                                 work.within)  # fmt: skip
    return state


class _RecordList(logging.Handler):
    """Keeps copies of the records it is given, formatted into their message (so that they pickle)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        kept = copy.copy(record)
        kept.msg, kept.args, kept.exc_info, kept.exc_text = record.getMessage(), None, None, None
        self.records.append(kept)


@contextlib.contextmanager
def _collected_records() -> Iterator[list[logging.LogRecord]]:
    """The INFO and higher records of the project's loggers while the block runs: a worker's log stays in its own
    process, so ``run_ingest`` logs them again where the run is (its Prefect and MLflow logs, the user's console)."""
    project = logging.getLogger("softcon")
    handler, level = _RecordList(), project.level
    project.addHandler(handler)
    if not project.isEnabledFor(logging.INFO):
        project.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        project.removeHandler(handler)
        project.setLevel(level)


def _fans_out(config: IngestConfig, tiles: int) -> bool:
    """Whether the run's tiles go to Dask: a scheduler is given, or the LocalCluster would have more than one
    worker with a tile each (one tile, or ``n_workers`` 1, runs in this process)."""
    return bool(config.dask_address) or min(config.n_workers, tiles) > 1


def _run_tiles(config: IngestConfig, work: Sequence[TileWork], read: ReadOptions) -> Iterator[tuple[Tile, _RunState]]:
    """Each tile's outcome as it finishes: in this process one after the other, or one Dask task per tile (the
    cluster at ``config.dask_address``, else a LocalCluster of ``config.n_workers`` processes).

    Every tile is tried before a failure is raised (the first one; the others are logged), so a tile that fails
    does not lose its neighbours' work.
    """
    if not _fans_out(config, len(work)):
        for one in work:
            yield one.tile, ingest_one_tile(config, one, read)
        return
    from distributed import as_completed

    with open_dask_client(config, None, trim_memory=False, profile=False) as client:
        log.info("ingest: %d tiles over the Dask cluster %s", len(work), client.dashboard_link)
        # Tiles with the most items first, so that no long tile is left to run alone at the end of the run.
        futures = {
            client.submit(ingest_one_tile, config, one, key=f"ingest-{one.tile.tile_id}-{uuid.uuid4().hex}",
                          priority=len(one.items)): one.tile
            for one in sorted(work, key=lambda one: len(one.items), reverse=True)
        }  # fmt: skip
        errors: list[tuple[Tile, BaseException]] = []
        for future in as_completed(futures):
            tile = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # the other tiles finish first
                log.error("tile %s failed: %s", tile.tile_id, error)
                errors.append((tile, error))
                continue
            yield tile, outcome
    if errors:
        raise errors[0][1]


def run_ingest(config: IngestConfig) -> IngestReport:
    """Search, filter and load Sentinel-2/-1 items onto the tile grid of the area into the cube.

    What it does goes to this module's logger (one INFO record per tile), how far it is to ``softcon.progress``
    (step "tiles", once per tile done).

    Example:
        >>> config = IngestConfig(stac=url, bbox=(11.0, 46.49, 11.02, 46.51), start=date(2024, 6, 1),
        ...                       end=date(2024, 6, 30), cube="cube.zarr")
        >>> report = run_ingest(config)
        >>> open_tile_dataset("cube.zarr", report.tiles[0]).s2

    Raises:
        ValueError: when the search finds no items or none is usable (no store is created), the cube holds
            other bands, or a header's environment variable is unset.
        FileNotFoundError: a missing static STAC file or area file.
    """
    started = time.perf_counter()
    progress = log.info
    access = StacAccess.from_config(config)
    read = ReadOptions.from_access(access, threads=config.read_threads)
    area = read_area(config)
    found = search_items(config, area, access=access)
    if not found:
        raise ValueError(
            f"no STAC items in {config.stac} for collections {list(config.collections)}, area {area.bounds}, "
            f"dates {config.start}..{config.end}; nothing written. Check the area (lon/lat W,S,E,N: open sea has "
            "no Sentinel-2 granules), the dates and the collection names"
        )
    s2_items = [i for i in found if sensor_of(i["collection"]) == "s2"]
    s1_items = [i for i in found if sensor_of(i["collection"]) == "s1"]
    s2_items, filtered = filter_cloudy_items(s2_items, config.max_cloud)
    progress(f"found {len(found)} items, {len(filtered)} over {config.max_cloud}% cloud")

    state = _RunState()
    usable: list[dict[str, Any]] = []
    for item in s2_items + s1_items:
        spec = spec_for_item(item)
        try:
            if spec.sensor == "s2":
                for band in config.bands:
                    spec.asset_key(band, item)
            elif not any(spec.assets[pol] in item["assets"] for pol in S1_POLS):  # single-pol is fine
                raise KeyError(f"item {item['id']} has none of the S1 assets {[spec.assets[p] for p in S1_POLS]}")
        except KeyError as error:
            log.warning("skipping item %s: %s", item["id"], error.args[0])
            state.failures[item["id"]] = f"missing asset: {error.args[0]}"
            continue
        usable.append(item)
    if not usable:
        raise ValueError(
            f"none of the {len(found)} STAC items is usable: {len(filtered)} over max_cloud {config.max_cloud}% "
            f"(raise it), {len(state.failures)} without a requested asset {dict(state.failures)} (request other "
            "bands); nothing written"
        )

    tiles = tiles_for_area(area, resolution=config.resolution, tile_size=config.tile_size, epsg=config.epsg)
    lost_steps = check_tiles(config.cube, tiles, usable)
    local = None if is_url(config.cube) else Path(config.cube)
    bytes_before = {tile.tile_id: _tree_bytes(local / tile_path(tile.tile_id)) for tile in tiles} if local else {}
    work = [
        TileWork(tile, _intersecting(usable, tile), tuple(lost_steps.get(tile.tile_id, ())), area_mask(tile, area))
        for tile in tiles
    ]
    for done, (tile, outcome) in enumerate(_run_tiles(config, work, read), start=1):
        for record in outcome.records:
            logging.getLogger(record.name).handle(record)
        for message in outcome.messages:
            progress(message)
        state.merge(outcome)
        log.info("tile %d/%d done: %s", done, len(tiles), tile.tile_id)
        stage_progress.report("tiles", done, len(tiles))
    cube_days = state.days

    bytes_written = (
        sum(max(0, _tree_bytes(local / tile_path(t.tile_id)) - bytes_before[t.tile_id]) for t in tiles) if local else 0
    )
    filtered_set = set(filtered)
    statuses = {}
    for item in found:
        item_id = item["id"]
        if item_id in state.failures:
            statuses[item_id] = "failed"
        elif item_id in filtered_set:
            statuses[item_id] = "filtered"
        elif item_id in state.ingested:
            statuses[item_id] = "ingested"
        else:
            statuses[item_id] = "not written"  # its tile-dates exist already, or were cloudy / empty
    report = IngestReport(
        cube=config.cube, tiles=[t.tile_id for t in tiles], items_found=len(found), items_filtered=len(filtered),
        items_ingested=len(state.ingested), items_failed=sorted(state.failures), tile_dates_written=state.written,
        tile_dates_skipped=dict(state.skipped), tile_dates_repaired=state.repaired, bytes_written=bytes_written,
        pixel_bytes=state.pixel_bytes,
        seconds=time.perf_counter() - started, dates=len(cube_days), failures=dict(state.failures),
        items=statuses,
    )  # fmt: skip
    progress(f"ingest done: {report.metrics()}")
    warning = report.warning(config)
    if warning:
        log.warning(warning)
    return report
