"""SSL4EO-S12 v1.0 as released (mediaTUM, Hugging Face ``wangyi111/SSL4EO-S12``): finding its samples.

::

    ROOT/s2c/0000042/20200311T160021_20200311T160021_T17SQA/B1.tif … B8A.tif … B12.tif   (L1C, 13 bands)
    ROOT/s2a/0000042/<season>/B1.tif … B12.tif                                          (L2A, 12 bands, no B10)
    ROOT/s1/0000042/S1A_IW_GRDH_1SDV_20200309T…/VV.tif, VH.tif                           (dB, float32)

one folder per location, one per season inside it (the source product's id, which holds the acquisition time),
one GeoTIFF per band at its own resolution: 264 px at 10 m, 132 px at 20 m, 44 px at 60 m. A season is read by
``read_folder``: each band resized to the patch size (bilinear, as SSL4EO-S12's loader does with ``cv2.resize``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS

MODALITY_BANDS: dict[str, tuple[str, ...]] = {"s2c": S2_L1C_BANDS, "s2a": S2_L2A_BANDS, "s1": S1_POLARIZATIONS}
"""Bands of each SSL4EO-S12 modality, in the project's names and SSL4EO-S12's order."""
_ACQUISITION = re.compile(r"(\d{8}T\d{6})")


def band_file(band: str) -> str:
    """SSL4EO-S12's file name of a band: ``B01`` → ``B1.tif``, ``B8A`` → ``B8A.tif``, ``VV`` → ``VV.tif``."""
    return (band[0] + band[2:] if re.fullmatch(r"B0\d", band) else band) + ".tif"


def season_time(season: str) -> np.datetime64:
    """Acquisition time of a season folder, from the first ``YYYYMMDDTHHMMSS`` in its name.

    Raises:
        ValueError: the name holds no such time (naming the folder).
    """
    match = _ACQUISITION.search(season)
    if match is None:
        raise ValueError(f"season folder {season!r} holds no acquisition time YYYYMMDDTHHMMSS")
    text = match.group(1)
    return np.datetime64(f"{text[:4]}-{text[4:6]}-{text[6:8]}T{text[9:11]}:{text[11:13]}:{text[13:15]}", "ns")


@dataclass(frozen=True)
class Season:
    """One image of a location: the name labels are keyed by, its time, and where to read it."""

    key: str
    """The season folder's name (v1.0) or ``file_id`` (v1.1): the product id, as SSL4EO-S12-ML keys labels."""
    time: np.datetime64
    source: str
    """Relative to the root: ``s2c/0000042/<season>`` (v1.0) or ``<file>.zarr.zip::<sample>::<time>`` (v1.1)."""


@dataclass(frozen=True)
class LocationScan:
    """What one location holds: its complete seasons per modality (sorted by time), and the incomplete ones."""

    location: str
    seasons: dict[str, list[Season]]
    incomplete: list[str] = field(default_factory=list)
    """Seasons skipped: a folder missing a band file or without a time in its name; a v1.1 image without a time."""


def scan_locations(root: str, locations: Sequence[str], modalities: Sequence[str]) -> list[LocationScan]:
    """The seasons of ``locations`` in each of ``modalities`` (one listing per folder, no file opened)."""
    scans = []
    for location in locations:
        seasons: dict[str, list[Season]] = {}
        incomplete: list[str] = []
        for modality in modalities:
            folder = Path(root, modality, location)
            seasons[modality] = []
            if not folder.is_dir():
                continue
            needed = {band_file(band) for band in MODALITY_BANDS[modality]}
            for name in sorted(entry.name for entry in folder.iterdir() if entry.is_dir()):
                has_time = _ACQUISITION.search(name) is not None
                if has_time and needed <= {entry.name for entry in (folder / name).iterdir()}:
                    seasons[modality].append(Season(name, season_time(name), f"{modality}/{location}/{name}"))
                else:
                    incomplete.append(f"{modality}/{location}/{name}")
            seasons[modality].sort(key=lambda season: season.time)
        scans.append(LocationScan(location, seasons, incomplete))
    return scans


def list_locations(root: str, modality: str, only: Sequence[str] | None) -> list[str]:
    """The location folders of ``modality`` (numbered, sorted by number), or ``only`` checked against them.

    Raises:
        ValueError: the tree has no ``modality`` folder, a folder name is not a location number, or a location
            asked for is not in the tree (each naming what to pass instead).
    """
    folder = Path(root, modality)
    if not folder.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise ValueError(
            f"{root} has no {modality}/ folder (it holds {present or 'nothing'}); pass the folder that holds "
            f"SSL4EO-S12's s2c/, s2a/ and s1/ (v1.0) or train/ and val/ (v1.1 Zarr), or choose the S2 modality "
            "it has with --s2"
        )
    found = [entry.name for entry in folder.iterdir() if entry.is_dir()]
    if only is not None:
        missing = sorted(set(only) - set(found))
        if missing:
            raise ValueError(f"locations {missing[:5]} are not folders of {folder} ({len(found)} locations there)")
        found = list(dict.fromkeys(only))
    odd = [name for name in found if not name.isdigit()]
    if odd:
        raise ValueError(f"{folder}: folders {odd[:5]} are not SSL4EO-S12 location numbers (e.g. 0000042)")
    if not found:
        raise ValueError(f"{folder} holds no location folder")
    return sorted(found, key=int)


def read_band(path: Path, size: int) -> np.ndarray:
    """One band file resized to ``size`` x ``size`` (bilinear; a file already that size is read as it is)."""
    with rasterio.open(path) as dataset:
        if dataset.shape == (size, size):
            return dataset.read(1)
        return dataset.read(1, out_shape=(size, size), resampling=Resampling.bilinear)


def read_folder(root: str, folder: str, bands: Sequence[str], size: int) -> np.ndarray:
    """(band, size, size) image of one v1.0 season folder."""
    return np.stack([read_band(Path(root, folder, band_file(band)), size) for band in bands])
