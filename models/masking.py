"""Siamese masking: hide random square patches of the student's view.

The image is divided into a grid of ``patch`` x ``patch`` cells; for each sample exactly
``round(ratio * cells)`` cells are chosen at random and set to 0, which after normalisation is the band
mean (the same value nodata gets). Cells cut by the right/bottom border are smaller, so the pixel ratio is
only approximately ``ratio`` when the image side is not a multiple of ``patch``.
"""

from __future__ import annotations

import math

import torch


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
