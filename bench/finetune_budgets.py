"""Did pretraining help, on the structured sample world: fine-tuning of a SoftCon ResNet-18 vs random init vs image
statistics at label budgets of 1 %, 10 % and 100 % of the train split, over seeds (``tasks/finetune_budgets.py``, the
rows ``softcon compare --finetune-task`` adds).

The world (``write_sample_data(world="structured")``, docs/sample_world.md) goes through the real stages: a local
STAC API, ingest, labels from its Dynamic-World-like map (scheme ``dynamic-world``), preprocess with per-pixel masks.
A SoftCon ResNet-18 is pretrained briefly on the store; then, for segmentation (masks) and multilabel (the store's
labels), each budget and seed fine-tunes the pretrained encoder, a random init of ResNet-18 and (multilabel) a
logistic head on per-band mean and std, all on the same label subset. The tables (test metrics, mean ± 95 %
t-interval over the seeds) go to ``<out>/finetune_budgets.md``; each task's per-seed runs and figure to
``<out>/<task>/``.

Full run (12 min 38 s on 2 partly shared CPU cores, 2026-12-02; its table is in the README):

    python bench/finetune_budgets.py --out /tmp/finetune_budgets

Smoke run (tiny world, budgets 10 % and 100 %, 1 seed, 1 epoch, about 2 minutes; checks the path end to end, its
numbers mean nothing):

    python bench/finetune_budgets.py --out /tmp/finetune_budgets_smoke --smoke
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from paper_claim import build_store

from softcon.config import FinetuneConfig, TrainConfig
from softcon.tasks.finetune_budgets import budget_table, run_budgets, write_budget_report
from softcon.tasks.train import run_training

TASKS = ("segmentation", "multilabel")


@dataclass(frozen=True)
class Preset:
    """Sizes of one run of the bench."""

    tiles: int
    tile_size: int
    dates: int
    patch_size: int
    steps: int
    """Pretraining steps."""
    batch_size: int
    """Pretraining batch."""
    epochs: int
    """Fine-tuning epochs at most (patience 5)."""
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]
    """Label budgets; each must leave 2 train patches at least (BatchNorm cannot train on one 1 x 1 map)."""


PRESETS = {
    # 4 tiles x 4 dates of 256 px, 32 px patches: about 370 train patches, so 1 % is 4 of them.
    "full": Preset(tiles=4, tile_size=256, dates=4, patch_size=32, steps=300, batch_size=64, epochs=10,
                   seeds=(0, 1, 2), budgets=(0.01, 0.1, 1.0)),
    # 23 train patches: 1 % would be one
    "smoke": Preset(tiles=2, tile_size=128, dates=2, patch_size=32, steps=4, batch_size=16, epochs=1, seeds=(0,),
                    budgets=(0.1, 1.0)),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".softcon/finetune_budgets"))
    parser.add_argument("--smoke", action="store_true", help="Tiny world, 1 seed, 1 epoch: the path, not numbers.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args()
    preset = PRESETS["smoke" if args.smoke else "full"]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, store, _ = build_store(args.out, preset, masks=True)  # paper_claim's world and store, with masks
    print(f"store built ({time.perf_counter() - started:.0f} s)", flush=True)
    pretraining = TrainConfig(
        store=store, out=str(args.out / "ckpt"), backbone="resnet18", steps=preset.steps,
        batch_size=preset.batch_size, warmup_steps=max(1, preset.steps // 10), checkpoint_every=preset.steps,
        device="cpu", seed=0, registered_model_name=None, log_system_metrics=False,
    )  # fmt: skip
    checkpoint = run_training(pretraining).checkpoint
    print(f"pretrained ({time.perf_counter() - started:.0f} s)", flush=True)
    tables = []
    for task in TASKS:
        config = FinetuneConfig(model=str(checkpoint), task=task, store=store, epochs=preset.epochs, batch_size=32,
                                device="cpu", out=str(args.out / task))  # fmt: skip
        runs = run_budgets(config, checkpoint, preset.budgets, preset.seeds, args.out / task / "runs",
                           on_run=lambda run: print(f"  {run.encoder}, budget {run.budget:g}, seed {run.seed}: "
                                                    f"{run.metrics}", flush=True))  # fmt: skip
        write_budget_report(runs, task, args.out / task)
        tables.append(f"## {task}\n\n{budget_table(runs, task)}")
        print(f"{task} done ({time.perf_counter() - started:.0f} s)", flush=True)
    markdown = "\n".join(tables)
    (args.out / "finetune_budgets.md").write_text(markdown)
    print(f"\n{markdown}\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
