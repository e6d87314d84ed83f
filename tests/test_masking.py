"""Siamese masking: ratio, determinism, application."""

from __future__ import annotations

import pytest
import torch

from models.masking import apply_mask, random_patch_mask


@pytest.mark.parametrize(("ratio", "size", "patch"), [(0.3, 32, 8), (0.5, 32, 4), (0.0, 16, 4), (0.75, 30, 8)])
def test_mask_ratio_is_respected(ratio: float, size: int, patch: int) -> None:
    mask = random_patch_mask(64, size, size, ratio=ratio, patch=patch, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 1, size, size)
    assert mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(ratio, abs=0.05)


def test_mask_is_made_of_square_cells() -> None:
    mask = random_patch_mask(4, 16, 16, ratio=0.5, patch=4, generator=torch.Generator().manual_seed(1))
    cells = mask.view(4, 1, 4, 4, 4, 4).permute(0, 1, 2, 4, 3, 5).reshape(4, 1, 4, 4, 16)
    assert bool(((cells.all(-1)) | (~cells).all(-1)).all())  # each cell is all masked or all visible
    assert (cells.all(-1).sum(dim=(1, 2, 3)) == 8).all()  # exactly half the cells per sample


def test_mask_is_deterministic_with_a_generator() -> None:
    first = random_patch_mask(8, 16, 16, ratio=0.3, patch=4, generator=torch.Generator().manual_seed(7))
    second = random_patch_mask(8, 16, 16, ratio=0.3, patch=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_apply_mask_zeroes_masked_pixels_only() -> None:
    x = torch.ones(2, 3, 8, 8)
    mask = random_patch_mask(2, 8, 8, ratio=0.5, patch=4, generator=torch.Generator().manual_seed(0))
    masked = apply_mask(x, mask)
    assert (masked[mask.expand_as(x)] == 0).all()
    assert (masked[~mask.expand_as(x)] == 1).all()


def test_bad_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="mask ratio must be in"):
        random_patch_mask(1, 8, 8, ratio=1.0, patch=4)
