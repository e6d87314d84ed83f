"""Seeded generator of a tiny synthetic training store (Zarr v3, schema_version 1).

Each location has a few dates; its classes are drawn at random and each present class k raises the
reflectance of a group of bands, so band means carry the labels and a linear probe can learn them.
Splits are by location. Some samples are unlabelled, some pixels are nodata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from softcon.config import S1_POLARIZATIONS, S2_L2A_BANDS
from softcon.models.training_store import IMAGE_COMPRESSOR


@dataclass(frozen=True)
class SyntheticStore:
    path: Path
    n_samples: int
    n_classes: int
    size: int
    dates_per_location: int
    class_names: list[str]


def write_store(
    path: Path,
    *,
    n_locations: int = 32,
    dates_per_location: int = 3,
    size: int = 16,
    n_classes: int = 4,
    chunk: int = 16,
    sharded: bool = False,
    seed: int = 0,
) -> SyntheticStore:
    """Write the store at ``path`` and describe it.

    ``sharded=True`` lays the images out like the preprocess stage: shards of ``chunk`` samples, inner
    chunks of one sample, the stage's image codec (the loader's fast path reads exactly this layout).
    """
    rng = np.random.default_rng(seed)
    n_bands = len(S2_L2A_BANDS)
    n = n_locations * dates_per_location
    location = np.repeat(np.arange(n_locations, dtype=np.int64), dates_per_location)

    presence = rng.random((n_locations, n_classes)) < 0.4
    presence[presence.sum(1) == 0, rng.integers(0, n_classes)] = True  # every location has a class
    fractions_loc = presence * rng.uniform(0.2, 1.0, (n_locations, n_classes))
    fractions_loc /= fractions_loc.sum(1, keepdims=True)

    base = rng.uniform(800, 1500, (n_locations, n_bands, 1, 1))
    band_class = np.arange(n_bands) % n_classes  # which class raises each band
    signal = 2000 * fractions_loc[:, band_class][:, :, None, None]  # (L, bands, 1, 1)
    s2 = base + signal + rng.normal(0, 150, (n_locations, n_bands, size, size))
    s2 = np.repeat(s2, dates_per_location, axis=0) + rng.normal(0, 100, (n, n_bands, size, size))
    s2 = np.clip(s2, 1, 10000).astype(np.uint16)
    s2[rng.random(s2.shape) < 0.01] = 0  # nodata

    s1 = rng.normal(-12, 3, (n, len(S1_POLARIZATIONS), size, size)).astype(np.float32)
    s1[rng.random(s1.shape) < 0.01] = np.nan

    labels = np.repeat(fractions_loc > 0, dates_per_location, axis=0).astype(np.uint8)
    fractions = np.repeat(fractions_loc, dates_per_location, axis=0).astype(np.float32)
    labelled = rng.random(n) > 0.1
    labels[~labelled] = 0
    fractions[~labelled] = 0
    split_loc = np.zeros(n_locations, dtype=np.uint8)  # 60 % train, 20 % val, 20 % test by location
    split_loc[int(0.6 * n_locations) : int(0.8 * n_locations)] = 1
    split_loc[int(0.8 * n_locations) :] = 2
    split = np.repeat(split_loc, dates_per_location)
    time = np.datetime64("2024-01-01", "ns") + np.tile(np.arange(dates_per_location), n_locations) * np.timedelta64(
        30, "D"
    )

    train = split == 0
    train_s2 = np.where(s2[train] == 0, np.nan, s2[train].astype(np.float64))
    train_s1 = s1[train].astype(np.float64)
    norm_stats = {
        name: {
            "mean": np.nanmean(values, axis=(0, 2, 3)).tolist(),
            "std": np.nanstd(values, axis=(0, 2, 3)).tolist(),
            "p01": np.nanpercentile(values, 1, axis=(0, 2, 3)).tolist(),
            "p99": np.nanpercentile(values, 99, axis=(0, 2, 3)).tolist(),
        }
        for name, values in (("s2", train_s2), ("s1", train_s1))
    }
    class_names = [f"class_{k}" for k in range(n_classes)]

    group = zarr.open_group(str(path), mode="w")
    arrays = {
        "s2": s2,
        "s1": s1,
        "labels": labels,
        "fractions": fractions,
        "labelled": labelled,
        "split": split,
        "location": location,
        "tile": np.zeros(n, dtype=np.int32),
        "time": time,
        "row": (location // 8).astype(np.int32),
        "col": (location % 8).astype(np.int32),
    }
    for name, data in arrays.items():
        if sharded and name in ("s2", "s1"):
            group.create_array(
                name, data=data, chunks=(1, *data.shape[1:]), shards=(chunk, *data.shape[1:]),
                compressors=IMAGE_COMPRESSOR,
            )  # fmt: skip
        else:
            group.create_array(name, data=data, chunks=(chunk, *data.shape[1:]))
    group.attrs.update(
        {
            "schema_version": 1,
            "class_names": class_names,
            "bands": list(S2_L2A_BANDS),
            "pols": list(S1_POLARIZATIONS),
            "split_names": ["train", "val", "test"],
            "norm_stats": norm_stats,
        }
    )
    return SyntheticStore(
        path=Path(path),
        n_samples=n,
        n_classes=n_classes,
        size=size,
        dates_per_location=dates_per_location,
        class_names=class_names,
    )
