"""Fine-tuning a pretrained encoder on labels: the model, what trains, the optimiser, the loop and the metrics.

Read top to bottom, this is the whole method (no framework):

1. ``FinetuneModel``: the encoder and a task head.

   - segmentation: ``FPNHead``, the semantic branch of Panoptic FPN (Kirillov et al., 2019) in its simplest form.
     It takes four feature maps of the encoder through timm's ``forward_intermediates`` (``feature_levels``: a CNN's
     last four stages, strides 4 to 32; a ViT's four evenly spaced blocks, tokens reshaped to the patch grid, all at
     the patch stride), maps each to ``width`` channels (1x1), merges them top-down (upsample and add, as FPN),
     smooths each (3x3 conv, GroupNorm, ReLU), upsamples all to the finest map and sums them, classifies each pixel
     (1x1) and upsamples the logits bilinearly to the input.
   - multilabel: a linear layer on the encoder's pooled features (``models.heads.MultiLabelHead``).

2. ``set_trainable``: ``frozen`` trains the head alone; ``partial`` also the last quarter of the encoder's coarse
   parameter groups (timm's ``group_matcher``: a ResNet's stages, a ViT's blocks; at least one, so ResNet's
   ``layer4`` and a 12-block ViT's last 3 blocks and final norm); ``full`` everything. The mask token of Siamese
   masking never trains (fine-tuning masks nothing). Modules with nothing to train run in eval mode
   (``train_mode``), so a frozen BatchNorm keeps its pretrained statistics.

3. ``parameter_groups``: AdamW groups with layer-wise learning-rate decay (BEiT, Bao et al., 2022): the head gets
   ``lr``, the encoder's fine parameter groups (timm's ``group_matcher(coarse=False)``: blocks) ``lr x decay^d``
   with d = 1 for the last block up to the number of groups for the stem; no weight decay on biases and norms.

4. ``fit``: epochs of AdamW steps under a cosine schedule; after each epoch the val metric (``PRIMARY_METRIC``);
   the best epoch's weights are kept and restored at the end; ``patience`` epochs without a better val metric stop
   the run early. On CUDA the forward passes run under bf16 autocast (``precision``), the loss in float32, as
   pretraining does; bf16 needs no gradient scaler. Under torchrun each rank trains on its shard of the training
   split through ``DistributedDataParallel`` (BatchNorm statistics per rank, taken from rank 0 before each val
   pass), and rank 0's val metric decides for all.

5. ``evaluate``: segmentation through a confusion matrix over the pixels with a class (``IGNORE_INDEX`` = 255 is
   ignored): mIoU (mean over classes present in truth or prediction), per-class IoU, pixel accuracy; multilabel
   through mAP micro and macro (``models.probe.mean_average_precision``) over labelled samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn
from torch.utils.data import DataLoader

from softcon.models.encoder import fit_to_encoder, is_vit, patch_size
from softcon.models.heads import MultiLabelHead
from softcon.models.loss import multilabel_loss
from softcon.models.probe import mean_average_precision
from softcon.models.training_store import MASK_NODATA

Task = Literal["segmentation", "multilabel"]
Freeze = Literal["frozen", "partial", "full"]
Precision = Literal["bf16", "fp32"]
IGNORE_INDEX = MASK_NODATA
"""Mask value without a class: no loss, no metric."""
PRIMARY_METRIC: dict[str, str] = {"segmentation": "miou", "multilabel": "map_micro"}
"""The val metric that picks the best epoch and stops early."""
PRETRAINING_ONLY = ("mask_token",)
"""Encoder parameters of pretraining alone (Siamese masking), never fine-tuned."""


# ------------------------------------------------------------------------------------------------- model


def feature_levels(encoder: nn.Module) -> list[int]:
    """Indices into the encoder's ``feature_info`` of the four maps the decoder takes: a ViT's blocks at a quarter,
    half, three quarters and the end of its depth; a CNN's last four stages."""
    info: Any = encoder.feature_info  # timm: one dict per feature map (num_chs, reduction, module)
    n = len(info)
    if is_vit(encoder):
        return sorted({max(0, n * k // 4 - 1) for k in (1, 2, 3, 4)})
    return list(range(max(0, n - 4), n))


class FPNHead(nn.Module):
    """Semantic FPN decoder: feature maps (finest first) -> (B, K, H, W) class logits at the input size."""

    def __init__(self, in_channels: list[int], n_classes: int, width: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(channels, width, 1) for channels in in_channels)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(32, width), nn.ReLU())
            for _ in in_channels
        )
        self.classifier = nn.Conv2d(width, n_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [lateral(x) for lateral, x in zip(self.lateral, features, strict=True)]  # (B, width, h_i, w_i)
        for i in range(len(maps) - 1, 0, -1):  # top-down: each coarser map into the next finer one
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:], mode="nearest")
        finest = maps[0].shape[-2:]
        merged = sum(
            F.interpolate(smooth(x), size=finest, mode="bilinear", align_corners=False)
            for smooth, x in zip(self.smooth, maps, strict=True)
        )
        logits = self.classifier(merged)  # (B, K, h_0, w_0)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)


class FinetuneModel(nn.Module):
    """Encoder + task head: (B, C, H, W) -> (B, K, H, W) pixel logits (segmentation) or (B, K) logits (multilabel)."""

    def __init__(self, encoder: nn.Module, task: Task, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.levels: list[int] = []
        self.head: nn.Module
        if task == "segmentation":
            self.levels = feature_levels(encoder)
            info: Any = encoder.feature_info
            self.head = FPNHead([int(info[i]["num_chs"]) for i in self.levels], n_classes)
        else:
            self.head = MultiLabelHead(int(getattr(encoder, "num_features", 0)), n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return self.head(self.encoder(fit_to_encoder(self.encoder, images)))  # (B, K)
        height, width = images.shape[-2:]
        if is_vit(self.encoder):  # whole patches: pad right and bottom, cut the logits back
            patch = patch_size(self.encoder)
            images = F.pad(images, (0, -width % patch, 0, -height % patch))
        encoder: Any = self.encoder  # a timm model
        features = encoder.forward_intermediates(images, indices=self.levels, intermediates_only=True)
        return self.head(features, images.shape[-2:])[..., :height, :width]  # (B, K, H, W)


# ------------------------------------------------------------------------------------------- what trains


def encoder_groups(encoder: nn.Module, *, coarse: bool) -> list[list[str]]:
    """The encoder's parameter names in timm's groups (``group_matcher``), stem first: coarse = stages (CNN) or
    blocks (ViT), fine = blocks; ``PRETRAINING_ONLY`` parameters left out. None for an encoder without parameters
    (``models.probe.BandStatistics``, the image-statistics baseline, whose head trains alone)."""
    if next(encoder.parameters(), None) is None:
        return []
    matcher: Any = encoder.group_matcher(coarse=coarse)  # type: ignore[operator]
    groups = group_parameters(encoder, matcher)
    named = [[name for name in groups[key] if name not in PRETRAINING_ONLY] for key in sorted(groups)]
    return [names for names in named if names]


def trainable_encoder_parameters(encoder: nn.Module, freeze: Freeze) -> set[str]:
    """Names of the encoder parameters ``freeze`` trains (see the module doc)."""
    if freeze == "frozen":
        return set()
    groups = encoder_groups(encoder, coarse=True)
    if freeze == "partial":
        groups = groups[-max(1, len(groups) // 4) :]
    return {name for group in groups for name in group}


def set_trainable(model: FinetuneModel, freeze: Freeze) -> None:
    """Switch ``requires_grad`` on for the head and the encoder parameters ``freeze`` trains, off for the rest."""
    trained = trainable_encoder_parameters(model.encoder, freeze)
    for name, parameter in model.encoder.named_parameters():
        parameter.requires_grad_(name in trained)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def train_mode(model: FinetuneModel) -> None:
    """Training mode, except modules whose own parameters are all frozen (frozen BatchNorm keeps its statistics)."""
    model.train()
    for module in model.encoder.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(parameter.requires_grad for parameter in own):
            module.eval()


def parameter_groups(model: FinetuneModel, lr: float, layer_decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters with layer-wise lr decay; each group's ``layer`` is its distance from
    the head (0: the head, 1: the encoder's last block ... the stem), its lr ``lr x layer_decay ** layer``."""
    named = dict(model.encoder.named_parameters())
    groups = encoder_groups(model.encoder, coarse=False)
    layers: list[tuple[int, list[nn.Parameter]]] = [(0, list(model.head.parameters()))]
    layers += [(len(groups) - i, [named[name] for name in names]) for i, names in enumerate(groups)]
    out = []
    for layer, parameters in layers:
        trained = [parameter for parameter in parameters if parameter.requires_grad]
        for decay, chosen in (
            (weight_decay, [p for p in trained if p.ndim > 1]),  # weights
            (0.0, [p for p in trained if p.ndim <= 1]),  # biases, norms, tokens
        ):
            if chosen:
                out.append({"params": chosen, "lr": lr * layer_decay**layer, "weight_decay": decay, "layer": layer})
    return out


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """bf16 autocast of the forward passes on CUDA with ``precision`` bf16; a no-op on CPU and with fp32."""
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# ------------------------------------------------------------------------------------------------ metrics


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows = true class, columns = predicted class; ``IGNORE_INDEX`` pixels left out."""
    valid = target != IGNORE_INDEX
    pairs = target[valid].long() * n_classes + prediction[valid].long()
    return torch.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_metrics(confusion: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """({miou, pixel_accuracy}, per-class IoU) of a confusion matrix; a class neither in the truth nor predicted has
    IoU NaN and is left out of the mean."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    total = confusion.sum()
    metrics = {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "pixel_accuracy": float(true_positive.sum() / total) if total else math.nan,
    }
    return metrics, iou


def multilabel_confusion(y: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(K, 2, 2) per-class counts [[TN, FP], [FN, TP]] of ``scores >= threshold``."""
    truth, predicted = np.asarray(y).astype(bool), np.asarray(scores) >= threshold
    return np.stack(
        [
            [((~truth) & (~predicted)).sum(0), ((~truth) & predicted).sum(0)],
            [(truth & (~predicted)).sum(0), (truth & predicted).sum(0)],
        ]
    ).transpose(2, 0, 1)


@dataclass(frozen=True)
class Evaluation:
    """A model on one split."""

    metrics: dict[str, float]
    """segmentation: miou, pixel_accuracy; multilabel: map_micro, map_macro."""
    per_class: np.ndarray
    """(K,) IoU (segmentation) or AP (multilabel); NaN for a class the split does not show."""
    confusion: np.ndarray
    """(K, K) pixel counts (segmentation) or (K, 2, 2) per-class counts at 0.5 (multilabel)."""


@torch.no_grad()
def evaluate(model: FinetuneModel, loader: Iterable[dict[str, torch.Tensor]], n_classes: int,
             device: torch.device, precision: Precision = "fp32") -> Evaluation:  # fmt: skip
    """The model's metrics on every batch of ``loader`` together (not averaged per batch)."""
    model.eval()
    if model.task == "segmentation":
        confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
        for batch in loader:
            with autocast(device, precision):
                prediction = model(batch["image"].to(device)).argmax(1).cpu()  # (B, H, W)
            confusion += confusion_matrix(prediction, batch["mask"], n_classes)
        metrics, iou = segmentation_metrics(confusion.numpy())
        return Evaluation(metrics, iou, confusion.numpy())
    truths, scores = [], []
    for batch in loader:
        labelled = batch["labelled"].bool()
        truths.append(batch["labels"][labelled].numpy())
        with autocast(device, precision):
            logits = model(batch["image"].to(device))
        scores.append(torch.sigmoid(logits.float()).cpu()[labelled].numpy())
    y = np.concatenate(truths) if truths else np.zeros((0, n_classes))
    score = np.concatenate(scores) if scores else np.zeros((0, n_classes))
    if not len(y):
        return Evaluation({"map_micro": math.nan, "map_macro": math.nan}, np.full(n_classes, np.nan),
                          np.zeros((n_classes, 2, 2), np.int64))  # fmt: skip
    micro, macro, per_class = mean_average_precision(y, score)
    return Evaluation({"map_micro": micro, "map_macro": macro}, per_class, multilabel_confusion(y, score))


# --------------------------------------------------------------------------------------------------- loop


def task_loss(
    model: FinetuneModel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    precision: Precision = "fp32",
    *,
    forward: nn.Module | None = None,
) -> torch.Tensor | None:
    """Cross-entropy over the pixels with a class (segmentation) or BCE over the labelled samples (multilabel), in
    float32 whatever the forward's autocast; None for a batch with nothing to learn from.

    ``forward``: the module that runs the batch, the DDP wrapper of ``model`` under torchrun. With one, a batch with
    nothing to learn from gives a zero loss through the logits instead of None: every rank must run backward at
    every step, or the others wait for its gradients.
    """
    with autocast(device, precision):
        logits = (forward or model)(batch["image"].to(device)).float()
    if model.task == "segmentation":
        mask = batch["mask"].to(device)  # (B, H, W)
        learn = bool((mask != IGNORE_INDEX).any())
        loss = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX) if learn else None
    else:
        labelled = batch["labelled"].to(device)
        learn = bool(labelled.any())
        loss = multilabel_loss(logits, batch["labels"].to(device), labelled) if learn else None
    if loss is None and forward is not None:
        return logits.sum() * 0.0
    return loss


def _rank0_value(value: float, distributed: bool, device: torch.device) -> float:
    """``value`` as rank 0 has it (every rank then takes the same epoch decisions); ``value`` in one process."""
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return float(tensor.item())


def _mean_over_ranks(loss_sum: float, steps: int, distributed: bool, device: torch.device) -> float:
    """The epoch's mean training loss over every rank's steps."""
    if not distributed:
        return loss_sum / max(steps, 1)
    totals = torch.tensor([loss_sum, float(steps)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return float(totals[0] / max(totals[1].item(), 1.0))


@dataclass
class FitResult:
    """How ``fit`` went: the model it was given now holds the best epoch's weights."""

    best_epoch: int
    epochs_run: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: epoch, train_loss, lr and the val metrics (``val_<name>``)."""


def fit(
    model: FinetuneModel,
    train: DataLoader,
    val: DataLoader,
    *,
    n_classes: int,
    epochs: int,
    lr: float,
    layer_decay: float = 1.0,
    weight_decay: float = 0.0,
    patience: int | None = None,
    device: torch.device,
    precision: Precision = "fp32",
    set_epoch: Callable[[int], None] = lambda epoch: None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    distributed: bool = False,
) -> FitResult:
    """Train the model's trainable parameters on ``train``, choosing the epoch by the val metric (module doc, 4).

    Args:
        precision: bf16 runs the forward passes under bf16 autocast on CUDA (``autocast``).
        set_epoch: called with each epoch before it runs (new augmentations of the training data).
        on_epoch: called after each epoch with the epoch and its ``history`` entry.
        distributed: one rank of a torchrun job (the process group is up): the steps run through
            ``DistributedDataParallel`` on this rank's ``train`` shard; before each val pass the buffers (BatchNorm
            statistics) are taken from rank 0, every rank evaluates the whole val split, and rank 0's val metric
            decides the best epoch and early stopping on all of them.
    """
    model.to(device)
    forward: nn.Module | None = None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, layer_decay, weight_decay), fused=True)
    total_steps = max(1, epochs * len(train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    primary = PRIMARY_METRIC[model.task]
    best, best_epoch = -math.inf, 0
    best_state: dict[str, Any] = {}  # set after the first epoch
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        set_epoch(epoch)
        train_mode(model)
        loss_sum, steps = 0.0, 0
        for batch in train:
            loss = task_loss(model, batch, device, precision, forward=forward)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}: lower lr ({lr})")
        if distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        scores = evaluate(model, val, n_classes, device, precision).metrics
        metric = _rank0_value(scores[primary], distributed, device)
        record = {"epoch": float(epoch), "train_loss": _mean_over_ranks(loss_sum, steps, distributed, device),
                  "lr": float(scheduler.get_last_lr()[0]), **{f"val_{k}": v for k, v in scores.items()}}  # fmt: skip
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
        if metric > best or best_epoch == 0:  # the first epoch is the best so far, even with a NaN metric
            best, best_epoch, best_state = metric, epoch, copy.deepcopy(model.state_dict())
        elif patience is not None and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return FitResult(best_epoch=best_epoch, epochs_run=len(history), best_metric=best, history=history)
