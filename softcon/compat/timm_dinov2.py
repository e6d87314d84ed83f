"""timm's DINOv2 checkpoint filter, for ``models/encoder.py``'s loading of original DINOv2 weight files.

Checked against timm 1.0.31 (pinned ``timm>=1.0,<2`` in pyproject.toml). Private API wrapped here:

- ``timm.models.vision_transformer._convert_dinov2(state_dict, model)``: renames the original DINOv2 format
  (facebookresearch ``dinov2_vit*14``) to timm's: ``register_tokens`` -> ``reg_token`` (with the class token's
  position embedding folded into ``cls_token`` and dropped from ``pos_embed``), SwiGLU ``mlp.w12``/``mlp.w3`` ->
  ``mlp.fc1``/``mlp.fc2``, and drops ``mask_token``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

__all__ = ["convert_dinov2_state_dict"]


def convert_dinov2_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` (original DINOv2 format) with timm's names for ``model`` (a timm ViT); it pops entries of
    ``state_dict`` (``mask_token``, ``register_tokens``...) as timm's filter does."""
    from timm.models.vision_transformer import _convert_dinov2

    # timm annotates the model as a VisionTransformer but its filter reads only the state dict: any timm ViT will do
    return _convert_dinov2(state_dict, cast("VisionTransformer", model))
