"""Run one ingest in a child process for the kill and concurrency tests (not collected by pytest).

Usage: python ingest_child.py CONFIG_JSON [--pause-at grow|commit] [--marker FILE] [--slow-append SECONDS]

``--pause-at grow`` stops after the first append wrote its chunks ahead, before any array grew;
``--pause-at commit`` stops after the data arrays grew, before the time coordinate (the commit point).
Either writes ``--marker`` and sleeps until killed. ``--slow-append`` sleeps inside every append,
holding the tile lock, so that concurrent runs overlap.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tasks.ingest as ingest
from softcon.config import IngestConfig

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--pause-at", choices=["grow", "commit"])
parser.add_argument("--marker")
parser.add_argument("--slow-append", type=float, default=0.0)
args = parser.parse_args()

original_grow = ingest._grow
grown: list[str] = []


def pausing_grow(array, steps):  # type: ignore[no-untyped-def]
    is_time = array.basename in ("time", "time_s1")
    if (args.pause_at == "grow" and not grown) or (args.pause_at == "commit" and is_time):
        Path(args.marker).write_text("paused")
        time.sleep(3600)
    grown.append(array.basename)
    original_grow(array, steps)


original_append = ingest.append_steps


def slow_append(*a, **k):  # type: ignore[no-untyped-def]
    time.sleep(args.slow_append)
    return original_append(*a, **k)


ingest._grow = pausing_grow
ingest.append_steps = slow_append
report = ingest.run_ingest(IngestConfig(**json.loads(Path(args.config).read_text())))
print(json.dumps({"written": report.tile_dates_written, "skipped": report.tile_dates_skipped}))
