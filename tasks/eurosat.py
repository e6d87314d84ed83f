"""EuroSAT (multispectral) as an evaluation dataset: single-label scene classification, 10 classes.

Source: Helber et al. 2019, "EuroSAT: A Novel Dataset and Deep Learning Benchmark for Land Use and Land Cover
Classification" (https://github.com/phelber/EuroSAT), licence MIT. The MS release holds one folder per class
(``AnnualCrop/``, ``Forest/``, …) of 64 x 64 px GeoTIFFs with 13 Sentinel-2 L1C bands in the order B01…B12 then
B8A (``EUROSAT_BANDS``), 10 m. There is no official split: patches are split 60/20/20 by a hash of their file
name (``bigearthnet.split_of_name``), so a patch keeps its split whatever else the folder holds.

Items match ``models.data.StoreDataset(two_views=False)``: "image" (C, 64, 64) float32 on the encoder's bands
(mapped by name; a band EuroSAT lacks is 0, its mean), "labels" one-hot (10,), "labelled" True.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch.utils.data import Dataset

from softcon.tasks.bigearthnet import band_mapping, split_of_name

EUROSAT_CLASSES: tuple[str, ...] = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
    "Residential", "River", "SeaLake",
)  # fmt: skip
"""The class folders of the MS release, in the order of the one-hot labels."""
EUROSAT_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip
"""Band order of the MS GeoTIFFs (B8A last)."""
TIF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class EuroSatPatch:
    path: Path
    label: int
    """Index in ``EUROSAT_CLASSES``."""


def find_eurosat(root: str | Path) -> list[EuroSatPatch]:
    """Every patch of an extracted EuroSAT MS folder (class folders, found at any depth, e.g. ``ds/images/...``).

    Raises:
        ValueError: no class folder with GeoTIFFs under ``root`` (naming the folders expected).
    """
    root = Path(root)
    patches = []
    for label, name in enumerate(EUROSAT_CLASSES):
        for folder in sorted(path for path in root.rglob(name) if path.is_dir()):
            patches += [EuroSatPatch(path, label) for path in sorted(folder.iterdir()) if path.suffix in TIF_SUFFIXES]
    if not patches:
        raise ValueError(
            f"no EuroSAT patches under {root}: expected class folders {list(EUROSAT_CLASSES)} of 13-band GeoTIFFs "
            "(the MS release, EuroSATallBands)"
        )
    return patches


def eurosat_splits(patches: list[EuroSatPatch]) -> np.ndarray:
    """Split name ("train", "val", "test") of each patch, 60/20/20 by a hash of its file name."""
    return np.array([split_of_name(patch.path.name, 0.2, 0.2) for patch in patches])


class EuroSatDataset(Dataset):
    """EuroSAT patches mapped onto an encoder's bands and normalised with the encoder's statistics."""

    def __init__(
        self, patches: list[EuroSatPatch], bands: list[str] | tuple[str, ...], norm_stats: dict[str, list[float]]
    ) -> None:
        if len(norm_stats["mean"]) != len(bands) or len(norm_stats["std"]) != len(bands):
            raise ValueError(f"norm_stats have {len(norm_stats['mean'])} bands, the encoder has {len(bands)}")
        self.patches = patches
        self.mapping = band_mapping(EUROSAT_BANDS, list(bands))
        self.mean = torch.tensor(norm_stats["mean"], dtype=torch.float32)  # (C,)
        self.std = torch.tensor(norm_stats["std"], dtype=torch.float32).clamp_min(1e-6)  # (C,)
        self.labels = torch.nn.functional.one_hot(
            torch.tensor([patch.label for patch in patches], dtype=torch.long), len(EUROSAT_CLASSES)
        ).float()  # (N, 10)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with rasterio.open(self.patches[i].path) as src:
            raw = torch.from_numpy(src.read().astype(np.float32))  # (13, 64, 64)
        x = torch.zeros(len(self.mapping), *raw.shape[1:])  # (C, H, W): bands EuroSAT lacks stay 0 = their mean
        for c, index in enumerate(self.mapping):
            if index is not None:
                x[c] = (raw[index] - self.mean[c]) / self.std[c]
        return {"image": x, "labels": self.labels[i], "labelled": torch.tensor(True), "index": torch.tensor(i)}
