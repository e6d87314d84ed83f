"""The SSL4EO-S12 linear-evaluation protocol (``--protocol ssl4eo``), as its scripts run it.

Source: zhu-xlab/SSL4EO-S12 ``src/benchmark/transfer_classification/linear_BE_moco.py`` at commit 1dc0c83 (and
its run scripts: BigEarthNet ``--lr 8.0 --schedule 20 40 --epochs 50 --batchsize 256``; EuroSAT ``--lr 0.1
--schedule 20 40 --epochs 50 --batchsize 64``). Each choice, from that file:

- the backbone is frozen and only a linear head trains, initialised N(0, 0.01) with zero bias;
- the backbone stays in train mode while the head trains, so BatchNorm normalises with batch statistics and
  keeps updating its running statistics (on a copy here, so other evaluations see the encoder unchanged); it is
  in eval mode for validation;
- loss: ``MultiLabelSoftMarginLoss`` (multi-label), cross-entropy for single-label EuroSAT; SGD, momentum 0.9, no
  weight decay; the learning rate drops 10x at each milestone epoch; batches drop the last incomplete one,
  validation's too;
- training views: RandomResizedCrop to 224 px (scale 0.8-1.0) and a horizontal flip, drawn per sample; validation
  views come resized to 256 and centre-cropped to 224 (``tasks/ssl4eo.py`` ``ContractInputs``);
- reported on the val split: their mAP (``average_precision_score(average="micro")`` per val batch, averaged over
  batches) and, beside it, micro and macro mAP over the whole split (top-1 accuracy for single-label).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from softcon.models.encoder import fit_to_encoder
from softcon.models.probe import mean_average_precision, top1_accuracy


@dataclass(frozen=True)
class LinearProtocol:
    """The hyper-parameters of one dataset's linear evaluation."""

    lr: float
    epochs: int
    milestones: tuple[int, ...]
    batch_size: int


PROTOCOLS = {
    "bigearthnet": LinearProtocol(lr=8.0, epochs=50, milestones=(20, 40), batch_size=256),
    "eurosat": LinearProtocol(lr=0.1, epochs=50, milestones=(20, 40), batch_size=64),
}
"""Per dataset, from the SSL4EO-S12 run scripts; other datasets (the store) use BigEarthNet's."""


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per sample: a crop of 80-100 % of the area, aspect 3/4-4/3, resized (bilinear) to ``size``; then a
    horizontal flip with probability 0.5. (B, C, H, W) -> (B, C, size, size)."""
    out = []
    height, width = images.shape[-2:]
    for image in images:
        for _ in range(10):  # torchvision's rule: draw until the crop fits, else the whole image
            area = height * width * float(torch.empty(1).uniform_(0.8, 1.0, generator=generator))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                break
        else:
            top, left, h, w = 0, 0, height, width
        crop = F.interpolate(image[None, :, top : top + h, left : left + w], size=(size, size), mode="bilinear",
                             align_corners=False)[0]  # fmt: skip
        out.append(crop.flip(-1) if bool(torch.rand(1, generator=generator) < 0.5) else crop)
    return torch.stack(out)


def run_linear_protocol(
    encoder: nn.Module,
    train: Dataset,
    val: Dataset,
    protocol: LinearProtocol,
    *,
    single_label: bool,
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
) -> dict[str, float]:
    """Train a linear head on the frozen ``encoder`` under ``protocol`` and score it on ``val``.

    Returns:
        ``ssl4eo_map_micro_batched`` (their metric), ``ssl4eo_map_micro`` and ``ssl4eo_map_macro`` over the whole
        split, ``ssl4eo_top1`` for single-label data, and ``ssl4eo_epochs``.
    """
    generator = torch.Generator().manual_seed(seed)
    backbone = copy.deepcopy(encoder).to(device)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    n_classes = int(train[0]["labels"].shape[0])
    head = nn.Linear(int(getattr(backbone, "num_features", 0)), n_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.SGD(head.parameters(), lr=protocol.lr, momentum=0.9)
    criterion: Any = nn.CrossEntropyLoss() if single_label else nn.MultiLabelSoftMarginLoss()
    n_epochs = epochs if epochs is not None else protocol.epochs
    loader_generator = torch.Generator().manual_seed(seed)
    for epoch in range(n_epochs):
        for group in optimizer.param_groups:
            group["lr"] = protocol.lr * 0.1 ** sum(epoch >= milestone for milestone in protocol.milestones)
        backbone.train()  # batch statistics, as their scripts (the backbone's weights stay frozen)
        loader = DataLoader(train, batch_size=protocol.batch_size, shuffle=True, drop_last=True,
                            generator=loader_generator)  # fmt: skip
        for batch in loader:
            images = random_resized_crop(batch["image"], 224, generator).to(device)
            labels = batch["labels"].to(device)
            with torch.no_grad():
                features = backbone(images)
            logits = head(features)
            loss = criterion(logits, labels.argmax(1) if single_label else labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    backbone.eval()
    scores, targets, batched = [], [], []
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=protocol.batch_size, shuffle=False, drop_last=True):
            logits = head(backbone(fit_to_encoder(backbone, batch["image"].to(device))))
            score = (logits.softmax(1) if single_label else torch.sigmoid(logits)).cpu().numpy()
            y = batch["labels"].numpy()
            scores.append(score)
            targets.append(y)
            batched.append(mean_average_precision(y, score)[0])
    if not scores:
        raise ValueError(
            f"the val split has fewer samples than one batch ({protocol.batch_size}); the ssl4eo protocol drops an "
            "incomplete batch: evaluate more data or use the project's protocol"
        )
    y_all, score_all = np.concatenate(targets), np.concatenate(scores)
    micro, macro, _ = mean_average_precision(y_all, score_all)
    metrics = {
        "ssl4eo_map_micro_batched": float(np.nanmean(batched)),
        "ssl4eo_map_micro": micro,
        "ssl4eo_map_macro": macro,
        "ssl4eo_epochs": float(n_epochs),
    }
    if single_label:
        metrics["ssl4eo_top1"] = top1_accuracy(y_all, score_all)
    return metrics
