"""Encoder: timm backbones with adapted input channels, local weights, strict key checks; projection head."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.encoder import build_encoder
from models.heads import ProjectionHead
from softcon.config import S2_L2A_BANDS

torch.set_num_threads(2)


@pytest.mark.parametrize(
    ("backbone", "in_chans", "features"),
    [("resnet18", 12, 512), ("resnet18", 2, 512), ("vit_tiny_patch16_224", 12, 192)],
    ids=["resnet18-s2", "resnet18-s1", "vit-tiny-s2"],
)
def test_encoder_outputs_features(backbone: str, in_chans: int, features: int) -> None:
    encoder = build_encoder(backbone, in_chans, img_size=32).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, features)
    assert encoder.num_features == features


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet_nope'"):
        build_encoder("resnet_nope", 12)


def rgb_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=3).state_dict()  # with fc.* keys


def test_rgb_weights_are_mapped_to_s2_bands(tmp_path: Path) -> None:
    state = rgb_state_dict()
    torch.save(state, tmp_path / "rgb.pth")
    encoder = build_encoder("resnet18", 12, tmp_path / "rgb.pth", bands=S2_L2A_BANDS)
    rgb, weight = state["conv1.weight"], encoder.conv1.weight.detach()
    scale = 3 / 12
    assert torch.allclose(weight[:, S2_L2A_BANDS.index("B04")], rgb[:, 0] * scale)
    assert torch.allclose(weight[:, S2_L2A_BANDS.index("B03")], rgb[:, 1] * scale)
    assert torch.allclose(weight[:, S2_L2A_BANDS.index("B02")], rgb[:, 2] * scale)
    assert torch.allclose(weight[:, S2_L2A_BANDS.index("B11")], rgb.mean(1) * scale)
    assert torch.equal(encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_safetensors_weights_load(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in rgb_state_dict().items()}
    save_file(state, str(tmp_path / "rgb.safetensors"))
    encoder = build_encoder("resnet18", 2, tmp_path / "rgb.safetensors")
    assert torch.allclose(encoder.conv1.weight, state["conv1.weight"].mean(1, keepdim=True).expand(-1, 2, -1, -1) * 1.5)


def test_wrong_weights_file_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = rgb_state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['layer4.1.bn2.bias'\]") as error:
        build_encoder("resnet18", 12, tmp_path / "bad.pth")
    assert "unexpected keys (1): ['extra.weight']" in str(error.value)


def test_projection_head_gives_unit_norm_embeddings() -> None:
    head = ProjectionHead(16, 8)
    z = head(torch.randn(4, 16))
    assert z.shape == (4, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
