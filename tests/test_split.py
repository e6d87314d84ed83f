"""Spatial block split: deterministic, order-independent, every split present when possible."""

from __future__ import annotations

import pytest

from softcon.tasks import split

BLOCKS = [(f"tile{t}", r, c) for t in range(3) for r in range(3) for c in range(3)]


def test_assign_splits_is_deterministic_and_order_independent():
    first = split.assign_splits(BLOCKS, 0.2, 0.2, seed=7)
    again = split.assign_splits(list(reversed(BLOCKS)) + BLOCKS[:3], 0.2, 0.2, seed=7)
    assert first == again


def test_assign_splits_seed_changes_assignment():
    assignments = {tuple(sorted(split.assign_splits(BLOCKS, 0.2, 0.2, seed=s).items())) for s in range(5)}
    assert len(assignments) > 1


def test_assign_splits_fractions():
    counts = [0, 0, 0]
    for value in split.assign_splits(BLOCKS, 0.1, 0.2, seed=0).values():
        counts[value] += 1
    assert counts == [27 - 3 - 5, 3, 5]


@pytest.mark.parametrize(
    ("n_blocks", "val", "test", "expected"),
    [(3, 0.1, 0.2, (1, 1, 1)), (2, 0.1, 0.2, (2, 0, 0)), (4, 0.0, 0.2, (3, 0, 1)), (1, 0.4, 0.4, (1, 0, 0))],
    ids=["three-blocks-one-each", "two-blocks-all-train", "no-val", "single-block"],
)
def test_split_counts(n_blocks, val, test, expected):
    assert split.split_counts(n_blocks, val, test) == expected


def test_patch_block_uses_patch_centre():
    assert split.patch_block("t", 16, 48, patch_size=32, block_size=64) == ("t", 0, 1)


def test_assign_splits_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to less than 1"):
        split.assign_splits(BLOCKS, 0.5, 0.5, seed=0)
