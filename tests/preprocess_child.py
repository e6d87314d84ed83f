"""Run one preprocess in a child process that kills itself (SIGKILL) at a given point (not collected by pytest).

Usage: python preprocess_child.py CONFIG_JSON --kill-at POINT

The Dask client is in-process (threads), so the kill takes the workers down with the driver, as a killed
machine would. ``KILL_POINTS`` lists the points.
"""

from __future__ import annotations

import argparse
import os
import signal

import zarr
from distributed import Client
from zarr.storage import LocalStore

import softcon.tasks.preprocess as preprocess
from softcon import progress
from softcon.config import PreprocessConfig
from softcon.models import training_store

KILL_POINTS = {
    "planning": "when the first tile of the patch plan (pass 1) is summarized, before the store is created",
    "clearing-old-store": "while an old store is deleted to make room for a new one (all but its root metadata gone)",
    "creating-store": "when the store's image arrays and part of its plan are written, before its attributes",
    "blocks-0": "when the store holds its plan and no block is marked done",
    "blocks-1": "when one write block is marked done",
    "blocks-3": "when three write blocks are marked done",
    "mid-block": "when a block's S2 shard is written and its S1 shard is not",
    "statistics": "during the statistics pass, every block written",
    "before-complete": "when the statistics are recorded and the metadata consolidated, before `complete` is set",
    "repairing": "when a damaged store's lost blocks are marked not done, before they are written again",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--kill-at", choices=sorted(KILL_POINTS), required=True)
    args = parser.parse_args()

    def kill_here(point: str) -> None:
        if args.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_progress(step: str, done: int, total: int) -> None:
        if step == "tiles" and done == 1:
            kill_here("planning")
        if step == "blocks":
            kill_here(f"blocks-{done}")

    original_delete_dir = LocalStore.delete_dir

    async def delete_dir(self, prefix):  # type: ignore[no-untyped-def]
        """Delete what an object store may delete first (every key but the root's ``zarr.json``), then die."""
        if args.kill_at == "clearing-old-store" and prefix == "":
            for path in self.root.rglob("*"):
                if path.is_file() and path != self.root / "zarr.json":
                    path.unlink()
            kill_here("clearing-old-store")
        await original_delete_dir(self, prefix)

    original_create_array = zarr.Group.create_array

    def create_array(self, name, **k):  # type: ignore[no-untyped-def]
        if name == "split":  # the image arrays and the plan's first columns exist
            kill_here("creating-store")
        return original_create_array(self, name, **k)

    original_write_images = training_store.write_images
    blocks_started: list[int] = []

    def write_images(out, start, s2, s1):  # type: ignore[no-untyped-def]
        blocks_started.append(start)
        if args.kill_at == "mid-block" and len(blocks_started) == 2:
            zarr.open_group(out, mode="r+")["s2"][start : start + len(s2)] = s2
            kill_here("mid-block")
        original_write_images(out, start, s2, s1)

    original_block_train_stats = preprocess.block_train_stats

    def block_train_stats(out, start, stop):  # type: ignore[no-untyped-def]
        kill_here("statistics")
        return original_block_train_stats(out, start, stop)

    original_consolidate = zarr.consolidate_metadata

    def consolidate_metadata(*a, **k):  # type: ignore[no-untyped-def]
        result = original_consolidate(*a, **k)
        kill_here("before-complete")
        return result

    original_reopen_blocks = training_store.reopen_blocks

    def reopen_blocks(out, blocks):  # type: ignore[no-untyped-def]
        original_reopen_blocks(out, blocks)
        kill_here("repairing")

    LocalStore.delete_dir = delete_dir
    zarr.Group.create_array = create_array
    training_store.write_images = write_images
    preprocess.block_train_stats = block_train_stats
    zarr.consolidate_metadata = consolidate_metadata
    training_store.reopen_blocks = reopen_blocks
    with (
        Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client,
        progress.listen(on_progress),
    ):
        preprocess.run_preprocess(PreprocessConfig.model_validate_json(args.config), client=client)


if __name__ == "__main__":
    main()
