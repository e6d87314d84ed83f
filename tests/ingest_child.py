"""Run one ingest in a child process for the kill and concurrency tests (not collected by pytest).

Usage: python ingest_child.py CONFIG_JSON [--pause-at grow|commit] [--marker FILE] [--slow-append SECONDS]
                                          [--kill-at POINT] [--write-batch N]

``--pause-at grow`` stops after the first append wrote its chunks ahead, before any array grew;
``--pause-at commit`` stops after the data arrays grew, before the time coordinate (the commit point).
Either writes ``--marker`` and sleeps until killed. ``--slow-append`` sleeps inside every append,
holding the tile lock, so that concurrent runs overlap.

``--kill-at POINT`` sends the process SIGKILL itself at that point (see ``KILL_POINTS``), so that a test
kills it at an exact moment without polling. ``--write-batch N`` appends at most N dates at once (1: each
date is its own append, so that a kill can land between two dates of one tile).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import zarr
from zarr.core.group import AsyncGroup

import softcon.tasks.cube_store as cube_store
import softcon.tasks.ingest as ingest
from softcon.config import IngestConfig

KILL_POINTS = {
    "before-first-tile": "when the first tile is about to be created (nothing of it written)",
    "mid-tile-creation": "when the first tile's arrays are created but for its time coordinates",
    "mid-write-ahead": "when half of the first append's chunks are written ahead",
    "after-write-ahead": "when the first append's chunks are all written ahead, before any array grew",
    "after-data-grew": "when the data arrays grew, before the item ids are recorded",
    "before-time-commit": "when the item ids are recorded, before the time coordinate grows (the commit point)",
    "between-dates": "between two appends of one tile (with --write-batch 1: after its first date)",
    "between-tiles": "when the first tile is done, before the second one starts",
    "mid-repair": "after the first array the repair of an interrupted append truncated, before the others",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--pause-at", choices=["grow", "commit"])
    parser.add_argument("--marker")
    parser.add_argument("--slow-append", type=float, default=0.0)
    parser.add_argument("--kill-at", choices=sorted(KILL_POINTS))
    parser.add_argument("--write-batch", type=int)
    args = parser.parse_args()

    def kill_here(point: str) -> None:
        if args.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    original_grow = cube_store.grow_arrays
    grown: list[str] = []

    def pausing_grow(array, steps):  # type: ignore[no-untyped-def]
        is_time = array.basename in ("time", "time_s1")
        if (args.pause_at == "grow" and not grown) or (args.pause_at == "commit" and is_time):
            Path(args.marker).write_text("paused")
            time.sleep(3600)
        if not grown:
            kill_here("after-write-ahead")
        if is_time:
            kill_here("before-time-commit")
        grown.append(array.basename)
        original_grow(array, steps)

    original_append = ingest.append_steps
    appends: list[int] = []

    def slow_append(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(args.slow_append)
        if appends:
            kill_here("between-dates")
        appends.append(1)
        return original_append(*a, **k)

    original_write_ahead = cube_store.write_ahead

    def write_ahead(writes):  # type: ignore[no-untyped-def]
        if args.kill_at == "mid-write-ahead":
            original_write_ahead(writes[: len(writes) // 2])
            kill_here("mid-write-ahead")
        original_write_ahead(writes)

    original_update_attributes = zarr.Group.update_attributes

    def update_attributes(self, new_attributes):  # type: ignore[no-untyped-def]
        if grown:  # the attribute write of an append: after its data arrays grew
            kill_here("after-data-grew")
        return original_update_attributes(self, new_attributes)

    original_create_tile = cube_store.create_tile

    def create_tile(*a, **k):  # type: ignore[no-untyped-def]
        kill_here("before-first-tile")
        return original_create_tile(*a, **k)

    original_create_array = AsyncGroup.create_array

    async def create_array(self, name, **k):  # type: ignore[no-untyped-def]
        if name == "time":  # created last with time_s1, once every other array holds its values
            kill_here("mid-tile-creation")
        return await original_create_array(self, name, **k)

    original_ingest_tile = ingest.ingest_tile
    tiles_started: list[int] = []

    def ingest_tile(*a, **k):  # type: ignore[no-untyped-def]
        if tiles_started:
            kill_here("between-tiles")
        tiles_started.append(1)
        return original_ingest_tile(*a, **k)

    original_resize = zarr.Array.resize

    def resize(self, new_shape):  # type: ignore[no-untyped-def]
        shrinks = new_shape[0] < self.shape[0]  # only a repair truncates
        original_resize(self, new_shape)
        if shrinks:
            kill_here("mid-repair")

    cube_store.grow_arrays = pausing_grow
    ingest.append_steps = slow_append
    cube_store.write_ahead = write_ahead
    cube_store.create_tile = create_tile
    ingest.ingest_tile = ingest_tile
    zarr.Group.update_attributes = update_attributes
    zarr.Array.resize = resize
    AsyncGroup.create_array = create_array
    if args.write_batch:
        ingest.WRITE_BATCH = args.write_batch
    # n_workers 1: every tile in this process, where the patches above apply.
    values = json.loads(Path(args.config).read_text()) | {"n_workers": 1, "dask_address": None}
    report = ingest.run_ingest(IngestConfig(**values))
    print(json.dumps({"written": report.tile_dates_written, "skipped": report.tile_dates_skipped}))


if __name__ == "__main__":
    main()
