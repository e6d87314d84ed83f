"""Backfill bookkeeping: cut a date range into periods, find which have acquisitions, remember which are done.

Plain functions (no Prefect): ``flows/backfill.py`` wires them. The ledger of ingested periods lives in the
cube itself (root group attribute ``ingested_periods``), so it travels with the data, works for a cube on
object storage, and a backfill restarted after a crash skips what an earlier attempt finished.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

import zarr

from softcon.config import IngestConfig
from tasks.ingest import tile_lock

Period = Literal["day", "week", "month"]
PERIODS: tuple[str, ...] = ("day", "week", "month")
LEDGER_ATTR = "ingested_periods"
LEDGER_LOCK = "ingested-periods"
"""Name of the lock (beside the tile locks, ``tasks.ingest.tile_lock``) held while the ledger is rewritten."""


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


def request_key(config: IngestConfig) -> str:
    """What makes two ingests of the same window the same: the area, the collections and the bands."""
    bbox = ",".join(f"{value:.6f}" for value in config.bbox)
    return f"{bbox}|{','.join(sorted(config.collections))}|{','.join(config.bands)}"


def read_ledger(cube: str) -> list[dict[str, Any]]:
    """The periods recorded as ingested in the cube (empty when the cube does not exist yet)."""
    try:
        root = zarr.open_group(cube, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return []
    return list(root.attrs.get(LEDGER_ATTR, []))


def done_windows(config: IngestConfig) -> set[DateWindow]:
    """The windows of this request (area, collections, bands) already ingested into ``config.cube``."""
    key = request_key(config)
    return {
        DateWindow(date.fromisoformat(entry["start"]), date.fromisoformat(entry["end"]))
        for entry in read_ledger(config.cube)
        if entry.get("request") == key
    }


def record_window(config: IngestConfig, window: DateWindow, **details: Any) -> None:
    """Add ``window`` to the cube's ledger: a read-modify-write of the root attrs under the cube's ledger lock,
    so that concurrent backfills of one local cube do not drop each other's entries (no lock for URLs)."""
    with tile_lock(config.cube, LEDGER_LOCK):
        root = zarr.open_group(config.cube, mode="a", zarr_format=3)
        ledger = [
            entry
            for entry in root.attrs.get(LEDGER_ATTR, [])
            if not (
                entry.get("request") == request_key(config)
                and entry.get("start") == window.start.isoformat()
                and entry.get("end") == window.end.isoformat()
            )
        ]
        ledger.append(
            {
                "request": request_key(config),
                "start": window.start.isoformat(),
                "end": window.end.isoformat(),
                **details,
            }
        )
        root.attrs[LEDGER_ATTR] = ledger


def window_config(config: IngestConfig, window: DateWindow) -> IngestConfig:
    """The request restricted to one window."""
    return config.model_copy(update={"start": window.start, "end": window.end})
