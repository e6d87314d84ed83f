"""Siamese masking: hide random square patches of the student's view.

The image is divided into a grid of ``patch`` x ``patch`` cells; for each sample exactly
``round(ratio * cells)`` cells are chosen at random and set to 0, which after normalisation is the band
mean (the same value nodata gets). Cells cut by the right/bottom border are smaller, so the pixel ratio is
only approximately ``ratio`` when the image side is not a multiple of ``patch``.

ViTs are masked at the token level instead (iBOT / DINOv2 style): the grid is the ViT's patch grid, and
the embedding of every masked patch is replaced by a learnable mask token right after the patch embedding
(``vit_forward_masked``), so the encoder is told which patches it cannot see instead of being shown zeros.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from softcon.compat.timm_vit import add_position_embedding


def random_patch_mask(
    batch: int,
    height: int,
    width: int,
    *,
    ratio: float,
    patch: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean mask (B, 1, H, W), True where the input is hidden.

    Args:
        batch, height, width: the size of the batch to mask.
        ratio: fraction of grid cells to hide, in [0, 1).
        patch: side of a cell in pixels.
        generator: CPU generator, for reproducible masks.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if patch <= 0:
        raise ValueError(f"mask patch must be > 0, got {patch}")
    gh, gw = math.ceil(height / patch), math.ceil(width / patch)
    n_cells = gh * gw
    n_masked = round(ratio * n_cells)
    noise = torch.rand(batch, n_cells, generator=generator)  # (B, gh*gw)
    # the n_masked cells with the smallest noise are hidden: exactly n_masked per sample
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, gh*gw)
    cells = (rank < n_masked).view(batch, 1, gh, gw)  # (B, 1, gh, gw)
    mask = cells.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (B, 1, gh*p, gw*p)
    return mask[:, :, :height, :width].to(device)  # (B, 1, H, W)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the masked pixels of x (B, C, H, W) with mask (B, 1, H, W)."""
    return x.masked_fill(mask, 0.0)


def add_mask_token(vit: nn.Module) -> None:
    """Give a timm VisionTransformer a learnable ``mask_token`` (1, 1, D) (DINOv2's init: N(0, 0.02))."""
    embed_dim = vit.embed_dim
    if not isinstance(embed_dim, int):
        raise TypeError(f"{type(vit).__name__} has no integer embed_dim; is it a timm ViT?")
    token = torch.zeros(1, 1, embed_dim)
    nn.init.trunc_normal_(token, std=0.02)
    vit.mask_token = nn.Parameter(token)


def vit_forward_masked(vit: nn.Module, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Pooled features (B, D) of a timm ViT whose masked patch tokens are replaced by its mask token.

    Args:
        vit: a timm VisionTransformer built with ``dynamic_img_size=True`` and ``add_mask_token`` applied.
        x: images (B, C, H, W), H and W multiples of the patch size.
        token_mask: (B, 1, H/p, W/p) bool, True where the patch is hidden (``random_patch_mask`` with
            ``patch=1`` on the token grid).
    """
    # timm ViTs are used by their attributes (VisionTransformer, Eva, ...), which nn.Module's typing cannot see.
    model: Any = vit
    tokens = model.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
    B, h, w, D = tokens.shape
    if token_mask.shape != (B, 1, h, w):
        raise ValueError(f"token mask of shape {tuple(token_mask.shape)} does not fit the patch grid {(B, 1, h, w)}")
    hidden = token_mask.reshape(B, h, w, 1)  # (B, h, w, 1)
    # torch.where keeps the mask token in the graph even with nothing masked (DDP wants every parameter used)
    tokens = torch.where(hidden, model.mask_token.to(tokens.dtype).view(1, 1, 1, D), tokens)  # (B, h, w, D)
    tokens = add_position_embedding(model, tokens)  # (B, prefix + h*w, D)
    tokens = model.patch_drop(tokens)
    tokens = model.norm_pre(tokens)
    tokens = model.blocks(tokens)
    tokens = model.norm(tokens)
    return model.forward_head(tokens, pre_logits=True)  # (B, D)
