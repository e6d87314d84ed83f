"""Per-band normalization statistics, computed in one pass over blocks of samples and reduced.

Mean and standard deviation are merged with Chan et al.'s parallel update of (count, mean, M2) in
float64: exact like a sum/sum-of-squares pass but without its cancellation when the mean is large
relative to the spread (uint16 reflectances ~1e3..1e4 over 1e9 pixels). Percentiles come from per-band
histograms: for S2 a 65536-bin bincount of the uint16 values (exact), for S1 a histogram of dB values
in ``S1_BIN_DB`` bins over ``S1_RANGE_DB`` (values outside are clipped into the edge bins), reported at
bin centres, so within half a bin of the exact value. Percentiles follow numpy's
``method="inverted_cdf"``: the smallest value whose cumulative share reaches q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

S2_LEVELS = 65536
S1_RANGE_DB: tuple[float, float] = (-60.0, 40.0)
S1_BIN_DB = 0.01
S1_N_BINS = round((S1_RANGE_DB[1] - S1_RANGE_DB[0]) / S1_BIN_DB)
PERCENTILES: tuple[float, float] = (1.0, 99.0)


@dataclass(frozen=True)
class BandMoments:
    """Per-band count, mean and sum of squared deviations (M2), all (band,)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def __add__(self, other: BandMoments) -> BandMoments:
        count = self.count + other.count
        safe = np.maximum(count, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / safe
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        return BandMoments(count=count, mean=mean, m2=m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), NaN for bands without data."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / np.maximum(self.count, 1)), np.nan)


def band_moments(values: np.ndarray, valid: np.ndarray) -> BandMoments:
    """Moments of (sample, band, h, w) values per band over the pixels where ``valid`` is True."""
    n_bands = values.shape[1]
    count = np.zeros(n_bands, dtype=np.int64)
    mean = np.zeros(n_bands, dtype=np.float64)
    m2 = np.zeros(n_bands, dtype=np.float64)
    for band in range(n_bands):
        pixels = values[:, band][valid[:, band]].astype(np.float64)
        count[band] = pixels.size
        if pixels.size:
            mean[band] = pixels.mean()
            m2[band] = ((pixels - mean[band]) ** 2).sum()
    return BandMoments(count=count, mean=mean, m2=m2)


def s2_histogram(s2: np.ndarray) -> np.ndarray:
    """Per-band counts of every uint16 value of (sample, band, h, w) S2 data, nodata (0) excluded.

    Returns:
        int64 (band, 65536).
    """
    hist = np.stack([np.bincount(s2[:, band].ravel(), minlength=S2_LEVELS) for band in range(s2.shape[1])]).astype(
        np.int64
    )
    hist[:, 0] = 0
    return hist


def s1_histogram(s1: np.ndarray) -> np.ndarray:
    """Per-band histogram of (sample, pol, h, w) dB values in ``S1_BIN_DB`` bins, NaN excluded.

    Returns:
        int64 (pol, S1_N_BINS).
    """
    hist = np.zeros((s1.shape[1], S1_N_BINS), dtype=np.int64)
    for band in range(s1.shape[1]):
        values = s1[:, band].ravel()
        values = values[np.isfinite(values)].astype(np.float64)
        bins = np.floor((values - S1_RANGE_DB[0]) / S1_BIN_DB).astype(np.int64)
        hist[band] = np.bincount(np.clip(bins, 0, S1_N_BINS - 1), minlength=S1_N_BINS)
    return hist


def s1_bin_centres() -> np.ndarray:
    """dB value that each S1 histogram bin reports."""
    return S1_RANGE_DB[0] + (np.arange(S1_N_BINS) + 0.5) * S1_BIN_DB


def histogram_percentile(hist: np.ndarray, q: float, bin_values: np.ndarray) -> np.ndarray:
    """Per-band q-th percentile (0..100) of histogrammed data, as numpy's ``inverted_cdf``.

    Returns NaN for a band with no counts.
    """
    result = np.full(hist.shape[0], np.nan)
    for band, counts in enumerate(hist):
        total = int(counts.sum())
        if total == 0:
            continue
        # inverted_cdf: the k-th smallest value, k = ceil(n q / 100) (at least 1); integer maths so that
        # n q / 100 landing on an integer is not spoiled by floating point.
        rank = max(1, -(-total * round(q * 1_000_000) // 100_000_000))
        result[band] = bin_values[int(np.searchsorted(np.cumsum(counts), rank))]
    return result


@dataclass(frozen=True)
class SensorStats:
    """Partial statistics of one sensor over some samples; add partials to reduce them."""

    moments: BandMoments
    hist: np.ndarray

    def __add__(self, other: SensorStats) -> SensorStats:
        return SensorStats(moments=self.moments + other.moments, hist=self.hist + other.hist)


def s2_partial_stats(s2: np.ndarray) -> SensorStats:
    """Partial statistics of (sample, band, h, w) uint16 S2, nodata (0) excluded."""
    return SensorStats(moments=band_moments(s2, s2 != 0), hist=s2_histogram(s2))


def s1_partial_stats(s1: np.ndarray) -> SensorStats:
    """Partial statistics of (sample, pol, h, w) float32 S1 dB, NaN excluded."""
    return SensorStats(moments=band_moments(s1, np.isfinite(s1)), hist=s1_histogram(s1))


def _json_floats(values: np.ndarray) -> list[float | None]:
    """NaN becomes None: Zarr attributes and MLflow dicts are JSON, which has no NaN."""
    return [None if not np.isfinite(v) else float(v) for v in values]


def finalize_stats(stats: SensorStats, bin_values: np.ndarray) -> dict[str, Any]:
    """JSON-able {"mean", "std", "p01", "p99", "count"} lists per band from reduced partials."""
    mean = np.where(stats.moments.count > 0, stats.moments.mean, np.nan)
    low, high = (histogram_percentile(stats.hist, q, bin_values) for q in PERCENTILES)
    return {
        "mean": _json_floats(mean),
        "std": _json_floats(stats.moments.std),
        "p01": _json_floats(low),
        "p99": _json_floats(high),
        "count": [int(c) for c in stats.moments.count],
    }
