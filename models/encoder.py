"""Encoder: a timm backbone as a feature extractor, its input layer adapted to the sensor's channels.

Pretrained weights come only from a local file (never downloaded). When the file's first layer has
3-channel RGB filters and the encoder sees Sentinel-2 bands, the filters are mapped band by band:

    B04 <- R,  B03 <- G,  B02 <- B,  every other band <- mean(R, G, B)

and the whole kernel is then multiplied by 3 / in_chans, so that an input with the same per-channel
statistics gives first-layer activations of the same size as the RGB original (timm's
``adapt_input_conv`` uses the same rescaling). Without band names (e.g. Sentinel-1 VV/VH) every channel
gets mean(R, G, B), rescaled the same way.

A file whose first layer has Sentinel channels (13: L1C in SSL4EO-S12's order, as SoftCon's ``B13_*`` files; 12:
L2A; 2: S1 VV, VH) is mapped by band name onto the encoder's bands (``map_bands``): each shared band keeps its
filter exactly; a band the data lacks (B10 on L2A data) is left out, the same as feeding it at its mean (0 after
normalisation); a band the file lacks gets the mean filter.

Weight files read (``torch.load(weights_only=True)`` or safetensors, optionally under "state_dict"/"model"):

- ResNet-50: torchvision (``torchvision.models.resnet50().state_dict()``) and timm use the same key names
  (conv1, bn1, layer1..4, fc), so both load into timm's ``resnet50``; the classifier (fc) is dropped.
- ViT: timm format (``vit_small_patch14_dinov2``), and the original DINOv2 format (facebookresearch
  ``dinov2_vits14`` etc.: the same names plus ``mask_token`` (1, D), optionally ``register_tokens`` and
  SwiGLU ``w12``/``w3``, converted by timm's DINOv2 filter). The position embedding is resampled to the
  model's grid (DINOv2's 37x37 at 518 px to e.g. 16x16 at 224 px). A file's ``mask_token`` initialises
  the encoder's mask token (used by Siamese masking); without one it keeps its N(0, 0.02) init.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from softcon.compat.timm_dinov2 import convert_dinov2_state_dict
from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS
from softcon.models.masking import add_mask_token

RGB_TO_S2: dict[str, int] = {"B04": 0, "B03": 1, "B02": 2}
"""Which RGB filter (0=R, 1=G, 2=B) initialises each visible Sentinel-2 band."""
FILE_BANDS: dict[int, tuple[str, ...]] = {13: S2_L1C_BANDS, 12: S2_L2A_BANDS, 2: S1_POLARIZATIONS}
"""The bands a weights file's first layer stands for, by its number of input channels: SoftCon's and SSL4EO-S12's
13-band files are Sentinel-2 L1C in SSL4EO-S12's order, 12-band ones L2A (no B10), 2-band ones Sentinel-1 VV, VH."""


def is_vit(model_or_name: nn.Module | str) -> bool:
    """Whether a backbone (timm name or built model) is a ViT, masked with a mask token."""
    if isinstance(model_or_name, str):
        return model_or_name.startswith(("vit", "deit", "eva"))
    return hasattr(model_or_name, "patch_embed") and hasattr(model_or_name, "blocks")


def patch_size(model: nn.Module) -> int:
    """A ViT's patch side in pixels (images must be multiples of it)."""
    embed: Any = model.patch_embed  # a timm PatchEmbed (nn.Module types attributes as Tensor | Module)
    size = embed.patch_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def fit_to_encoder(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images a ViT can take: a side that is not a multiple of its patch (264 or 120 px for patch 14) is brought to
    the encoder's image size, centre-cropped when larger (as training crops 224 from 264) and resized (bilinear)
    when smaller (as SoftCon resizes BigEarthNet's 120 px). CNNs, and ViT inputs in whole patches, pass unchanged.
    """
    if not is_vit(encoder):
        return images
    height, width = images.shape[-2:]
    patch = patch_size(encoder)
    if height % patch == 0 and width % patch == 0:
        return images
    embed: Any = encoder.patch_embed
    target_h, target_w = (int(side) for side in embed.img_size)
    if height >= target_h and width >= target_w:
        top, left = (height - target_h) // 2, (width - target_w) // 2
        return images[..., top : top + target_h, left : left + target_w]
    return nn.functional.interpolate(images, size=(target_h, target_w), mode="bilinear", align_corners=False)


class Dinov2LinearFeatures(nn.Module):
    """A timm ViT's features as DINOv2's linear evaluation takes them: the class tokens of the last ``blocks``
    blocks and the mean patch token of the last, concatenated ((blocks + 1) x D), each after the final norm."""

    def __init__(self, vit: nn.Module, blocks: int = 4) -> None:
        super().__init__()
        self.vit = vit
        self.blocks = blocks
        self.num_features = (blocks + 1) * int(getattr(vit, "num_features", 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit: Any = self.vit  # a timm VisionTransformer
        images = fit_to_encoder(vit, images)
        layers = vit.get_intermediate_layers(images, n=self.blocks, return_prefix_tokens=True, norm=True)
        class_tokens = [prefix[:, 0] for _, prefix in layers]  # (B, D) each
        return torch.cat([*class_tokens, layers[-1][0].mean(dim=1)], dim=1)  # (B, (blocks + 1) D)


def build_encoder(
    backbone: str,
    in_chans: int,
    weights: str | Path | None = None,
    *,
    bands: Sequence[str] | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model with ``in_chans`` inputs and no classifier: (B, C, H, W) -> (B, num_features).

    Args:
        backbone: timm model name: "resnet50", "vit_small_patch14_dinov2" (ViT-S/14),
            "vit_base_patch14_dinov2" (ViT-B/14); small ones for tests ("resnet18", "vit_tiny_patch16_224").
        in_chans: number of input channels (12 Sentinel-2 L2A bands, 2 Sentinel-1 polarisations).
        weights: optional local weights file (.safetensors, or a torch state dict .pt/.pth).
        bands: band names in input order, used to map RGB filters (see module docstring).
        img_size: input side for ViTs (position embeddings); other sizes still work (dynamic size).

    Raises:
        ValueError: unknown backbone, or a weights file that does not fit the model (the message lists
            the missing and unexpected keys and the shape mismatches).
    """
    if in_chans <= 0:
        raise ValueError(f"in_chans must be > 0, got {in_chans}")
    kwargs: dict[str, Any] = {}
    if is_vit(backbone):
        kwargs = {"img_size": img_size or 224, "dynamic_img_size": True}
    try:
        model = timm.create_model(backbone, pretrained=False, in_chans=in_chans, num_classes=0, **kwargs)
    except RuntimeError as error:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"unknown backbone {backbone!r}: {error}") from error
    if is_vit(model):
        add_mask_token(model)
    if weights is not None:
        load_pretrained(model, weights, bands=bands)
    return model


def load_torch_file(path: str | Path, *, what: str = "weights file") -> Any:
    """``torch.load`` of a local file on CPU with ``weights_only=True`` (never unpickles code), with errors that
    say what is wrong with the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, truncated or non-torch file, or one holding objects other than tensors and plain
            values (refused unread).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own text suggests weights_only=False, i.e. running the file's code: not an option here.
        detail = str(error).partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise ValueError(
            f"{what} {path} is refused (Weights only load failed: {detail[0] if detail else error}): it holds "
            "objects other than tensors and plain values, or is not a torch file; re-save it as a state dict "
            "(torch.save(model.state_dict(), file)) or as safetensors"
        ) from error
    except (EOFError, OSError, RuntimeError) as error:
        raise ValueError(
            f"{what} {path} ({path.stat().st_size} bytes) cannot be read: it is truncated or not a torch file "
            f"({type(error).__name__}: {error}); copy or download it again"
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch file (weights_only); unwraps {"state_dict"/"model": ...}.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or unreadable file, or one that holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(
                f"weights file {path} ({path.stat().st_size} bytes) cannot be read: it is truncated or not a "
                f"safetensors file ({error}); copy or download it again"
            ) from error
    state = load_torch_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def weights_bands(path: str | Path) -> tuple[str, ...]:
    """The bands a weights file was trained on, from its first layer's input channels (``FILE_BANDS``).

    Raises:
        ValueError: the file has no first layer this reads (conv1 or patch_embed.proj), or its channel count
            stands for no Sentinel band set (naming the count).
    """
    state = read_state_dict(path)
    first = next((state[key] for key in ("conv1.weight", "patch_embed.proj.weight") if key in state), None)
    if first is None:
        raise ValueError(f"{path}: no first layer conv1.weight or patch_embed.proj.weight to read its bands from")
    channels = int(first.shape[1])
    if channels not in FILE_BANDS:
        raise ValueError(
            f"{path}: a first layer of {channels} channels stands for no known band set ({sorted(FILE_BANDS)} do); "
            "give a store, whose bands the encoder is built for"
        )
    return FILE_BANDS[channels]


def map_bands(weight: torch.Tensor, file_bands: Sequence[str], bands: Sequence[str]) -> torch.Tensor:
    """(O, len(file_bands), k, k) first-layer filters as (O, len(bands), k, k) for the encoder's bands, by name.

    A band in both keeps its filter exactly, wherever it sits in either order. A band of the file the encoder's
    data lacks (B10 for L2A data) is left out, which is the same as feeding it at its mean (0 after
    normalisation). A band the file lacks gets the mean of the file's filters.

    Raises:
        ValueError: when the two share no band (e.g. Sentinel-1 filters for Sentinel-2 bands).
    """
    index = {band: i for i, band in enumerate(file_bands)}
    if not set(index) & set(bands):
        raise ValueError(f"the weights' bands {list(file_bands)} share none with the encoder's {list(bands)}")
    mean = weight.mean(dim=1)
    return torch.stack([weight[:, index[band]] if band in index else mean for band in bands], dim=1)


def adapt_first_conv(weight: torch.Tensor, in_chans: int, bands: Sequence[str] | None = None) -> torch.Tensor:
    """Map (O, 3, k, k) RGB filters to (O, in_chans, k, k) following the module docstring's rule."""
    if weight.shape[1] != 3:
        raise ValueError(f"can only adapt 3-channel RGB filters, got {weight.shape[1]} channels")
    mean = weight.mean(dim=1)  # (O, k, k)
    channels = []
    for c in range(in_chans):
        band = bands[c] if bands is not None and c < len(bands) else None
        channels.append(weight[:, RGB_TO_S2[band]] if band in RGB_TO_S2 else mean)
    return torch.stack(channels, dim=1) * (3.0 / in_chans)  # (O, in_chans, k, k)


def load_pretrained(model: nn.Module, path: str | Path, *, bands: Sequence[str] | None = None) -> None:
    """Load a local weights file into ``model`` with a strict key check (classifier keys are dropped)."""
    state = read_state_dict(path)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier")
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier or [])
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{c}.") for c in classifiers)}

    own = model.state_dict()
    if "mask_token" in state and state["mask_token"].dim() == 2 and "mask_token" in own:
        # original DINOv2 format: (1, D) mask token; the rest (register tokens, SwiGLU names) via timm
        mask_token = state.pop("mask_token").reshape(own["mask_token"].shape)
        if "register_tokens" in state or any(".mlp.w12." in k for k in state):
            state = convert_dinov2_state_dict(state, model)
        state["mask_token"] = mask_token
    elif "mask_token" in own and "mask_token" not in state:
        state["mask_token"] = own["mask_token"]  # no mask token in the file (timm format): keep the init
    first_conv = cfg.get("first_conv")
    conv_key = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    if conv_key in state and conv_key in own:
        in_chans, file_chans = own[conv_key].shape[1], state[conv_key].shape[1]
        if file_chans != in_chans:
            if file_chans == 3:
                state[conv_key] = adapt_first_conv(state[conv_key], in_chans, bands)
            elif file_chans in FILE_BANDS and bands is not None and len(bands) == in_chans:
                state[conv_key] = map_bands(state[conv_key], FILE_BANDS[file_chans], bands)
            else:
                raise ValueError(
                    f"{path}: first layer {conv_key} has {file_chans} input channels; the model needs {in_chans}. "
                    f"3-channel RGB filters are adapted, and {sorted(FILE_BANDS)}-channel Sentinel filters are "
                    "mapped by band name when the encoder's bands are known"
                )
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        embed: Any = model.patch_embed  # a timm PatchEmbed
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(embed.grid_size), num_prefix_tokens=prefix
        )

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights file {path} does not fit {type(model).__name__}:\n"
            f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched[:20]}"
        )
    model.load_state_dict(state, strict=True)
