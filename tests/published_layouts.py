"""Weights files in the layouts SoftCon released (random values, nothing downloaded), and a miniature EuroSAT MS
tree in the release's layout: shared by the encoder, evaluation and paper-model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch


def softcon_resnet50(in_chans: int) -> dict[str, torch.Tensor]:
    """A state dict in the layout of SoftCon's released ResNet-50 files (B13_rn50_softcon.pth, B2_rn50_softcon.pth):
    torchvision's resnet50 keys without ``fc``, first layer (64, in_chans, 7, 7); random values."""
    import torchvision

    torch.manual_seed(in_chans)
    state = torchvision.models.resnet50(weights=None).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state["conv1.weight"] = torch.randn(64, in_chans, 7, 7)
    return state


def softcon_vit(name: str, dim: int, in_chans: int) -> dict[str, torch.Tensor]:
    """A state dict in the layout of SoftCon's released ViT files (B13_vits14_softcon.pth, B13_vitb14_softcon.pth):
    DINOv2's original keys at 224 px (16x16 patches + class token), LayerScale (init_values 1e-5), no register
    tokens, a (1, D) mask token, patch embedding (D, in_chans, 14, 14); random values."""
    torch.manual_seed(dim)
    state = timm.create_model(name, pretrained=False, img_size=224, init_values=1e-5).state_dict()
    state["patch_embed.proj.weight"] = torch.randn(dim, in_chans, 14, 14)
    state["mask_token"] = torch.randn(1, dim)
    return state


def eurosat_tree(root: Path, per_class: int = 24) -> Path:
    """A miniature EuroSAT MS tree: three class folders of 13-band 64 px GeoTIFFs (B8A last), each class with
    its own band means, as the release lays them out (no split files)."""
    import rasterio
    from rasterio.transform import from_origin

    from softcon.tasks.eurosat import EUROSAT_BANDS, EUROSAT_CLASSES

    rng = np.random.default_rng(0)
    for label, name in enumerate(EUROSAT_CLASSES[:3]):
        folder = root / "ds" / "images" / "remote_sensing" / "otherDatasets" / "sentinel_2" / "tif" / name
        folder.mkdir(parents=True)
        means = np.linspace(800, 3000, len(EUROSAT_BANDS))[::-1] if label == 1 else np.linspace(800, 3000, 13)
        means = means * (1 + 0.5 * label)
        for i in range(per_class):
            image = rng.normal(means[:, None, None], 150, (len(EUROSAT_BANDS), 64, 64)).clip(1, 10000)
            profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 13, "dtype": "uint16",
                       "crs": "EPSG:32632", "transform": from_origin(500000, 5000000, 10, 10)}  # fmt: skip
            with rasterio.open(folder / f"{name}_{i + 1}.tif", "w", **profile) as dst:
                dst.write(image.astype(np.uint16))
    return root
