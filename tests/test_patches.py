"""Pure patch transforms: grid, window fractions, quality verdicts, class fractions, S1 matching."""

from __future__ import annotations

import numpy as np
import pytest

from softcon.tasks import patches


@pytest.mark.parametrize(
    ("shape", "size", "stride", "expected"),
    [((64, 64), 32, None, 4), ((64, 64), 32, 16, 9), ((70, 40), 32, None, 2), ((16, 16), 32, None, 0)],
    ids=["no-overlap", "half-stride", "remainder-dropped", "tile-too-small"],
)
def test_patch_windows_count(shape, size, stride, expected):
    windows = patches.patch_windows(shape, size, stride)
    assert windows.shape == (expected, 2)
    assert windows.dtype == np.int32
    if expected:
        assert (windows + size <= np.array(shape)).all()


def test_patch_windows_row_major():
    windows = patches.patch_windows((64, 64), 32)
    assert windows.tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]


def test_window_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 40)) > 0.7
    windows = patches.patch_windows((40, 40), 8, 4)
    expected = [mask[r : r + 8, c : c + 8].mean() for r, c in windows]
    np.testing.assert_allclose(patches.window_fractions(mask, windows, 8), expected)


def test_quality_verdicts_cloud_takes_precedence():
    verdicts = patches.quality_verdicts(
        np.array([0.0, 0.5, 0.5, 0.0]),
        np.array([0.0, 0.0, 0.5, 0.5]),
        max_cloud_fraction=0.1,
        max_nodata_fraction=0.1,
    )
    assert verdicts.tolist() == [patches.KEEP, patches.DROP_CLOUD, patches.DROP_CLOUD, patches.DROP_NODATA]


def test_cloud_mask_classes():
    assert patches.cloud_mask(np.arange(12)).nonzero()[0].tolist() == [3, 8, 9, 10]


def test_class_fractions_over_labelled_pixels():
    landcover = np.array([[10, 10, 20, 0], [10, 80, 0, 0]], dtype=np.uint8)  # 5 labelled of 8; 80 unknown
    fractions, labelled = patches.class_fractions(landcover, [10, 20, 30])
    np.testing.assert_allclose(fractions, [0.75, 0.25, 0.0])
    assert fractions.dtype == np.float32
    assert labelled == pytest.approx(4 / 8)


def test_class_fractions_unlabelled_patch_is_all_zero():
    fractions, labelled = patches.class_fractions(np.zeros((4, 4), np.uint8), [10, 20])
    assert fractions.tolist() == [0.0, 0.0]
    assert labelled == 0.0


def test_multi_hot_is_strictly_above_threshold():
    assert patches.multi_hot(np.array([0.05, 0.0501, 0.9]), 0.05).tolist() == [0, 1, 1]


def test_match_s1_dates_nearest_within_gap():
    s2 = np.array(["2024-06-01", "2024-06-11", "2024-06-21"], dtype="datetime64[ns]")
    s1 = np.array(["2024-05-30", "2024-06-02", "2024-06-15"], dtype="datetime64[ns]")
    matched = patches.match_s1_dates(s2, s1, np.timedelta64(3, "D"))
    assert matched.tolist() == [1, -1, -1]


def test_match_s1_dates_without_s1():
    s2 = np.array(["2024-06-01"], dtype="datetime64[ns]")
    assert patches.match_s1_dates(s2, np.array([], "datetime64[ns]"), np.timedelta64(3, "D")).tolist() == [-1]
