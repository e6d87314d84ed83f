"""Backfill bookkeeping: cut a date range into periods, find which have acquisitions, remember which are done.

Plain functions (no Prefect): ``flows/backfill.py`` wires them. The ledger of ingested periods lives in the
cube itself (root group attribute ``ingested_periods``), so it travels with the data, works for a cube on
object storage, and a backfill restarted after a crash skips what an earlier attempt finished.

The ledger claims no more than the cube holds. An entry names its request (every parameter that changes what
is written: ``request_parameters``), its window, and the tile-dates it covered (tile id -> time coordinate ->
UTC dates, read from the cube once the period's ingest completed). A window counts as done only under the
same request and while the cube still holds each of those tile-dates (``read_ledger_state``). A period is
recorded only when its ingest wrote tile-dates or found them already there, or had none to consider: not
when items failed, nor when it wrote nothing while skipping tile-dates as nodata or cloudy
(``unfinished_reason``), nor when the cube holds fewer tile-dates than the ingest reported.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import zarr

from softcon.config import IngestConfig
from softcon.tasks.collections import sensor_of
from softcon.tasks.cube_store import SENSOR_ARRAYS, existing_days, open_cube, tile_group, tile_lock
from softcon.tasks.ingest import tiles_for_area
from softcon.tasks.object_writes import conditional_writes, swap_object
from softcon.tasks.stac_access import is_url
from softcon.tasks.stac_search import read_area

Period = Literal["day", "week", "month"]
PERIODS: tuple[str, ...] = ("day", "week", "month")
LEDGER_ATTR = "ingested_periods"
LEDGER_LOCK = "ingested-periods"
"""Name of the lock (beside the tile locks, ``tasks.cube_store.tile_lock``) held while the ledger is rewritten."""


@dataclass(frozen=True, order=True)
class DateWindow:
    """An inclusive range of days, one child run of a backfill."""

    start: date
    end: date

    @property
    def label(self) -> str:
        return self.start.isoformat() if self.start == self.end else f"{self.start.isoformat()}..{self.end.isoformat()}"

    def contains(self, day: date) -> bool:
        return self.start <= day <= self.end


def split_periods(start: date, end: date, period: str) -> list[DateWindow]:
    """Cut ``start..end`` (inclusive) into calendar days, ISO weeks (Monday first) or months.

    The first and last windows are clipped to the range, so the windows cover it exactly, without overlap.

    Raises:
        ValueError: for an unknown period or an end before the start.
    """
    if period not in PERIODS:
        raise ValueError(f"period {period!r} is not one of {', '.join(PERIODS)}")
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    windows: list[DateWindow] = []
    day = start
    while day <= end:
        if period == "day":
            last = day
        elif period == "week":
            last = day + timedelta(days=6 - day.weekday())
        else:
            last = day.replace(day=calendar.monthrange(day.year, day.month)[1])
        windows.append(DateWindow(day, min(last, end)))
        day = windows[-1].end + timedelta(days=1)
    return windows


def item_day(item: dict[str, Any]) -> date:
    """The UTC day of a STAC item's ``datetime`` (or ``start_datetime``)."""
    props = item["properties"]
    text = props.get("datetime") or props.get("start_datetime")
    return datetime.fromisoformat(text.replace("Z", "+00:00")).date()


def windows_with_items(windows: Sequence[DateWindow], items: Iterable[dict[str, Any]]) -> dict[DateWindow, int]:
    """How many items fall in each window (windows without items are left out)."""
    counts: dict[DateWindow, int] = {}
    days = [item_day(item) for item in items]
    for window in windows:
        found = sum(1 for day in days if window.contains(day))
        if found:
            counts[window] = found
    return counts


TileDates = dict[str, dict[str, list[str]]]
"""Tile id -> time coordinate (``time`` for Sentinel-2, ``time_s1`` for Sentinel-1) -> ISO dates (UTC) of its steps."""

SENSOR_TIME = {"s2": "time", "s1": "time_s1"}
"""Sensor -> the time coordinate of its steps in a tile (``tasks.cube_store.SENSOR_ARRAYS``)."""
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
"""Files that make one shapefile: its geometries and their CRS are spread over them."""


def _area_digest(area: str) -> str:
    """SHA-256 of an area file's bytes (of every part of a shapefile), so an edited area is a new request and a
    moved one is not."""
    path = Path(area)
    if not path.is_file():
        raise FileNotFoundError(f"area file {path} does not exist; give a GeoJSON or GeoPackage")
    parts = [path.with_suffix(suffix) for suffix in SHAPEFILE_PARTS] if path.suffix.lower() == ".shp" else [path]
    digest = hashlib.sha256()
    for part in parts:
        if part.is_file():
            digest.update(part.suffix.lower().encode())  # which part, not its name: a moved area is the same
            digest.update(part.read_bytes())
    return digest.hexdigest()


def request_parameters(config: IngestConfig) -> dict[str, Any]:
    """The parameters of an ingest that decide which tile-dates it writes, and with what.

    In: where items come from and which are searched (``stac``, ``collections``, the area: ``bbox`` and the
    area file's content), which items and tile-dates are kept (``max_cloud``, ``max_tile_cloud``,
    ``max_tile_nodata``: a recorded period may have skipped cloudy or empty tile-dates, which looser thresholds
    would write), and the grid and arrays they land on (``epsg``, ``tile_size``, ``resolution``, ``bands``).

    Out, because they do not change what is written: ``start``/``end`` (each ledger entry holds its own window);
    ``cube`` (the ledger lives in it); ``sign`` and ``headers`` (how assets are reached: a read they make fail
    is a failed item, and a period with failed items is never recorded); ``retries``, ``retry_delay`` and
    ``read_threads`` (how often and how many reads are tried at once, not what they return); ``dask_address`` and
    ``n_workers`` (which processes write the tiles, not what they write).
    """
    return {
        "stac": config.stac,
        "collections": sorted(config.collections),
        "bbox": None if config.bbox is None else [round(value, 6) for value in config.bbox],
        "area_sha256": None if config.area is None else _area_digest(config.area),
        "max_cloud": config.max_cloud,
        "max_tile_cloud": config.max_tile_cloud,
        "max_tile_nodata": config.max_tile_nodata,
        "epsg": config.epsg,
        "tile_size": config.tile_size,
        "resolution": config.resolution,
        "bands": list(config.bands),  # in the cube's order: another order is another band axis
    }


def request_key(config: IngestConfig) -> str:
    """What makes two ingests of the same window write the same: ``request_parameters`` as canonical JSON."""
    return json.dumps(request_parameters(config), sort_keys=True, separators=(",", ":"))


def _changed_parameters(recorded_key: str, config: IngestConfig) -> str:
    """The parameters a ledger key differs in from ``config``'s, e.g. ``tile_size 1056, now 256``."""
    try:
        recorded = json.loads(recorded_key)
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):  # "bbox|collections|bands", before the key held every parameter
        return "a key from before the grid and the thresholds were part of it"
    now = request_parameters(config)
    differences = [
        f"{name} {json.dumps(recorded.get(name))}, now {json.dumps(value)}"
        for name, value in now.items()
        if recorded.get(name) != value
    ]
    return "; ".join(differences) or "a key of another form"


def request_tiles(config: IngestConfig) -> list[str]:
    """Ids of the grid tiles the request's area touches (the tiles ``run_ingest`` writes)."""
    area = read_area(config)
    tiles = tiles_for_area(area, resolution=config.resolution, tile_size=config.tile_size, epsg=config.epsg)
    return [tile.tile_id for tile in tiles]


def read_tile_dates(
    cube: str,
    tile_ids: Iterable[str],
    window: DateWindow | None = None,
    time_dims: Iterable[str] = tuple(SENSOR_ARRAYS),
) -> TileDates:
    """The UTC dates of the time steps the cube's tiles hold (within ``window`` when given).

    Reads only each tile's time coordinates (``time_dims``: ``time``, ``time_s1``), the commit point of an
    append, so a step is counted only once it is complete. Tiles that are missing, or hold no step in the
    window, are left out.
    """
    try:
        root = open_cube(cube)
    except FileNotFoundError:
        return {}
    found: TileDates = {}
    for tile_id in tile_ids:
        group = tile_group(root, tile_id)
        if group is None:
            continue
        steps: dict[str, list[str]] = {}
        for time_dim in time_dims:
            if time_dim not in group:  # a tile whose creation was interrupted holds no step
                continue
            # Longitude 0: the solar day of an acquisition there is its UTC date.
            days = existing_days(group, time_dim, 0.0)
            dates = sorted(day.isoformat() for day in days if window is None or window.contains(day))
            if dates:
                steps[time_dim] = dates
        if steps:
            found[tile_id] = steps
    return found


def read_period_tile_dates(config: IngestConfig, tile_ids: Iterable[str], window: DateWindow) -> TileDates:
    """The tile-dates of ``window`` that the request could have written and the cube holds: on its tiles, along
    the time coordinates of its collections (an S2-only request does not claim the cube's S1 steps)."""
    time_dims = {SENSOR_TIME[sensor_of(collection)] for collection in config.collections}
    return read_tile_dates(config.cube, tile_ids, window, sorted(time_dims))


def count_tile_dates(tile_dates: TileDates) -> int:
    """How many tile-dates (steps of one tile along one time coordinate) ``tile_dates`` holds."""
    return sum(len(dates) for steps in tile_dates.values() for dates in steps.values())


def missing_tile_dates(recorded: TileDates, present: TileDates) -> TileDates:
    """The tile-dates of ``recorded`` that ``present`` lacks."""
    missing: TileDates = {}
    for tile_id, steps in recorded.items():
        for time_dim, dates in steps.items():
            lost = [day for day in dates if day not in present.get(tile_id, {}).get(time_dim, [])]
            if lost:
                missing.setdefault(tile_id, {})[time_dim] = lost
    return missing


def unfinished_reason(metrics: Mapping[str, float], held: TileDates) -> str | None:
    """Why a period whose ingest completed is not done, or None when it is (then record it with ``held``).

    Done: the ingest wrote tile-dates or found them already in the cube (whatever else it skipped), or had no
    tile-date to consider at all, and the cube holds at least as many of the period's tile-dates as it reported
    (fewer: some were deleted since, or a cached result stood for a cube that changed). Not done: items failed
    (they may load next time), or it wrote nothing and found nothing while skipping tile-dates as nodata or
    cloudy (what a grid that misses the data does, e.g. a tile size far larger than the area's scenes).

    Args:
        metrics: the ingest's metrics (``IngestReport.metrics``, as its MLflow run holds them).
        held: the period's tile-dates the cube holds now (``read_tile_dates``).
    """
    failed = int(metrics.get("items_failed", 0))
    if failed:
        return f"{failed} item(s) failed"
    reported = int(metrics.get("tile_dates_written", 0) + metrics.get("tile_dates_skipped_exists", 0))
    skipped = {
        name.removeprefix("tile_dates_skipped_"): int(value)
        for name, value in sorted(metrics.items())
        if name.startswith("tile_dates_skipped_") and name != "tile_dates_skipped_exists" and value
    }
    if reported == 0 and skipped:
        reasons = ", ".join(f"{count} as {reason}" for reason, count in skipped.items())
        return f"it wrote no tile-date and skipped {sum(skipped.values())} ({reasons})"
    if count_tile_dates(held) < reported:
        return f"the cube holds {count_tile_dates(held)} of its tile-dates, the ingest reported {reported}"
    return None


def _root_attrs(root: zarr.Group) -> dict[str, Any]:
    """The cube's root attributes as a plain dict (zarr types the values as JSON, which narrows nothing here)."""
    return dict(root.attrs)


def read_ledger(cube: str) -> list[dict[str, Any]]:
    """The periods recorded as ingested in the cube (empty when the cube does not exist yet)."""
    try:
        root = open_cube(cube)
    except FileNotFoundError:
        return []
    return list(_root_attrs(root).get(LEDGER_ATTR, []))


def _window_of(entry: Mapping[str, Any]) -> DateWindow:
    return DateWindow(date.fromisoformat(entry["start"]), date.fromisoformat(entry["end"]))


@dataclass(frozen=True)
class LedgerState:
    """The ledger of one cube read for one request, each recorded window checked against the cube."""

    done: set[DateWindow]
    """Recorded under this request, and every tile-date it covered is still in the cube."""
    gone: dict[DateWindow, TileDates]
    """Recorded under this request, but these of its tile-dates are no longer in the cube."""
    other: dict[DateWindow, str]
    """Recorded only under other parameters -> how they differ from this request's."""

    def rerun_reason(self, window: DateWindow) -> str | None:
        """Why a recorded window is not done (None for a window that is done, or was never recorded)."""
        if window in self.gone:
            lost = "; ".join(
                f"{tile_id} {time_dim} {', '.join(dates)}"
                for tile_id, steps in sorted(self.gone[window].items())
                for time_dim, dates in steps.items()
            )
            return f"recorded but its tile-dates are gone from the cube ({lost})"
        if window in self.other:
            return f"recorded under other parameters ({self.other[window]})"
        return None

    def rerun_reasons(self, windows: Iterable[DateWindow]) -> dict[DateWindow, str]:
        """The windows among ``windows`` that were recorded but are not done, with why."""
        return {window: reason for window in windows if (reason := self.rerun_reason(window))}

    def rerun_summary(self, windows: Iterable[DateWindow]) -> str:
        """How many of ``windows`` run again, by why, e.g. ``" (1 recorded under other parameters)"``."""
        again = self.rerun_reasons(windows)
        gone = sum(window in self.gone for window in again)
        counts = [
            f"{gone} recorded but their tile-dates are gone from the cube" if gone else "",
            f"{len(again) - gone} recorded under other parameters" if len(again) > gone else "",
        ]
        return f" ({', '.join(count for count in counts if count)})" if again else ""


def read_ledger_state(config: IngestConfig) -> LedgerState:
    """The ledger of ``config.cube`` for ``config``'s request, each entry checked against the tiles it covered.

    Reads the root attributes and the time coordinates of the tiles the entries name, each tile once.
    """
    key = request_key(config)
    entries = read_ledger(config.cube)
    mine = [entry for entry in entries if entry.get("request") == key]
    covered = {tile_id for entry in mine for tile_id in entry.get("tile_dates", {})}
    present = read_tile_dates(config.cube, covered)
    done: set[DateWindow] = set()
    gone: dict[DateWindow, TileDates] = {}
    for entry in mine:
        missing = missing_tile_dates(entry.get("tile_dates", {}), present)
        if missing:
            gone[_window_of(entry)] = missing
        else:
            done.add(_window_of(entry))
    other = {
        _window_of(entry): _changed_parameters(entry.get("request", ""), config)
        for entry in entries
        if entry.get("request") != key and _window_of(entry) not in done
    }
    return LedgerState(done=done, gone={w: m for w, m in gone.items() if w not in done}, other=other)


def done_windows(config: IngestConfig) -> set[DateWindow]:
    """The windows of this request already ingested into ``config.cube``, their tile-dates still there."""
    return read_ledger_state(config).done


def _ledger_with(ledger: Sequence[Mapping[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The ledger with ``entry`` in place of any entry of the same request and window."""
    same = ("request", "start", "end")
    return [dict(e) for e in ledger if tuple(e.get(k) for k in same) != tuple(entry[k] for k in same)] + [entry]


def record_window(
    config: IngestConfig, window: DateWindow, *, tile_dates: TileDates | None = None, **details: Any
) -> None:
    """Add ``window`` to the cube's ledger with the tile-dates it covered, so that concurrent backfills of one
    cube never drop each other's entries: a local cube's root attributes are rewritten under the cube's ledger
    lock; on S3-compatible object storage its root ``zarr.json`` is swapped with a conditional write
    (``If-Match``), read again and retried when another writer committed first (other object stores: a plain
    rewrite, one writer per cube).

    Args:
        config: the request (its key is recorded with the window).
        window: the period ingested.
        tile_dates: what the period covered (``read_tile_dates``); none for a period that had nothing to write.
            ``done_windows`` counts the window as done only while the cube still holds all of them.
        details: recorded as they are (the child's flow-run and MLflow run ids).
    """
    entry = {
        "request": request_key(config),
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "tile_dates": tile_dates or {},
        **details,
    }
    if is_url(config.cube) and conditional_writes(config.cube):
        open_cube(config.cube, mode="a")  # the root group exists (a period with nothing to write may be first)

        def add_entry(metadata: bytes) -> bytes:
            root = json.loads(metadata)
            attributes = root.setdefault("attributes", {})
            attributes[LEDGER_ATTR] = _ledger_with(attributes.get(LEDGER_ATTR, []), entry)
            return json.dumps(root, indent=2).encode()

        swap_object(f"{config.cube.rstrip('/')}/zarr.json", add_entry)
        return
    with tile_lock(config.cube, LEDGER_LOCK):
        root = open_cube(config.cube, mode="a")
        root.attrs[LEDGER_ATTR] = _ledger_with(_root_attrs(root).get(LEDGER_ATTR, []), entry)


def window_config(config: IngestConfig, window: DateWindow) -> IngestConfig:
    """The request restricted to one window."""
    return config.model_copy(update={"start": window.start, "end": window.end})
