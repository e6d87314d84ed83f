"""Projection head: encoder features -> L2-normalised embedding for the contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Two-layer MLP (Linear-BN-ReLU-Linear, SimCLR/MoCo v2 style) followed by L2 normalisation.

    Args:
        in_dim: encoder feature size (``encoder.num_features``).
        out_dim: embedding size.
        hidden_dim: hidden layer size; default ``in_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.fc1(features)))  # (B, hidden)
        x = self.fc2(x)  # (B, out_dim)
        return F.normalize(x.float(), dim=1)  # (B, out_dim), unit norm, float32 even under autocast


class MultiLabelHead(nn.Module):
    """Linear classifier encoder features -> (B, K) class logits, for the supervised reference objective."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if n_classes <= 0:
            raise ValueError(f"the supervised head needs at least one class, got {n_classes}")
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)  # (B, K)
