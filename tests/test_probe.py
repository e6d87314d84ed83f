"""Probe metrics: mAP, F1, kNN and the linear probe on features that do or do not separate classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from softcon.models.probe import (
    BandStatistics,
    Features,
    f1_samples,
    feature_sanity,
    knn_scores,
    load_features,
    mean_average_precision,
    probe_scores,
    save_features,
    train_linear_probe,
)

torch.set_num_threads(2)


def separable_features(n: int, seed: int, K: int = 4, D: int = 16, noise: float = 0.3) -> Features:
    generator = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, K, generator=generator) < 0.4).float()
    directions = torch.randn(K, D, generator=torch.Generator().manual_seed(99))
    return Features(x=y @ directions + noise * torch.randn(n, D, generator=generator), y=y)


def test_perfect_scores_give_map_one() -> None:
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    micro, macro, per_class = mean_average_precision(y, y.astype(float))
    assert micro == macro == 1.0 and (per_class == 1).all()
    assert f1_samples(y, y.astype(float)) == 1.0


def test_macro_skips_classes_without_positives() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0]])
    _, macro, per_class = mean_average_precision(y, np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]]))
    assert macro == 1.0 and np.isnan(per_class[1])


def test_linear_probe_learns_separable_features() -> None:
    train, test = separable_features(200, 0), separable_features(100, 1)
    probe = train_linear_probe(train, lr=1e-2, epochs=100, batch_size=64)
    scores = probe_scores(probe, test)
    micro, macro, _ = mean_average_precision(test.y.numpy(), scores)
    assert micro > 0.95 and macro > 0.95
    assert f1_samples(test.y.numpy(), scores) > 0.9


def test_knn_scores_are_weighted_votes() -> None:
    train, test = separable_features(200, 0), separable_features(100, 1)
    scores = knn_scores(train, test, k=10)
    assert scores.shape == (100, 4) and scores.min() >= 0 and scores.max() <= 1 + 1e-6
    micro, _, _ = mean_average_precision(test.y.numpy(), scores)
    assert micro > 0.9


def test_random_features_give_chance_map() -> None:
    train, test = separable_features(200, 0), separable_features(400, 1)
    random_test = Features(x=torch.randn_like(test.x), y=test.y)
    probe = train_linear_probe(train, lr=1e-2, epochs=50)
    micro, _, _ = mean_average_precision(test.y.numpy(), probe_scores(probe, random_test))
    assert micro == pytest.approx(test.y.mean().item(), abs=0.1)


def test_map_is_over_the_whole_set_not_a_mean_of_batches() -> None:
    from sklearn.metrics import average_precision_score

    test = separable_features(300, 1)
    scores = torch.sigmoid(test.x[:, :4]).numpy()
    micro, _, _ = mean_average_precision(test.y.numpy(), scores)
    assert micro == pytest.approx(average_precision_score(test.y.numpy().ravel(), scores.ravel()))
    batches = [mean_average_precision(test.y.numpy()[i : i + 50], scores[i : i + 50])[0] for i in range(0, 300, 50)]
    assert micro != pytest.approx(float(np.mean(batches)), abs=1e-6)


def test_feature_sanity_flags_collapse_and_nan() -> None:
    healthy = feature_sanity(separable_features(100, 0).x)
    assert not healthy.collapsed and healthy.spread > 0.1 and healthy.nan_fraction == 0 and healthy.std > 0
    constant = feature_sanity(torch.ones(50, 8) * 3 + 1e-9 * torch.randn(50, 8))
    assert constant.collapsed and constant.spread < 1e-6
    scaled = feature_sanity(1000 * torch.ones(50, 8) + torch.randn(50, 8))  # tiny spread around a large mean
    assert scaled.collapsed
    with_nan = torch.randn(40, 8)
    with_nan[0, :4] = float("nan")
    nan = feature_sanity(with_nan)
    assert nan.collapsed and nan.nan_fraction == pytest.approx(4 / 320)


def test_band_statistics_are_mean_and_std_per_band() -> None:
    image = torch.randn(3, 5, 8, 8) * torch.arange(1, 6).view(1, 5, 1, 1) + 10
    features = BandStatistics(5)(image)
    assert features.shape == (3, 10)
    torch.testing.assert_close(features[:, :5], image.mean((2, 3)))
    torch.testing.assert_close(features[:, 5:], image.flatten(2).std(2))


def test_features_round_trip_through_npz(tmp_path: Path) -> None:
    features = separable_features(20, 0)
    features = Features(features.x, features.y, fractions=features.y / features.y.sum(1, keepdim=True).clamp_min(1))
    path = save_features(tmp_path / "f" / "train.npz", features)
    loaded = load_features(path)
    torch.testing.assert_close(loaded.x, features.x)
    torch.testing.assert_close(loaded.y, features.y)
    torch.testing.assert_close(loaded.fractions, features.fractions)
    assert not list((tmp_path / "f").glob("*.tmp*"))
