"""timm's VisionTransformer token path, for ``models/masking.py``'s forward with mask tokens (iBOT / DINOv2 style).

Checked against timm 1.0.31 (pinned ``timm>=1.0,<2`` in pyproject.toml). Private API wrapped here:

- ``timm.models.vision_transformer.VisionTransformer._pos_embed(x)``: prepends the class and register tokens to
  the patch tokens and adds the position embedding (resampled to the patch grid when the model was built with
  ``dynamic_img_size=True``, which then takes ``x`` as (B, h, w, D)), then applies ``pos_drop``. It is the step
  between ``patch_embed`` and ``patch_drop`` of timm's own ``forward_features``, which the masked forward
  splits there to put the mask token in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["add_position_embedding"]


def add_position_embedding(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``vit``'s prefix tokens (class, registers) followed by ``tokens`` (the output of its ``patch_embed``:
    (B, h, w, D) with ``dynamic_img_size``, else (B, h*w, D)), with its position embedding added and its position
    dropout applied: (B, prefix + h*w, D)."""
    # timm ViTs are used by their attributes, which nn.Module's typing cannot see
    model: Any = vit
    embedded: torch.Tensor = model._pos_embed(tokens)
    return embedded
