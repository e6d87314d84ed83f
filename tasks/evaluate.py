"""Evaluate stage: frozen-encoder linear probing and kNN on multi-label targets, with baselines.

Protocol (the same for every encoder, so rows of the comparison table compare like with like):

1. Features of the frozen encoder are extracted **once** per (encoder, dataset, split) and cached as an
   ``.npz`` under ``<out>/features/`` (key: the encoder's identity — checkpoint or weights bytes, or the
   random-init seed —, the dataset, the split, the training subset, the band set, the normalisation and
   the image size). Probe, kNN, learning-rate selection and plots all read the cache.
2. Linear probe: multi-label logistic regression (one sigmoid per class, BCE, AdamW) on standardised
   features; its learning rate is the one of ``config.probe_lrs`` with the best micro mAP on the val split
   (on train when there is no labelled val split).
3. kNN: cosine similarity, ``config.knn_k`` neighbours from the train split, similarity-weighted label votes.
4. Metrics over the whole evaluated split (not per batch): micro and macro mAP, per-class AP, sample-averaged
   F1 at 0.5, named as in DESIGN.md (``linear_map_micro`` …) and prefixed per dataset for BigEarthNet
   (``bigearthnet/linear_map_micro``); baselines under ``[bigearthnet/]baselines/<name>/<metric>``.
5. Sanity: feature std, NaN fraction, spread of the unit-normalised features; a collapsed encoder is
   flagged (``collapsed`` = 1) and marked in the table.

Datasets: the training store's held-out split (``config.split``), and/or a BigEarthNet-format folder
(``tasks/bigearthnet.py``; its bands mapped onto the encoder's by name). ``config.train_fraction`` < 1
draws that fraction of the train split without replacement (BigEarthNet-10 %: 0.1).

Encoders: the model (a training checkpoint; its EMA teacher) and ``config.baselines``: ``random`` (the
model's backbone, random init, seed ``config.seed``), ``image-stats`` (per-band mean and std), a checkpoint
file (e.g. the hard-contrastive λ = 0 run) and ``weights:FILE`` (a local weights file loaded into the model's
backbone, or ``config.weights_backbone``). Images are normalised with the checkpoint's statistics, which are
part of the encoder's input contract; baselines other than checkpoints use the model's.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from softcon.config import S1_POLARIZATIONS, EvaluateConfig
from softcon.models.data import StoreDataset
from softcon.models.encoder import Dinov2LinearFeatures, build_encoder, is_vit, weights_bands
from softcon.models.probe import (
    BandStatistics,
    Features,
    extract_features,
    f1_samples,
    feature_sanity,
    knn_scores,
    load_features,
    mean_average_precision,
    probe_scores,
    save_features,
    top1_accuracy,
    train_linear_probe,
)
from softcon.models.training_store import read_store_attrs
from softcon.tasks.bigearthnet import (
    PATCH_SIZE,
    S2_BANDS,
    BigEarthNetDataset,
    Sensor,
    assign_splits,
    find_patches,
    subset_without_replacement,
)
from softcon.tasks.eurosat import EUROSAT_CLASSES, EuroSatDataset, EuroSatPatch, eurosat_splits, find_eurosat
from softcon.tasks.schemes import CORINE_BIGEARTHNET19
from softcon.tasks.ssl4eo import ContractInputs, ssl4eo_norm_stats
from softcon.tasks.ssl4eo_linear import PROTOCOLS, run_linear_protocol
from softcon.tasks.train import load_encoder, read_checkpoint

EncoderKind = Literal["checkpoint", "random", "weights", "image-stats"]
METRIC_NAMES = ("linear_map_micro", "linear_map_macro", "knn_map_micro", "knn_map_macro", "linear_f1", "knn_f1")


@dataclass(frozen=True)
class EncoderSpec:
    """One row of the comparison: what to build and what to call it."""

    name: str
    kind: EncoderKind
    path: str | None = None


@dataclass(frozen=True)
class EncoderResult:
    """One encoder on one dataset."""

    encoder: str
    kind: EncoderKind
    dataset: str
    """Which dataset: "store" or "bigearthnet"."""
    metrics: dict[str, float]
    """METRIC_NAMES plus feature_std, feature_nan_fraction, feature_spread, feature_dead_fraction,
    collapsed (0/1), probe_lr, n_train, n_eval."""
    per_class_ap: dict[str, float]
    """Linear-probe AP of each class with a positive in the evaluated split."""
    collapsed: bool
    scores_file: Path
    """``.npz`` with y, linear, knn scores and fractions (when known) of the evaluated split."""
    feature_files: tuple[Path, ...]
    """The cached features this result used (train, val, evaluated)."""


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation produced: metrics for MLflow, per-encoder results and the files behind them."""

    metrics: dict[str, float]
    """The model's metrics under DESIGN.md names (prefixed per dataset), then every baseline's."""
    per_class_ap: dict[str, float]
    """The model's per-class AP on the first dataset."""
    results: tuple[EncoderResult, ...]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    """Class names of each dataset."""
    n_train: int = 0
    n_eval: int = 0
    seconds: float = 0.0
    probe_lr: float = math.nan


def slug(name: str) -> str:
    """A file- and metric-safe version of an encoder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("λ", "lambda")).strip("-").lower() or "encoder"


def checkpoint_name(path: str | Path) -> str:
    """A row name for a training checkpoint from its config: SoftCon (λ=…) or hard contrastive (λ=0)."""
    config = read_checkpoint(path).get("config", {})
    lam = float(config.get("lambda_soft", math.nan))
    return "hard contrastive (λ=0)" if lam == 0 else f"SoftCon (λ={lam:g})"


def parse_baseline(text: str) -> EncoderSpec:
    """``random``, ``image-stats``, ``weights:FILE``, ``checkpoint:FILE`` or a checkpoint file, optionally
    prefixed ``NAME=`` to name the row.

    Raises:
        ValueError: an empty spec, or a file that does not exist.
    """
    name, _, spec = text.rpartition("=") if "=" in text.split(":", 1)[0] else ("", "", text)
    spec = spec.strip()
    if spec in ("random", "image-stats"):
        plain: EncoderKind = "random" if spec == "random" else "image-stats"
        return EncoderSpec(name or ("random init" if spec == "random" else "image statistics"), plain)
    kind: EncoderKind = "checkpoint"
    if spec.startswith("weights:"):
        kind, spec = "weights", spec.removeprefix("weights:")
    spec = spec.removeprefix("checkpoint:")
    if not spec:
        raise ValueError(f"empty baseline {text!r}; give random, image-stats, weights:FILE or a checkpoint file")
    if not Path(spec).is_file():
        raise ValueError(
            f"baseline {text!r}: {spec} is not a file (give random, image-stats, weights:FILE, a checkpoint file, "
            "or an MLflow train run id through the flow)"
        )
    if not name:
        name = checkpoint_name(spec) if kind == "checkpoint" else f"weights {Path(spec).name}"
    return EncoderSpec(name, kind, spec)


def _file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _spec_path(spec: EncoderSpec) -> str:
    """The file of a checkpoint or weights spec."""
    if spec.path is None:
        raise ValueError(f"encoder {spec.name!r} ({spec.kind}) has no file")
    return spec.path


def _sensor(name: str) -> Sensor:
    """``name`` as a sensor of the datasets ("s2" or "s1")."""
    if name == "s2":
        return "s2"
    if name == "s1":
        return "s1"
    raise ValueError(f"sensor {name!r} is not one of ('s2', 's1')")


def build_spec(
    spec: EncoderSpec, reference: dict[str, Any], config: EvaluateConfig
) -> tuple[nn.Module, dict[str, Any], str]:
    """(encoder in eval mode, its meta, its identity for the feature cache) of one spec.

    ``reference`` is the model checkpoint's meta: backbone, in_chans, sensor, bands, norm_stats, img_size.
    """
    if spec.kind == "checkpoint":
        path = _spec_path(spec)
        encoder, meta = load_encoder(path)
        return encoder, meta, f"checkpoint:{_file_digest(path)}"
    meta = dict(reference)
    if spec.kind == "image-stats":
        return BandStatistics(reference["in_chans"]).eval(), meta, "image-stats:v1"
    backbone = config.weights_backbone if spec.kind == "weights" and config.weights_backbone else reference["backbone"]
    torch.manual_seed(config.seed)  # random init (and any head a weights file lacks) depends on the seed only
    encoder = build_encoder(
        backbone,
        reference["in_chans"],
        spec.path if spec.kind == "weights" else None,
        bands=reference["bands"],
        img_size=reference["img_size"],
    )
    meta["backbone"] = backbone
    if spec.kind == "weights":
        return encoder.eval(), meta, f"weights:{backbone}:{_file_digest(_spec_path(spec))}"
    return encoder.eval(), meta, f"random:{backbone}:{reference['in_chans']}:{config.seed}:torch{torch.__version__}"


RAW_PATCH_BYTES = len(S2_BANDS) * PATCH_SIZE * PATCH_SIZE * 4
"""Memory of one raw BigEarthNet S2 patch (float32)."""
RAW_CACHE_BYTES = 1 << 30
"""A BigEarthNet folder whose raw patches fit in this is read once per evaluation, not once per encoder."""


class EvaluationData:
    """The datasets of one evaluation, each split readable for any encoder's bands and statistics."""

    def __init__(self, config: EvaluateConfig, sensor: str) -> None:
        self.config = config
        self.sensor = sensor
        self.names: list[str] = []
        if config.store is not None:
            self.names.append("store")
        self._patches: list | None = None
        self._splits: np.ndarray | None = None
        if config.bigearthnet is not None:
            self._patches = find_patches(config.bigearthnet, _sensor(sensor))
            self._splits = assign_splits(config.bigearthnet, [patch.name for patch in self._patches])
            self.names.append("bigearthnet")
        small = self._patches is not None and len(self._patches) * RAW_PATCH_BYTES <= RAW_CACHE_BYTES
        self._raw_cache: dict[str, np.ndarray] | None = {} if small else None
        self._eurosat: list[EuroSatPatch] = []
        if config.eurosat is not None:
            self._eurosat = find_eurosat(config.eurosat)
            self._eurosat_splits = eurosat_splits(self._eurosat)
            self.names.append("eurosat")

    def single_label(self, dataset: str) -> bool:
        """Whether a dataset has one class per sample (probed by softmax regression, scored by top-1 accuracy)."""
        return dataset == "eurosat"

    def class_names(self, dataset: str, meta: dict[str, Any]) -> list[str]:
        if dataset == "bigearthnet":
            return list(CORINE_BIGEARTHNET19.class_names)
        if dataset == "eurosat":
            return list(EUROSAT_CLASSES)
        return list(meta.get("class_names") or [])

    def members(self, dataset: str, split: str) -> str:
        """Digest of what a split holds (patch names and labels; a store's fingerprint), so cached features of a
        folder whose split lists or labels changed, or of a store rebuilt in place, are not reused."""
        chosen: list[Any]
        if dataset == "bigearthnet":
            assert self._patches is not None and self._splits is not None  # set when "bigearthnet" is a dataset
            chosen = [(p.name, p.corine_labels) for p, name in zip(self._patches, self._splits, strict=True)
                      if name == split]  # fmt: skip
        elif dataset == "eurosat":
            chosen = [(str(p.path), p.label) for p, name in zip(self._eurosat, self._eurosat_splits, strict=True)
                      if name == split]  # fmt: skip
        else:
            assert self.config.store is not None  # "store" is a dataset when config.store is set
            chosen = [(read_store_attrs(self.config.store) or {}).get("fingerprint")]
        return hashlib.sha256(json.dumps(chosen, default=str).encode()).hexdigest()[:16]

    def location(self, dataset: str) -> str:
        return str(
            {"store": self.config.store, "bigearthnet": self.config.bigearthnet}.get(dataset, self.config.eurosat)
        )

    def split(self, dataset: str, split: str, meta: dict[str, Any], *, raw_size: bool = False) -> Dataset:
        """One split as a single-view dataset normalised for the encoder of ``meta``, under the configured input
        contract (``model``: z-scores with the encoder's statistics; ``ssl4eo``: SoftCon's, ``tasks/ssl4eo.py``)."""
        if self.config.input_contract == "ssl4eo":
            meta = {**meta, "norm_stats": ssl4eo_norm_stats(meta["bands"])}
        data: StoreDataset | BigEarthNetDataset | EuroSatDataset | Subset | ContractInputs
        data = self._normalised(dataset, split, meta)
        if self.config.input_contract == "ssl4eo":
            resize_crop = (256, 224) if dataset == "bigearthnet" and not raw_size else (None, None)
            data = ContractInputs(data, resize=resize_crop[0], crop=resize_crop[1])
        if split == "train" and self.config.train_fraction < 1:
            positions = subset_without_replacement(
                np.arange(len(data)), self.config.train_fraction, seed=self.config.seed
            )
            return Subset(data, positions.tolist())
        return data

    def _normalised(
        self, dataset: str, split: str, meta: dict[str, Any]
    ) -> StoreDataset | BigEarthNetDataset | EuroSatDataset | Subset:
        data: StoreDataset | BigEarthNetDataset | EuroSatDataset
        if dataset == "store":
            assert self.config.store is not None  # "store" is a dataset when config.store is set
            data = StoreDataset(
                self.config.store,
                split,
                _sensor(self.sensor),
                two_views=False,
                augment=False,
                norm_stats=meta["norm_stats"],
            )
            if data.channel_names and meta["bands"] and data.channel_names != list(meta["bands"]):
                raise ValueError(
                    f"the store's {self.sensor} bands {data.channel_names} differ from the encoder's {meta['bands']}"
                )
        elif dataset == "eurosat":
            chosen_patches = [p for p, name in zip(self._eurosat, self._eurosat_splits, strict=True) if name == split]
            data = EuroSatDataset(chosen_patches, meta["bands"], meta["norm_stats"])
        else:
            assert self._patches is not None and self._splits is not None  # set when "bigearthnet" is a dataset
            chosen = [patch for patch, name in zip(self._patches, self._splits, strict=True) if name == split]
            if not chosen:
                return Subset(torch.utils.data.TensorDataset(torch.zeros(0)), [])
            data = BigEarthNetDataset(
                chosen,
                meta["bands"],
                meta["norm_stats"],
                image_size=self.config.bigearthnet_size,
                raw_cache=self._raw_cache,
            )
        return data


def cached_features(
    config: EvaluateConfig,
    data: EvaluationData,
    dataset: str,
    split: str,
    encoder: nn.Module,
    meta: dict[str, Any],
    identity: str,
    name: str,
    device: torch.device,
) -> tuple[Features, Path]:
    """Features of one split, read from ``<out>/features/`` when this exact extraction was done before."""
    key = json.dumps(
        {
            "encoder": identity,
            "dataset": dataset,
            "location": str(Path(data.location(dataset)).resolve()),
            "split": split,
            "members": data.members(dataset, split),
            "train_fraction": config.train_fraction if split == "train" else 1.0,
            "seed": config.seed if split == "train" and config.train_fraction < 1 else 0,
            "bands": list(meta.get("bands") or []),
            "norm_stats": meta.get("norm_stats"),
            "image_size": config.bigearthnet_size if dataset == "bigearthnet" else None,
            # keys of the newer options only when they differ from the default, so earlier caches stay valid
            **({"input_contract": config.input_contract} if config.input_contract != "model" else {}),
            **({"vit_features": config.vit_features} if config.vit_features != "cls" else {}),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(config.out) / "features" / f"{dataset}-{split}-{slug(name)}-{digest}.npz"
    if path.is_file():
        return load_features(path), path
    if config.vit_features == "dinov2" and is_vit(encoder):
        encoder = Dinov2LinearFeatures(encoder)
    features = extract_features(encoder, data.split(dataset, split, meta), batch_size=config.batch_size, device=device)
    return features, save_features(path, features)


def select_probe(
    config: EvaluateConfig, train: Features, selection: Features, *, single_label: bool = False
) -> tuple[float, nn.Module]:
    """The probe, among one per learning rate of ``config.probe_lrs``, with the best micro mAP on ``selection``
    (top-1 accuracy for a single-label dataset, whose probe is a softmax regression)."""
    best: tuple[float, nn.Module] | None = None
    best_map = -math.inf
    for lr in config.probe_lrs:
        probe = train_linear_probe(
            train,
            lr=lr,
            epochs=config.probe_epochs,
            batch_size=config.batch_size,
            weight_decay=config.probe_weight_decay,
            seed=config.seed,
            single_label=single_label,
        )
        scores = probe_scores(probe, selection)
        if single_label:
            micro = top1_accuracy(selection.y.numpy(), scores)
        else:
            micro, _, _ = mean_average_precision(selection.y.numpy(), scores)
        if best is None:
            best = (lr, probe)  # the first learning rate stands when no score is a number
        if micro > best_map:  # NaN (no positives) never wins
            best, best_map = (lr, probe), micro
    assert best is not None  # probe_lrs has min_length=1 in EvaluateConfig
    return best


def _finite(features: Features) -> Features:
    # a NaN feature would poison every score; it is counted by the sanity check, then treated as 0
    return Features(torch.nan_to_num(features.x, nan=0.0, posinf=0.0, neginf=0.0), features.y, features.fractions)


def evaluate_encoder(
    config: EvaluateConfig,
    data: EvaluationData,
    dataset: str,
    spec: EncoderSpec,
    built: tuple[nn.Module, dict[str, Any], str],
    device: torch.device,
) -> EncoderResult:
    """Linear probe and kNN of one encoder on one dataset, from cached features."""
    encoder, meta, identity = built

    def features(split: str) -> tuple[Features, Path]:
        return cached_features(config, data, dataset, split, encoder, meta, identity, spec.name, device)

    (train, train_file), (evaluated, eval_file) = features("train"), features(config.split)
    where = data.location(dataset)
    if len(train.x) == 0:
        raise ValueError(f"the train split of {where} has no labelled samples to fit a probe on")
    if len(evaluated.x) == 0:
        fix = (
            "re-run preprocess with a smaller split block (split_block, in pixels) or over a larger area"
            if dataset == "store"
            else f"give the folder its split lists ({config.split}.csv: one patch name per row) or more patches"
        )
        raise ValueError(
            f"the {config.split} split of {where} has no labelled samples to evaluate: {fix}, or evaluate --split val"
        )
    sanity = feature_sanity(evaluated.x, collapse_threshold=config.collapse_threshold)
    train, evaluated = _finite(train), _finite(evaluated)
    files = [train_file, eval_file]

    selection = train  # learning rate chosen on val; on train when val is what is reported, or empty
    if config.split != "val":
        val, val_file = features("val")
        files.append(val_file)
        if len(val.x) > 0 and val.y.any():
            selection = _finite(val)
    single_label = data.single_label(dataset)
    probe_lr, probe = select_probe(config, train, selection, single_label=single_label)

    y = evaluated.y.numpy()
    linear = probe_scores(probe, evaluated)  # (N, K)
    knn = knn_scores(train, evaluated, k=config.knn_k)  # (N, K)
    linear_micro, linear_macro, per_class = mean_average_precision(y, linear)
    knn_micro, knn_macro, _ = mean_average_precision(y, knn)
    class_names = data.class_names(dataset, meta) or [f"class_{c}" for c in range(y.shape[1])]
    metrics = {
        "linear_map_micro": linear_micro,
        "linear_map_macro": linear_macro,
        "knn_map_micro": knn_micro,
        "knn_map_macro": knn_macro,
        "linear_f1": f1_samples(y, linear),
        "knn_f1": f1_samples(y, knn),
        "feature_std": sanity.std,
        "feature_nan_fraction": sanity.nan_fraction,
        "feature_spread": sanity.spread,
        "feature_dead_fraction": sanity.dead_fraction,
        "collapsed": float(sanity.collapsed),
        "probe_lr": probe_lr,
        "n_train": float(len(train.x)),
        "n_eval": float(len(evaluated.x)),
    }
    if single_label:
        metrics |= {"linear_top1": top1_accuracy(y, linear), "knn_top1": top1_accuracy(y, knn)}
    if config.protocol == "ssl4eo" and int(getattr(encoder, "num_features", 0) or 0) > 0:
        metrics |= run_linear_protocol(
            encoder,
            data.split(dataset, "train", meta, raw_size=True),  # cropped and flipped on the fly
            data.split(dataset, "val", meta),
            PROTOCOLS.get(dataset, PROTOCOLS["bigearthnet"]),
            single_label=single_label,
            device=device,
            seed=config.seed,
            epochs=config.protocol_epochs,
        )
    scores_file = Path(config.out) / "scores" / f"{dataset}-{slug(spec.name)}.npz"
    scores_file.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"y": y, "linear": linear, "knn": knn, "x": evaluated.x.numpy()}
    if evaluated.fractions is not None:
        arrays["fractions"] = evaluated.fractions.numpy()
    np.savez(scores_file, allow_pickle=True, **arrays)  # numpy's default, named so that mypy matches **arrays to **kwds
    return EncoderResult(
        encoder=spec.name,
        kind=spec.kind,
        dataset=dataset,
        metrics=metrics,
        per_class_ap={name: float(ap) for name, ap in zip(class_names, per_class, strict=True) if np.isfinite(ap)},
        collapsed=sanity.collapsed,
        scores_file=scores_file,
        feature_files=tuple(files),
    )


def metric_prefix(dataset: str) -> str:
    """The metric prefix: none for the training store (DESIGN.md's plain names), "bigearthnet/" for BigEarthNet."""
    return "" if dataset == "store" else f"{dataset}/"


def flat_metrics(results: list[EncoderResult] | tuple[EncoderResult, ...], model: str) -> dict[str, float]:
    """MLflow metrics: the model's under DESIGN.md names, each baseline's under ``baselines/<name>/``."""
    metrics: dict[str, float] = {}
    for result in results:
        prefix = metric_prefix(result.dataset)
        if result.encoder != model:
            prefix += f"baselines/{slug(result.encoder)}/"
        metrics.update({f"{prefix}{key}": value for key, value in result.metrics.items()})
    return metrics


def weights_reference(config: EvaluateConfig) -> dict[str, Any]:
    """The input contract of a weights file evaluated alone: the store's bands, statistics and classes, or without a
    store (input contract ``ssl4eo``) the file's own bands (``weights_bands``) with SSL4EO-S12's statistics; ViTs
    at 224 px (other sizes are fitted: ``fit_to_encoder``), CNNs at the store's patch size (any size without one).
    """
    assert config.backbone is not None  # EvaluateConfig requires it with weights
    vit_size = 224 if is_vit(config.backbone) else None
    if config.store is None:
        assert config.weights is not None and config.input_contract == "ssl4eo"  # EvaluateConfig's rule
        bands = list(weights_bands(config.weights))
        if (config.sensor == "s1") != (bands == list(S1_POLARIZATIONS)):
            raise ValueError(f"{config.weights} holds {bands} filters; sensor {config.sensor!r} does not take them")
        return {
            "backbone": config.backbone,
            "in_chans": len(bands),
            "sensor": config.sensor,
            "bands": bands,
            "norm_stats": ssl4eo_norm_stats(bands),
            "img_size": vit_size,
            "class_names": [],
        }
    data = StoreDataset(config.store, "train", config.sensor, two_views=False, augment=False)
    return {
        "backbone": config.backbone,
        "in_chans": data.in_chans,
        "sensor": config.sensor,
        "bands": data.channel_names,
        "norm_stats": {"mean": data.mean.flatten().tolist(), "std": data.std.flatten().tolist()},
        "img_size": vit_size or data.image_shape[1],
        "class_names": data.class_names,
    }


def run_evaluation(
    config: EvaluateConfig, checkpoint: str | Path | None, baselines: list[str] | None = None
) -> EvaluationResult:
    """Linear probe and kNN of a checkpoint's frozen encoder, and of the baselines, on each dataset.

    Args:
        config: the evaluate stage configuration (store and/or bigearthnet, split, knn_k, probe_epochs,
            probe_lrs, baselines, train_fraction, out ...).
        checkpoint: a training checkpoint file (``tasks.train.run_training``'s result); None evaluates
            ``config.weights`` as the model (``weights_reference``).
        baselines: baseline specs overriding ``config.baselines`` (the flow passes them with MLflow run ids
            resolved to checkpoint files).

    Returns:
        EvaluationResult; metric names follow DESIGN.md (``linear_map_micro``, ``bigearthnet/…``).

    Raises:
        ValueError: a dataset without labelled train or evaluated samples, bands that do not match, a bad
            baseline spec.

    Example:
        >>> config = EvaluateConfig(store="data/store.zarr", baselines=["random", "image-stats"])
        >>> result = run_evaluation(config, "data/ckpt/step_000300.pt")
        >>> result.metrics["linear_map_micro"], result.metrics["baselines/random-init/linear_map_micro"]
    """
    started = time.perf_counter()
    specs = [parse_baseline(text) for text in (config.baselines if baselines is None else baselines)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if checkpoint is not None:
        model_encoder, reference = load_encoder(checkpoint)
        model = EncoderSpec(checkpoint_name(checkpoint), "checkpoint", str(checkpoint))
        identity = f"checkpoint:{_file_digest(checkpoint)}"
    else:
        assert config.weights is not None  # EvaluateConfig requires model or weights
        reference = weights_reference(config)
        model = EncoderSpec(f"weights {Path(config.weights).name}", "weights", config.weights)
        model_encoder, _, identity = build_spec(model, reference, config.model_copy(update={"weights_backbone": None}))
    names = [model.name] + [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"encoder names must differ, got {names}; name rows with NAME=SPEC")
    data = EvaluationData(config, reference["sensor"])

    results: list[EncoderResult] = []
    built_model = (model_encoder, reference, identity)
    for spec in [model, *specs]:
        built = built_model if spec is model else build_spec(spec, reference, config)
        for dataset in data.names:
            results.append(evaluate_encoder(config, data, dataset, spec, built, device))

    first = results[0]
    return EvaluationResult(
        metrics=flat_metrics(results, model.name),
        per_class_ap=first.per_class_ap,
        results=tuple(results),
        class_names={dataset: data.class_names(dataset, reference) for dataset in data.names},
        n_train=int(first.metrics["n_train"]),
        n_eval=int(first.metrics["n_eval"]),
        seconds=time.perf_counter() - started,
        probe_lr=first.metrics["probe_lr"],
    )
