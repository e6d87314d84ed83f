"""BigEarthNet-format folders: patch discovery, CORINE 43 -> 19 labels, band mapping, splits, subsets.

Format (BigEarthNet v1, Sumbul et al. 2019/2021): one folder per patch, named after the patch, holding

    S2: <name>_B01.tif ... <name>_B12.tif, <name>_B8A.tif   (no B10) uint16 reflectance x10000;
        120x120 at 10 m (B02, B03, B04, B08), 60x60 at 20 m (B05, B06, B07, B8A, B11, B12),
        20x20 at 60 m (B01, B09)
    S1: <name>_VV.tif, <name>_VH.tif                           float32 backscatter in dB, 120x120 at 10 m
    both: <name>_labels_metadata.json                          {"labels": [CORINE 43-class names], ...}

The folder given to the reader may be a patch archive itself or a parent of S2 and S1 archives (as
``BigEarthNet-S2-Example/`` and ``BigEarthNet-S1-Example/`` side by side); patches are found recursively.

Band rule (documented in docs/evaluation.md): every 20 m / 60 m band is upsampled to the 10 m grid
(120x120) with bilinear interpolation (half-pixel centres, as GDAL's bilinear resampling), then bands are
matched to the encoder's band list **by name**. An encoder band the patch lacks (B10 of an L1C encoder) is
filled with that band's normalisation mean, i.e. 0 after normalisation, the same value nodata gets in the
training store; a patch band the encoder does not use is dropped. An encoder that shares no band with the
patch is refused.

Splits: when the folder holds the official split lists (``train.csv``, ``val.csv``, ``test.csv``: one patch
name per row, first column) they are used; otherwise each patch goes to a split by a hash of its name, so
the assignment is stable whatever other patches the folder holds. The "10 % of train" protocol subset is
drawn **without replacement** (``subset_without_replacement``); the SSL4EO-S12 evaluation code draws
with replacement, which repeats patches and shrinks the effective training set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from softcon.tasks.schemes import CORINE_BIGEARTHNET19

Sensor = Literal["s2", "s1"]

S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
"""The 12 BigEarthNet S2 bands (L2A has no B10), in the order this reader returns them."""
S1_POLS: tuple[str, ...] = ("VV", "VH")
PATCH_SIZE = 120
"""Patch side in pixels at 10 m."""
LABELS_SUFFIX = "_labels_metadata.json"

CORINE_WITHOUT_19_CLASS: frozenset[str] = frozenset({
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities", "Bare rock",
    "Burnt areas", "Intertidal flats",
})  # fmt: skip
"""The 11 CORINE level-3 classes of BigEarthNet's 43 that the 19-class nomenclature drops."""


@dataclass(frozen=True)
class BigEarthNetPatch:
    """One patch folder and its labels."""

    name: str
    folder: Path
    sensor: Sensor
    corine_labels: tuple[str, ...]
    """The CORINE 43-class names of the label JSON."""
    labels: np.ndarray
    """(19,) uint8 multi-hot in ``CORINE_BIGEARTHNET19.class_names`` order."""


def corine_to_bigearthnet19(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """(19,) uint8 multi-hot of CORINE 43-class names (classes without a 19-class counterpart are dropped).

    Raises:
        ValueError: for a name that is not one of BigEarthNet's 43 CORINE classes.
    """
    mapping = CORINE_BIGEARTHNET19.source_names
    index = {name: i for i, name in enumerate(CORINE_BIGEARTHNET19.class_names)}
    labels = np.zeros(len(index), dtype=np.uint8)
    for name in names:
        if name in mapping:
            labels[index[mapping[name]]] = 1
        elif name not in CORINE_WITHOUT_19_CLASS:
            known = sorted(mapping) + sorted(CORINE_WITHOUT_19_CLASS)
            raise ValueError(f"label {name!r} is not a BigEarthNet CORINE class; known: {known}")
    return labels


def _patch_sensor(folder: Path, name: str) -> Sensor | None:
    if (folder / f"{name}_B02.tif").is_file():
        return "s2"
    if (folder / f"{name}_VV.tif").is_file():
        return "s1"
    return None


def find_patches(root: str | Path, sensor: Sensor) -> list[BigEarthNetPatch]:
    """Every ``sensor`` patch under ``root`` (recursively), sorted by name, with its 19-class labels.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no ``sensor`` patch under ``root``, or a label JSON without a "labels" list.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BigEarthNet folder {root} does not exist")
    patches = []
    label_files = [
        Path(folder) / name
        for folder, _, files in os.walk(root, followlinks=True)  # archives are often symlink farms
        for name in files
        if name.endswith(LABELS_SUFFIX)
    ]
    for labels_file in sorted(label_files):
        name = labels_file.name[: -len(LABELS_SUFFIX)]
        if labels_file.parent.name != name or _patch_sensor(labels_file.parent, name) != sensor:
            continue
        metadata = json.loads(labels_file.read_text())
        if not isinstance(metadata.get("labels"), list):
            raise ValueError(f"{labels_file} has no 'labels' list of CORINE class names")
        corine = tuple(metadata["labels"])
        patches.append(BigEarthNetPatch(name, labels_file.parent, sensor, corine, corine_to_bigearthnet19(corine)))
    if not patches:
        raise ValueError(
            f"no BigEarthNet {sensor.upper()} patch under {root}: expected folders <name>/ holding "
            f"<name>{LABELS_SUFFIX} and <name>_{'B02' if sensor == 's2' else 'VV'}.tif"
        )
    return sorted(patches, key=lambda patch: patch.name)


def _read_band(path: Path) -> np.ndarray:
    import rasterio

    if not path.is_file():
        raise FileNotFoundError(f"BigEarthNet band file {path} is missing")
    with rasterio.open(path) as dataset:
        return dataset.read(1).astype(np.float32)


def upsample(band: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """(h, w) -> (size, size) bilinear with half-pixel centres; a band already at ``size`` is returned as is."""
    if band.shape == (size, size):
        return band
    x = torch.from_numpy(band)[None, None]  # (1, 1, h, w)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def read_patch(patch: BigEarthNetPatch) -> np.ndarray:
    """(C, 120, 120) float32: S2 bands in ``S2_BANDS`` order on the 10 m grid, or S1 (VV, VH) in dB."""
    bands = S2_BANDS if patch.sensor == "s2" else S1_POLS
    return np.stack([upsample(_read_band(patch.folder / f"{patch.name}_{band}.tif")) for band in bands])


def band_mapping(source: tuple[str, ...] | list[str], target: tuple[str, ...] | list[str]) -> list[int | None]:
    """For each encoder band (``target``), its index in the patch's bands (``source``) or None (filled).

    Raises:
        ValueError: when no encoder band is in the patch.
    """
    mapping = [list(source).index(band) if band in source else None for band in target]
    if all(index is None for index in mapping):
        raise ValueError(f"the encoder's bands {list(target)} share none with the patch's {list(source)}")
    return mapping


def split_of_name(name: str, val_fraction: float, test_fraction: float) -> str:
    """A patch's split from a hash of its name, not a shuffle: it keeps its split when patches come or go."""
    u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def assign_splits(
    root: str | Path, names: list[str], *, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> np.ndarray:
    """Split name ("train", "val", "test") of each patch: the official CSV lists when present, else by hash.

    S1 patch names are matched to CSV rows through any column, since the official S1 lists pair
    ``<s2 name>,<s1 name>``. A patch missing from all lists gets its split by hash.
    """
    root = Path(root)
    listed: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        if path.is_file():
            with path.open(newline="") as file:
                for row in csv.reader(file):
                    for cell in row:
                        listed[cell.strip()] = split
    return np.array([listed.get(name) or split_of_name(name, val_fraction, test_fraction) for name in names])


def subset_without_replacement(indices: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """A sorted random ``fraction`` of ``indices``, each at most once (at least one when any exist).

    Raises:
        ValueError: fraction outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices)
    if fraction == 1 or len(indices) == 0:
        return indices
    size = max(1, round(fraction * len(indices)))
    return np.sort(np.random.default_rng(seed).choice(indices, size=size, replace=False))


class BigEarthNetDataset(Dataset):
    """BigEarthNet patches mapped onto an encoder's bands and normalised with the encoder's statistics.

    Items match ``models.data.StoreDataset(two_views=False)``: "image" (C, H, W) float32, "labels" (19,)
    float32, "labelled" (always True), "index" int64 (position in ``patches``).

    Args:
        patches: patches of one sensor (``find_patches``).
        bands: the encoder's band (or polarisation) names, in its input order.
        norm_stats: {"mean": [...], "std": [...]} per encoder band (the checkpoint's).
        image_size: resize the 120 px patch to this side (bilinear); None keeps 120.
        raw_cache: patch name -> raw (C_src, 120, 120) array, filled on first read and shared by the datasets
            of one evaluation, so each encoder after the first reads no GeoTIFF; None reads every time.
    """

    def __init__(
        self,
        patches: list[BigEarthNetPatch],
        bands: list[str] | tuple[str, ...],
        norm_stats: dict[str, list[float]],
        *,
        image_size: int | None = None,
        raw_cache: dict[str, np.ndarray] | None = None,
    ) -> None:
        if not patches:
            raise ValueError("no BigEarthNet patches to read")
        sensors = {patch.sensor for patch in patches}
        if len(sensors) > 1:
            raise ValueError(f"patches mix sensors {sorted(sensors)}; give one sensor")
        self.patches = patches
        self.sensor = patches[0].sensor
        source = S2_BANDS if self.sensor == "s2" else S1_POLS
        self.mapping = band_mapping(source, list(bands))
        self.filled = [band for band, index in zip(bands, self.mapping, strict=True) if index is None]
        if len(norm_stats["mean"]) != len(bands) or len(norm_stats["std"]) != len(bands):
            raise ValueError(f"norm_stats have {len(norm_stats['mean'])} bands, the encoder has {len(bands)}")
        self.mean = torch.tensor(norm_stats["mean"], dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(norm_stats["std"], dtype=torch.float32).clamp_min(1e-6).view(-1, 1, 1)  # (C, 1, 1)
        self.image_size = image_size
        self.raw_cache = raw_cache
        self.labels = torch.from_numpy(np.stack([patch.labels for patch in patches]).astype(np.float32))  # (N, 19)

    def __len__(self) -> int:
        return len(self.patches)

    def _raw(self, patch: BigEarthNetPatch) -> np.ndarray:
        if self.raw_cache is None:
            return read_patch(patch)
        if patch.name not in self.raw_cache:
            self.raw_cache[patch.name] = read_patch(patch)
        return self.raw_cache[patch.name]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = torch.from_numpy(self._raw(self.patches[i]))  # (C_src, 120, 120)
        nodata = torch.isnan(raw) if self.sensor == "s1" else raw == 0  # (C_src, H, W)
        x = torch.zeros(len(self.mapping), *raw.shape[1:])  # (C, H, W): filled bands stay 0 = their mean
        for c, index in enumerate(self.mapping):
            if index is not None:
                normalised = (raw[index] - self.mean[c, 0, 0]) / self.std[c, 0, 0]
                x[c] = normalised.masked_fill(nodata[index], 0.0)
        if self.image_size is not None and self.image_size != x.shape[-1]:
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        return {
            "image": x,
            "labels": self.labels[i],
            "labelled": torch.tensor(True),
            "index": torch.tensor(i, dtype=torch.int64),
        }
