"""Evaluate stage: frozen-encoder linear probing and kNN on multi-label targets.

Protocol: features of the frozen evaluation encoder (the EMA teacher of a checkpoint) are extracted once
for the store's train split (probe training, kNN memory), its val split (probe learning-rate selection)
and ``config.split`` (the reported numbers). Only labelled samples count. Images are normalised with the
checkpoint's statistics, not the store's, because they are part of the encoder's input contract.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.data import StoreDataset
from models.probe import (
    Features,
    extract_features,
    f1_samples,
    knn_scores,
    mean_average_precision,
    probe_scores,
    train_linear_probe,
)
from softcon.config import EvaluateConfig
from tasks.train import load_encoder


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation produced."""

    metrics: dict[str, float]
    """linear_map_micro, linear_map_macro, knn_map_micro, knn_map_macro, linear_f1, feature_std,
    feature_nan_fraction, probe_lr (mAP in [0, 1]; NaN where the split has no positives)."""
    per_class_ap: dict[str, float]
    """Linear-probe AP of each class with at least one positive in the evaluated split."""
    n_train: int
    n_eval: int
    seconds: float
    probe_lr: float


def read_store_features(
    config: EvaluateConfig, encoder: torch.nn.Module, meta: dict, split: str, device: torch.device
) -> Features:
    """Frozen features of the labelled samples of one split of ``config.store``."""
    dataset = StoreDataset(
        config.store, split, meta["sensor"], two_views=False, augment=False, norm_stats=meta["norm_stats"]
    )
    if dataset.channel_names and meta["bands"] and dataset.channel_names != list(meta["bands"]):
        raise ValueError(
            f"the store's {meta['sensor']} bands {dataset.channel_names} differ from the encoder's {meta['bands']}"
        )
    return extract_features(encoder, dataset, batch_size=config.batch_size, device=device)


def select_probe_lr(config: EvaluateConfig, train: Features, selection: Features) -> float:
    """The probe learning rate with the best micro mAP on ``selection``."""
    best_lr, best_map = config.probe_lrs[0], -math.inf
    for lr in config.probe_lrs:
        probe = train_linear_probe(
            train, lr=lr, epochs=config.probe_epochs, batch_size=config.batch_size, seed=config.seed
        )
        micro, _, _ = mean_average_precision(selection.y.numpy(), probe_scores(probe, selection))
        if micro > best_map:  # NaN (no positives) never wins
            best_lr, best_map = lr, micro
    return best_lr


def run_evaluation(config: EvaluateConfig, checkpoint: str | Path) -> EvaluationResult:
    """Linear probe and kNN of a checkpoint's frozen encoder on ``config.store``.

    Args:
        config: the evaluate stage configuration (store, split, knn_k, probe_epochs, probe_lrs, ...).
        checkpoint: a training checkpoint file (``tasks.train.run_training``'s result).

    Returns:
        EvaluationResult; metric names follow DESIGN.md (``linear_map_micro`` ...).

    Raises:
        NotImplementedError: for BigEarthNet folders (not supported yet).
        ValueError: when the store has no labelled training samples or its bands differ from the encoder's.

    Example:
        >>> result = run_evaluation(EvaluateConfig(store="data/store.zarr"), "data/ckpt/step_000300.pt")
        >>> result.metrics["linear_map_micro"]
    """
    if config.bigearthnet is not None:
        raise NotImplementedError(
            f"BigEarthNet evaluation ({config.bigearthnet}) is not implemented yet; evaluate on a store"
        )
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder, meta = load_encoder(checkpoint)

    train = read_store_features(config, encoder, meta, "train", device)
    evaluated = read_store_features(config, encoder, meta, config.split, device)
    if len(train.x) == 0:
        raise ValueError(f"the train split of {config.store} has no labelled samples to fit a probe on")
    if len(evaluated.x) == 0:
        raise ValueError(f"the {config.split} split of {config.store} has no labelled samples to evaluate")
    feature_std = float(evaluated.x.std(0).mean()) if len(evaluated.x) > 1 else 0.0
    nan_fraction = float(torch.isnan(evaluated.x).float().mean())
    # a NaN feature would poison every score; count it above, then treat it as 0
    train = Features(torch.nan_to_num(train.x), train.y)
    evaluated = Features(torch.nan_to_num(evaluated.x), evaluated.y)

    # learning rate chosen on val; on train when val is what is reported, or empty
    selection = train
    if config.split != "val":
        val = read_store_features(config, encoder, meta, "val", device)
        if len(val.x) > 0 and val.y.any():
            selection = Features(torch.nan_to_num(val.x), val.y)
    probe_lr = select_probe_lr(config, train, selection)
    probe = train_linear_probe(
        train, lr=probe_lr, epochs=config.probe_epochs, batch_size=config.batch_size, seed=config.seed
    )

    y = evaluated.y.numpy()
    linear = probe_scores(probe, evaluated)  # (N, K)
    knn = knn_scores(train, evaluated, k=config.knn_k)  # (N, K)
    linear_micro, linear_macro, per_class = mean_average_precision(y, linear)
    knn_micro, knn_macro, _ = mean_average_precision(y, knn)
    class_names = list(meta.get("class_names") or [f"class_{c}" for c in range(y.shape[1])])
    metrics = {
        "linear_map_micro": linear_micro,
        "linear_map_macro": linear_macro,
        "knn_map_micro": knn_micro,
        "knn_map_macro": knn_macro,
        "linear_f1": f1_samples(y, linear),
        "feature_std": feature_std,
        "feature_nan_fraction": nan_fraction,
        "probe_lr": probe_lr,
    }
    return EvaluationResult(
        metrics=metrics,
        per_class_ap={name: float(ap) for name, ap in zip(class_names, per_class, strict=True) if np.isfinite(ap)},
        n_train=len(train.x),
        n_eval=len(evaluated.x),
        seconds=time.perf_counter() - started,
        probe_lr=probe_lr,
    )
