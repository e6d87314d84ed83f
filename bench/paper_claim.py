"""The paper's claim at small scale: SoftCon's linear-probe micro mAP vs hard contrastive vs random init.

On demo-style data (generated Sentinel-like scenes and a WorldCover-format map behind a local STAC API,
through the real ingest -> labels -> preprocess stages), trains a ResNet-18 with SoftCon (lambda=1) and
with the hard-contrastive baseline (lambda=0) for each of 3 seeds, and evaluates both, a random-init
encoder and the per-band image-statistics baseline under one protocol (``tasks.evaluate.run_evaluation``)
on the store's test split. Prints one row per encoder with mean ± std over seeds and the per-seed values,
the training loss terms, and writes everything to ``<out>/paper_claim.json``.

Sized to finish in about 10-15 minutes on 2 CPU cores (``--steps``, ``--batch-size``, ``--tiles`` change it):

    python bench/paper_claim.py --out /tmp/paper_claim
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from softcon.config import EvaluateConfig, IngestConfig, LabelsConfig, PreprocessConfig, TrainConfig
from softcon.tasks.evaluate import run_evaluation
from softcon.tasks.ingest import run_ingest
from softcon.tasks.labels import run_labels
from softcon.tasks.preprocess import run_preprocess
from softcon.tasks.sample_data import write_sample_data
from softcon.tasks.stac_server import serve_stac
from softcon.tasks.train import run_training


def build_store(out: Path, *, tiles: int, tile_size: int, dates: int) -> tuple[str, dict[str, float]]:
    """Sample data -> local STAC API -> ingest -> labels -> preprocess; returns the store and timings."""
    timings = {}
    started = time.perf_counter()
    sample = write_sample_data(out / "sample", tiles=tiles, tile_size=tile_size, dates=dates, seed=0)
    timings["sample_data"] = time.perf_counter() - started
    cube, store = str(out / "cube.zarr"), str(out / "store.zarr")
    with serve_stac([sample.items_file]) as stac_url:
        started = time.perf_counter()
        run_ingest(
            IngestConfig(
                stac=stac_url,
                collections=["sentinel-2-l2a", "sentinel-1-rtc"],
                bbox=sample.bbox,
                start=sample.start,
                end=sample.end,
                tile_size=tile_size,
                cube=cube,
            )
        )
        timings["ingest"] = time.perf_counter() - started
        started = time.perf_counter()
        run_labels(LabelsConfig(cube=cube, source=stac_url, collection="esa-worldcover", scheme="worldcover"))
        timings["labels"] = time.perf_counter() - started
    started = time.perf_counter()
    report = run_preprocess(
        PreprocessConfig(
            cube=cube, out=store, patch_size=32, split_block=64, val_fraction=0.15, test_fraction=0.25, n_workers=1
        )
    )
    timings["preprocess"] = time.perf_counter() - started
    print(f"store: {report}")
    return store, timings


def spread(values: np.ndarray) -> str:
    """mean ± sample standard deviation."""
    return f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".softcon/paper_claim"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lambda-soft", type=float, default=1.0)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--store", help="Reuse this training store instead of building one.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when seeds run in parallel).")
    parser.add_argument(
        "--table-from", type=Path, nargs="+", help="Only print the table of these paper_claim.json files (merged)."
    )
    args = parser.parse_args()
    if args.table_from:
        print_table([run for path in args.table_from for run in json.loads(path.read_text())["runs"]])
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()

    if args.store:
        store, timings = args.store, {}
    else:
        store, timings = build_store(args.out, tiles=args.tiles, tile_size=args.tile_size, dates=args.dates)
    runs = []
    for seed in args.seeds:
        checkpoints, losses = {}, {}
        for name, lam in (("softcon", args.lambda_soft), ("hard", 0.0)):
            history: list[dict[str, float]] = []
            started = time.perf_counter()
            done = args.out / f"ckpt-{name}-seed{seed}" / f"step_{args.steps:06d}.pt"
            if done.is_file():  # a finished run of this seed: evaluate it again, do not retrain
                checkpoints[name], losses[name] = done, []
                continue
            result = run_training(
                TrainConfig(
                    store=store,
                    out=str(args.out / f"ckpt-{name}-seed{seed}"),
                    backbone="resnet18",
                    lambda_soft=lam,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    warmup_steps=max(1, args.steps // 10),
                    checkpoint_every=args.steps,
                    device="cpu",
                    seed=seed,
                ),
                on_metrics=lambda step, metrics, history=history: history.append({"step": step, **metrics}),
            )
            timings[f"train_{name}_seed{seed}"] = time.perf_counter() - started
            checkpoints[name], losses[name] = result.checkpoint, history
            print(f"seed {seed} {name} (λ={lam}): {time.perf_counter() - started:.0f} s, last {history[-1]}")
        started = time.perf_counter()
        evaluation = run_evaluation(
            EvaluateConfig(
                store=store,
                baselines=[f"hard contrastive (λ=0)={checkpoints['hard']}", "random", "image-stats"],
                probe_epochs=100,
                seed=seed,
                out=str(args.out / "evaluation"),
            ),
            checkpoints["softcon"],
        )
        timings[f"evaluate_seed{seed}"] = time.perf_counter() - started
        runs.append(
            {
                "seed": seed,
                "results": [{"encoder": r.encoder, **r.metrics} for r in evaluation.results],
                "train_history": losses,
            }
        )
        print(f"seed {seed}: " + ", ".join(f"{r.encoder} {100 * r.metrics['linear_map_micro']:.1f}"
                                           for r in evaluation.results))  # fmt: skip
        timings["total"] = time.perf_counter() - total
        (args.out / "paper_claim.json").write_text(  # after every seed, so a stopped run keeps what it did
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "timings": timings, "runs": runs}, indent=1)
        )
    print_table(runs)
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def print_table(runs: list[dict]) -> None:
    """One row per encoder: mean ± std over the runs' seeds, and the per-seed values."""
    rows: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for result in run["results"]:
            name = "SoftCon" if result["encoder"].startswith("SoftCon") else result["encoder"]
            for metric in ("linear_map_micro", "linear_map_macro", "knn_map_micro"):
                rows.setdefault(name, {}).setdefault(metric, []).append(100 * result[metric])
    seeds = ", ".join(str(run["seed"]) for run in runs)
    print(f"\n| encoder | linear mAP micro (mean ± std, seeds {seeds}) | per seed | linear mAP macro | kNN mAP micro |")
    print("|---|---|---|---|---|")
    for name, metrics in rows.items():
        micro, macro, knn = (
            np.array(metrics[key]) for key in ("linear_map_micro", "linear_map_macro", "knn_map_micro")
        )
        print(
            f"| {name} | {spread(micro)} | {', '.join(f'{v:.1f}' for v in micro)} | {spread(macro)} | {spread(knn)} |"
        )


if __name__ == "__main__":
    main()
