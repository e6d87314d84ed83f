"""Export of fine-tuned models and of the encoder for other frameworks: a segmentation model's ONNX and TorchScript
graphs map (B, C, H, W) to (B, K, H, W) logits equal to the torch model's, a multi-label model's timm folder is a timm
classifier, the card and the STAC Item state the task, the classes, the fine-tuning config and metrics and the
encoder it came from (the Item valid against the vendored MLM schema), and the pretrained encoder's timm weights load
strictly into a ``features_only`` timm backbone, as TorchGeo's and segmentation-models-pytorch's ``tu-`` encoders build
it, with the pipeline encoder's feature maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cube_factory import CLASS_CODES, CLASS_NAMES, write_cube, write_masked_store
from safetensors.torch import load_file
from test_export import _mlm_validator

from softcon.config import ExportConfig, FinetuneConfig, TrainConfig
from softcon.tasks.export import run_export, timm_segmentation_model
from softcon.tasks.finetune import load_finetuned, run_finetune
from softcon.tasks.train import load_encoder, run_training

torch.set_num_threads(2)
PATCH = 16
FORMATS = ("timm", "onnx", "torchscript")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    cube = write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")
    out = str(tmp_path_factory.mktemp("store") / "store.zarr")
    write_masked_store(cube, out, patch_size=PATCH)
    return out


@pytest.fixture(scope="module")
def pretrained(store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step pretraining checkpoint of a small ResNet."""
    config = TrainConfig(store=store, out=str(tmp_path_factory.mktemp("ckpt")), backbone="test_resnet", steps=1,
                         batch_size=8, warmup_steps=1, mask_patch=4, embed_dim=16, device="cpu")  # fmt: skip
    return run_training(config).checkpoint


@pytest.fixture(scope="module", params=["segmentation", "multilabel"])
def exported(
    request: pytest.FixtureRequest, store: str, pretrained: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path]]:
    """The pretrained encoder fine-tuned for one epoch, exported in every format (one folder each)."""
    config = FinetuneConfig(model=str(pretrained), task=request.param, store=store, epochs=1, batch_size=8,
                            device="cpu", out=str(tmp_path_factory.mktemp("finetuned")))  # fmt: skip
    checkpoint = run_finetune(config, pretrained).checkpoint
    folders = {}
    for fmt in FORMATS:
        folders[fmt] = tmp_path_factory.mktemp(f"{request.param}-{fmt}")
        run_export(ExportConfig(model=str(checkpoint), format=fmt, out=str(folders[fmt])), checkpoint)
    return checkpoint, folders


def images(batch: int, height: int = PATCH, width: int = PATCH) -> torch.Tensor:
    return torch.randn(batch, 12, height, width, generator=torch.Generator().manual_seed(batch))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_and_torchscript_give_the_models_logits(exported: tuple[Path, dict[str, Path]]) -> None:
    import onnxruntime

    checkpoint, folders = exported
    model, meta = load_finetuned(checkpoint)
    session = onnxruntime.InferenceSession(str(folders["onnx"] / "model.onnx"), providers=["CPUExecutionProvider"])
    module = torch.jit.load(str(folders["torchscript"] / "model.torchscript.pt"))
    classes = len(CLASS_NAMES)
    for batch, height, width in ((1, PATCH, PATCH), (3, PATCH, PATCH), (2, PATCH + 32, PATCH + 16)):
        inputs = images(batch, height, width)
        with torch.no_grad():
            expected = model(inputs).numpy()
            traced = module(inputs).numpy()
        shape = (batch, classes, height, width) if meta["task"] == "segmentation" else (batch, classes)
        assert expected.shape == shape
        (got,) = session.run(None, {"images": inputs.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-5)
    assert [output.name for output in session.get_outputs()] == ["logits"]


def test_the_timm_folder_rebuilds_the_model(
    exported: tuple[Path, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, folders = exported
    model, meta = load_finetuned(checkpoint)
    config = json.loads((folders["timm"] / "config.json").read_text())
    assert config["softcon"]["class_names"] == list(CLASS_NAMES) and config["softcon"]["task"] == meta["task"]
    inputs = images(2)
    with torch.no_grad():
        expected = model(inputs)
        if meta["task"] == "multilabel":  # a plain timm classifier: no softcon code
            rebuilt = timm.create_model(f"local-dir:{folders['timm']}", pretrained=True).eval()
            assert config["num_classes"] == len(CLASS_NAMES)
        else:  # the timm encoder and the decoder's safetensors
            rebuilt = timm_segmentation_model(folders["timm"])
            assert (folders["timm"] / "decoder.safetensors").is_file() and config["num_classes"] == 0
        torch.testing.assert_close(rebuilt(inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_stac_item_states_the_task_and_the_classes(exported: tuple[Path, dict[str, Path]], fmt: str) -> None:
    from pystac import STACObjectType
    from pystac.validation import JsonSchemaSTACValidator

    checkpoint, folders = exported
    _, meta = load_finetuned(checkpoint)
    item = json.loads((folders[fmt] / "model.stac.json").read_text())
    assert [error.message for error in _mlm_validator().iter_errors(item)] == []
    JsonSchemaSTACValidator().validate_core(item, STACObjectType.ITEM, "1.1.0")
    properties = item["properties"]
    task = {"segmentation": "semantic-segmentation", "multilabel": "classification"}[meta["task"]]
    assert properties["mlm:tasks"] == [task] and properties["mlm:name"].endswith(f"-{meta['task']}")
    (output,) = properties["mlm:output"]
    assert output["tasks"] == [task]
    classes = output["classification:classes"]
    assert [c["name"] for c in classes] == list(CLASS_NAMES) and [c["value"] for c in classes] == [0, 1, 2, 3]
    assert classes[0]["color_hint"] == "006400"  # WorldCover's tree cover
    expected_shape = [-1, 4, PATCH, PATCH] if meta["task"] == "segmentation" else [-1, 4]
    assert output["result"]["shape"] == expected_shape
    assert properties["mlm:hyperparameters"]["task"] == meta["task"]
    assert "fine-tuned on" in properties["mlm:pretrained_source"]


def test_the_card_names_the_task_classes_config_metrics_and_the_encoder(exported: tuple[Path, dict[str, Path]]) -> None:
    checkpoint, folders = exported
    _, meta = load_finetuned(checkpoint)
    card = (folders["onnx"] / "README.md").read_text()
    assert f"fine-tuned for {'semantic segmentation' if meta['task'] == 'segmentation' else 'multi-label'}" in card
    assert "| 3 | water | 80 |" in card and all(f"| {name} |" in card for name in CLASS_NAMES)
    assert f"- pretrained encoder: `{meta['source']}`" in card
    metric = "test/miou" if meta["task"] == "segmentation" else "test/map_micro"
    assert f"- {metric}: " in card and '"freeze": "full"' in card
    assert "MLflow finetune run: none recorded" in card
    assert list(CLASS_CODES) == [int(code) for code in meta["class_codes"]]


def test_the_exported_encoder_plugs_into_a_features_only_timm_backbone(
    pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weight-loading step of TorchGeo's SemanticSegmentationTask or an smp Unet on a timm encoder: the timm
    folder's weights load with strict key matching into ``timm.create_model(..., features_only=True)`` and give the
    pipeline encoder's multi-scale feature maps."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_export(ExportConfig(model=str(pretrained), format="timm", out=str(tmp_path)), pretrained)
    encoder, meta = load_encoder(pretrained)
    backbone = timm.create_model(meta["backbone"], features_only=True, in_chans=meta["in_chans"]).eval()
    backbone.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    from_folder = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True).eval()
    inputs = images(2, 64, 64)
    with torch.no_grad():
        expected = encoder.forward_intermediates(inputs, intermediates_only=True)
        for model in (backbone, from_folder):
            maps = model(inputs)
            assert [m.shape for m in maps] == [m.shape for m in expected] and len(maps) == len(encoder.feature_info)
            for got, want in zip(maps, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
