"""Evaluation stage: metrics of a trained checkpoint on a store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from store_factory import SyntheticStore, write_store

from softcon.config import EvaluateConfig, TrainConfig
from tasks.evaluate import run_evaluation
from tasks.train import run_training

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("evaluate") / "store.zarr")


@pytest.fixture(scope="module")
def checkpoint(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(
        store=str(store.path), out=str(tmp_path_factory.mktemp("ckpt")), steps=2, batch_size=8,
        warmup_steps=1, mask_patch=4, embed_dim=16, device="cpu",
    )  # fmt: skip
    return run_training(config).checkpoint


def test_evaluation_metrics_are_in_range(store: SyntheticStore, checkpoint: Path) -> None:
    config = EvaluateConfig(store=str(store.path), probe_epochs=20, knn_k=5)
    result = run_evaluation(config, checkpoint)
    for name in ("linear_map_micro", "linear_map_macro", "knn_map_micro", "knn_map_macro", "linear_f1"):
        assert 0.0 <= result.metrics[name] <= 1.0, name
    assert result.metrics["feature_nan_fraction"] == 0.0 and result.metrics["feature_std"] > 0
    assert result.probe_lr in config.probe_lrs
    assert result.n_train > 0 and result.n_eval > 0
    assert set(result.per_class_ap) <= set(store.class_names)
    assert all(0 <= ap <= 1 for ap in result.per_class_ap.values())
    # band means carry the labels in the synthetic store, so even a barely trained encoder beats chance
    assert result.metrics["linear_map_micro"] > 0.6 and not math.isnan(result.metrics["knn_map_micro"])


def test_val_split_can_be_evaluated(store: SyntheticStore, checkpoint: Path) -> None:
    result = run_evaluation(EvaluateConfig(store=str(store.path), split="val", probe_epochs=5), checkpoint)
    assert 0.0 <= result.metrics["linear_map_micro"] <= 1.0


def test_bigearthnet_is_not_implemented_yet(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="BigEarthNet evaluation"):
        run_evaluation(EvaluateConfig(bigearthnet=str(tmp_path)), checkpoint)
