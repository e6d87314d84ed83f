"""SSL4EO-S12 v1.1 (Blumenstiel et al. 2025) in its Zarr release: finding and reading its samples.

Layout, from the release's README (github ``DLR-MF-DAS/SSL4EO-S12-v1.1``; files on Hugging Face
``embed2scale/SSL4EO-S12-v1.1-Zarr``, the ``embed2scale/SSL4EO-S12-v1.1`` repository holding a WebDataset version
since February 2026)::

    ROOT/train/S2L1C/ssl4eos12_train_seasonal_data_000001.zarr.zip … (and S2L2A/, S1GRD/, S2RGB/)
    ROOT/val/S2L1C/ssl4eos12_val_seasonal_data_000001.zarr.zip …

Zarr v2 zip files of 64 locations each: ``bands (sample, time, band, y, x)`` (int16 for S2, float16 dB for S1,
264 x 264), coordinates ``sample`` (location id, e.g. ``"0080717"``) and ``band`` (``B01`` …; ``vv``, ``vh``),
and per (sample, time) ``time_`` (acquisition time) and ``file_id`` (the product id, as SSL4EO-S12-ML keys its
labels). The files of one shard name in S2 and S1 folders hold the same locations; an S1 image pairs with the S2
one of its location nearest in time, as in v1.0. ``cloud_mask`` is not read (the release screened clouds when
it chose its images). Not confirmed from public sources: the S2L1C band list (read from each file, so any list
holding the encoder's bands works).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr
from torch.nn import functional as F

from softcon.tasks.ssl4eo_layout import MODALITY_BANDS, LocationScan, Season

ZARR_MODALITIES = {"s2c": "S2L1C", "s2a": "S2L2A", "s1": "S1GRD"}
"""The v1.0 modality names the importer takes, and v1.1's folders for them."""
RELEASE_SPLITS = ("train", "val")
_SEP = "::"


def is_zarr_release(root: str) -> bool:
    """Whether ``root`` holds the v1.1 Zarr release (``train/`` or ``val/`` with modality folders)."""
    return any(Path(root, split, folder).is_dir() for split in RELEASE_SPLITS for folder in ZARR_MODALITIES.values())


def list_files(root: str, modality: str) -> list[str]:
    """The ``.zarr.zip`` (or ``.zarr``) files of ``modality`` under ``train/`` and ``val/``, relative to the root.

    Raises:
        ValueError: the release has no file of that modality (naming the folders looked at).
    """
    folders = [Path(root, split, ZARR_MODALITIES[modality]) for split in RELEASE_SPLITS]
    files = sorted(
        str(path.relative_to(root))
        for folder in folders
        if folder.is_dir()
        for path in folder.iterdir()
        if path.name.endswith((".zarr.zip", ".zarr"))
    )
    if not files:
        raise ValueError(
            f"{root} holds no {ZARR_MODALITIES[modality]} Zarr files under {[str(f) for f in folders]}; choose the "
            "S2 modality it has with --s2"
        )
    return files


def open_file(path: Path) -> xr.Dataset:
    """One Zarr file of the release (a zip, or a folder) as a lazy dataset."""
    store: zarr.storage.StoreLike = zarr.storage.ZipStore(path, mode="r") if path.suffix == ".zip" else str(path)
    return xr.open_zarr(store, zarr_format=2, consolidated=None, mask_and_scale=False)


def _file_bands(dataset: xr.Dataset) -> list[str]:
    return [str(band).upper() for band in dataset["band"].values]


def _seasons(dataset: xr.Dataset, relative: str, position: int) -> tuple[list[Season], list[str]]:
    """The images of one sample of a file with their times, and those without a time."""
    times = dataset["time_"].values[position].astype("datetime64[ns]")
    names = dataset["file_id"].values[position] if "file_id" in dataset else [""] * len(times)
    seasons, missing = [], []
    for index, (time, name) in enumerate(zip(times, names, strict=True)):
        source = f"{relative}{_SEP}{position}{_SEP}{index}"
        if np.isnat(time):
            missing.append(source)
        else:
            seasons.append(Season(str(name), time, source))
    return sorted(seasons, key=lambda season: season.time), missing


def scan_files(
    root: str, files: Sequence[str], s2_modality: str, with_s1: bool, only: Sequence[str] | None
) -> list[LocationScan]:
    """The locations of ``files`` (S2 files; their S1 twins by shard name) with their images.

    Raises:
        ValueError: a file lacks bands the modality needs (naming the file and the bands).
    """
    wanted = None if only is None else set(only)
    scans = []
    for relative in files:
        s2 = open_file(Path(root, relative))
        missing_bands = sorted(set(MODALITY_BANDS[s2_modality]) - set(_file_bands(s2)))
        if missing_bands:
            raise ValueError(f"{relative} lacks bands {missing_bands} of {s2_modality}; choose the other --s2")
        split, _, name = Path(relative).parts
        s1_relative = str(Path(split, ZARR_MODALITIES["s1"], name))
        s1 = open_file(Path(root, s1_relative)) if with_s1 and Path(root, s1_relative).exists() else None
        s1_positions = {str(sample): i for i, sample in enumerate(s1["sample"].values)} if s1 is not None else {}
        for position, sample in enumerate(str(value) for value in s2["sample"].values):
            if wanted is not None and sample not in wanted:
                continue
            seasons, incomplete = _seasons(s2, relative, position)
            found = {s2_modality: seasons}
            if s1 is not None and sample in s1_positions:
                found["s1"], missing_s1 = _seasons(s1, s1_relative, s1_positions[sample])
                incomplete += missing_s1
            scans.append(LocationScan(sample, found, incomplete))
    return scans


def is_zarr_source(source: str) -> bool:
    return _SEP in source


def read_image(root: str, source: str, bands: Sequence[str], size: int, opened: dict[str, xr.Dataset]) -> np.ndarray:
    """(band, size, size) image of one (file, sample, time) ``source``, resized bilinearly when the file's side
    differs from ``size``; ``opened`` caches the files a block reads."""
    relative, position, index = source.split(_SEP)
    if relative not in opened:
        opened[relative] = open_file(Path(root, relative))
    dataset = opened[relative]
    order = [_file_bands(dataset).index(band) for band in bands]
    image = np.asarray(dataset["bands"].isel(sample=int(position), time=int(index)).values)[order]
    if image.shape[-2:] != (size, size):
        resized = F.interpolate(torch.from_numpy(image.astype(np.float32))[None], size=(size, size), mode="bilinear")
        image = resized[0].numpy()
    return image.astype(np.float32)
