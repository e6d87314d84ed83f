"""Fine-tune stage: the pretrained encoder with a head on the user's labels, reported on val and test.

``run_finetune`` builds the encoder (``encoder_and_meta``: a training checkpoint's EMA teacher, a local weights
file, or random initialisation), the datasets (``finetune_data``: a training store's splits, with per-pixel masks for
segmentation, or a BigEarthNet-format folder for multilabel; ``train_fraction`` of the train split drawn without
replacement, as evaluate draws it), trains with ``models.finetune.fit`` and evaluates the best epoch on val and
test. Images are normalised with the encoder's statistics (a checkpoint's, else the store's, else SSL4EO-S12's),
which are part of its input contract.

The fine-tuned model is one ``torch.save`` file ``<out>/finetuned.pt`` (state dicts and plain values, so
``torch.load(..., weights_only=True)`` reads it; ``load_finetuned`` builds it back)::

    format="softcon-finetuned", version=1, task, meta (backbone, in_chans, sensor, bands, norm_stats, img_size,
    class_names, class_codes, levels, source), encoder, head (state dicts), config (FinetuneConfig as JSON),
    metrics, best_epoch

``class_codes`` are the classes' codes in the cube's ``landcover`` (the store's ``class_codes``; BigEarthNet's
19-class codes), so a prediction's class index maps back to the scheme (``softcon predict`` writes both).

Metric names: ``val/<metric>`` and ``test/<metric>`` with <metric> ``miou``, ``pixel_accuracy`` and
``iou/<class>`` (segmentation) or ``map_micro``, ``map_macro`` and ``ap/<class>`` (multilabel); ``best_epoch``,
``epochs_run``, ``n_train``; per epoch ``train_loss``, ``lr`` and ``val_<metric>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from softcon.config import FINETUNE_RANDOM, FINETUNE_WEIGHTS, FinetuneConfig
from softcon.models.data import StoreDataset
from softcon.models.distributed import DistributedContext, init_distributed, rank_batch_size
from softcon.models.encoder import build_encoder, load_torch_file
from softcon.models.finetune import FinetuneModel, FitResult, evaluate, fit, set_trainable
from softcon.models.training_store import MASK_NODATA
from softcon.tasks.bigearthnet import S1_POLS, S2_BANDS, BigEarthNetDataset, assign_splits, find_patches
from softcon.tasks.bigearthnet import subset_without_replacement as draw_subset
from softcon.tasks.evaluate import slug
from softcon.tasks.schemes import CORINE_BIGEARTHNET19
from softcon.tasks.ssl4eo import ssl4eo_norm_stats
from softcon.tasks.train import load_encoder, resolve_device, seed_everything, write_checkpoint

FINETUNED_FORMAT = "softcon-finetuned"
FINETUNED_VERSION = 1
FINETUNED_FILE = "finetuned.pt"
EXAMPLES_FILE = "examples.npz"
N_EXAMPLES = 4
"""Test patches whose predicted masks the report keeps for the figure."""

Split: TypeAlias = StoreDataset | BigEarthNetDataset | Subset
"""One split of the data, items as ``StoreDataset(two_views=False)`` gives them."""


@dataclass(frozen=True)
class FinetuneReport:
    """What a fine-tuning run produced."""

    metrics: dict[str, float]
    """``val/…`` and ``test/…`` metrics of the best epoch (module doc), best_epoch, epochs_run, n_train, seconds."""
    best_epoch: int
    epochs_run: int
    checkpoint: Path
    """The fine-tuned model (encoder + head + metadata)."""
    task: str
    class_names: list[str]
    confusion: np.ndarray
    """Of the test split (val when test is empty): (K, K) pixels, rows true; or (K, 2, 2) per class at 0.5."""
    history: list[dict[str, float]]
    """Per epoch: epoch, train_loss, lr, val_<metric>."""
    examples: Path | None
    """Segmentation: ``.npz`` of a few test patches (rgb, truth, prediction) for the figure; None otherwise."""


@dataclass(frozen=True)
class FinetuneData:
    """The splits of one fine-tuning run, normalised for the encoder."""

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    class_codes: list[int]
    """Each class's code in the label scheme (the cube's ``landcover`` values)."""
    set_epoch: Callable[[int], None]
    """New augmentations of the training split for an epoch."""


def encoder_and_meta(config: FinetuneConfig, checkpoint: str | Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder to fine-tune and its input contract (backbone, in_chans, sensor, bands, norm_stats, img_size).

    A training checkpoint gives its EMA teacher and meta; ``weights:FILE`` and ``random`` build ``config.backbone``
    for the store's bands and statistics, or without a store for BigEarthNet's bands with SSL4EO-S12's statistics.
    """
    if checkpoint is not None:
        encoder, meta = load_encoder(checkpoint)
        return encoder, {**meta, "source": str(checkpoint)}
    if config.model != FINETUNE_RANDOM and not config.model.startswith(FINETUNE_WEIGHTS):
        raise ValueError(f"model {config.model!r} needs its checkpoint resolved (a run id, a file, models:/…)")
    assert config.backbone is not None  # FinetuneConfig requires it with random and weights:FILE
    if config.store is not None:
        reference = StoreDataset(config.store, "train", config.sensor, two_views=False, augment=False)
        bands = reference.channel_names
        norm_stats = {"mean": reference.mean.flatten().tolist(), "std": reference.std.flatten().tolist()}
        img_size: int | None = reference.image_shape[1]
    else:
        bands = list(S2_BANDS if config.sensor == "s2" else S1_POLS)
        norm_stats, img_size = ssl4eo_norm_stats(bands), None
    weights = config.model.removeprefix(FINETUNE_WEIGHTS) if config.model != FINETUNE_RANDOM else None
    torch.manual_seed(config.seed)  # random init (and any layer a weights file lacks) depends on the seed only
    encoder = build_encoder(config.backbone, len(bands), weights, bands=bands, img_size=img_size)
    meta = {"backbone": config.backbone, "in_chans": len(bands), "sensor": config.sensor, "bands": bands,
            "norm_stats": norm_stats, "img_size": img_size, "source": config.model}  # fmt: skip
    return encoder, meta


def finetune_data(config: FinetuneConfig, meta: dict[str, Any]) -> FinetuneData:
    """Train (a ``train_fraction`` subset, augmented), val and test splits of the store or BigEarthNet folder.

    Raises:
        ValueError: the store's bands differ from the encoder's, or the train or val split is empty.
    """
    train: Split
    val: Split
    test: Split
    if config.store is not None:
        store, segmentation = config.store, config.task == "segmentation"

        def split(name: str) -> StoreDataset:
            training = name == "train"
            return StoreDataset(
                store, name, meta["sensor"], two_views=False, crop_size=config.crop_size if training else None,
                seed=config.seed, augment=training, norm_stats=meta["norm_stats"], masks=segmentation,
            )  # fmt: skip

        store_train, val, test = split("train"), split("val"), split("test")
        if store_train.channel_names and list(meta["bands"]) != store_train.channel_names:
            raise ValueError(f"the store's bands {store_train.channel_names} differ from the encoder's {meta['bands']}")
        train, class_names, set_epoch = store_train, store_train.class_names, store_train.set_epoch
        class_codes = [int(code) for code in store_train.attrs.get("class_codes", range(1, len(class_names) + 1))]
    else:
        assert config.bigearthnet is not None  # FinetuneConfig requires a store or a folder
        patches = find_patches(config.bigearthnet, "s2" if meta["sensor"] == "s2" else "s1")
        splits = assign_splits(config.bigearthnet, [patch.name for patch in patches])

        def folder_split(name: str) -> Split:
            chosen = [patch for patch, split_name in zip(patches, splits, strict=True) if split_name == name]
            if not chosen:
                return Subset(TensorDataset(torch.zeros(0)), [])
            return BigEarthNetDataset(chosen, meta["bands"], meta["norm_stats"])

        train, val, test = folder_split("train"), folder_split("val"), folder_split("test")
        class_names, set_epoch = list(CORINE_BIGEARTHNET19.class_names), _no_epoch
        class_codes = list(CORINE_BIGEARTHNET19.class_codes)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"fine-tuning needs samples in the train and val splits (train {len(train)}, val {len(val)}): val picks "
            "the epoch and stops early"
        )
    n_split = len(train)
    if config.train_fraction < 1:
        train = Subset(train, draw_subset(np.arange(n_split), config.train_fraction, seed=config.seed).tolist())
    if len(train) < 2:
        raise ValueError(
            f"train_fraction {config.train_fraction} leaves {len(train)} training sample of the train split's "
            f"{n_split}: batch normalisation needs at least 2; give a larger train_fraction (label budget) or a "
            "larger store"
        )
    return FinetuneData(train, val, test, class_names, class_codes, set_epoch)


def _no_epoch(epoch: int) -> None:
    """BigEarthNet patches are not augmented: every epoch sees the same images."""


def split_loader(dataset: Split, config: FinetuneConfig, *, shuffle: bool = False) -> DataLoader:
    """Batches of one split, in ``config.seed``'s order when shuffled (training)."""
    generator = torch.Generator().manual_seed(config.seed)
    # training drops a short last batch: BatchNorm cannot train on one sample's 1 x 1 map
    return DataLoader(dataset, config.batch_size, shuffle=shuffle, generator=generator,
                      drop_last=shuffle and len(dataset) > config.batch_size)  # fmt: skip


def rank_train_loader(dataset: Split, config: FinetuneConfig, context: DistributedContext) -> DataLoader:
    """This rank's shard of the shuffled training split, ``batch_size / world_size`` samples a step (the global
    batch is ``batch_size``, as in pretraining); every rank draws the same number of steps."""
    per_rank = rank_batch_size(config.batch_size, context.world_size)
    sampler: DistributedSampler[dict[str, torch.Tensor]] = DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    return DataLoader(dataset, per_rank, sampler=sampler, drop_last=len(dataset) > config.batch_size)


def run_finetune(
    config: FinetuneConfig,
    checkpoint: str | Path | None,
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneReport:
    """Fine-tune the encoder of ``checkpoint`` (None: ``config.model`` is ``random`` or ``weights:FILE``) with a
    segmentation or multi-label head and write ``<out>/finetuned.pt``.

    Args:
        config: the finetune stage configuration.
        checkpoint: a training checkpoint file (the flow resolves run ids and ``models:/`` URIs to one).
        on_epoch: called after each epoch with its number and metrics (train_loss, lr, val_<metric>).

    Under torchrun this is rank 0's part (the flow's): every rank trains on its shard (``rank_train_loader``,
    ``fit``'s distributed mode), the other ranks through ``finetune_rank``; rank 0 alone evaluates and writes.

    Example:
        >>> config = FinetuneConfig(model="ckpt/step_000300.pt", task="segmentation", store="store.zarr")
        >>> report = run_finetune(config, "ckpt/step_000300.pt")
        >>> report.metrics["test/miou"], report.checkpoint
    """
    started = time.perf_counter()
    fitted = _fit(config, checkpoint, on_epoch, main_only=True)
    return _report(config, *fitted, started)


def finetune_rank(config: FinetuneConfig, checkpoint: str | Path | None) -> None:
    """A rank other than 0 of a torchrun job: trains its shard of the training split in step with the others."""
    _fit(config, checkpoint, None, main_only=False)


def _fit(
    config: FinetuneConfig,
    checkpoint: str | Path | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    *,
    main_only: bool,
) -> tuple[FinetuneModel, FinetuneData, dict[str, Any], FitResult, torch.device]:
    """Build the model and data, join the torchrun job if there is one, and train (``fit``)."""
    device = resolve_device(config.device)
    context = init_distributed(device.type)
    try:
        if main_only and not context.is_main:
            raise RuntimeError(
                f"run_finetune runs on rank 0 of a torchrun job; rank {context.rank} calls finetune_rank"
            )
        if context.enabled and device.type == "cuda":
            device = torch.device("cuda", context.local_rank)
        seed_everything(config.seed)
        encoder, meta = encoder_and_meta(config, checkpoint)
        data = finetune_data(config, meta)
        model = FinetuneModel(encoder, config.task, len(data.class_names))
        set_trainable(model, config.freeze)
        set_epoch = data.set_epoch
        if not context.enabled:
            train = split_loader(data.train, config, shuffle=True)
        else:
            train = rank_train_loader(data.train, config, context)

            def set_epoch(epoch: int) -> None:
                data.set_epoch(epoch)
                train.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

        result = fit(
            model, train, split_loader(data.val, config), n_classes=len(data.class_names), epochs=config.epochs,
            lr=config.lr, layer_decay=config.layer_decay, weight_decay=config.weight_decay, patience=config.patience,
            device=device, precision=config.precision, set_epoch=set_epoch, on_epoch=on_epoch,
            distributed=context.enabled,
        )  # fmt: skip
    finally:
        context.close()
    return model, data, meta, result, device


def _report(config: FinetuneConfig, model: FinetuneModel, data: FinetuneData, meta: dict[str, Any],
            result: FitResult, device: torch.device, started: float) -> FinetuneReport:  # fmt: skip
    """Evaluate the best epoch on val and test, write ``<out>/finetuned.pt`` (and the examples), report."""
    n_classes = len(data.class_names)

    def loader(dataset: Split) -> DataLoader:
        return split_loader(dataset, config)

    metrics: dict[str, float] = {}
    evaluations = {}
    for name, dataset in (("val", data.val), ("test", data.test)):
        if len(dataset):
            evaluations[name] = evaluate(model, loader(dataset), n_classes, device, config.precision)
            metrics |= split_metrics(name, evaluations[name].metrics, evaluations[name].per_class, config.task,
                                     data.class_names)  # fmt: skip
    reported = evaluations.get("test", evaluations["val"])
    metrics |= {"best_epoch": float(result.best_epoch), "epochs_run": float(result.epochs_run),
                "n_train": float(len(data.train)), "seconds": time.perf_counter() - started}  # fmt: skip
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / FINETUNED_FILE
    meta = {**meta, "class_names": data.class_names, "class_codes": data.class_codes, "levels": model.levels,
            "img_size": meta["img_size"] or int(data.train[0]["image"].shape[-1])}  # fmt: skip
    write_checkpoint(checkpoint_path, {
        "format": FINETUNED_FORMAT, "version": FINETUNED_VERSION, "task": config.task, "meta": meta,
        "encoder": model.encoder.state_dict(), "head": model.head.state_dict(),
        "config": config.model_dump(mode="json"), "metrics": metrics, "best_epoch": result.best_epoch,
    })  # fmt: skip
    examples = None
    if config.task == "segmentation":
        shown = data.test if len(data.test) else data.val
        examples = write_examples(model, shown, meta["bands"], out / EXAMPLES_FILE, device)
    return FinetuneReport(
        metrics=metrics, best_epoch=result.best_epoch, epochs_run=result.epochs_run, checkpoint=checkpoint_path,
        task=config.task, class_names=data.class_names, confusion=reported.confusion, history=result.history,
        examples=examples,
    )  # fmt: skip


def split_metrics(
    split: str, metrics: dict[str, float], per_class: np.ndarray, task: str, class_names: list[str]
) -> dict[str, float]:
    """``<split>/<metric>`` and ``<split>/iou/<class>`` (or ``ap/<class>``) for the classes the split shows."""
    kind = "iou" if task == "segmentation" else "ap"
    named = {f"{split}/{name}": value for name, value in metrics.items()}
    for name, value in zip(class_names, per_class, strict=True):
        if np.isfinite(value):
            named[f"{split}/{kind}/{slug(name)}"] = float(value)
    return named


@torch.no_grad()
def write_examples(model: FinetuneModel, dataset: Split, bands: list[str], path: Path, device: torch.device) -> Path:
    """A few patches of ``dataset`` as an ``.npz``: rgb (N, H, W, 3) in [0, 1], truth and prediction (N, H, W)."""
    items = [dataset[i] for i in range(min(N_EXAMPLES, len(dataset)))]
    images = torch.stack([item["image"] for item in items])  # (N, C, H, W) normalised
    model.eval()
    prediction = model(images.to(device)).argmax(1).cpu().numpy()
    rgb = [bands.index(band) if band in bands else 0 for band in ("B04", "B03", "B02")]
    composite = images[:, rgb].permute(0, 2, 3, 1).numpy()  # z-scores: +-2 std -> [0, 1]
    np.savez(path, rgb=np.clip((composite + 2) / 4, 0, 1), truth=torch.stack([item["mask"] for item in items]).numpy(),
             prediction=prediction)  # fmt: skip
    return path


def read_finetuned(path: str | Path) -> dict[str, Any]:
    """The fine-tuned model file of ``run_finetune`` as written (module doc).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a fine-tuned softcon model.
    """
    state = load_torch_file(path, what="fine-tuned model")
    if not isinstance(state, dict) or state.get("format") != FINETUNED_FORMAT:
        raise ValueError(f"{path} is not a fine-tuned softcon model (softcon finetune writes {FINETUNED_FILE})")
    return state


def finetuned_model(state: dict[str, Any]) -> tuple[FinetuneModel, dict[str, Any]]:
    """The model of a ``read_finetuned`` state (eval mode, CPU) and its meta (with ``task``)."""
    meta = {**state["meta"], "task": state["task"]}
    encoder = build_encoder(meta["backbone"], meta["in_chans"], img_size=meta["img_size"])
    model = FinetuneModel(encoder, state["task"], len(meta["class_names"]))
    model.encoder.load_state_dict(state["encoder"])
    model.head.load_state_dict(state["head"])
    return model.eval(), meta


def load_finetuned(path: str | Path) -> tuple[FinetuneModel, dict[str, Any]]:
    """The fine-tuned model of ``run_finetune`` (eval mode, CPU) and its meta (with ``task``)."""
    return finetuned_model(read_finetuned(path))


# ------------------------------------------------------------------------------------------------ figures


def confusion_figure(confusion: np.ndarray, class_names: list[str], task: str) -> Figure:
    """Segmentation: the (K, K) pixel confusion, each true class's row normalised; multilabel: per class, the shares
    of its samples that are TN, FP, FN, TP at 0.5."""
    names = [name[:28] for name in class_names]
    if task == "segmentation":
        counts = np.asarray(confusion, dtype=np.float64)
        columns, xlabel = names, "predicted class"
    else:
        counts = np.asarray(confusion, dtype=np.float64).reshape(len(names), 4)
        columns, xlabel = ["TN", "FP", "FN", "TP"], "outcome at 0.5"
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    figure = Figure(figsize=(1.2 + 0.45 * max(len(columns), 4), 1.2 + 0.35 * len(names)), layout="constrained")
    axes = figure.subplots()
    shown = axes.imshow(shares, vmin=0, vmax=1, cmap="Blues")
    axes.set_xticks(range(len(columns)), columns, rotation=90 if task == "segmentation" else 0, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("true class")
    for (row, column), value in np.ndenumerate(counts):
        axes.text(column, row, f"{int(value)}", ha="center", va="center", fontsize=6,
                  color="white" if shares[row, column] > 0.5 else "black")  # fmt: skip
    figure.colorbar(
        shown, ax=axes, label="share of the true class's " + ("pixels" if task == "segmentation" else "samples")
    )
    return figure


def prediction_figure(examples: Path, class_names: list[str]) -> Figure:
    """Each example patch: its RGB composite, the true mask and the predicted one (no class: white)."""
    with np.load(examples) as data:
        rgb, truth, prediction = data["rgb"], data["truth"], data["prediction"]
    colours = ListedColormap([matplotlib.colormaps["tab20"](k % 20) for k in range(len(class_names))])
    colours.set_bad("white")
    figure = Figure(figsize=(7.5, 2.5 * len(rgb)), layout="constrained")
    axes = np.asarray(figure.subplots(len(rgb), 3, squeeze=False))
    for row in range(len(rgb)):
        truth_masked = np.ma.masked_equal(truth[row], MASK_NODATA)
        for column, (image, title) in enumerate(
            ((rgb[row], "RGB"), (truth_masked, "truth"), (prediction[row], "predicted"))
        ):
            panel = axes[row, column]
            if column == 0:
                panel.imshow(image)
            else:
                panel.imshow(image, cmap=colours, vmin=-0.5, vmax=len(class_names) - 0.5, interpolation="nearest")
            panel.set_title(title, fontsize=8)
            panel.axis("off")
    handles = [Patch(color=colours(k), label=name[:28]) for k, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=7)
    return figure
