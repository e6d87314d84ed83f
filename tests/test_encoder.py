"""Encoder: timm backbones with adapted input channels, local weights, strict key checks; projection head."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from published_layouts import softcon_resnet50, softcon_vit
from safetensors.torch import save_file

from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS
from softcon.models.encoder import build_encoder
from softcon.models.heads import ProjectionHead

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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "in_chans", "size", "features"),
    [
        ("resnet50", 13, 32, 2048),
        ("vit_small_patch14_dinov2", 12, 28, 384),
        ("vit_base_patch14_dinov2", 2, 28, 768),
    ],
    ids=["resnet50-s2l1c", "vit-s14-s2l2a", "vit-b14-s1"],
)
def test_paper_backbones_take_sentinel_channels(backbone: str, in_chans: int, size: int, features: int) -> None:
    encoder = build_encoder(backbone, in_chans, img_size=size).eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, in_chans, size, size))
    assert out.shape == (1, features)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_resnet50_weights_in_torchvision_and_timm_format_load(tmp_path: Path, source: str) -> None:
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        state = torchvision.models.resnet50(weights=None).state_dict()
    else:
        state = timm.create_model("resnet50", pretrained=False).state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    encoder = build_encoder("resnet50", 13, tmp_path / "resnet50.pth", bands=S2_L1C_BANDS)
    assert torch.allclose(encoder.conv1.weight[:, S2_L1C_BANDS.index("B04")], state["conv1.weight"][:, 0] * 3 / 13)
    assert torch.allclose(encoder.conv1.weight[:, S2_L1C_BANDS.index("B8A")], state["conv1.weight"].mean(1) * 3 / 13)
    assert torch.equal(encoder.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(encoder.layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])


def dinov2_state(original_format: bool) -> dict[str, torch.Tensor]:
    """A fake DINOv2 ViT-S/14 file: timm's model at 518 px (37x37 grid); the original format adds a (1, D)
    mask token, as in facebookresearch's dinov2_vits14."""
    torch.manual_seed(0)
    state = timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict()
    if original_format:
        state["mask_token"] = torch.randn(1, 384)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("original_format", [True, False], ids=["dinov2-original", "timm"])
def test_dinov2_vit_weights_load_with_adapted_patch_embedding(tmp_path: Path, original_format: bool) -> None:
    state = dinov2_state(original_format)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dinov2.safetensors"))
    encoder = build_encoder("vit_small_patch14_dinov2", 12, tmp_path / "dinov2.safetensors", bands=S2_L2A_BANDS,
                            img_size=56)  # fmt: skip
    patch = encoder.patch_embed.proj.weight
    assert patch.shape == (384, 12, 14, 14)
    assert torch.allclose(patch[:, S2_L2A_BANDS.index("B02")], state["patch_embed.proj.weight"][:, 2] * 3 / 12)
    assert encoder.pos_embed.shape == (1, 1 + 4 * 4, 384)  # 37x37 resampled to the 4x4 grid of 56 px
    assert torch.equal(encoder.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's is kept
    assert torch.equal(encoder.blocks[11].ls2.gamma, state["blocks.11.ls2.gamma"])
    if original_format:
        assert torch.equal(encoder.mask_token.view(1, 384), state["mask_token"])
    with torch.no_grad():
        assert encoder(torch.randn(1, 12, 56, 56)).shape == (1, 384)


def test_weights_of_another_architecture_list_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.save(rgb_state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"does not fit VisionTransformer") as error:
        build_encoder("vit_tiny_patch16_224", 12, tmp_path / "resnet18.pth", img_size=32)
    message = str(error.value)
    assert "missing keys (" in message and "'blocks.0.attn.qkv.weight'" in message
    assert "unexpected keys (" in message and "'layer1.0.conv1.weight'" in message


class NotATensor:
    """An arbitrary pickled object: weights_only loading must refuse it instead of running its code."""


def test_weights_files_are_read_without_unpickling_code(tmp_path: Path) -> None:
    torch.save({"conv1.weight": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        build_encoder("resnet18", 12, tmp_path / "pickled.pth")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "state", "bands"),
    [
        ("resnet50", lambda: softcon_resnet50(13), S2_L1C_BANDS),
        ("resnet50", lambda: softcon_resnet50(13), S2_L2A_BANDS),
        ("resnet50", lambda: softcon_resnet50(2), S1_POLARIZATIONS),
        ("vit_small_patch14_dinov2", lambda: softcon_vit("vit_small_patch14_dinov2", 384, 13), S2_L1C_BANDS),
        ("vit_small_patch14_dinov2", lambda: softcon_vit("vit_small_patch14_dinov2", 384, 13), S2_L2A_BANDS),
        ("vit_base_patch14_dinov2", lambda: softcon_vit("vit_base_patch14_dinov2", 768, 13), S2_L2A_BANDS),
    ],
    ids=[
        "rn50-13-on-L1C",
        "rn50-13-on-L2A",
        "rn50-2-on-S1",
        "vits14-13-on-L1C",
        "vits14-13-on-L2A",
        "vitb14-13-on-L2A",
    ],
)
def test_softcon_released_checkpoints_load_exactly_and_map_bands_by_name(
    tmp_path: Path, backbone: str, state: object, bands: tuple[str, ...]
) -> None:
    """Every key of the published layout lands (a mismatch raises listing missing/unexpected keys); the first layer
    keeps each band's filter by name: a 13-band file on 12-band L2A data leaves B10's filter out, the same as B10
    fed at its mean (0 after normalisation), and never shifts B11/B12 onto B10's position."""
    weights = state()  # type: ignore[operator]
    path = tmp_path / "softcon.pth"
    torch.save(weights, path)
    vit = backbone.startswith("vit")
    encoder = build_encoder(backbone, len(bands), path, bands=bands, **({"img_size": 224} if vit else {}))
    first = "patch_embed.proj.weight" if vit else "conv1.weight"
    file_bands = S2_L1C_BANDS if weights[first].shape[1] == 13 else S1_POLARIZATIONS
    loaded = encoder.state_dict()[first]
    for position, band in enumerate(bands):
        assert torch.equal(loaded[:, position], weights[first][:, file_bands.index(band)]), band
    if vit:
        assert torch.equal(encoder.mask_token.view(1, -1), weights["mask_token"])
        assert torch.equal(encoder.blocks[0].ls1.gamma, weights["blocks.0.ls1.gamma"])
        assert torch.equal(encoder.pos_embed, weights["pos_embed"])  # 224 px: no resampling
    else:
        assert torch.equal(encoder.layer4[2].bn3.running_mean, weights["layer4.2.bn3.running_mean"])


@pytest.mark.parametrize("side", [264, 120])
def test_a_patch_14_vit_takes_store_and_bigearthnet_patches(side: int) -> None:
    """Store patches (264 px) and BigEarthNet's (120 px) are no multiple of 14: evaluation crashed with "Input
    height (264) should be divisible by patch size (14)". They are cropped (larger) or resized (smaller) to 224."""
    from torch.utils.data import Dataset

    from softcon.models.encoder import fit_to_encoder
    from softcon.models.probe import extract_features

    torch.manual_seed(0)
    encoder = build_encoder("vit_small_patch14_dinov2", 12, bands=S2_L2A_BANDS, img_size=224).eval()
    images = torch.rand(2, 12, side, side)
    fitted = fit_to_encoder(encoder, images)
    assert fitted.shape[-2:] == (224, 224)
    if side > 224:
        assert torch.equal(fitted, images[..., 20:244, 20:244])  # the centre, as training crops it

    class Patches(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"image": images[index], "labelled": torch.tensor(True), "labels": torch.zeros(3)}

    features = extract_features(encoder, Patches(), batch_size=2)
    assert features.x.shape == (2, 384) and torch.isfinite(features.x).all()
    cnn = build_encoder("resnet18", 12)
    assert fit_to_encoder(cnn, images) is images  # CNNs take any size
