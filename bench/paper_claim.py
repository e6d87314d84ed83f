"""The paper's claim on the structured sample world: SoftCon vs hard contrastive vs random init vs image statistics,
with ablations, over seeds, with 95 % confidence intervals.

The world (``write_sample_data(world="structured")``, docs/sample_world.md) goes through the real stages: a local
STAC API, ingest, labels from its coarse, noisy Dynamic-World-like map (the pretraining labels), preprocess. Each
encoder is then evaluated under one protocol (``tasks.evaluate.run_evaluation``: cached features, linear probe with
its learning rate chosen on val, kNN) on the world's BigEarthNet-format evaluation set, whose CORINE labels are
another nomenclature: evaluation is a transfer task, as in the paper. Rows:

- SoftCon: the project's reading of the paper's loss (its training code is unpublished): InfoNCE + lambda x the
  soft term in the form ``--soft-loss`` (default sigmoid BCE with learnable scale and bias, ``models/loss.py``);
- hard contrastive (lambda = 0), random init, image statistics (per-band mean and std);
- the supervised reference: a ResNet-18 trained end to end on the evaluation set's own train labels
  (``world_check.cnn_map``; its test mAP, not a frozen-feature probe);
- with ``--ablations``: lambda 0.5 / 2, label similarity jaccard / fractions, soft term mse / soft_ce, mask ratio
  0 / 0.6, stop-gradient teacher; each differs from the SoftCon row in that one setting.

Every row runs for each seed (world and store fixed; seed of training, probe and kNN split); the table shows
mean +- the 95 % t-interval half-width. The table, the per-seed values and the settings go to
``<out>/paper_claim.{md,json}`` and to an MLflow run ("paper-claim" experiment) as a comparison artifact.

    python bench/paper_claim.py --out /tmp/paper_claim --ablations            # CPU preset, ~30 min on 2 cores
    python bench/paper_claim.py --out /tmp/paper_claim_gpu --preset gpu       # GPU preset (H200, ResNet-50, 224 px)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from softcon.config import EvaluateConfig, IngestConfig, LabelsConfig, PreprocessConfig, TrainConfig
from softcon.tasks.bigearthnet import assign_splits, find_patches, read_patch
from softcon.tasks.evaluate import run_evaluation
from softcon.tasks.ingest import run_ingest
from softcon.tasks.labels import run_labels
from softcon.tasks.preprocess import run_preprocess
from softcon.tasks.sample_data import SampleData, write_sample_data
from softcon.tasks.stac_server import serve_stac
from softcon.tasks.train import run_training

METRICS = ("linear_map_micro", "linear_map_macro", "knn_map_micro", "knn_map_macro")


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the bench."""

    tiles: int
    tile_size: int
    dates: int
    patch_size: int
    backbone: str
    steps: int
    batch_size: int
    crop_size: int | None
    device: str
    supervised_epochs: int


PRESETS = {
    "cpu": Preset(tiles=4, tile_size=256, dates=4, patch_size=32, backbone="resnet18", steps=100, batch_size=48,
                  crop_size=None, device="cpu", supervised_epochs=12),
    # One H200, within about 5 minutes: a larger world, ResNet-50 at 224 px crops of 264 px patches.
    "gpu": Preset(tiles=16, tile_size=528, dates=4, patch_size=264, backbone="resnet50", steps=600, batch_size=256,
                  crop_size=224, device="cuda", supervised_epochs=30),
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One trained encoder of the table: its name and how its training differs from the SoftCon row's."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)


def rows(soft_loss: str, ablations: bool) -> list[Row]:
    softcon = Row(f"SoftCon (λ=1, {soft_loss})")
    main = [softcon, Row("hard contrastive (λ=0)", {"lambda_soft": 0.0})]
    if not ablations:
        return main
    return [
        *main,
        Row("λ=0.5", {"lambda_soft": 0.5}),
        Row("λ=2", {"lambda_soft": 2.0}),
        Row("label similarity jaccard", {"label_similarity": "jaccard"}),
        Row("label similarity fractions", {"label_similarity": "fractions"}),
        Row("soft term mse", {"soft_loss": "mse"}),
        Row("soft term soft_ce", {"soft_loss": "soft_ce"}),
        Row("mask ratio 0", {"mask_ratio": 0.0}),
        Row("mask ratio 0.6", {"mask_ratio": 0.6}),
        Row("stop-gradient teacher", {"teacher": "stop_gradient"}),
    ]


def build_store(out: Path, preset: Preset, *, masks: bool = False) -> tuple[SampleData, str, dict[str, float]]:
    """Structured world -> local STAC API -> ingest -> labels (Dynamic-World-like map) -> preprocess (with per-pixel
    masks when asked: segmentation fine-tuning needs them). ``preset`` needs tiles, tile_size, dates, patch_size."""
    timings = {}
    started = time.perf_counter()
    sample = write_sample_data(out / "sample", tiles=preset.tiles, tile_size=preset.tile_size, dates=preset.dates,
                               seed=0, world="structured")  # fmt: skip
    timings["sample_data"] = time.perf_counter() - started
    assert sample.dynamic_world is not None and sample.bigearthnet is not None  # the structured world writes both
    cube, store = str(out / "cube.zarr"), str(out / "store.zarr")
    with serve_stac([sample.items_file]) as stac_url:
        started = time.perf_counter()
        run_ingest(IngestConfig(stac=stac_url, collections=["sentinel-2-l2a", "sentinel-1-rtc"], bbox=sample.bbox,
                                start=sample.start, end=sample.end, tile_size=preset.tile_size, cube=cube,
                                max_cloud=100.0, max_tile_cloud=0.5))  # fmt: skip
        timings["ingest"] = time.perf_counter() - started
    started = time.perf_counter()
    run_labels(LabelsConfig(cube=cube, source=str(sample.dynamic_world), scheme="dynamic-world"))
    timings["labels"] = time.perf_counter() - started
    started = time.perf_counter()
    config = PreprocessConfig(cube=cube, out=store, patch_size=preset.patch_size, split_block=64, val_fraction=0.15,
                              test_fraction=0.15, n_workers=1, masks=masks)  # fmt: skip
    report = run_preprocess(config)
    timings["preprocess"] = time.perf_counter() - started
    print(f"store: {report.counts}", flush=True)
    return sample, store, timings


def supervised_reference(folder: Path, preset: Preset, seed: int) -> dict[str, float]:
    """Test micro/macro mAP of a ResNet-18 trained on the evaluation set's train labels (``world_check``)."""
    from world_check import cnn_map

    patches = find_patches(folder, "s2")
    splits = assign_splits(folder, [patch.name for patch in patches])
    images = np.stack([read_patch(patch) for patch in patches])
    labels = np.stack([patch.labels for patch in patches])
    train = splits != "test"
    present = labels[train].sum(axis=0) > 0
    micro, history = cnn_map(images, labels[:, present], train, epochs=preset.supervised_epochs, batch_size=32,
                             lr=2e-3, seed=seed)  # fmt: skip
    return {"linear_map_micro": micro, "linear_map_macro": history[-1]["test_map_macro"], "epochs": len(history)}


def interval(values: list[float]) -> str:
    """mean ± half-width of the 95 % t-interval, in percent."""
    array = 100 * np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return f"{array.mean():.1f}"
    half = stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array))
    return f"{array.mean():.1f} ± {half:.1f}"


def table(results: dict[str, dict[str, list[float]]], seeds: list[int], names: list[str] | None = None) -> str:
    """The comparison table in markdown: one row per encoder (``names``, default all), mean ± 95 % CI over the
    seeds."""
    lines = [
        f"| encoder (seeds {', '.join(map(str, seeds))}) | linear mAP micro | linear mAP macro | kNN mAP micro | "
        "kNN mAP macro |",
        "|---|---|---|---|---|",
    ]
    for name in names or list(results):
        metrics = results.get(name, {})
        cells = [interval(metrics[m]) if metrics.get(m) else "–" for m in METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def tables(results: dict[str, dict[str, list[float]]], seeds: list[int], ablation_rows: list[Row]) -> str:
    """The claim table (SoftCon, hard contrastive, baselines, supervised) and, with ablations, the ablation table
    (the SoftCon and λ=0 rows repeated as its reference)."""
    ablations = [row.name for row in ablation_rows]
    main = [name for name in results if name not in ablations]
    markdown = table(results, seeds, main)
    if ablations:
        markdown += "\n\nAblations (each row changes one setting of the SoftCon row):\n\n"
        markdown += table(results, seeds, main[:2] + ablations)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".softcon/paper_claim"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, help="Training steps; default the preset's.")
    parser.add_argument("--supervised-epochs", type=int, help="Supervised reference epochs; default the preset's.")
    parser.add_argument("--soft-loss", default="sigmoid", choices=["sigmoid", "mse", "soft_ce"])
    parser.add_argument("--ablations", action="store_true", help="Add the ablation rows.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.steps:
        preset = Preset(**{**preset.__dict__, "steps": args.steps})
    if args.supervised_epochs:
        preset = Preset(**{**preset.__dict__, "supervised_epochs": args.supervised_epochs})
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    sample, store, timings = build_store(args.out, preset)
    assert sample.bigearthnet is not None

    results: dict[str, dict[str, list[float]]] = {}
    extra = rows(args.soft_loss, args.ablations)[2:]
    per_seed: list[dict[str, Any]] = []

    def record(name: str, metrics: dict[str, float]) -> None:
        for metric in METRICS:
            if metric in metrics:
                results.setdefault(name, {}).setdefault(metric, []).append(metrics[metric])

    for seed in args.seeds:
        checkpoints: dict[str, Path] = {}
        for row in rows(args.soft_loss, args.ablations):
            started = time.perf_counter()
            config = TrainConfig(
                store=store, out=str(args.out / f"ckpt-{len(checkpoints)}-seed{seed}"), backbone=preset.backbone,
                steps=preset.steps, batch_size=preset.batch_size, warmup_steps=max(1, preset.steps // 10),
                checkpoint_every=preset.steps, crop_size=preset.crop_size, device=preset.device, seed=seed,
                soft_loss=args.soft_loss, registered_model_name=None, log_system_metrics=False,
            )  # fmt: skip
            checkpoints[row.name] = run_training(config.model_copy(update=row.changes)).checkpoint
            timings[f"train {row.name} seed {seed}"] = time.perf_counter() - started
        started = time.perf_counter()
        first, *others = checkpoints
        evaluation = run_evaluation(
            EvaluateConfig(bigearthnet=str(sample.bigearthnet), probe_epochs=100, knn_k=10, seed=seed, plots=False,
                           out=str(args.out / "evaluation"),
                           baselines=[f"{name}={checkpoints[name]}" for name in others] + ["random", "image-stats"]),
            checkpoints[first],
        )  # fmt: skip
        timings[f"evaluate seed {seed}"] = time.perf_counter() - started
        for result in evaluation.results:
            name = first if result.encoder.startswith("SoftCon") else result.encoder
            record(name, result.metrics)
        started = time.perf_counter()
        supervised = supervised_reference(sample.bigearthnet, preset, seed)
        record("supervised on the evaluation labels (end to end)", supervised)
        timings[f"supervised seed {seed}"] = time.perf_counter() - started
        per_seed.append({"seed": seed, "results": {r.encoder: r.metrics for r in evaluation.results},
                         "supervised": supervised})  # fmt: skip
        elapsed = time.perf_counter() - total
        print(f"seed {seed} done ({elapsed:.0f} s):\n{tables(results, args.seeds, extra)}", flush=True)
        dump = {"preset": preset.__dict__, "args": {k: str(v) for k, v in vars(args).items()}, "timings": timings,
                "per_seed": per_seed, "results": results}  # fmt: skip
        (args.out / "paper_claim.json").write_text(json.dumps(dump, indent=1, default=str))
    markdown = tables(results, args.seeds, extra)
    (args.out / "paper_claim.md").write_text(markdown + "\n")
    timings["total"] = time.perf_counter() - total
    log_to_mlflow(args.out, markdown, results, timings)
    print(f"\n{markdown}\n\ntotal {timings['total']:.0f} s")


def log_to_mlflow(out: Path, markdown: str, results: dict[str, dict[str, list[float]]], timings: dict) -> None:
    """The comparison as an MLflow run: the table and JSON as artifacts, each row's mean as metrics."""
    import mlflow

    from softcon.flows.tracking import use_experiment

    with mlflow.start_run(experiment_id=use_experiment("paper-claim"), run_name="paper-claim"):
        mlflow.log_text(markdown, "comparison.md")
        mlflow.log_artifact(str(out / "paper_claim.json"))
        for name, metrics in results.items():
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60]
            for metric, values in metrics.items():
                mlflow.log_metric(f"{slug}.{metric}", float(np.mean(values)))
        mlflow.log_metric("seconds", timings["total"])


if __name__ == "__main__":
    main()
