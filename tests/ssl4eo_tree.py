"""A miniature SSL4EO-S12 tree in the released layout, cut from the real patches in ``tests/data/real``.

Layout (``tasks/ssl4eo_import.py``): ``ROOT/{s2c,s2a,s1}/<7-digit location>/<season product id>/<band>.tif``,
each band at its own resolution. What goes where:

- ``s2c``: the real Virginia L1C crop (13 bands, 240 px at 10 m) cut into four 120 px quadrants, one per location
  0..3; season 1 of location i is quadrant i, season 2 quadrant (i + 1) % 4 (real pixels, another place).
- ``s2a``: the real BigEarthNet L2A patches (12 bands, 120 px at 10 m): location i, season s -> patch (i + s) % 6.
- ``s1``: the real BigEarthNet S1 patches (VV, VH dB, 120 px): locations 0..2 only (location 3 has no S1), dated
  ten days after each S2 season.
- location 0000004 has one s2c season missing its B10 file (an incomplete download), and no other season.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from real_data import REAL

from softcon.tasks.ssl4eo_layout import band_file

L1C = REAL / "sentinel2_l1c_virginia"
BEN_S2 = REAL / "bigearthnet" / "BigEarthNet-S2-Example"
BEN_S1 = REAL / "bigearthnet" / "BigEarthNet-S1-Example"
L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
L2A_BANDS = tuple(band for band in L1C_BANDS if band != "B10")
PATCH = 120
LOCATIONS = ("0000000", "0000001", "0000002", "0000003")
SEASON_DATES = ("20200320T160021", "20200621T155819")
QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))


def s2_season(date: str) -> str:
    """A season folder named as SSL4EO-S12's S2 ones (the product id of the source scene)."""
    return f"{date}_{date}_T17SQA"


def s1_season(date: str) -> str:
    """A season folder named as SSL4EO-S12's S1 ones, ten days after ``date``."""
    day = np.datetime64(f"{date[:4]}-{date[4:6]}-{date[6:8]}") + np.timedelta64(10, "D")
    stamp = str(day).replace("-", "") + "T225926"
    return f"S1A_IW_GRDH_1SDV_{stamp}_{stamp}_031873_03AD8E_5F32"


def _copy_window(source: Path, target: Path, window: Window | None = None) -> None:
    with rasterio.open(source) as src:
        window = window or Window(0, 0, src.width, src.height)
        profile = {**src.profile, "width": int(window.width), "height": int(window.height),
                   "transform": src.window_transform(window)}  # fmt: skip
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.update(tiled=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(target, "w", **profile) as dst:
            dst.write(src.read(window=window))


def _l1c_quadrant(folder: Path, quadrant: tuple[int, int]) -> None:
    for band in L1C_BANDS:
        source = L1C / f"s2_{band}_crop.tif"
        with rasterio.open(source) as src:
            side = src.width // 2
        window = Window(quadrant[1] * side, quadrant[0] * side, side, side)
        _copy_window(source, folder / band_file(band), window)


def _ben_s2(folder: Path, patch: str) -> None:
    for band in L2A_BANDS:
        _copy_window(BEN_S2 / patch / f"{patch}_{band}.tif", folder / band_file(band))


def _ben_s1(folder: Path, patch: str) -> None:
    for pol in ("VV", "VH"):
        _copy_window(next((BEN_S1 / patch).glob(f"*_{pol}.tif")), folder / f"{pol}.tif")


def build_tree(root: Path) -> Path:
    """Write the miniature tree under ``root`` and return it."""
    s2_patches = sorted(p.name for p in BEN_S2.iterdir())
    s1_patches = sorted(p.name for p in BEN_S1.iterdir())
    for i, location in enumerate(LOCATIONS):
        for s, date in enumerate(SEASON_DATES):
            _l1c_quadrant(root / "s2c" / location / s2_season(date), QUADRANTS[(i + s) % 4])
            _ben_s2(root / "s2a" / location / s2_season(date), s2_patches[(i + s) % 6])
            if i < 3:
                _ben_s1(root / "s1" / location / s1_season(date), s1_patches[(i + s) % 6])
    broken = root / "s2c" / "0000004" / s2_season(SEASON_DATES[0])
    _l1c_quadrant(broken, QUADRANTS[0])
    (broken / "B10.tif").unlink()
    return root


def build_zarr_release(root: Path, tree: Path) -> Path:
    """The same locations and images as the v1.0 ``tree``, in v1.1's Zarr release layout under ``root``: Zarr v2
    zip files with ``bands (sample, time, band, y, x)`` (S2 int16, S1 float16 dB), ``time_`` and ``file_id``
    (``tasks/ssl4eo_zarr.py``); locations 0-1 in ``train/``, 2-3 in ``val/``; location 3's S1 times are NaT (none)."""
    import warnings

    import xarray as xr
    import zarr

    from softcon.tasks.ssl4eo_layout import read_folder, season_time

    l1c = list(L1C_BANDS)
    for split, locations in (("train", LOCATIONS[:2]), ("val", LOCATIONS[2:])):
        for folder, modality, bands, dtype in (
            ("S2L1C", "s2c", l1c, np.int16),
            ("S1GRD", "s1", ["VV", "VH"], np.float16),
        ):
            images, times, names = [], [], []
            for location in locations:
                seasons = (
                    sorted((tree / modality / location).iterdir()) if (tree / modality / location).is_dir() else []
                )
                per_time = [read_folder(str(tree), f"{modality}/{location}/{s.name}", bands, PATCH) for s in seasons]
                images.append(per_time or [np.zeros((len(bands), PATCH, PATCH))] * len(SEASON_DATES))
                times.append([season_time(s.name) for s in seasons] or [np.datetime64("NaT", "ns")] * len(SEASON_DATES))
                names.append([s.name for s in seasons] or [""] * len(SEASON_DATES))
            dataset = xr.Dataset(
                {
                    "bands": (("sample", "time", "band", "y", "x"), np.asarray(images).astype(dtype)),
                    "time_": (("sample", "time"), np.asarray(times, "datetime64[ns]")),
                    "file_id": (("sample", "time"), np.asarray(names)),
                },
                coords={"sample": list(locations), "time": np.arange(len(SEASON_DATES)),
                        "band": [band.lower() for band in bands] if modality == "s1" else bands},
            )  # fmt: skip
            path = root / split / folder / f"ssl4eos12_{split}_seasonal_data_000001.zarr.zip"
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile warns of duplicate names when zarr rewrites a key
                store = zarr.storage.ZipStore(path, mode="w")
                dataset.to_zarr(store, zarr_format=2, consolidated=True)
                store.close()
    return root
