"""Prefect flows, one per stage plus the pipeline, backfill and reproduce."""

from softcon import models  # noqa: F401  (sets torch's allocator options before a flow module imports torch)
