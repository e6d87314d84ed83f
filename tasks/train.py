"""Train stage: SoftCon pretraining of an encoder on a training store.

Read top to bottom, ``run_training`` is the whole method: build the data, the student (encoder +
projection head), its EMA teacher, the loss, the optimiser and the schedule; then for every step mask the
student's view (Siamese masking), embed both views, take the SoftCon loss, step, and move the teacher.

Checkpoint format (one ``torch.save`` file ``step_{step:06d}.pt`` in ``config.out``; state dicts and plain
values only, so ``torch.load(..., weights_only=True)`` reads it):

    format="softcon-checkpoint", version=1, step, config (TrainConfig as JSON-able dict),
    meta (backbone, in_chans, sensor, bands, norm_stats, embed_dim, img_size, class_names),
    student, projector, teacher, teacher_projector (module state dicts; uncompiled, no DDP prefix),
    loss (learnable scale/bias), optimizer, scheduler, rng (torch, cuda, numpy, python), metrics.

The evaluation encoder is the EMA teacher (``load_encoder``): as in BYOL/DINO it is the smoother,
usually better model, and it is what the student was trained to agree with.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.data import BlockShuffleSampler, StoreDataset
from models.ema import ema_momentum, ema_update, make_teacher
from models.encoder import build_encoder
from models.heads import ProjectionHead
from models.loss import SoftConLoss
from models.masking import apply_mask, random_patch_mask
from softcon.config import TrainConfig

CHECKPOINT_FORMAT = "softcon-checkpoint"
CHECKPOINT_VERSION = 1
LOG_EVERY = 10
KEEP_CHECKPOINTS = 2  # older periodic checkpoints are removed; each one holds two models and AdamW state


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    """The final checkpoint file."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    metrics: dict[str, float]
    """loss, instance, soft, embedding_std over the last logging window."""
    seconds: float
    """Wall time of this call."""
    samples_per_second: float
    """Training throughput of this call (scenes per second)."""
    in_chans: int
    backbone: str


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available (use 'auto' or 'cpu')")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR factor: linear warmup from 1/warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights and scalars (the loss scale and bias)."""
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest step in ``out``, or None."""
    checkpoints = sorted(out.glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a softcon training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {state.get('version')}, this code reads {CHECKPOINT_VERSION}")
    return state


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    random.setstate(state["python"])


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint as the latest."""
    partial_path = path.with_suffix(".pt.partial")
    torch.save(state, partial_path)
    partial_path.replace(path)


def run_training(
    config: TrainConfig, *, on_metrics: Callable[[int, dict[str, float]], None] | None = None
) -> TrainResult:
    """Pretrain an encoder with SoftCon on ``config.store`` and write checkpoints to ``config.out``.

    Args:
        config: the train stage configuration.
        on_metrics: called as ``on_metrics(step, metrics)`` every 10 steps and at the last step, with
            loss, instance, soft, lr, samples_per_second, embedding_std, ema_momentum, grad_norm,
            loss_scale, loss_bias (the Prefect flow logs them to MLflow).

    Returns:
        TrainResult with the final checkpoint.

    Example:
        >>> result = run_training(TrainConfig(store="data/store.zarr", steps=300, out="data/ckpt"))
        >>> encoder, meta = load_encoder(result.checkpoint)
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    seed_everything(config.seed)

    # data: two dates (or two augmentations) of each scene, block-shuffled
    dataset = StoreDataset(
        config.store, "train", config.sensor, two_views=True, crop_size=config.crop_size, seed=config.seed
    )
    if len(dataset) < config.batch_size:
        raise ValueError(
            f"the train split of {config.store} has {len(dataset)} samples, fewer than batch_size {config.batch_size}"
        )
    sampler = BlockShuffleSampler(dataset, seed=config.seed)
    steps_per_epoch = len(dataset) // config.batch_size  # drop_last: every batch has batch_size scenes
    img_size = config.crop_size or dataset.image_shape[1]

    # model: student encoder + projector, EMA teacher copies, loss with learnable scale and bias
    student = build_encoder(
        config.backbone, dataset.in_chans, config.weights, bands=dataset.channel_names, img_size=img_size
    )
    projector = ProjectionHead(student.num_features, config.embed_dim)
    teacher, teacher_projector = make_teacher(student), make_teacher(projector)
    loss_fn = SoftConLoss(
        temperature=config.temperature, lambda_soft=config.lambda_soft, label_similarity=config.label_similarity
    )
    for module in (student, projector, teacher, teacher_projector, loss_fn):
        module.to(device)
    if cuda:  # convolutions run faster in NHWC under bf16
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)

    trained = [student, projector, loss_fn]
    optimizer = torch.optim.AdamW(parameter_groups(trained, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=config.warmup_steps, total=config.steps)
    )
    parameters = [p for module in trained for p in module.parameters()]

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone": config.backbone,
        "in_chans": dataset.in_chans,
        "sensor": config.sensor,
        "bands": dataset.channel_names,
        "norm_stats": {"mean": dataset.mean.flatten().tolist(), "std": dataset.std.flatten().tolist()},
        "embed_dim": config.embed_dim,
        "img_size": img_size,
        "class_names": dataset.class_names,
    }

    def checkpoint_state(step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "config": config.model_dump(mode="json"),
            "meta": meta,
            "student": student.state_dict(),
            "projector": projector.state_dict(),
            "teacher": teacher.state_dict(),
            "teacher_projector": teacher_projector.state_dict(),
            "loss": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "metrics": metrics,
        }

    step = 0
    metrics: dict[str, float] = {}
    last = latest_checkpoint(out) if config.resume else None
    if last is not None:
        state = read_checkpoint(last)
        for key in ("backbone", "in_chans", "sensor", "embed_dim"):
            if state["meta"][key] != meta[key]:
                raise ValueError(f"cannot resume from {last}: its {key} is {state['meta'][key]!r}, now {meta[key]!r}")
        student.load_state_dict(state["student"])
        projector.load_state_dict(state["projector"])
        teacher.load_state_dict(state["teacher"])
        teacher_projector.load_state_dict(state["teacher_projector"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, metrics = state["step"], dict(state["metrics"])
    final = last

    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    window = {"loss": 0.0, "instance": 0.0, "soft": 0.0, "embedding_std": 0.0}
    window_sums = torch.zeros(4, device=device)  # loss, instance, soft, embedding_std; summed on device
    window_steps, window_start = 0, time.perf_counter()
    trained_samples, loop_start = 0, time.perf_counter()
    while step < config.steps:
        # each epoch's order and augmentations depend only on (seed, epoch): resuming mid-epoch skips
        # the batches already seen and gets exactly the batches a straight run would have
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        order = sampler.order()
        batches = [order[b * config.batch_size : (b + 1) * config.batch_size].tolist()
                   for b in range(skip, steps_per_epoch)]  # fmt: skip
        batches = batches[: config.steps - step]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers, pin_memory=cuda)
        for batch in loader:
            view_a = batch["view_a"].to(device, non_blocking=True)  # (B, C, H, W) student's view
            view_b = batch["view_b"].to(device, non_blocking=True)  # (B, C, H, W) teacher's view
            labels = batch["labels"].to(device, non_blocking=True)  # (B, K)
            fractions = batch["fractions"].to(device, non_blocking=True)  # (B, K)
            labelled = batch["labelled"].to(device, non_blocking=True)  # (B,)
            B, _, H, W = view_a.shape
            if cuda:
                view_a = view_a.contiguous(memory_format=torch.channels_last)
                view_b = view_b.contiguous(memory_format=torch.channels_last)

            # Siamese masking: the student sees view_a with random squares hidden; a generator seeded by
            # the step makes the mask independent of everything else that draws random numbers
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            mask = random_patch_mask(
                B, H, W, ratio=config.mask_ratio, patch=config.mask_patch, generator=generator, device=device
            )  # (B, 1, H, W)
            with autocast():
                z = projector(student(apply_mask(view_a, mask)))  # (B, D) unit norm
                with torch.no_grad():
                    z_teacher = teacher_projector(teacher(view_b))  # (B, D) unit norm
            terms = loss_fn(z, z_teacher, labels, labelled, fractions)

            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            scheduler.step()
            momentum = ema_momentum(step, config.steps, config.ema_momentum)
            ema_update(teacher, student, momentum)
            ema_update(teacher_projector, projector, momentum)
            step += 1
            trained_samples += B

            # collapse shows as embedding_std -> 0; a healthy spread on the unit sphere is ~1/sqrt(D)
            embedding_std = z.detach().std(dim=0).mean()
            window_sums += torch.stack([terms["loss"].detach(), terms["instance"], terms["soft"], embedding_std])
            window_steps += 1
            if step % LOG_EVERY == 0 or step == config.steps:
                values = (window_sums / window_steps).tolist()  # one device sync per window
                window = dict(zip(window, values, strict=True))
                elapsed = time.perf_counter() - window_start
                metrics = {
                    **window,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": window_steps * B / max(elapsed, 1e-9),
                    "ema_momentum": momentum,
                    "grad_norm": float(grad_norm),
                    "loss_scale": loss_fn.log_scale.detach().exp().item(),
                    "loss_bias": loss_fn.bias.detach().item(),
                }
                if not all(math.isfinite(value) for value in window.values()):
                    raise FloatingPointError(f"non-finite loss at step {step}: {window}")
                if on_metrics is not None:
                    on_metrics(step, metrics)
                window_sums.zero_()
                window_steps, window_start = 0, time.perf_counter()

            if step % config.checkpoint_every == 0 or step == config.steps:
                final = out / f"step_{step:06d}.pt"
                write_checkpoint(final, checkpoint_state(step, metrics))
                for old in sorted(out.glob("step_*.pt"))[:-KEEP_CHECKPOINTS]:
                    old.unlink()

    if final is None:  # cannot happen: steps > 0 and every run ends on a checkpoint
        raise RuntimeError("training finished without writing a checkpoint")
    loop_seconds = time.perf_counter() - loop_start
    return TrainResult(
        checkpoint=final,
        steps=step,
        metrics={key: metrics[key] for key in ("loss", "instance", "soft", "embedding_std") if key in metrics},
        seconds=time.perf_counter() - started,
        samples_per_second=trained_samples / loop_seconds if trained_samples else 0.0,
        in_chans=dataset.in_chans,
        backbone=config.backbone,
    )


def load_encoder(checkpoint: str | Path, *, which: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """The EMA teacher encoder (eval mode, CPU) of a checkpoint and its metadata.

    Args:
        checkpoint: a ``step_*.pt`` file written by ``run_training``.
        which: "teacher" (default, the evaluation encoder) or "student".

    Returns:
        (encoder, meta) with meta keys backbone, in_chans, sensor, bands, norm_stats, embed_dim,
        img_size, class_names, step.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = read_checkpoint(checkpoint)
    meta = {**state["meta"], "step": state["step"]}
    encoder = build_encoder(meta["backbone"], meta["in_chans"], img_size=meta["img_size"])
    encoder.load_state_dict(state[which])
    return encoder.eval(), meta
