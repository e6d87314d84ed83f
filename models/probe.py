"""Frozen-feature evaluation: feature extraction and caching, multi-label linear probe, kNN, mAP and F1,
feature sanity checks, and the per-band image-statistics "encoder"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from softcon.models.encoder import fit_to_encoder


@dataclass(frozen=True)
class Features:
    """Frozen features of one split and their targets."""

    x: torch.Tensor
    """(N, D) float32 features."""
    y: torch.Tensor
    """(N, K) float32 multi-hot targets."""
    fractions: torch.Tensor | None = None
    """(N, K) float32 class fractions where the dataset has them (the training store), else None."""


def save_features(path: str | Path, features: Features) -> Path:
    """Write features to an ``.npz`` (x, y and fractions when present); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": features.x.numpy(), "y": features.y.numpy()}
    if features.fractions is not None:
        arrays["fractions"] = features.fractions.numpy()
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, allow_pickle=True, **arrays)  # numpy's default, named so that mypy matches **arrays to **kwds
    temporary.replace(path)  # a killed write never leaves a truncated cache entry
    return path


def load_features(path: str | Path) -> Features:
    """Features written by ``save_features``."""
    with np.load(path) as data:
        fractions = torch.from_numpy(data["fractions"]) if "fractions" in data else None
        return Features(x=torch.from_numpy(data["x"]), y=torch.from_numpy(data["y"]), fractions=fractions)


class BandStatistics(nn.Module):
    """The image-statistics baseline: per-band mean and standard deviation over pixels, (B, C, H, W) -> (B, 2C).

    A linear probe on these says how much of a task is solvable from the spectrum alone; a learnt encoder
    that does not beat it has learnt nothing spatial.
    """

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.num_features = 2 * in_chans

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        flat = image.flatten(2)  # (B, C, H*W)
        return torch.cat([flat.mean(2), flat.std(2)], dim=1)  # (B, 2C)


@dataclass(frozen=True)
class FeatureSanity:
    """Whether features can be trusted, before any probe is fitted on them."""

    std: float
    """Mean over dimensions of the per-dimension standard deviation across samples (raw feature scale)."""
    nan_fraction: float
    """Fraction of non-finite feature values."""
    spread: float
    """Root of the total variance of the L2-normalised features: 0 when every sample maps to the same
    direction, up to sqrt(2) for well spread features; independent of the feature scale and dimension."""
    dead_fraction: float
    """Fraction of dimensions constant across samples."""
    collapsed: bool
    """Non-finite values, or spread below the threshold: the encoder no longer tells samples apart."""


def feature_sanity(x: torch.Tensor, *, collapse_threshold: float = 0.01) -> FeatureSanity:
    """Std, NaN fraction, spread and dead dimensions of (N, D) features; flags a collapsed encoder."""
    nan_fraction = float((~torch.isfinite(x)).float().mean()) if x.numel() else 0.0
    finite = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)  # (N, D)
    if len(finite) < 2:
        return FeatureSanity(0.0, nan_fraction, 0.0, 1.0, True)
    std = finite.std(0)  # (D,)
    unit = F.normalize(finite, dim=1)  # (N, D)
    spread = float(unit.var(0).sum().sqrt())
    dead = float((std <= 1e-6 * (finite.abs().mean() + 1e-12)).double().mean())
    collapsed = nan_fraction > 0 or not math.isfinite(spread) or spread < collapse_threshold
    return FeatureSanity(float(std.mean()), nan_fraction, spread, dead, collapsed)


@torch.no_grad()
def extract_features(
    encoder: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> Features:
    """Run ``encoder`` (eval mode) over a single-view dataset, keeping labelled samples only."""
    device = torch.device(device)
    encoder = encoder.eval().to(device)
    features, targets, fractions = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)  # sequential: one chunk read per block
    for batch in loader:
        keep = batch["labelled"].bool()  # (B,)
        if not keep.any():
            continue
        image = batch["image"][keep].to(device)  # (b, C, H, W)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = encoder(fit_to_encoder(encoder, image))  # (b, D)
        features.append(x.float().cpu())
        targets.append(batch["labels"][keep].float())
        if "fractions" in batch:
            fractions.append(batch["fractions"][keep].float())
    if not features:
        return Features(x=torch.zeros(0, getattr(encoder, "num_features", 0)), y=torch.zeros(0, 0))
    return Features(
        x=torch.cat(features),
        y=torch.cat(targets),
        fractions=torch.cat(fractions) if len(fractions) == len(features) else None,
    )


def train_linear_probe(
    train: Features,
    *,
    lr: float,
    epochs: int,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    single_label: bool = False,
) -> nn.Module:
    """Multi-label logistic regression (one sigmoid per class, BCE, AdamW) on standardised features; with
    ``single_label`` (one-hot targets, e.g. EuroSAT) softmax regression (cross-entropy) instead.

    The standardisation uses the statistics of ``train``, so every encoder is probed on the same footing
    whatever its feature scale.

    Returns a module mapping raw features (N, D) to logits (N, K); the standardisation is inside it, so
    it applies unchanged to other splits.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = train.x.mean(0)  # (D,)
    std = train.x.std(0).clamp_min(1e-6) if len(train.x) > 1 else torch.ones_like(mean)  # (D,)
    linear = nn.Linear(train.x.shape[1], train.y.shape[1])
    with torch.no_grad():  # seeded init, independent of the global RNG
        linear.weight.normal_(0, 0.01, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    x = (train.x - mean) / std  # (N, D)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            logits = linear(x[index])
            if single_label:
                loss = F.cross_entropy(logits, train.y[index].argmax(1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return StandardisedLinear(linear, mean, std).eval()


def top1_accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    """Share of samples whose highest score is their (one-hot) class."""
    return float((scores.argmax(1) == y.argmax(1)).mean()) if len(y) else math.nan


class StandardisedLinear(nn.Module):
    """Linear probe with the training-feature standardisation folded in."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)  # (N, K) logits


@torch.no_grad()
def probe_scores(probe: nn.Module, features: Features) -> np.ndarray:
    """Class probabilities (N, K) of a linear probe."""
    return torch.sigmoid(probe(features.x)).numpy()


@torch.no_grad()
def knn_scores(train: Features, query: Features, *, k: int, temperature: float = 0.07) -> np.ndarray:
    """Weighted kNN label voting with cosine similarity.

    score_c(q) = sum_{j in top-k(q)} w_j y_jc / sum_j w_j, with w_j = exp(cos(q, x_j) / temperature)
    (the DINO kNN weighting); scores are in [0, 1].
    """
    k = min(k, len(train.x))
    train_x = F.normalize(train.x, dim=1)  # (N, D)
    query_x = F.normalize(query.x, dim=1)  # (M, D)
    similarity = query_x @ train_x.T  # (M, N)
    top, index = similarity.topk(k, dim=1)  # (M, k)
    weights = torch.softmax(top / temperature, dim=1)  # (M, k), sums to 1
    votes = train.y[index]  # (M, k, K)
    return (weights.unsqueeze(-1) * votes).sum(1).numpy()  # (M, K)


def mean_average_precision(y: np.ndarray, scores: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(micro mAP, macro mAP, per-class AP); macro and per-class only over classes with a positive.

    Per-class AP is NaN for classes without positives in ``y``.
    """
    y = np.asarray(y).astype(int)
    micro = float(average_precision_score(y, scores, average="micro")) if y.any() else float("nan")
    per_class = np.full(y.shape[1], np.nan)
    for c in np.flatnonzero(y.sum(0) > 0):
        per_class[c] = average_precision_score(y[:, c], scores[:, c])
    macro = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return micro, macro, per_class


def f1_samples(y: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5) -> float:
    """Sample-averaged F1 of ``scores >= threshold``; a sample with no true and no predicted class scores 1."""
    return float(f1_score(np.asarray(y).astype(int), scores >= threshold, average="samples", zero_division=1.0))
