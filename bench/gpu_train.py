"""GPU training throughput: ResNet-50 and ViT-S/14 SoftCon steps at 224 px in bf16 on one CUDA device.

For each backbone this builds the real training step (``tasks.train.build_trainer``: student with Siamese
masking, EMA teacher, SoftCon loss, AdamW, clipping, bf16 autocast, channels_last) and feeds it batches read
from a training store (two-view batches from the training loader: ``make_loader`` workers reading a
``defer_augment`` dataset, ``GpuAugment`` on the device; kept there and cycled, so the figure is the step's
speed, not the loader's). The loader's own rate, and its ratio to the step's, is reported on its own row:
below 1x the GPU would wait for data. It reports:

    samples/s     scenes per second over the timed steps (after warm-up), synchronised
    peak memory   torch.cuda.max_memory_allocated over the timed steps (GiB)
    MFU           model FLOPs per step (student forward + backward, teacher forward, counted by
                  torch.utils.flop_counter on one step) x steps/s / the device's dense bf16 peak
                  (H100/H200 SXM 989 TFLOP/s, A100 312, L40S 362, L4 121; --peak-tflops to override)

Without ``--store`` a synthetic 12-band store of ``--size`` px patches is written to a temporary folder with
the test suite's seeded generator (tests/store_factory.py). Usage:

    python bench/gpu_train.py                                   # H200: both models, 224 px, bf16
    python bench/gpu_train.py --store data/store.zarr --batch-size 256 --compile
    python bench/gpu_train.py --device cpu --steps 2 --size 64  # smoke mode (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcon.config import TrainConfig  # noqa: E402
from softcon.models.data import BlockShuffleSampler, GpuAugment, StoreDataset, make_loader  # noqa: E402
from softcon.models.encoder import is_vit  # noqa: E402
from softcon.tasks.train import build_trainer  # noqa: E402

MODELS = ("resnet50", "vit_small_patch14_dinov2")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity)."""


@dataclass
class Row:
    model: str
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


def synthetic_store(folder: Path, size: int, n_samples: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from store_factory import write_store

    # 60 % of locations are the train split; 2 dates per location give the two views; shards of 32
    # one-sample chunks as the preprocess stage writes them (the loader's fast path)
    n_locations = max(8, math.ceil(n_samples / 2 / 0.6))
    return write_store(folder / "store.zarr", n_locations=n_locations, dates_per_location=2, size=size,
                       sharded=True, chunk=32).path  # fmt: skip


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
    workers: int,
    threads: int,
    loader_batches: int,
) -> tuple[list[dict], float]:
    """``n_batches`` two-view batches on the device, and the samples/s of the training loader that made them.

    The loader is the one training uses with a GPU: ``make_loader`` over a ``defer_augment`` dataset (reads and
    decodes in ``workers`` processes, or on ``threads`` threads in this one; pinned batches) and ``GpuAugment``
    on ``device`` (crops, flips, turns, normalisation); its rate is counted from the first batch over
    ``loader_batches`` more, repeating epochs over the store, and compared with the step's rate it says whether
    the GPU would wait for data.
    """
    dataset = StoreDataset(
        store, "train", "s2", two_views=True, crop_size=side, seed=0, defer_augment=True, decode_threads=threads
    )
    if len(dataset) < batch_size * n_batches:
        raise ValueError(f"the store's train split has {len(dataset)} samples, need {batch_size * n_batches}")
    per_epoch = len(dataset) // batch_size
    sampler = EpochsSampler(dataset, epochs=math.ceil((loader_batches + 1) / per_epoch))
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
        if timed == loader_batches:
            break
    load_rate = batch_size * timed / (time.perf_counter() - started) if timed else float("nan")
    return batches, load_rate


def count_step_flops(trainer, batch: dict) -> float:
    """FLOPs of one step's model math: student forward + backward on the masked view, teacher forward."""
    view_a, view_b = batch["view_a"], batch["view_b"]
    B, _, H, W = view_a.shape
    mask = trainer.student.make_mask(B, H, W, ratio=0.3, patch=trainer.config.mask_patch, generator=None)
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            z, _ = trainer.student(view_a, mask.to(view_a.device))
            with torch.no_grad():
                trainer.teacher(view_b)
        z.float().sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_model(args: argparse.Namespace, model: str, store: Path, device: torch.device) -> tuple[Row, float]:
    side = side_for(model, args.size)
    batches, load_rate = load_batches(
        store, side, args.batch_size, args.n_batches, device,
        workers=args.workers, threads=args.decode_threads, loader_batches=args.loader_batches,
    )  # fmt: skip
    total = args.warmup + args.steps
    config = TrainConfig(
        store=str(store), backbone=model, batch_size=args.batch_size, steps=total, warmup_steps=1, device=str(device),
        precision=args.precision, compile=args.compile, embed_dim=128, lambda_soft=1.0,
    )  # fmt: skip
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
    for step in range(args.warmup, total):
        terms = trainer.step(batches[step % len(batches)], step)
    float(terms["loss"])  # waits for the last step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    steps_per_second = args.steps / seconds
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops * steps_per_second / 1e12
    row = Row(
        model=model,
        size=side,
        batch_size=args.batch_size,
        samples_per_second=args.batch_size * steps_per_second,
        peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        gflops_per_step=flops / 1e9,
        tflops_per_second=achieved,
        mfu=achieved / peak if peak else None,
    )
    del trainer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, load_rate


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="training store; default a synthetic one of --size px")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu (smoke mode)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--size", type=int, default=224, help="input side in px (ViTs: floored to the patch)")
    parser.add_argument("--batch-size", type=int, help="default 128 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 10 on CUDA, 1 on CPU")
    parser.add_argument("--n-batches", type=int, default=4, help="distinct store batches cycled on the device")
    parser.add_argument("--workers", type=int, help="loader worker processes; default cores - 1 up to 8, 0 on CPU")
    parser.add_argument("--decode-threads", type=int, default=1, help="decode threads per loader process")
    parser.add_argument("--loader-batches", type=int, default=20, help="batches timed for the loader's rate")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default from the device name)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; for a smoke run use --device cpu --steps 2 --size 64")
    cpu = device.type == "cpu"
    args.batch_size = args.batch_size or (4 if cpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    if args.workers is None:
        args.workers = 0 if cpu else max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="softcon-gpu-bench-") as folder:
        store = args.store or synthetic_store(Path(folder), args.size, args.batch_size * args.n_batches)
        rows, load_rates = [], []
        for model in args.models.split(","):
            row, load_rate = bench_model(args, model, store, device)
            rows.append(row)
            load_rates.append(load_rate)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nSoftCon training step on {name}, {args.precision}, batch {args.batch_size}, {args.steps} timed steps")
    header = ("model", "px", "samples/s", "peak GiB", "GFLOP/step", "TFLOP/s", "MFU")
    widths = (28, 4, 10, 9, 11, 8, 6)
    cells = [f"{h:{w}s}" if i == 0 else f"{h:>{w}s}" for i, (h, w) in enumerate(zip(header, widths, strict=True))]
    print(" ".join(cells))
    for row in rows:
        memory = f"{row.peak_memory_gib:9.1f}" if row.peak_memory_gib is not None else f"{'n/a':>9s}"
        mfu = f"{row.mfu:6.1%}" if row.mfu is not None else f"{'n/a':>6s}"
        print(
            f"{row.model:28s} {row.size:4d} {row.samples_per_second:10.1f} {memory} "
            f"{row.gflops_per_step:11.1f} {row.tflops_per_second:8.2f} {mfu}"
        )
    for row, rate in zip(rows, load_rates, strict=True):
        print(
            f"training loader at {row.size} px ({args.workers} workers x {args.decode_threads} decode threads, "
            f"GpuAugment on {device.type}): "
            f"{rate:.1f} samples/s, {rate / row.samples_per_second:.2f}x the {row.model} step"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
