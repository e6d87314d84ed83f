"""GPU training throughput: SoftCon against the plain supervised step, the loader, and end-to-end training.

For each backbone (ResNet-50, ViT-S/14, ViT-B/14) and batch size this builds the real training step
(``tasks.train.build_trainer``: student with Siamese masking, EMA teacher, SoftCon loss, AdamW, clipping, bf16
autocast, channels_last) and the plain supervised step of the same timm backbone, batch and precision (``objective:
supervised``: a linear multi-label head on the features, BCE, no masking, no teacher: one forward and backward of
the backbone), fed with batches read from a training store (two-view batches from the training loader:
``make_loader`` reading a ``defer_augment`` dataset, ``GpuAugment`` on the device; kept there and cycled, so the
figure is the step's speed, not the loader's). It reports per row:

    samples/s     scenes per second over the timed steps (after warm-up), synchronised
    peak memory   torch.cuda.max_memory_allocated over the timed steps (GiB)
    MFU           model FLOPs per step (counted by torch.utils.flop_counter on one step) x steps/s / the device's
                  dense bf16 peak (H100/H200 SXM 989 TFLOP/s, A100 312, L40S 362, L4 121; --peak-tflops overrides)

and per (backbone, batch) the ratio SoftCon / supervised samples/s: what the method costs over supervised training
of the same network. Two more modes:

    --loader-table W1xT1,W2xT2,...   the training loader's samples/s alone for each (workers x decode threads)
    --e2e                            ``run_training`` (the loop ``softcon train`` runs: the production loader,
                                     GpuAugment, the step, log windows, checkpoints) on the store, against the
                                     step-only rate of the same configuration; under torchrun it is DDP over the
                                     ranks and rank 0 reports

Without ``--store`` a synthetic store in the preprocess stage's layout is written to a temporary folder
(``preprocess_layout_store``: 12 bands, ``--size``-px patches, shards of 64 samples, inner chunks of one sample,
the store's image codec). Rows go to ``--json`` after each one (a run cut short keeps what it measured) and the
tables to ``--markdown`` (likewise). Usage:

    python bench/gpu_train.py                                   # H200: three backbones, 224 px, bf16
    python bench/gpu_train.py --store data/store.zarr --batch-sizes 128,256,512 --compile
    python bench/gpu_train.py --device cpu --steps 2 --size 64  # smoke mode (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcon.config import S2_L2A_BANDS, TrainConfig  # noqa: E402
from softcon.models import training_store  # noqa: E402
from softcon.models.data import BlockShuffleSampler, GpuAugment, StoreDataset, make_loader  # noqa: E402
from softcon.models.encoder import is_vit  # noqa: E402
from softcon.tasks.train import build_trainer, run_training  # noqa: E402

MODELS = ("resnet50", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2")
OBJECTIVES = ("softcon", "supervised")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity)."""
SHARD = 64
"""Samples per shard of the synthetic store: the preprocess stage's default ``samples_per_block``."""


@dataclass
class Row:
    model: str
    objective: str
    compiled: bool
    size: int
    batch_size: int
    samples_per_second: float
    peak_memory_gib: float | None
    gflops_per_step: float
    tflops_per_second: float
    mfu: float | None


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def preprocess_layout_store(path: Path, n_samples: int, size: int, seed: int = 0) -> Path:
    """A training store of ``n_samples`` in the preprocess stage's layout: 12 bands, ``size`` px, shards of 64.

    Two dates per location, three of four locations in the train split, random multi-hot labels over 8 classes.
    One block of smooth noisy patches is compressed with the store's codec and its shard file copied to the
    others (same bytes, same decode cost as a real shard; a 2,000-sample store is written in seconds).
    """
    rng = np.random.default_rng(seed)
    n_samples = max(SHARD, n_samples - n_samples % SHARD)
    n_bands, n_classes = len(S2_L2A_BANDS), 8
    locations = np.arange(n_samples) // 2
    labels = (rng.random((n_samples // 2, n_classes)) < 0.3).astype(np.uint8).repeat(2, axis=0)
    labels[labels.sum(1) == 0, 0] = 1
    plan = training_store.SamplePlan(
        location=locations.astype(np.int64),
        tile=np.zeros(n_samples, np.int32),
        time=np.datetime64("2024-06-01", "ns") + (np.arange(n_samples) % 2) * np.timedelta64(10, "D"),
        row=np.zeros(n_samples, np.int32),
        col=np.zeros(n_samples, np.int32),
        split=np.where(locations % 4 == 3, 1, 0).astype(np.uint8),
        labels=labels,
        fractions=labels / labels.sum(1, keepdims=True).astype(np.float32),
        labelled=np.ones(n_samples, bool),
    )
    ramp = np.linspace(0, 6, size)
    field = 400 * np.sin(ramp[:, None] * rng.uniform(0.5, 2, (SHARD, 1, 1, 1)) + ramp[None, :])
    base = rng.normal(1500, 400, (SHARD, n_bands, 1, 1))
    block = np.clip(base + field + rng.normal(0, 50, (SHARD, n_bands, size, size)), 1, 10_000).astype(np.uint16)
    stats = {"mean": block.mean(axis=(0, 2, 3)).tolist(), "std": block.std(axis=(0, 2, 3)).tolist()}
    attrs = {
        "bands": list(S2_L2A_BANDS), "pols": ["VV", "VH"], "class_names": [f"class{k}" for k in range(n_classes)],
        "split_names": ["train", "val", "test"], "norm_stats": {"s2": stats},
    }  # fmt: skip
    training_store.create_store(
        str(path), plan, n_bands=n_bands, n_pols=2, patch_size=size, samples_per_block=SHARD, attrs=attrs
    )
    training_store.write_images(str(path), 0, block, np.full((SHARD, 2, size, size), np.nan, np.float32))
    shard = path / "s2" / "c" / "0" / "0" / "0" / "0"
    for index in range(1, n_samples // SHARD):
        target = path / "s2" / "c" / str(index) / "0" / "0" / "0"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, target)
    return path


def synthetic_store(folder: Path, size: int, n_samples: int) -> Path:
    """A preprocess-layout store in ``folder`` whose train split holds at least ``n_samples``."""
    return preprocess_layout_store(folder / "store.zarr", math.ceil(n_samples / 0.75) + 2 * SHARD, size)


class EpochsSampler(BlockShuffleSampler):
    """``epochs`` block-shuffled epochs in one order, so one loader (one start of its workers) runs them all."""

    def __init__(self, dataset: StoreDataset, epochs: int) -> None:
        super().__init__(dataset, seed=0)
        self.epochs = epochs

    def __iter__(self) -> Iterator[int]:
        for epoch in range(self.epochs):
            self.set_epoch(epoch)
            yield from super().__iter__()

    def __len__(self) -> int:
        return self.epochs * super().__len__()


def side_for(model: str, size: int) -> int:
    """Input side: ``size``, floored to a multiple of the patch size for ViTs (14 px: 224 stays 224)."""
    if not is_vit(model):
        return size
    patch = int(model.split("patch")[1].split("_")[0])
    return size - size % patch


def load_batches(
    store: Path,
    side: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    *,
    workers: int = 0,
    threads: int = 1,
    loader_batches: int = 0,
) -> tuple[list[dict], float]:
    """``n_batches`` two-view batches on the device, and the samples/s of the training loader that made them.

    The loader is the one training uses with a GPU: ``make_loader`` over a ``defer_augment`` dataset (reads and
    decodes in ``workers`` processes, or on ``threads`` threads in this one; pinned batches) and ``GpuAugment``
    on ``device`` (crops, flips, turns, normalisation); its rate is counted from the first batch over
    ``loader_batches`` more, repeating epochs over the store (NaN for 0), and compared with the step's rate it
    says whether the GPU would wait for data.
    """
    dataset = StoreDataset(
        store, "train", "s2", two_views=True, crop_size=side, seed=0, defer_augment=True, decode_threads=threads
    )
    if len(dataset) < batch_size * n_batches:
        raise ValueError(f"the store's train split has {len(dataset)} samples, need {batch_size * n_batches}")
    per_epoch = len(dataset) // batch_size
    sampler = EpochsSampler(dataset, epochs=math.ceil((max(loader_batches, n_batches) + 1) / per_epoch))
    augment = GpuAugment(dataset, device)
    batches: list[dict] = []
    started, timed = 0.0, 0
    for batch in make_loader(dataset, batch_size, sampler=sampler, num_workers=workers):
        views = augment(batch)
        if len(batches) < n_batches:
            batches.append(views)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not started:
            started = time.perf_counter()
        else:
            timed += 1
        if timed >= loader_batches and len(batches) == n_batches:
            break
    load_rate = batch_size * timed / (time.perf_counter() - started) if timed else float("nan")
    return batches, load_rate


def grown(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``batch`` repeated along the batch axis to ``size`` scenes (the step's speed does not depend on the data)."""
    repeats = math.ceil(size / len(batch["view_a"]))
    return {key: value.repeat(repeats, *([1] * (value.dim() - 1)))[:size] for key, value in batch.items()}


def step_config(args: argparse.Namespace, store: Path, model: str, objective: str, batch_size: int) -> TrainConfig:
    """The training configuration of one row: SoftCon as trained, or the plain supervised step of the backbone."""
    total = args.warmup + args.steps
    plain = {"mask_ratio": 0.0, "teacher": "stop_gradient"} if objective == "supervised" else {}
    return TrainConfig(
        store=str(store), backbone=model, batch_size=batch_size, steps=total, warmup_steps=1, device=str(args.device),
        precision=args.precision, compile=args.compile, embed_dim=128, lambda_soft=1.0, objective=objective, **plain,
    )  # fmt: skip


def count_step_flops(trainer, batch: dict) -> float:
    """FLOPs of one step's model math: student forward + backward, and SoftCon's teacher forward."""
    view_a, view_b = batch["view_a"], batch["view_b"]
    B, _, H, W = view_a.shape
    config = trainer.config
    mask = trainer.student.make_mask(B, H, W, ratio=config.mask_ratio, patch=config.mask_patch, generator=None)
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            z, logits = trainer.student(view_a, mask.to(view_a.device))
            if not trainer.supervised:
                with torch.no_grad():
                    trainer.teacher(view_b)
        (logits if trainer.supervised else z).float().sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_step(args: argparse.Namespace, config: TrainConfig, batches: list[dict], side: int) -> Row:
    """Warm-up, then ``args.steps`` timed steps of ``config``'s trainer on ``batches`` (cycled on the device)."""
    device = torch.device(args.device)
    first = batches[0]
    trainer = build_trainer(
        config, first["view_a"].shape[1], bands=None, img_size=side, n_classes=first["labels"].shape[1], device=device
    )
    flops = count_step_flops(trainer, first)
    for step in range(args.warmup):
        trainer.step(batches[step % len(batches)], step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        terms = trainer.step(batches[step % len(batches)], step)
    float(terms["loss"])  # waits for the last step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps_per_second = args.steps / (time.perf_counter() - started)
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops * steps_per_second / 1e12
    row = Row(
        model=config.backbone, objective=config.objective, compiled=config.compile, size=side,
        batch_size=config.batch_size, samples_per_second=config.batch_size * steps_per_second,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        gflops_per_step=flops / 1e9, tflops_per_second=achieved, mfu=achieved / peak if peak else None,
    )  # fmt: skip
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def step_rows(args: argparse.Namespace, store: Path, record: Callable[[Row], None]) -> list[Row]:
    """Every (backbone, batch size, objective) row; each handed to ``record`` as soon as it is measured."""
    device = torch.device(args.device)
    rows: list[Row] = []
    for model in args.models:
        side = side_for(model, args.size)
        loaded, load_rate = load_batches(
            store, side, min(args.batch_sizes), args.n_batches, device, workers=args.workers,
            threads=args.decode_threads, loader_batches=args.loader_batches,
        )  # fmt: skip
        print(f"training loader at {side} px ({args.workers} workers x {args.decode_threads} decode threads, "
              f"GpuAugment on {device.type}): {load_rate:.1f} samples/s")  # fmt: skip
        for batch_size in args.batch_sizes:
            batches = [grown(batch, batch_size) for batch in loaded]
            for objective in args.objectives:
                row = bench_step(args, step_config(args, store, model, objective, batch_size), batches, side)
                rows.append(row)
                record(row)
            del batches
    return rows


def loader_table(args: argparse.Namespace, store: Path) -> list[dict[str, Any]]:
    """The training loader's samples/s (two views, GpuAugment on the device) per (workers, decode threads)."""
    device = torch.device(args.device)
    side = side_for(args.models[0], args.size)
    rows = []
    for combo in args.loader_table.split(","):
        workers, threads = (int(v) for v in combo.split("x"))
        _, rate = load_batches(
            store, side, min(args.batch_sizes), 1, device, workers=workers, threads=threads,
            loader_batches=args.loader_batches,
        )  # fmt: skip
        rows.append({"workers": workers, "decode_threads": threads, "size": side, "samples_per_second": rate})
        print(f"loader {workers} workers x {threads} decode threads, {side} px: {rate:.1f} samples/s")
    return rows


def end_to_end(args: argparse.Namespace, store: Path, out: Path) -> dict[str, Any] | None:
    """``run_training`` on the store against the step alone (same configuration); None on ranks other than 0."""
    model, batch_size = args.models[0], args.batch_sizes[0]
    side = side_for(model, args.size)
    config = step_config(args, store, model, "softcon", batch_size).model_copy(
        update={"crop_size": side, "out": str(out), "log_every": max(1, args.steps // 4),
                "checkpoint_every": 10**6, "num_workers": args.workers, "decode_threads": args.decode_threads or None}
    )  # fmt: skip
    logged: list[float] = []
    result = run_training(config, on_metrics=lambda step, metrics: logged.append(metrics["samples_per_second"]))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trained = logged[1:] or logged  # the first window holds the start-up (workers, cudnn autotuning)
    row: dict[str, Any] = {
        "model": model, "batch_size": batch_size, "size": side, "world_size": world, "steps": result.steps,
        "e2e_samples_per_second": float(np.median(trained)), "e2e_whole_run_samples_per_second":
        result.samples_per_second, "workers": args.workers, "decode_threads": args.decode_threads,
    }  # fmt: skip
    if world == 1:
        device = torch.device(args.device)
        batches, _ = load_batches(store, side, batch_size, args.n_batches, device)
        step = bench_step(args, step_config(args, store, model, "softcon", batch_size), batches, side)
        row["step_only_samples_per_second"] = step.samples_per_second
        row["e2e_over_step"] = row["e2e_samples_per_second"] / step.samples_per_second
    print(json.dumps(row))
    return row


def markdown(rows: list[Row], precision: str, device_name: str) -> str:
    """The rows as a table, and SoftCon / supervised per (backbone, batch, compiled)."""
    lines = [
        f"SoftCon training step on {device_name}, {precision}",
        "",
        "| model | objective | compiled | px | batch | samples/s | peak GiB | GFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = f"{row.peak_memory_gib:.1f}" if row.peak_memory_gib is not None else "n/a"
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "n/a"
        lines.append(
            f"| {row.model} | {row.objective} | {row.compiled} | {row.size} | {row.batch_size} | "
            f"{row.samples_per_second:.1f} | {memory} | {row.gflops_per_step:.1f} | {row.tflops_per_second:.2f} | "
            f"{mfu} |"
        )
    pairs = {(r.model, r.batch_size, r.compiled, r.objective): r.samples_per_second for r in rows}
    ratios = [
        f"| {model} | {batch} | {compiled} | {rate / pairs[(model, batch, compiled, 'supervised')]:.2f} |"
        for (model, batch, compiled, objective), rate in pairs.items()
        if objective == "softcon" and (model, batch, compiled, "supervised") in pairs
    ]
    if ratios:
        lines += ["", "SoftCon / supervised samples/s (same backbone, batch, precision)", "",
                  "| model | batch | compiled | ratio |", "|---|---|---|---|", *ratios]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="training store; default a synthetic one of --size px")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu (smoke mode)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="softcon and/or supervised")
    parser.add_argument("--size", type=int, default=224, help="input side in px (ViTs: floored to the patch)")
    parser.add_argument("--batch-sizes", help="comma-separated; default 128 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 10 on CUDA, 1 on CPU")
    parser.add_argument("--n-batches", type=int, default=1, help="distinct store batches cycled on the device")
    parser.add_argument("--workers", type=int, help="loader worker processes; default 0")
    parser.add_argument("--decode-threads", type=int, help="decode threads per loader process; default cores - 1 "
                        "up to 8 on CUDA with 0 workers, else 1")  # fmt: skip
    parser.add_argument("--loader-batches", type=int, default=20, help="batches timed for the loader's rate")
    parser.add_argument("--loader-table", help="only the loader's rate, per WORKERSxTHREADS, e.g. 0x1,0x4,4x1")
    parser.add_argument("--e2e", action="store_true", help="only run_training against the step (first model, batch)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default from the device name)")
    parser.add_argument("--json", type=Path, help="also write the rows here (after each one)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; for a smoke run use --device cpu --steps 2 --size 64")
    cpu = device.type == "cpu"
    args.models = args.models.split(",")
    args.objectives = args.objectives.split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("4" if cpu else "128")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    args.workers = args.workers or 0
    if args.decode_threads is None:
        cores = len(os.sched_getaffinity(0))
        args.decode_threads = 1 if cpu or args.workers else max(1, min(8, cores - 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="softcon-gpu-bench-") as folder:
        wanted = max(args.batch_sizes) * max(args.n_batches, 4 if args.e2e else 1)
        store = args.store or synthetic_store(Path(folder), 264 if args.size == 224 else args.size, wanted)
        if args.loader_table:
            table = loader_table(args, store)
            if args.json:
                args.json.write_text(json.dumps(table, indent=2))
            return []
        if args.e2e:
            row = end_to_end(args, store, Path(folder) / "checkpoints")
            if args.json and row is not None:
                args.json.write_text(json.dumps(row, indent=2))
            return []
        rows: list[Row] = []
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

        def record(row: Row) -> None:
            rows.append(row)
            print(f"{row.model} {row.objective} batch {row.batch_size}: {row.samples_per_second:.1f} samples/s")
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
            if args.markdown:
                args.markdown.write_text(markdown(rows, args.precision, name))

        step_rows(args, store, record)

    print("\n" + markdown(rows, args.precision, name))
    return rows


if __name__ == "__main__":
    main()
