"""Normalization statistics: merged partials equal numpy on the whole data."""

from __future__ import annotations

import numpy as np
import pytest

from softcon.tasks import norm_stats


@pytest.fixture
def s2() -> np.ndarray:
    rng = np.random.default_rng(3)
    values = rng.normal(3000, 400, (20, 3, 8, 8)).clip(1, 65535).astype(np.uint16)
    values[0, :, :4] = 0  # nodata
    return values


def _reduced(parts):
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def test_s2_stats_equal_numpy(s2):
    stats = _reduced([norm_stats.s2_partial_stats(s2[i : i + 6]) for i in range(0, 20, 6)])
    result = norm_stats.finalize_stats(stats, np.arange(norm_stats.S2_LEVELS, dtype=float))
    for band in range(3):
        pixels = s2[:, band][s2[:, band] != 0].astype(np.float64)
        np.testing.assert_allclose(result["mean"][band], pixels.mean(), rtol=1e-12)
        np.testing.assert_allclose(result["std"][band], pixels.std(), rtol=1e-10)
        assert result["p01"][band] == np.percentile(pixels, 1, method="inverted_cdf")
        assert result["p99"][band] == np.percentile(pixels, 99, method="inverted_cdf")
        assert result["count"][band] == pixels.size


@pytest.mark.parametrize("n", [1, 99, 100, 101, 200, 1234], ids=lambda n: f"n{n}")
def test_histogram_percentile_is_inverted_cdf(n):
    values = np.random.default_rng(n).integers(1, 50, n)
    hist = np.bincount(values, minlength=64)[None]
    for q in (1, 50, 99):
        expected = np.percentile(values, q, method="inverted_cdf")
        assert norm_stats.histogram_percentile(hist, q, np.arange(64.0))[0] == expected


def test_s1_stats_within_half_a_bin():
    rng = np.random.default_rng(4)
    s1 = rng.normal(-12, 4, (10, 2, 8, 8)).astype(np.float32)
    s1[1] = np.nan
    stats = norm_stats.s1_partial_stats(s1[:5]) + norm_stats.s1_partial_stats(s1[5:])
    result = norm_stats.finalize_stats(stats, norm_stats.s1_bin_centres())
    for band in range(2):
        pixels = s1[:, band][np.isfinite(s1[:, band])].astype(np.float64)
        np.testing.assert_allclose(result["mean"][band], pixels.mean(), rtol=1e-12)
        np.testing.assert_allclose(result["std"][band], pixels.std(), rtol=1e-10)
        for key, q in (("p01", 1), ("p99", 99)):
            exact = np.percentile(pixels, q, method="inverted_cdf")
            assert abs(result[key][band] - exact) <= norm_stats.S1_BIN_DB / 2 + 1e-9


def test_empty_band_gives_none():
    stats = norm_stats.s1_partial_stats(np.full((2, 2, 4, 4), np.nan, np.float32))
    result = norm_stats.finalize_stats(stats, norm_stats.s1_bin_centres())
    assert result["mean"] == [None, None] and result["p99"] == [None, None] and result["count"] == [0, 0]
