"""StoreDataset: shapes, dtypes, normalisation, determinism, two dates as views, schema check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from store_factory import SyntheticStore, write_store

from models.data import BlockShuffleSampler, StoreDataset


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("data") / "store.zarr")


def test_item_shapes_and_dtypes(store: SyntheticStore) -> None:
    item = StoreDataset(store.path, crop_size=8)[0]
    assert item["view_a"].shape == item["view_b"].shape == (12, 8, 8)
    assert item["view_a"].dtype == torch.float32
    assert item["labels"].shape == item["fractions"].shape == (store.n_classes,)
    assert item["labelled"].dtype == torch.bool


@pytest.mark.parametrize(("sensor", "channels"), [("s2", 12), ("s1", 2)])
def test_single_view_is_normalised_with_nodata_zero(store: SyntheticStore, sensor: str, channels: int) -> None:
    dataset = StoreDataset(store.path, sensor=sensor, two_views=False, augment=False)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # (N, C, H, W)
    assert images.shape[1] == channels
    assert torch.isfinite(images).all()
    assert images.mean().abs() < 0.2 and 0.5 < images.std() < 1.5
    raw = dataset.read_sample(int(dataset.indices[0]))
    nodata = np.isnan(raw) if sensor == "s1" else raw == 0
    assert nodata.any() and (images[0].numpy()[nodata] == 0).all()


def test_splits_partition_the_store(store: SyntheticStore) -> None:
    sizes = [len(StoreDataset(store.path, split=split)) for split in ("train", "val", "test")]
    assert sum(sizes) == store.n_samples and all(sizes)


def test_items_are_deterministic_by_seed_and_epoch(store: SyntheticStore) -> None:
    first, second = StoreDataset(store.path, seed=3), StoreDataset(store.path, seed=3)
    assert torch.equal(first[5]["view_a"], second[5]["view_a"])
    assert torch.equal(first[5]["view_b"], second[5]["view_b"])
    second.set_epoch(1)
    assert not torch.equal(first[5]["view_a"], second[5]["view_a"])


def test_views_are_two_dates_of_one_location(store: SyntheticStore) -> None:
    dataset = StoreDataset(store.path, augment=False)
    group = zarr.open_group(str(store.path), mode="r")
    location = group["location"][:]
    for i in range(6):
        item = dataset[i]
        sample = int(item["index"])
        candidates = [s for s in np.flatnonzero(location == location[sample]) if s != sample]
        assert any(torch.equal(item["view_b"], dataset.normalise(dataset.read_sample(int(s)))) for s in candidates)
        assert torch.equal(item["view_a"], dataset.normalise(dataset.read_sample(sample)))


def test_block_sampler_is_a_permutation(store: SyntheticStore) -> None:
    dataset = StoreDataset(store.path)
    sampler = BlockShuffleSampler(dataset, seed=0, buffer_blocks=2)
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_wrong_schema_version_is_refused(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    group.attrs["schema_version"] = 0
    with pytest.raises(ValueError, match="schema_version 0; this code reads schema_version 1"):
        StoreDataset(tmp_path / "old.zarr")


def test_unknown_split_is_refused(store: SyntheticStore) -> None:
    with pytest.raises(ValueError, match="split 'holdout' is not one of"):
        StoreDataset(store.path, split="holdout")
