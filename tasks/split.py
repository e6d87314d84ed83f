"""Spatial train/val/test split by blocks, so that neighbouring patches never straddle two splits."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2

BlockId = tuple[str, int, int]
"""(tile_id, block_row, block_col)."""


def patch_block(tile_id: str, row: int, col: int, patch_size: int, block_size: int) -> BlockId:
    """The split block holding a patch's centre pixel (blocks are ``block_size`` px squares of a tile)."""
    centre_row, centre_col = row + patch_size // 2, col + patch_size // 2
    return (tile_id, int(centre_row // block_size), int(centre_col // block_size))


def split_counts(n_blocks: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """How many blocks go to (train, val, test).

    Rounded to the nearest block; with at least 3 blocks, a non-zero fraction gets at least one block,
    and at least one block always stays in train.
    """
    n_val = round(val_fraction * n_blocks)
    n_test = round(test_fraction * n_blocks)
    if n_blocks >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    while n_blocks > 0 and n_val + n_test >= n_blocks:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_blocks - n_val - n_test, n_val, n_test


def assign_splits(
    block_ids: Sequence[Hashable], val_fraction: float, test_fraction: float, seed: int
) -> dict[Hashable, int]:
    """Assign each block to train (0), val (1) or test (2), deterministically from ``seed``.

    The distinct block ids are sorted (by their ``repr``, so mixed types sort too) and shuffled with a
    seeded generator; the first ones go to test, the next to val, the rest to train. The result depends
    only on the set of block ids, the fractions and the seed, not on the order they are given in.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum to less than 1"
        )
    blocks = sorted(set(block_ids), key=repr)
    _, n_val, n_test = split_counts(len(blocks), val_fraction, test_fraction)
    order = np.random.default_rng(seed).permutation(len(blocks))
    splits: dict[Hashable, int] = {}
    for rank, index in enumerate(order):
        splits[blocks[index]] = TEST if rank < n_test else VAL if rank < n_test + n_val else TRAIN
    return splits
