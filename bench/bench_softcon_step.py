"""What the soft term costs: a SoftCon training step against the same step with lambda = 0, same run.

Both trainers (``tasks.train.build_trainer``: masking, student forward/backward, EMA teacher forward, loss,
AdamW, clipping, EMA update) are built from the same seed and stepped on the same batches from a training
store, interleaved in rounds (A, B, A, B, ...) so that load on the shared machine hits both alike; the figure
is the ratio of median step times. With lambda = 0 the soft term is evaluated under no_grad for logging only
(``models/loss.py``), so the difference is the soft term's graph: B x B label similarity, sigmoid-BCE and its
backward. A third row times that soft term alone (forward + backward) at growing batch sizes.

With ``--optimizer`` the same interleaved rounds compare the AdamW implementations instead: fused (one kernel
over all parameters, what ``Trainer`` uses), foreach (one kernel per operation over lists of tensors) and the
per-tensor loop (PyTorch's default on CPU), each on an otherwise identical SoftCon trainer.

    python bench/bench_softcon_step.py                       # CPU: resnet18, 64 px, batch 64
    python bench/bench_softcon_step.py --optimizer --size 32 # the demo's step (resnet18, 32 px, batch 64)
    python bench/bench_softcon_step.py --device cuda --backbone resnet50 --size 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_train import load_batches, synthetic_store  # noqa: E402

from softcon.config import TrainConfig  # noqa: E402
from softcon.models.loss import SoftConLoss  # noqa: E402
from softcon.tasks.train import build_trainer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAMBDAS = {"softcon": (1.0, {}), "lambda0": (0.0, {})}
"""The soft term's cost: SoftCon against lambda = 0, both with the trainer's AdamW."""
OPTIMIZERS = {
    "fused": (1.0, {"fused": True, "foreach": None}),
    "foreach": (1.0, {"fused": None, "foreach": True}),
    "per-tensor loop": (1.0, {"fused": None, "foreach": False}),
}
"""AdamW implementations, set on the trainer's parameter groups (its step reads them there)."""


def time_soft_term(batch_size: int, dim: int, classes: int, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of the soft term alone (forward + backward) on a (B, D) batch."""
    loss_fn = SoftConLoss(lambda_soft=1.0).to(device)
    z = F.normalize(torch.randn(batch_size, dim, device=device), dim=1).requires_grad_()
    z_teacher = F.normalize(torch.randn(batch_size, dim, device=device), dim=1)
    labels = (torch.rand(batch_size, classes, device=device) < 0.3).float()
    labelled = torch.ones(batch_size, dtype=torch.bool, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        similarity = z @ z_teacher.T
        target = torch.nn.functional.normalize(labels, dim=1) @ torch.nn.functional.normalize(labels, dim=1).T
        pair_mask = labelled[:, None] & labelled[None, :]
        loss_fn.soft_term(similarity, target, pair_mask).backward()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="training store; default a synthetic one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (each: steps of A, then of B)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--optimizer", action="store_true", help="compare AdamW fused / foreach / per-tensor loop")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="softcon-step-bench-") as folder:
        store = args.store or synthetic_store(Path(folder), args.size, args.batch_size * 2)
        batches, _ = load_batches(store, args.size, args.batch_size, 2, device)
        total = args.rounds * args.steps_per_round + 1
        variants = OPTIMIZERS if args.optimizer else LAMBDAS
        trainers = {}
        for name, (lambda_soft, implementation) in variants.items():
            torch.manual_seed(0)
            config = TrainConfig(
                store=str(store), backbone=args.backbone, batch_size=args.batch_size, steps=total, warmup_steps=1,
                device=str(device), lambda_soft=lambda_soft, embed_dim=128,
            )  # fmt: skip
            first = batches[0]
            trainers[name] = build_trainer(
                config, first["view_a"].shape[1], img_size=args.size, n_classes=first["labels"].shape[1], device=device
            )
            for group in trainers[name].optimizer.param_groups:
                group.update(implementation)
            trainers[name].step(batches[0], 0)  # warm-up: allocations, autotuning
        times: dict[str, list[float]] = {name: [] for name in trainers}
        step = 1
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                for i in range(args.steps_per_round):
                    sync(device)
                    started = time.perf_counter()
                    terms = trainer.step(batches[(step + i) % len(batches)], step + i)
                    float(terms["loss"])
                    times[name].append(time.perf_counter() - started)
            step += args.steps_per_round

    if args.optimizer:
        fused = statistics.median(times["fused"])
        print(f"\nAdamW implementations in the SoftCon step: {args.backbone}, {args.size} px, batch {args.batch_size}, "
              f"{device}")  # fmt: skip
        print(f"{'AdamW':34s} {'median step s':>14s} {'steps':>6s} {'x fused':>8s}")
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, median in medians.items():
            print(f"{name:34s} {median:14.4f} {len(times[name]):6d} {median / fused:8.2f}")
        return medians
    softcon, baseline = statistics.median(times["softcon"]), statistics.median(times["lambda0"])
    overhead = (softcon - baseline) / softcon
    classes = batches[0]["labels"].shape[1]
    soft_alone = {b: time_soft_term(b, 128, 19, device) for b in (args.batch_size, 256, 1024)}
    print(f"\nSoftCon step vs lambda = 0: {args.backbone}, {args.size} px, batch {args.batch_size}, {device}")
    print(f"{'variant':34s} {'median step s':>14s} {'steps':>6s}")
    print(f"{'SoftCon (lambda = 1)':34s} {softcon:14.4f} {len(times['softcon']):6d}")
    print(f"{'hard contrastive (lambda = 0)':34s} {baseline:14.4f} {len(times['lambda0']):6d}")
    print(f"soft term share of the SoftCon step: {overhead:+.2%} (store classes: {classes})")
    for b, seconds in soft_alone.items():
        print(f"soft term alone, fwd+bwd, B={b:5d}, D=128, K=19: {seconds * 1e3:8.3f} ms")
    return {"softcon_s": softcon, "lambda0_s": baseline, "overhead": overhead}


if __name__ == "__main__":
    main()
