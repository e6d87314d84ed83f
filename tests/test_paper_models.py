"""The SoftCon paper's six released models, in their published layouts, through evaluation as the paper ran it.

For each of RN50, ViT-S/14 and ViT-B/14, multispectral (13-band L1C) and SAR (VV, VH): the file loads with no
missing or unexpected key, is evaluated alone (``--weights --backbone``, no store) under SoftCon's input contract on
BigEarthNet-format data (the real S2 / S1 example patches) with the ``ssl4eo`` protocol, and, for the multispectral
ones, on EuroSAT-format data. Random values: these tests prove the plumbing, not the published numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from published_layouts import eurosat_tree, softcon_resnet50, softcon_vit
from real_data import REAL

import softcon.tasks.ssl4eo_linear as protocol_module
from softcon.config import EvaluateConfig
from softcon.tasks.evaluate import run_evaluation
from softcon.tasks.ssl4eo_linear import LinearProtocol

PAPER_MODELS: dict[str, tuple[str, Callable[[], dict[str, torch.Tensor]], str]] = {
    "B13_rn50_softcon": ("resnet50", lambda: softcon_resnet50(13), "s2"),
    "B13_vits14_softcon": ("vit_small_patch14_dinov2", lambda: softcon_vit("vit_small_patch14_dinov2", 384, 13), "s2"),
    "B13_vitb14_softcon": ("vit_base_patch14_dinov2", lambda: softcon_vit("vit_base_patch14_dinov2", 768, 13), "s2"),
    "B2_rn50_softcon": ("resnet50", lambda: softcon_resnet50(2), "s1"),
    "B2_vits14_softcon": ("vit_small_patch14_dinov2", lambda: softcon_vit("vit_small_patch14_dinov2", 384, 2), "s1"),
    "B2_vitb14_softcon": ("vit_base_patch14_dinov2", lambda: softcon_vit("vit_base_patch14_dinov2", 768, 2), "s1"),
}


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BigEarthNet S2 and S1 example patches with official-style split lists (train 3, val 2, test 1)."""
    root = tmp_path_factory.mktemp("ben")
    for patch in sorted((REAL / "bigearthnet").glob("*/*")):
        (root / patch.name).symlink_to(patch, target_is_directory=True)
    s1_of = {  # the official S1 lists pair "<S2 name>,<S1 name>"
        json.loads(label.read_text())["corresponding_s2_patch"]: label.parent.name
        for label in (REAL / "bigearthnet" / "BigEarthNet-S1-Example").glob("*/*_labels_metadata.json")
    }
    s2 = sorted(s1_of)
    for split, names in (("train", s2[:3]), ("val", s2[3:5]), ("test", s2[5:])):
        (root / f"{split}.csv").write_text("".join(f"{name},{s1_of[name]}\n" for name in names))
    return root


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return eurosat_tree(tmp_path_factory.mktemp("eurosat"), per_class=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_a_paper_model_loads_and_evaluates_as_the_paper_ran_it(
    name: str, bigearthnet: Path, eurosat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone, state, sensor = PAPER_MODELS[name]
    weights = tmp_path / f"{name}.pth"
    torch.save(state(), weights)
    # Their schedule, shortened: one epoch in batches the six example patches fill.
    monkeypatch.setitem(protocol_module.PROTOCOLS, "bigearthnet", LinearProtocol(8.0, 1, (), 2))
    monkeypatch.setitem(protocol_module.PROTOCOLS, "eurosat", LinearProtocol(0.1, 1, (), 2))
    config = EvaluateConfig(
        weights=str(weights),
        backbone=backbone,
        sensor=sensor,
        bigearthnet=str(bigearthnet),
        eurosat=str(eurosat) if sensor == "s2" else None,
        input_contract="ssl4eo",
        protocol="ssl4eo",
        vit_features="dinov2" if backbone.startswith("vit") else "cls",
        probe_epochs=2,
        knn_k=2,
        batch_size=8,
        plots=False,
        out=str(tmp_path / "eval"),
    )
    result = run_evaluation(config, None)
    metrics = result.metrics
    assert 0 <= metrics["bigearthnet/ssl4eo_map_micro"] <= 1 and 0 <= metrics["bigearthnet/linear_map_micro"] <= 1
    if sensor == "s2":
        assert 0 <= metrics["eurosat/ssl4eo_top1"] <= 1 and 0 <= metrics["eurosat/linear_top1"] <= 1
    else:
        assert not any(key.startswith("eurosat/") for key in metrics)  # EuroSAT has no Sentinel-1
