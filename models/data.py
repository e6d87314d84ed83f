"""Training-store dataset: normalised tensors, two views per scene, augmentations on tensors.

The store (written by the preprocess stage) keeps samples in Zarr chunks along the sample axis; a random
read of one sample would decode a whole chunk, so the dataset reads a chunk ("block") at a time and keeps
the last few in an LRU cache, and ``BlockShuffleSampler`` visits blocks in random order, shuffling samples
only inside a small buffer of blocks. Every random choice (second date, crop, flips, rotations) comes from
a generator seeded by (seed, epoch, sample), so an item is the same whichever worker loads it and
whenever it is loaded: that is what makes resumed training exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

SCHEMA_VERSION = 1
Sensor = Literal["s2", "s1"]


def open_store(store: str | Path) -> zarr.Group:
    """Open a training store read-only, refusing one with an unknown schema version."""
    try:
        group = zarr.open_group(str(store), mode="r")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"training store {store} does not exist") from error
    version = group.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"training store {store} has schema_version {version!r}; this code reads schema_version "
            f"{SCHEMA_VERSION} (re-run `softcon preprocess` to rewrite it)"
        )
    return group


def split_code(group: zarr.Group, split: str) -> int:
    """The integer code of a split name ("train", "val", "test") in this store."""
    names = list(group.attrs.get("split_names", ["train", "val", "test"]))
    if split not in names:
        raise ValueError(f"split {split!r} is not one of the store's splits {names}")
    return names.index(split)


class StoreDataset(Dataset):
    """Samples of one split of a training store as normalised float tensors.

    Each item is a dict:
        two_views=True:  "view_a", "view_b" (C, H', W') float32 — two dates of the scene's location when
                         it has at least two samples in the split, else the same patch twice (the views
                         still differ by their augmentations)
        two_views=False: "image" (C, H', W') float32
        always:          "labels" (K,) float32 multi-hot, "fractions" (K,) float32, "labelled" bool,
                         "index" int64 (sample index in the store)

    Normalisation is (x - mean) / std per band with the store's statistics (or ``norm_stats``); nodata
    (S2 value 0, S1 NaN) becomes 0 after normalisation, i.e. the band mean.

    Args:
        store: path or URL of the training store.
        split: "train", "val" or "test".
        sensor: "s2" or "s1".
        two_views: return two views per item (training) or one (feature extraction).
        crop_size: random crop side (centre crop when ``augment`` is False); None keeps the patch.
        seed: base seed of every random choice.
        augment: random crop position, flips and 90° rotations; False for evaluation.
        norm_stats: {"mean": [...], "std": [...]} overriding the store's (e.g. a checkpoint's).
        cache_blocks: how many decoded chunks to keep.
    """

    def __init__(
        self,
        store: str | Path,
        split: str = "train",
        sensor: Sensor = "s2",
        two_views: bool = True,
        crop_size: int | None = None,
        seed: int = 0,
        *,
        augment: bool = True,
        norm_stats: dict[str, Any] | None = None,
        cache_blocks: int = 8,
    ) -> None:
        if sensor not in ("s2", "s1"):
            raise ValueError(f"sensor {sensor!r} is not one of ('s2', 's1')")
        self.store = str(store)
        group = open_store(store)
        if sensor not in group:
            raise ValueError(f"training store {store} has no {sensor!r} array")
        self.sensor = sensor
        self.split = split
        self.two_views = two_views
        self.crop_size = crop_size
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self.cache_blocks = cache_blocks
        self.attrs = dict(group.attrs)
        self.channel_names: list[str] = list(self.attrs.get("bands" if sensor == "s2" else "pols", []))
        self.class_names: list[str] = list(self.attrs.get("class_names", []))

        image = group[sensor]
        self.image_shape: tuple[int, int, int] = tuple(image.shape[1:])  # (C, H, W)
        self.block_size = int(image.chunks[0])
        if crop_size is not None and crop_size > min(self.image_shape[1:]):
            raise ValueError(f"crop_size {crop_size} is larger than the patches {self.image_shape[1:]}")

        stats = norm_stats or self.attrs.get("norm_stats", {}).get(sensor)
        if stats is None:
            raise ValueError(f"training store {store} has no norm_stats for {sensor!r}")
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(stats["std"], dtype=torch.float32).clamp_min(1e-6).view(-1, 1, 1)  # (C, 1, 1)
        if self.mean.shape[0] != self.image_shape[0]:
            raise ValueError(
                f"norm_stats have {self.mean.shape[0]} bands, the {sensor} array has {self.image_shape[0]}"
            )

        code = split_code(group, split)
        self.indices = np.flatnonzero(group["split"][:] == code)  # (N,) store sample indices
        self.labels = torch.from_numpy(group["labels"][:].astype(np.float32))  # (S, K)
        self.fractions = torch.from_numpy(group["fractions"][:].astype(np.float32))  # (S, K)
        self.labelled = torch.from_numpy(group["labelled"][:].astype(bool))  # (S,)
        locations = group["location"][:][self.indices]
        # samples of one location in this split: the candidate second dates
        self._dates: dict[int, np.ndarray] = {}
        order = np.argsort(locations, kind="stable")
        unique, starts = np.unique(locations[order], return_index=True)
        for location, group_order in zip(unique, np.split(order, starts[1:]), strict=True):
            self._dates[int(location)] = self.indices[group_order]
        self._location_of = dict(zip(self.indices.tolist(), locations.tolist(), strict=True))
        self._array: zarr.Array | None = None
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def in_chans(self) -> int:
        return self.image_shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Change the random choices of every item (call once per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the store and start with an empty cache
        state = self.__dict__.copy()
        state["_array"] = None
        state["_blocks"] = OrderedDict()
        return state

    def read_sample(self, sample: int) -> np.ndarray:
        """Raw (C, H, W) values of one store sample, through the block cache."""
        block = sample // self.block_size
        if block not in self._blocks:
            if self._array is None:
                self._array = zarr.open_group(self.store, mode="r")[self.sensor]
            start = block * self.block_size
            self._blocks[block] = self._array[start : start + self.block_size]  # (block, C, H, W)
            while len(self._blocks) > self.cache_blocks:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(block)
        return self._blocks[block][sample - block * self.block_size]

    def normalise(self, raw: np.ndarray) -> torch.Tensor:
        """(C, H, W) raw values -> normalised float32, nodata -> 0."""
        x = torch.from_numpy(raw.astype(np.float32, copy=True))  # (C, H, W)
        nodata = torch.isnan(x) if self.sensor == "s1" else x == 0
        x = (x - self.mean) / self.std
        return x.masked_fill(nodata, 0.0)

    def transform(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Crop, flips and 90° rotations of one (C, H, W) view."""
        _, H, W = x.shape
        if self.crop_size is not None:
            size = self.crop_size
            if self.augment:
                top, left = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
            else:
                top, left = (H - size) // 2, (W - size) // 2
            x = x[:, top : top + size, left : left + size]
        if not self.augment:
            return x
        if rng.random() < 0.5:
            x = x.flip(2)
        if rng.random() < 0.5:
            x = x.flip(1)
        turns = int(rng.integers(0, 4)) if x.shape[1] == x.shape[2] else 2 * int(rng.integers(0, 2))
        if turns:
            x = torch.rot90(x, turns, dims=(1, 2))
        return x.contiguous()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = int(self.indices[i])
        rng = np.random.default_rng([self.seed, self.epoch, sample])
        item: dict[str, torch.Tensor] = {
            "labels": self.labels[sample],
            "fractions": self.fractions[sample],
            "labelled": self.labelled[sample],
            "index": torch.tensor(sample, dtype=torch.int64),
        }
        x = self.transform(self.normalise(self.read_sample(sample)), rng)
        if not self.two_views:
            item["image"] = x
            return item
        dates = self._dates[self._location_of[sample]]
        others = dates[dates != sample]
        other = int(rng.choice(others)) if len(others) else sample
        item["view_a"] = x
        item["view_b"] = self.transform(self.normalise(self.read_sample(other)), rng)
        return item


class BlockShuffleSampler(Sampler[int]):
    """Visit blocks (store chunks) in random order, shuffling samples within a buffer of blocks.

    A full random permutation would decode a chunk per sample; this keeps reads sequential in chunks
    while mixing ``buffer_blocks`` chunks (and therefore several locations and dates) in every batch.
    """

    def __init__(self, dataset: StoreDataset, *, seed: int = 0, buffer_blocks: int = 4) -> None:
        self.dataset = dataset
        self.seed = seed
        self.buffer_blocks = buffer_blocks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """Dataset positions (0..len-1) in this epoch's order."""
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        blocks = self.dataset.indices // self.dataset.block_size  # (N,)
        unique = np.unique(blocks)
        rng.shuffle(unique)
        positions = []
        for start in range(0, len(unique), self.buffer_blocks):
            buffer = np.flatnonzero(np.isin(blocks, unique[start : start + self.buffer_blocks]))
            positions.append(rng.permutation(buffer))
        return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(self.dataset)
