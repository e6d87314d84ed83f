"""Probe metrics: mAP, F1, kNN and the linear probe on features that do or do not separate classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.probe import Features, f1_samples, knn_scores, mean_average_precision, probe_scores, train_linear_probe

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
