"""Student network: encoder + projection head (+ optional supervised head) behind one forward.

One module so that DDP wraps (and synchronises) everything that gets a gradient, and so that the
Siamese masking is applied in one place: pixel squares set to 0 for CNNs, the mask token in place of
masked patch tokens for ViTs (``models.masking``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from softcon.models.encoder import is_vit, patch_size
from softcon.models.heads import MultiLabelHead, ProjectionHead
from softcon.models.masking import apply_mask, random_patch_mask, vit_forward_masked


class Student(nn.Module):
    """encoder -> (projector -> unit-norm z, classifier -> logits).

    Args:
        encoder: a timm backbone from ``build_encoder`` (num_classes=0).
        embed_dim: projection head output size.
        n_classes: when given, a linear multi-label head on the features (supervised reference objective).
    """

    def __init__(self, encoder: nn.Module, embed_dim: int, *, n_classes: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        num_features = encoder.num_features
        if not isinstance(num_features, int):
            raise TypeError(f"{type(encoder).__name__} has no integer num_features; is it a timm backbone?")
        self.projector = ProjectionHead(num_features, embed_dim)
        self.classifier = MultiLabelHead(num_features, n_classes) if n_classes else None
        self.vit = is_vit(encoder)

    def mask_cell(self, requested: int) -> int:
        """Side in pixels of one masked square: the ViT patch (token masking), else ``requested``."""
        return patch_size(self.encoder) if self.vit else requested

    def make_mask(
        self, batch: int, height: int, width: int, *, ratio: float, patch: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Random mask for this student: (B, 1, H, W) pixels for CNNs, (B, 1, H/p, W/p) tokens for ViTs."""
        if not self.vit:
            return random_patch_mask(batch, height, width, ratio=ratio, patch=patch, generator=generator)
        p = patch_size(self.encoder)
        if height % p or width % p:
            raise ValueError(
                f"ViT inputs must be multiples of the patch size {p}, got {height}x{width} (set crop_size)"
            )
        return random_patch_mask(batch, height // p, width // p, ratio=ratio, patch=1, generator=generator)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features (B, F) of the masked input."""
        if self.vit:
            if mask is None:
                vit: Any = self.encoder  # a timm ViT, used by its attributes (see models.masking)
                mask = torch.zeros(x.shape[0], 1, *vit.patch_embed.dynamic_feat_size(x.shape[-2:]),
                                   dtype=torch.bool, device=x.device)  # fmt: skip
            return vit_forward_masked(self.encoder, x, mask)
        return self.encoder(apply_mask(x, mask) if mask is not None else x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z (B, D) unit norm, logits (B, K) or None)."""
        features = self.features(x, mask)  # (B, F)
        z = self.projector(features)
        logits = self.classifier(features) if self.classifier is not None else None
        return z, logits
