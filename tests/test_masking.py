"""Siamese masking: ratio, determinism, application."""

from __future__ import annotations

import pytest
import torch

from softcon.models.masking import apply_mask, random_patch_mask, vit_forward_masked


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


def tiny_vit():
    from softcon.models.encoder import build_encoder

    torch.manual_seed(0)
    return build_encoder("vit_tiny_patch16_224", 3, img_size=64).eval()


def test_vit_without_masked_tokens_equals_the_plain_forward() -> None:
    vit = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    nothing = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(vit_forward_masked(vit, x, nothing), vit(x), atol=1e-5)


def test_vit_masked_patches_are_replaced_by_the_mask_token() -> None:
    vit = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    token_mask = random_patch_mask(2, 4, 4, ratio=0.5, patch=1, generator=torch.Generator().manual_seed(3))
    pixels = token_mask.repeat_interleave(16, 2).repeat_interleave(16, 3).expand_as(x)  # (2, 3, 64, 64)
    changed = torch.where(pixels, torch.randn_like(x) * 10, x)  # new content in the masked patches only
    with torch.no_grad():
        masked = vit_forward_masked(vit, x, token_mask)
        assert torch.allclose(vit_forward_masked(vit, changed, token_mask), masked, atol=1e-5)  # content unseen
        assert not torch.allclose(masked, vit(x), atol=1e-3)  # but masking changes the features
        vit.mask_token.add_(torch.randn_like(vit.mask_token))  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(vit_forward_masked(vit, x, token_mask), masked, atol=1e-3)  # the token is used


def test_mask_token_gets_a_gradient() -> None:
    vit = tiny_vit().train()
    token_mask = random_patch_mask(2, 4, 4, ratio=0.5, patch=1, generator=torch.Generator().manual_seed(4))
    vit_forward_masked(vit, torch.randn(2, 3, 64, 64), token_mask).sum().backward()
    assert vit.mask_token.grad is not None and vit.mask_token.grad.abs().sum() > 0
