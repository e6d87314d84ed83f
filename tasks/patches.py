"""Pure patch-level transforms: the patch grid, quality fractions, class fractions, S1 date matching.

Nothing here does I/O; ``tasks/preprocess.py`` reads the cube and calls these on numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLOUD_SCL_CLASSES: tuple[int, ...] = (3, 8, 9, 10)
"""Sen2Cor SCL classes counted as cloud: 3 cloud shadow, 8/9 cloud medium/high probability, 10 cirrus."""

KEEP, DROP_CLOUD, DROP_NODATA = 0, 1, 2
"""Quality verdicts of a patch-date; cloud is checked first, so a patch dropped for both counts as cloud."""


def patch_windows(tile_shape: tuple[int, int], patch_size: int, stride: int | None = None) -> np.ndarray:
    """Top-left (row, col) pixel offsets of every patch that lies fully inside a tile.

    Args:
        tile_shape: (height, width) of the tile in pixels.
        patch_size: patch side in pixels.
        stride: step between patches; default ``patch_size`` (no overlap).

    Returns:
        int32 array (n_patches, 2) of (row, col), row-major (rows first, then columns).
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    stride = patch_size if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    height, width = tile_shape
    rows = np.arange(0, height - patch_size + 1, stride, dtype=np.int32)
    cols = np.arange(0, width - patch_size + 1, stride, dtype=np.int32)
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1).astype(np.int32)


def window_fractions(mask: np.ndarray, windows: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of True pixels of a (y, x) mask inside each square window, via a summed-area table.

    Returns:
        float64 array (n_windows,).
    """
    mask = np.asarray(mask, dtype=np.int64)
    # Summed-area table padded with a zero row/column, so a window sum is four lookups.
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    rows, cols = windows[:, 0].astype(np.int64), windows[:, 1].astype(np.int64)
    ends_r, ends_c = rows + patch_size, cols + patch_size
    totals = table[ends_r, ends_c] - table[rows, ends_c] - table[ends_r, cols] + table[rows, cols]
    return totals / float(patch_size * patch_size)


def cloud_mask(scl: np.ndarray) -> np.ndarray:
    """True where the SCL class is cloud, cloud shadow or cirrus."""
    return np.isin(scl, CLOUD_SCL_CLASSES)


def s2_nodata_mask(s2: np.ndarray) -> np.ndarray:
    """True where any band of a (band, y, x) S2 image is 0 (nodata)."""
    return (np.asarray(s2) == 0).any(axis=0)


def quality_verdicts(
    cloud: np.ndarray, nodata: np.ndarray, *, max_cloud_fraction: float, max_nodata_fraction: float
) -> np.ndarray:
    """KEEP / DROP_CLOUD / DROP_NODATA for each patch-date from its cloud and nodata fractions."""
    verdicts = np.full(np.shape(cloud), KEEP, dtype=np.uint8)
    verdicts[np.asarray(nodata) > max_nodata_fraction] = DROP_NODATA
    verdicts[np.asarray(cloud) > max_cloud_fraction] = DROP_CLOUD
    return verdicts


def class_fractions(landcover_patch: np.ndarray, class_codes: Sequence[int]) -> tuple[np.ndarray, float]:
    """Class fractions over the labelled pixels of a land-cover patch, and the labelled fraction.

    A pixel is labelled when its code is one of ``class_codes`` (0 is nodata and never a class).

    Returns:
        (fractions float32 (n_classes,) summing to 1, or all 0 when nothing is labelled;
        labelled pixels / all pixels).
    """
    codes = np.asarray(class_codes, dtype=np.int64)
    counts = np.bincount(np.asarray(landcover_patch, dtype=np.int64).ravel(), minlength=256)[codes]
    labelled = int(counts.sum())
    total = int(np.asarray(landcover_patch).size)
    if labelled == 0:
        return np.zeros(len(codes), dtype=np.float32), 0.0
    return (counts / labelled).astype(np.float32), labelled / total


def multi_hot(fractions: np.ndarray, threshold: float) -> np.ndarray:
    """Multi-hot uint8 targets: a class is present when its fraction is strictly above ``threshold``."""
    return (np.asarray(fractions) > threshold).astype(np.uint8)


def match_s1_dates(s2_times: np.ndarray, s1_times: np.ndarray, max_gap: np.timedelta64) -> np.ndarray:
    """Index of the nearest S1 acquisition to each S2 date, or -1 when none is within ``max_gap``.

    Ties go to the earlier S1 date.
    """
    s2_times = np.asarray(s2_times, dtype="datetime64[ns]")
    s1_times = np.asarray(s1_times, dtype="datetime64[ns]")
    if s1_times.size == 0:
        return np.full(s2_times.shape, -1, dtype=np.int64)
    gaps = np.abs(s2_times[:, None] - s1_times[None, :])  # (n_s2, n_s1)
    nearest = gaps.argmin(axis=1)
    within = gaps[np.arange(len(s2_times)), nearest] <= max_gap.astype("timedelta64[ns]")
    return np.where(within, nearest, -1).astype(np.int64)


S1_DB_UNITS = ("db", "decibel", "decibels")
S1_POWER_UNITS = ("linear", "power", "1")
S1_AMPLITUDE_UNITS = ("amplitude",)


def s1_db_scale(units: str | None) -> float | None:
    """The factor k of ``k * log10(value)`` that turns S1 values in ``units`` into dB; None when already dB.

    A missing ``units`` attribute means dB, the cube contract.

    Raises:
        ValueError: for units that are neither dB, linear power nor amplitude.
    """
    unit = (units or "dB").strip().lower()
    if unit in S1_DB_UNITS:
        return None
    if unit in S1_POWER_UNITS:
        return 10.0
    if unit in S1_AMPLITUDE_UNITS:
        return 20.0
    allowed = S1_DB_UNITS + S1_POWER_UNITS + S1_AMPLITUDE_UNITS
    raise ValueError(f"S1 units {units!r} are not one of {allowed}; the store keeps S1 in dB")


def s1_to_db(values: np.ndarray, scale: float | None) -> np.ndarray:
    """S1 backscatter in dB as float32: unchanged when ``scale`` is None, else ``scale * log10``.

    Zero or negative linear values (nodata in linear products) and inf become NaN, the store's S1 nodata.
    """
    values = np.asarray(values, dtype=np.float32)
    if scale is None:
        return np.where(np.isinf(values), np.float32(np.nan), values)
    with np.errstate(divide="ignore", invalid="ignore"):
        db = scale * np.log10(values)
    return np.where((values > 0) & np.isfinite(db), db, np.nan).astype(np.float32)
