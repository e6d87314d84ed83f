"""Progress of a stage's work, through one interface for every stage.

The work (``tasks/``) reports how far it is with ``report(step, done, total)`` ("tiles" in ingest, "tiles",
"blocks" and "stats" in preprocess, "steps" in training) and hands out links with ``announce(name, url)`` (the Dask
dashboard). Whoever shows progress subscribes for the length of a block with ``listen``: the CLI draws bars, a
stage flow writes every tenth to its run log (``flows/tracking.py``). The stages' signatures stay plain data, so
Prefect's cache keys and flow parameters never see a callback.

Listeners belong to the process and are called in the reporting thread; one that raises is logged and skipped, so
showing progress never fails a stage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ProgressCallback = Callable[[str, int, int], None]
"""``on_progress(step, done, total)``."""
LinkCallback = Callable[[str, str], None]
"""``on_link(name, url)``."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listener:
    """What one subscriber wants called."""

    on_progress: ProgressCallback | None = None
    on_link: LinkCallback | None = None


_listeners: list[Listener] = []
_lock = threading.Lock()


@contextmanager
def listen(on_progress: ProgressCallback | None = None, on_link: LinkCallback | None = None) -> Iterator[None]:
    """Receive every ``report`` and ``announce`` of this process while the block runs."""
    listener = Listener(on_progress, on_link)
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def _current() -> list[Listener]:
    with _lock:
        return list(_listeners)


def report(step: str, done: int, total: int) -> None:
    """``done`` of ``total`` units of ``step`` are finished."""
    for listener in _current():
        if listener.on_progress is not None:
            try:
                listener.on_progress(step, done, total)
            except Exception:
                log.exception("a progress listener failed on %s %d/%d", step, done, total)


def announce(name: str, url: str) -> None:
    """A link worth showing while the stage runs, e.g. ``announce("dask.dashboard", link)``."""
    for listener in _current():
        if listener.on_link is not None:
            try:
                listener.on_link(name, url)
            except Exception:
                log.exception("a progress listener failed on link %s", name)
