"""Export stage: a trained encoder as files other projects load, each checked against the encoder before it is kept.

Formats (``ExportConfig.format``), each loaded with its own library and no code of this project:

- ``timm``: ``config.json`` and ``model.safetensors`` in the Hugging Face hub layout that
  ``timm.create_model("local-dir:OUT", pretrained=True)`` reads (``timm.models._hub.load_model_config_from_path``):
  ``architecture`` (the timm name), ``num_classes`` 0, ``num_features``, ``model_args`` (the arguments timm builds
  the model with: ``in_chans``, and ``img_size`` and ``dynamic_img_size`` for a ViT) and ``pretrained_cfg`` (input
  size, per-band ``mean``/``std``). timm turns ``pretrained_cfg`` into its ``PretrainedCfg`` dataclass, which takes
  no other keys, so the band names and the normalisation rule go in its ``notes``, and in full in a top-level
  ``softcon`` block, which timm ignores.
- ``onnx``: ``model.onnx`` from ``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``: the
  dynamo exporter needs onnxscript), input ``images`` (batch, C, H, W), output ``features`` (batch, D); the batch
  axis is dynamic, and for a CNN the height and width axes too.
- ``torchscript``: ``model.torchscript.pt`` from ``torch.jit.trace`` at S x S, for ``torch.jit.load``. A CNN's trace
  holds no image size (convolutions and a global average) and runs at any size; a ViT's fixes the position
  embedding's grid, so it runs at S x S only. (``torch.jit.script`` of timm's ViT does run at other multiples of
  the patch, but its ONNX graph cannot: the TorchScript-based exporter fixes the grid too, so both ViT graphs keep
  the one trained size.)

The sizes each format takes per backbone family are ``model_card.size_rule``'s; the card and the Item state them,
and ``check_export`` checks them: at S x S and, where other sizes are claimed, at a second, non-square size.

The exported module is the evaluation encoder (as ``tasks.train.load_encoder`` builds it: the EMA teacher),
without the ViT mask token, which only training uses; or, for a fine-tuned model (``tasks/finetune.py``'s
``finetuned.pt``), the whole ``FinetuneModel``: (B, C, H, W) to (B, K, H, W) pixel logits (segmentation) or (B, K)
logits (multilabel), with K its classes. The fine-tuned model's timm folder: for multilabel a timm classifier
(``num_classes`` K, the head as timm's own classifier layer), which ``timm.create_model("local-dir:OUT",
pretrained=True)`` runs whole; for segmentation the encoder as for a pretrained one (timm loads it, also with
``features_only=True``) and the FPN decoder in ``decoder.safetensors`` with its classes and feature levels in the
``softcon`` block of ``config.json``, which ``timm_segmentation_model`` assembles (the decoder is this project's code;
ONNX and TorchScript hold the whole graph). A CNN's segmentation graph takes any size in all formats, as its
encoder; a ViT's only the trained one in ONNX and TorchScript (its timm folder: multiples of the patch).

``run_export`` reloads each written file with its library and compares its outputs on a seeded batch with the
module's (``check_export``); a larger difference than float error is an error, not a warning. Beside the files it
writes the model card and the STAC Item (``tasks/model_card.py``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from softcon.config import ExportConfig
from softcon.models.encoder import build_encoder, is_vit, load_torch_file, patch_size
from softcon.models.finetune import FinetuneModel
from softcon.tasks.finetune import FINETUNED_FORMAT, finetuned_model
from softcon.tasks.model_card import (
    NORMALISATION_RULE,
    ExportedModel,
    FineTuning,
    ModelFile,
    TrainRecord,
    read_lineage,
    require,
    size_rule,
    write_model_card,
    write_stac_item,
)
from softcon.tasks.train import checked_checkpoint

ONNX_OPSET = 17
"""ONNX opset of the graph: run by onnxruntime 1.14 and later and by most other runtimes."""
CHECK_BATCH = 3
"""Images in the export check: not 1, the batch the graphs are traced with, so a fixed batch axis fails it."""
CNN_CHECK_MARGIN = (32, 16)
"""A CNN export is checked at (S + 32) x (S + 16) too: a second height and a different width."""
TOLERANCE = 1e-4
"""Largest allowed difference of export and encoder features, relative to the largest feature: two float32
implementations of the same graph differ by about 1e-6 of it."""
_PYTORCH = "application/octet-stream; framework=pytorch"
FILES: dict[str, tuple[ModelFile, ...]] = {
    "timm": (
        ModelFile(
            key="model", name="model.safetensors", title="Encoder weights (timm state dict)",
            media_type=f"{_PYTORCH}; profile=safetensors", roles=("mlm:model", "mlm:weights"),
            artifact_type="safetensors.torch.save_file",
        ),
        ModelFile(
            key="config", name="config.json", title="timm model config (architecture, model_args, pretrained_cfg)",
            media_type="application/json", roles=("metadata",),
        ),
    ),
    "onnx": (
        ModelFile(
            key="model", name="model.onnx", title="Encoder as an ONNX graph (dynamic axes: see the model card)",
            media_type="application/octet-stream; framework=onnx; profile=onnx", roles=("mlm:model",),
            artifact_type="onnx",
        ),
    ),
    "torchscript": (
        ModelFile(
            key="model", name="model.torchscript.pt", title="Encoder as a traced TorchScript module",
            media_type=f"{_PYTORCH}; profile=torchscript", roles=("mlm:model",), artifact_type="torch.jit.save",
        ),
    ),
}  # fmt: skip
"""The files each format writes, the model file first."""
DECODER_FILE = ModelFile(
    key="decoder", name="decoder.safetensors", title="FPN decoder weights of the segmentation model (softcon)",
    media_type=f"{_PYTORCH}; profile=safetensors", roles=("mlm:weights",),
)  # fmt: skip
"""The timm folder's extra file for a fine-tuned segmentation model."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely it reproduces the encoder."""

    out: str
    format: str
    files: list[str]
    """Names of every file written into ``out``: the model's, the model card and the STAC Item."""
    num_features: int
    max_abs_diff: float
    """Largest difference of the reloaded export's features from the encoder's on the check batch."""

    def metrics(self) -> dict[str, float]:
        return {"num_features": float(self.num_features), "max_abs_diff": self.max_abs_diff}


def encoder_of(module: nn.Module) -> nn.Module:
    """The timm encoder of an exported module: a fine-tuned model's, or the module itself."""
    return module.encoder if isinstance(module, FinetuneModel) else module


def timm_classifier(encoder: nn.Module) -> str:
    """Name of the layer timm builds as the classifier of ``encoder``'s architecture (``fc``, ``head`` …)."""
    return str((getattr(encoder, "pretrained_cfg", {}) or {}).get("classifier") or "fc")


def timm_config(module: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` that lets timm rebuild ``module``'s encoder and load its weights (module docstring): with
    the multi-label head as timm's classifier, and a segmentation model's decoder facts in the ``softcon`` block."""
    encoder = encoder_of(module)
    in_chans, size = int(meta["in_chans"]), int(meta["img_size"])
    multilabel = isinstance(module, FinetuneModel) and module.task == "multilabel"
    num_classes = len(meta["class_names"]) if multilabel else 0
    model_args: dict[str, Any] = {"in_chans": in_chans, "num_classes": num_classes}
    if is_vit(encoder):
        model_args |= {"img_size": size, "dynamic_img_size": True}
    source = getattr(encoder, "pretrained_cfg", {}) or {}
    bands, mean, std = list(meta["bands"]), meta["norm_stats"]["mean"], meta["norm_stats"]["std"]
    what = (f"{meta['backbone']} fine-tuned for {module.task}" if isinstance(module, FinetuneModel)
            else f"SoftCon-pretrained {meta['backbone']} encoder")  # fmt: skip
    softcon: dict[str, Any] = {"sensor": meta["sensor"], "bands": bands, "mean": mean, "std": std,
                               "normalisation": NORMALISATION_RULE, "img_size": size}  # fmt: skip
    if isinstance(module, FinetuneModel):
        softcon |= {"task": module.task, "class_names": list(meta["class_names"]),
                    "class_codes": [int(code) for code in meta["class_codes"]]}  # fmt: skip
        if module.task == "segmentation":
            softcon["decoder"] = {"file": DECODER_FILE.name, "levels": list(module.levels),
                                  "class": "softcon.models.finetune.FPNHead"}  # fmt: skip
    return {
        "architecture": meta["backbone"],
        "num_classes": num_classes,
        "num_features": int(getattr(encoder, "num_features", 0)),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [in_chans, size, size],
            "fixed_input_size": False,
            "interpolation": "bilinear",  # as the pipeline resizes (models.encoder.fit_to_encoder)
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": num_classes,
            "first_conv": source.get("first_conv"),
            "classifier": source.get("classifier"),
            "description": f"{what} of {meta['sensor']} bands",
            "notes": [f"bands: {','.join(bands)}", f"normalisation: {NORMALISATION_RULE}"],
        },
        "softcon": softcon,
    }


def write_timm_folder(module: nn.Module, meta: dict[str, Any], out: Path) -> None:
    """``model.safetensors`` (the encoder's state dict without the training-only mask token; a multi-label model's
    head as timm's classifier) and ``config.json``; a segmentation model's decoder in ``decoder.safetensors``."""
    from safetensors.torch import save_file

    encoder = encoder_of(module)
    state = {name: tensor.contiguous() for name, tensor in encoder.state_dict().items() if name != "mask_token"}
    if isinstance(module, FinetuneModel) and module.task == "multilabel":
        classifier = timm_classifier(encoder)
        head = module.head.get_submodule("fc").state_dict()  # models.heads.MultiLabelHead: one linear layer
        state |= {f"{classifier}.{name}": tensor.contiguous() for name, tensor in head.items()}
    elif isinstance(module, FinetuneModel):
        decoder = {name: tensor.contiguous() for name, tensor in module.head.state_dict().items()}
        save_file(decoder, str(out / DECODER_FILE.name), metadata={"format": "pt"})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(timm_config(module, meta), indent=2) + "\n")


def timm_segmentation_model(folder: str | Path) -> FinetuneModel:
    """The segmentation model of a fine-tuned timm export: timm builds and loads the encoder from the folder, the
    FPN decoder comes from ``decoder.safetensors`` (eval mode)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    softcon = json.loads((folder / "config.json").read_text())["softcon"]
    encoder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model = FinetuneModel(encoder, "segmentation", len(softcon["class_names"]))
    if model.levels != softcon["decoder"]["levels"]:
        raise ValueError(f"{folder}: decoder levels {softcon['decoder']['levels']}, the encoder gives {model.levels}")
    model.head.load_state_dict(load_file(str(folder / DECODER_FILE.name)))
    return model.eval()


def _output(module: nn.Module) -> tuple[str, dict[int, str]]:
    """The graph's output name and dynamic axes: features or logits (a CNN segmentation map's height and width
    follow the input's)."""
    if not isinstance(module, FinetuneModel):
        return "features", {0: "batch"}
    if module.task == "segmentation" and not is_vit(module.encoder):
        return "logits", {0: "batch", 2: "height", 3: "width"}
    return "logits", {0: "batch"}


def write_onnx(module: nn.Module, meta: dict[str, Any], out: Path) -> None:
    """``model.onnx``, traced at one image of the trained size; the batch axis dynamic, and for a CNN (which takes
    any size) the height and width axes too."""
    onnx = require("onnx", "an onnx export")
    path = out / "model.onnx"
    image_axes = {0: "batch"} if is_vit(encoder_of(module)) else {0: "batch", 2: "height", 3: "width"}
    output, output_axes = _output(module)
    with warnings.catch_warnings():
        # timm's size checks become constants in the trace (TracerWarning); check_export verifies the graph instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (_example(meta, batch=1),), str(path), input_names=["images"], output_names=[output],
            dynamic_axes={"images": image_axes, output: output_axes}, opset_version=ONNX_OPSET, dynamo=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path))


def write_torchscript(module: nn.Module, meta: dict[str, Any], out: Path) -> None:
    """``model.torchscript.pt``, ``torch.jit.trace`` of the module at one image of the trained size."""
    with warnings.catch_warnings():
        # torch 2.9+ marks TorchScript deprecated (FutureWarning), and timm's size checks become constants in the
        # trace (TracerWarning); check_export verifies the traced module instead.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, _example(meta, batch=1), check_trace=False)  # check_export checks it
        torch.jit.save(traced, str(out / "model.torchscript.pt"))


WRITERS: dict[str, Callable[[nn.Module, dict[str, Any], Path], None]] = {
    "timm": write_timm_folder,
    "onnx": write_onnx,
    "torchscript": write_torchscript,
}


def _example(meta: dict[str, Any], *, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A seeded batch of normalised-looking images (z-scores): (batch, C, H, W), by default of the trained size."""
    height, width = size or (int(meta["img_size"]),) * 2
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, int(meta["in_chans"]), height, width, generator=generator)


def check_sizes(fmt: str, encoder: nn.Module, meta: dict[str, Any]) -> list[tuple[int, int]]:
    """The (height, width) sizes ``check_export`` runs the export at: the trained one, and a second, non-square one
    where ``model_card.size_rule`` says the export takes other sizes."""
    side = int(meta["img_size"])
    rule = size_rule(fmt, patch_size(encoder) if is_vit(encoder) else None)
    if rule == "any":
        return [(side, side), (side + CNN_CHECK_MARGIN[0], side + CNN_CHECK_MARGIN[1])]
    if rule == "patch-multiples":
        patch = patch_size(encoder)
        return [(side, side), (side + patch, side + 2 * patch)]
    return [(side, side)]


def read_features(fmt: str, out: Path, images: torch.Tensor) -> np.ndarray:
    """Outputs (features or logits) of ``images`` from the export in ``out``, loaded with the format's own library
    (a fine-tuned segmentation model's timm folder: ``timm_segmentation_model``)."""
    if fmt == "timm":
        softcon = json.loads((out / "config.json").read_text()).get("softcon", {})
        if softcon.get("task") == "segmentation":
            model: nn.Module = timm_segmentation_model(out)
        else:
            model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            return model(images).numpy()
    if fmt == "onnx":
        runtime = require("onnxruntime", "an onnx export")
        session = runtime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation, see write_torchscript
        module = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        return module(images).numpy()


def check_export(fmt: str, out: Path, module: nn.Module, meta: dict[str, Any]) -> float:
    """The largest difference of the export's outputs from the module's on ``CHECK_BATCH`` seeded images of each
    of ``check_sizes`` (the sizes the card says the export takes).

    Raises:
        RuntimeError: the export does not reproduce the module (a bug in the export, not in the input), or fails
            at a size the card says it takes.
    """
    largest = 0.0
    for height, width in check_sizes(fmt, encoder_of(module), meta):
        images = _example(meta, batch=CHECK_BATCH, size=(height, width))
        with torch.no_grad():
            expected = module(images).numpy()
        try:
            got = read_features(fmt, out, images)
        except Exception as error:  # onnxruntime and TorchScript raise their own types for a refused shape
            raise RuntimeError(f"the {fmt} export fails on {height} x {width} px images: {error}") from error
        if got.shape != expected.shape:
            raise RuntimeError(f"the {fmt} export gives outputs of shape {got.shape}, the model {expected.shape}")
        difference = float(np.abs(got - expected).max())
        if difference > TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise RuntimeError(
                f"the {fmt} export's outputs differ from the model's by up to {difference:.3g} at {height} x {width} px"
            )
        largest = max(largest, difference)
    return largest


def read_model(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The module to export, its meta and the file's contents, from one read of the file (a training checkpoint
    also holds the AdamW moments, so a second read would double the export's slowest step): a fine-tuned model
    (``tasks.finetune.finetuned_model``), or a training checkpoint's evaluation encoder (as
    ``tasks.train.load_encoder`` builds it).

    Raises:
        FileNotFoundError: no file.
        ValueError: neither a training checkpoint nor a fine-tuned model.
    """
    state = load_torch_file(checkpoint, what="checkpoint")
    if isinstance(state, dict) and state.get("format") == FINETUNED_FORMAT:
        model, meta = finetuned_model(state)
        return model, meta, state
    state = checked_checkpoint(state, checkpoint)
    meta = {**state["meta"], "step": state["step"]}
    encoder = build_encoder(meta["backbone"], meta["in_chans"], img_size=meta["img_size"])
    encoder.load_state_dict(state["teacher"])  # the EMA teacher, or the student under teacher=stop_gradient
    return encoder.eval(), meta, state


def describe(
    fmt: str, module: nn.Module, meta: dict[str, Any], state: dict[str, Any], *, checkpoint: str, max_abs_diff: float
) -> ExportedModel:
    """The export as the model card and the STAC Item describe it."""
    framework, version = (
        ("ONNX", require("onnx", "an onnx export").__version__) if fmt == "onnx" else ("PyTorch", torch.__version__)
    )
    encoder = encoder_of(module)
    parameters = sum(p.numel() for name, p in module.named_parameters() if not name.endswith("mask_token"))
    finetuned = None
    files = FILES[fmt]
    if isinstance(module, FinetuneModel):
        config = dict(state["config"])
        finetuned = FineTuning(
            task=module.task, class_names=tuple(meta["class_names"]),
            class_codes=tuple(int(code) for code in meta["class_codes"]), encoder=str(config["model"]),
            encoder_file=str(meta["source"]), metrics=dict(state["metrics"]), best_epoch=int(state["best_epoch"]),
        )  # fmt: skip
        if fmt == "timm" and module.task == "segmentation":
            files = (*files, DECODER_FILE)
    return ExportedModel(
        format=fmt,
        files=files,
        framework=framework,
        framework_version=version,
        backbone=str(meta["backbone"]),
        sensor=str(meta["sensor"]),
        bands=tuple(meta["bands"]),
        mean=tuple(float(v) for v in meta["norm_stats"]["mean"]),
        std=tuple(float(v) for v in meta["norm_stats"]["std"]),
        img_size=int(meta["img_size"]),
        patch_size=patch_size(encoder) if is_vit(encoder) else None,
        num_features=int(getattr(encoder, "num_features", 0)),
        total_parameters=parameters,
        step=int(state.get("step", 0)),
        checkpoint=checkpoint,
        train_config=dict(state["config"]),
        class_names=tuple(meta.get("class_names") or ()),
        max_abs_diff=max_abs_diff,
        finetuned=finetuned,
    )


def run_export(config: ExportConfig, checkpoint: str | Path, record: TrainRecord | None = None) -> ExportReport:
    """Export the encoder of ``checkpoint`` (or the fine-tuned model it is) in ``config.format`` into ``config.out``,
    check it, and write the model card and the STAC Item beside it.

    Example::

        config = ExportConfig(model="ckpt/step_000300.pt", format="onnx", out="export")
        report = run_export(config, "ckpt/step_000300.pt")
        # export/model.onnx, export/README.md, export/model.stac.json

    Args:
        config: the format and the folder; ``config.model`` is what the user named (the flow resolves it).
        checkpoint: the training checkpoint or fine-tuned model file behind ``config.model``.
        record: what MLflow holds of the train (or finetune) run, for the card; None for a bare file.

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: a file that is not a softcon checkpoint, or a format whose library is not installed.
        RuntimeError: the written file does not reproduce the model.
    """
    module, meta, state = read_model(checkpoint)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    WRITERS[config.format](module, meta, out)
    difference = check_export(config.format, out, module, meta)
    model = describe(config.format, module, meta, state, checkpoint=str(checkpoint), max_abs_diff=difference)
    lineage = read_lineage(model.train_config)
    card = write_model_card(out, model, lineage, record)
    item = write_stac_item(out, model, lineage, record)
    return ExportReport(
        out=str(out),
        format=config.format,
        files=[file.name for file in model.files] + [card.name, item.name],
        num_features=model.num_features,
        max_abs_diff=difference,
    )
