"""Train stage: SoftCon pretraining of an encoder on a training store.

Read top to bottom, ``run_training`` is the whole method: build the data, the student (encoder +
projection head), its EMA teacher, the loss, the optimiser and the schedule (``build_trainer``); then for
every step mask the student's view (Siamese masking), embed both views, take the SoftCon loss, step, and
move the teacher (``Trainer.step``, shared with the benchmarks in ``bench/``). The loop (``_train``) is a
dozen lines over named steps, in the order they run: ``training_dataset``, ``resume_state``, the batches of
``training_batches`` (``models.data.make_loader``, one per epoch), ``Trainer.step``, ``MetricWindow`` and
``window_metrics`` (log), ``checkpoint_state`` and ``save_checkpoint`` (save), then the DDP barrier.

On CUDA the forward runs under bf16 autocast (``precision``; fp16 adds a gradient scaler) with
channels_last inputs and weights; ``compile=True`` wraps the student's forward in ``torch.compile``. AdamW
runs fused (one kernel over all parameters, CPU and CUDA): the demo's CPU step (ResNet-18, 32 px, batch 64) took
0.18-0.21 s against 0.20-0.25 s with PyTorch's CPU default, the per-tensor loop (``bench/bench_softcon_step.py
--optimizer``).
Launched by ``torchrun --nproc-per-node N`` the run is data-parallel (DDP, NCCL on GPUs, gloo on CPU): the
global batch is split across ranks (``models.distributed``), the loss is taken per rank on its share
(negatives come from the rank's own share), gradients are averaged, rank 0 logs and writes checkpoints.

Checkpoint format (one ``torch.save`` file ``step_{step:06d}.pt`` in ``config.out``; state dicts and plain
values only, so ``torch.load(..., weights_only=True)`` reads it):

    format="softcon-checkpoint", version=1, step, config (TrainConfig as JSON-able dict),
    meta (backbone, in_chans, sensor, bands, norm_stats, embed_dim, img_size, class_names),
    student, projector, teacher, teacher_projector (module state dicts; uncompiled, no DDP prefix),
    classifier (supervised objective only), loss (learnable scale/bias), optimizer, scheduler,
    scaler (GradScaler; disabled unless fp16), rng (torch, cuda, numpy, python), metrics.

The evaluation encoder is the EMA teacher (``load_encoder``): as in BYOL/DINO it is the smoother,
usually better model, and it is what the student was trained to agree with.

Ablations (``TrainConfig``): ``soft_loss`` picks the form of the soft term (``models.loss``); ``teacher=
"stop_gradient"`` drops the EMA copy and embeds the unmasked view with the student itself under ``no_grad``
(SimSiam): ``Trainer.teacher`` is then the student, nothing is moved after a step (logged ema_momentum 0), and
a checkpoint's teacher entries equal its student entries, so the evaluated encoder is the student.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from softcon import progress as stage_progress
from softcon.config import TrainConfig
from softcon.models.data import BlockShuffleSampler, GpuAugment, StoreDataset, make_loader
from softcon.models.distributed import DistributedContext, ShardedBatchSampler, init_distributed, rank_batch_size
from softcon.models.ema import ema_momentum, ema_update, make_teacher
from softcon.models.encoder import build_encoder, load_torch_file
from softcon.models.loss import SoftConLoss, multilabel_loss
from softcon.models.student import Student

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "softcon-checkpoint"
CHECKPOINT_VERSION = 1
COLLAPSE_FRACTION = 0.1
"""Collapse guard: warn when the embedding std falls below this fraction of a healthy 1/sqrt(D)."""
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
    """Training throughput of this call (scenes per second, all ranks)."""
    in_chans: int
    backbone: str
    weights_checksum: float = 0.0
    """Sum of the student's parameters (float64): equal on every DDP rank when replicas stay in sync."""


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
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
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
    """A training checkpoint file's contents (``checked_checkpoint``)."""
    return checked_checkpoint(load_torch_file(path, what="checkpoint"), path)


def checked_checkpoint(state: Any, path: str | Path) -> dict[str, Any]:
    """``state``, read from ``path``, if it is a training checkpoint of the version this code reads.

    Raises:
        ValueError: another file, or another version.
    """
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
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
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


def collapse_warning(embedding_std: float, embed_dim: int, *, step: int | None = None) -> bool:
    """Collapse guard: True (and a logged warning) when the embedding std nears 0.

    Unit-norm embeddings spread over the sphere have a per-dimension std of about 1/sqrt(D); a collapsed
    encoder maps every scene to nearly the same point and the std goes to 0.
    """
    threshold = COLLAPSE_FRACTION / math.sqrt(embed_dim)
    if embedding_std < threshold:
        logger.warning(
            "possible representation collapse%s: embedding std %.2e < %.2e (healthy ~%.2e); lower the lr, raise "
            "the temperature or check the data",
            f" at step {step}" if step is not None else "",
            embedding_std,
            threshold,
            1 / math.sqrt(embed_dim),
        )
        return True
    return False


class Trainer:
    """The model, optimiser and schedule of a run, and one training step (``step``).

    Built by ``build_trainer``; ``run_training`` feeds it batches from the store, the benchmarks feed it
    batches held on the device. ``student`` / ``teacher`` are the plain modules (checkpointed);
    ``forward`` is what runs them (DDP-wrapped and/or compiled).
    """

    def __init__(
        self, config: TrainConfig, student: Student, device: torch.device, dist_ctx: DistributedContext
    ) -> None:
        self.config = config
        self.device = device
        self.dist = dist_ctx
        self.cuda = device.type == "cuda"
        self.supervised = config.objective == "supervised"
        self.student: Student = student.to(device)
        # the target branch: a frozen copy of the same class, or (stop_gradient) the student itself under no_grad
        self.teacher = cast(Student, make_teacher(student)) if config.teacher == "ema" else self.student
        self.loss_fn = SoftConLoss(
            temperature=config.temperature, lambda_soft=config.lambda_soft, label_similarity=config.label_similarity,
            soft_loss=config.soft_loss,
        ).to(device)  # fmt: skip
        if self.cuda:  # convolutions run faster in NHWC under bf16
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        forward: nn.Module = self.student
        if dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                self.student,
                device_ids=[device.index] if self.cuda else None,
                # the supervised objective leaves the projector unused, SoftCon the classifier (absent)
                find_unused_parameters=self.supervised,
            )
        self.forward = torch.compile(forward) if config.compile else forward

        trained: list[nn.Module] = [self.student] if self.supervised else [self.student, self.loss_fn]
        self.parameters = [p for module in trained for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(trained, config.weight_decay), lr=config.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_cosine, warmup=config.warmup_steps, total=config.steps)
        )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.precision]
        self.autocast_enabled = self.cuda and config.precision != "fp32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cuda and config.precision == "fp16")

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.autocast_enabled)

    def step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch (tensors on the device); returns the loss terms (detached)."""
        config = self.config
        view_a, view_b = batch["view_a"], batch["view_b"]  # (B, C, H, W) student's and teacher's views
        labels, labelled = batch["labels"], batch["labelled"]  # (B, K), (B,)
        B, _, H, W = view_a.shape
        if self.cuda:
            view_a = view_a.contiguous(memory_format=torch.channels_last)
            view_b = view_b.contiguous(memory_format=torch.channels_last)

        # Siamese masking: the student sees view_a with random squares (CNN) or patch tokens (ViT) hidden; a
        # generator seeded by (step, rank) makes the mask independent of everything else that draws numbers
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1009 + self.dist.rank)
        mask = self.student.make_mask(
            B, H, W, ratio=config.mask_ratio, patch=config.mask_patch, generator=generator
        ).to(self.device, non_blocking=True)  # (B, 1, H, W) or (B, 1, H/p, W/p)
        with self.autocast():
            z, logits = self.forward(view_a, mask)  # (B, D) unit norm, (B, K) or None
            if self.supervised:
                z_teacher = None
            else:
                with torch.no_grad():
                    z_teacher, _ = self.teacher(view_b)  # (B, D) unit norm
        if self.supervised:
            loss = multilabel_loss(logits, labels, labelled)
            zero = torch.zeros((), device=self.device)
            terms = {"loss": loss, "instance": zero, "soft": zero}
        else:
            terms = self.loss_fn(z, z_teacher, labels, labelled, batch.get("fractions"))

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        if self.dist.enabled and not self.supervised:
            # the loss's scale and bias live outside the DDP module: average their gradients by hand, or the
            # ranks would clip by different norms and their replicas drift apart
            for parameter in self.loss_fn.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= self.dist.world_size
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (no-op when the scaler is disabled)
        grad_norm = nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if config.teacher == "ema":
            momentum = ema_momentum(step, config.steps, config.ema_momentum)
            ema_update(self.teacher, self.student, momentum)
        else:
            momentum = 0.0  # stop_gradient: the teacher is the student, as an EMA with momentum 0 would make it
        # collapse shows as embedding_std -> 0; a healthy spread on the unit sphere is ~1/sqrt(D)
        embedding_std = z.detach().float().std(dim=0).mean()
        return {
            "loss": terms["loss"].detach(),
            "instance": terms["instance"],
            "soft": terms["soft"],
            "embedding_std": embedding_std,
            "grad_norm": grad_norm.detach(),
            "ema_momentum": torch.tensor(momentum),
        }

    def state(self) -> dict[str, Any]:
        """Model, EMA, optimiser, scheduler and scaler state for a checkpoint (uncompiled, no DDP prefix)."""
        state = {
            "student": self.student.encoder.state_dict(),
            "projector": self.student.projector.state_dict(),
            "teacher": self.teacher.encoder.state_dict(),
            "teacher_projector": self.teacher.projector.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.student.classifier is not None and self.teacher.classifier is not None:
            state["classifier"] = self.student.classifier.state_dict()
            state["teacher_classifier"] = self.teacher.classifier.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state; a stop_gradient trainer (teacher = student) loads the student entries only."""
        self.student.encoder.load_state_dict(state["student"])
        self.student.projector.load_state_dict(state["projector"])
        if self.student.classifier is not None:
            self.student.classifier.load_state_dict(state["classifier"])
        if self.teacher is not self.student:
            self.teacher.encoder.load_state_dict(state["teacher"])
            self.teacher.projector.load_state_dict(state["teacher_projector"])
            if self.teacher.classifier is not None:
                self.teacher.classifier.load_state_dict(state["teacher_classifier"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the implementation is not state: older checkpoints say unfused
            group.update(fused=True, foreach=None)
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def weights_checksum(self) -> float:
        return float(sum(p.detach().double().sum().item() for p in self.student.parameters()))


def build_trainer(
    config: TrainConfig,
    in_chans: int,
    *,
    bands: list[str] | None = None,
    img_size: int | None = None,
    n_classes: int | None = None,
    device: torch.device | None = None,
    dist_ctx: DistributedContext | None = None,
) -> Trainer:
    """Student (encoder from ``config.weights`` when given), teacher (EMA copy or the student), loss, AdamW and
    schedule."""
    device = device or resolve_device(config.device)
    encoder = build_encoder(config.backbone, in_chans, config.weights, bands=bands, img_size=img_size)
    if config.objective == "supervised" and not n_classes:
        raise ValueError("objective 'supervised' needs the store's class count (n_classes)")
    student = Student(encoder, config.embed_dim, n_classes=n_classes if config.objective == "supervised" else None)
    if student.vit and img_size and img_size % student.mask_cell(config.mask_patch):
        cell = student.mask_cell(config.mask_patch)
        raise ValueError(
            f"{config.backbone} needs inputs that are multiples of its {cell} px patch, got {img_size} px: set "
            f"crop_size to a multiple of {cell} (e.g. {img_size - img_size % cell})"
        )
    return Trainer(config, student, device, dist_ctx or DistributedContext())


def decode_threads(config: TrainConfig, cuda: bool) -> int:
    """The loader's decode threads: ``config.decode_threads``, or by default one per core but one (up to 8) in the main
    process when a GPU trains, since decoding threads there share no batch through shared memory as workers do."""
    if config.decode_threads is not None:
        return config.decode_threads
    if not cuda or config.num_workers:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


def run_training(
    config: TrainConfig, *, on_metrics: Callable[[int, dict[str, float]], None] | None = None
) -> TrainResult:
    """Pretrain an encoder with SoftCon on ``config.store`` and write checkpoints to ``config.out``.

    Args:
        config: the train stage configuration.
        on_metrics: called on rank 0 as ``on_metrics(step, metrics)`` every ``config.log_every`` steps and
            at the last step, with loss, instance, soft, lr, samples_per_second, embedding_std,
            collapse_warning, ema_momentum, grad_norm, loss_scale, loss_bias, and on CUDA
            gpu_memory_allocated_gb / gpu_memory_peak_gb (the Prefect flow logs them to MLflow). How far it is
            goes to ``softcon.progress`` (step "steps", once per optimizer step, rank 0 only).

    Returns:
        TrainResult with the final checkpoint.

    Example:
        >>> result = run_training(TrainConfig(store="data/store.zarr", steps=300, out="data/ckpt"))
        >>> encoder, meta = load_encoder(result.checkpoint)
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    dist_ctx = init_distributed(device.type)
    try:
        if dist_ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_ctx.local_rank)
        return _train(config, device, dist_ctx, started, on_metrics)
    finally:
        dist_ctx.close()


def _train(
    config: TrainConfig,
    device: torch.device,
    dist_ctx: DistributedContext,
    started: float,
    on_metrics: Callable[[int, dict[str, float]], None] | None,
) -> TrainResult:
    """``run_training`` on a resolved device: set up, resume, then step, log and save until ``config.steps``."""
    rank_batch_size(config.batch_size, dist_ctx.world_size)  # refuse an uneven split before any work
    seed_everything(config.seed)
    dataset = training_dataset(config, cuda=device.type == "cuda")
    meta = checkpoint_meta(config, dataset)
    trainer = build_trainer(
        config, dataset.in_chans, bands=dataset.channel_names, img_size=meta["img_size"],
        n_classes=int(dataset.labels.shape[1]), device=device, dist_ctx=dist_ctx,
    )  # fmt: skip
    out = Path(config.out)
    if dist_ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    step, metrics, final = resume_state(config, trainer, meta)

    first_step, window, loop_start = step, MetricWindow(device, config.batch_size), time.perf_counter()
    for batch in training_batches(dataset, config, device, dist_ctx, first_step=step):
        terms = trainer.step(batch, step)
        step += 1
        window.add(terms)
        if step % config.log_every == 0 or step == config.steps:
            metrics = window_metrics(window, terms, trainer, step=step)  # over all ranks; raises on a non-finite loss
            if on_metrics is not None and dist_ctx.is_main:
                on_metrics(step, metrics)
            window.reset()
        if dist_ctx.is_main:
            stage_progress.report("steps", step, config.steps)
        if step % config.checkpoint_every == 0 or step == config.steps:
            final = out / f"step_{step:06d}.pt"
            if dist_ctx.is_main:
                save_checkpoint(final, checkpoint_state(config, meta, trainer, step, metrics))
            if dist_ctx.enabled:
                torch.distributed.barrier()  # no rank runs ahead of a checkpoint being written

    if final is None:  # cannot happen: steps > 0 and every run ends on a checkpoint
        raise RuntimeError("training finished without writing a checkpoint")
    trained_samples = (step - first_step) * config.batch_size
    return TrainResult(
        checkpoint=final,
        steps=step,
        metrics={key: metrics[key] for key in MetricWindow.names if key in metrics},
        seconds=time.perf_counter() - started,
        samples_per_second=trained_samples / (time.perf_counter() - loop_start) if trained_samples else 0.0,
        in_chans=dataset.in_chans,
        backbone=config.backbone,
        weights_checksum=trainer.weights_checksum(),
    )


def training_dataset(config: TrainConfig, *, cuda: bool) -> StoreDataset:
    """The train split of ``config.store``, two views of each scene (two dates, or two augmentations of one).

    With ``augment_on_device`` (the default on CUDA) the loader only decodes and ``training_batches`` cuts and
    normalises the views on the device (``GpuAugment``: the same values as the loader's CPU path).

    Raises:
        ValueError: the split has fewer samples than one batch.
    """
    on_device = config.augment_on_device if config.augment_on_device is not None else cuda
    dataset = StoreDataset(
        config.store, "train", config.sensor, two_views=True, crop_size=config.crop_size, seed=config.seed,
        decode_threads=decode_threads(config, cuda), defer_augment=on_device,
    )  # fmt: skip
    if len(dataset) < config.batch_size:
        raise ValueError(
            f"the train split of {config.store} has {len(dataset)} samples, fewer than batch_size {config.batch_size}"
        )
    return dataset


def training_batches(
    dataset: StoreDataset,
    config: TrainConfig,
    device: torch.device,
    dist_ctx: DistributedContext,
    *,
    first_step: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of steps ``first_step`` to ``config.steps`` on ``device``, epoch after epoch.

    Each epoch is one ``make_loader`` (the loader the data tests check) over the block-shuffled order cut into
    global batches and sharded per rank (``ShardedBatchSampler``). An epoch's order and augmentations depend
    only on (seed, epoch): resuming mid-epoch skips the batches already seen and gets exactly the batches a
    straight run would have. A ``defer_augment`` dataset's batches are made into views by ``GpuAugment``.
    """
    sampler = BlockShuffleSampler(dataset, seed=config.seed)
    augment = GpuAugment(dataset, device) if dataset.defer_augment else None
    steps_per_epoch = len(dataset) // config.batch_size  # drop_last: every batch has batch_size scenes
    step = first_step
    while step < config.steps:
        epoch, skip = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        batches = ShardedBatchSampler(
            sampler, config.batch_size, rank=dist_ctx.rank, world_size=dist_ctx.world_size, first_batch=skip,
            max_batches=config.steps - step,
        )  # fmt: skip
        loader = make_loader(
            dataset, batch_sampler=batches, num_workers=config.num_workers, pin_memory=device.type == "cuda"
        )
        for batch in loader:
            step += 1
            if augment is not None:
                yield augment(batch)
            else:
                yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def checkpoint_meta(config: TrainConfig, dataset: StoreDataset) -> dict[str, Any]:
    """What a checkpoint says about its encoder and data (``load_encoder`` returns it; a resume checks it)."""
    return {
        "backbone": config.backbone,
        "in_chans": dataset.in_chans,
        "sensor": config.sensor,
        "bands": dataset.channel_names,
        "norm_stats": {"mean": dataset.mean.flatten().tolist(), "std": dataset.std.flatten().tolist()},
        "embed_dim": config.embed_dim,
        "img_size": config.crop_size or dataset.image_shape[1],
        "class_names": dataset.class_names,
        "objective": config.objective,
    }


def resume_state(
    config: TrainConfig, trainer: Trainer, meta: dict[str, Any]
) -> tuple[int, dict[str, float], Path | None]:
    """Continue from the latest checkpoint in ``config.out`` when ``config.resume`` asks for it.

    Loads the model, EMA teacher, optimiser, schedule and scaler into ``trainer`` and the RNG states into this
    process, so the run goes on as if it had never stopped.

    Returns:
        (step, metrics, checkpoint): the step to continue from, the metrics of the checkpoint's last window and
        the checkpoint read; (0, {}, None) for a fresh run.

    Raises:
        ValueError: the checkpoint's backbone, in_chans, sensor or embed_dim differ from this run's.
    """
    out = Path(config.out)
    last = latest_checkpoint(out) if config.resume and out.is_dir() else None
    if last is None:
        return 0, {}, None
    state = read_checkpoint(last)
    for key in ("backbone", "in_chans", "sensor", "embed_dim"):
        if state["meta"][key] != meta[key]:
            raise ValueError(f"cannot resume from {last}: its {key} is {state['meta'][key]!r}, now {meta[key]!r}")
    trainer.load_state(state)
    set_rng_state(state["rng"])
    return state["step"], dict(state["metrics"]), last


class MetricWindow:
    """The loss terms of the steps since the last log, summed on the device: one host sync per window."""

    names = ("loss", "instance", "soft", "embedding_std")

    def __init__(self, device: torch.device, batch_size: int) -> None:
        self.sums = torch.zeros(len(self.names), device=device)  # (4,) in the order of ``names``
        self.batch_size = batch_size
        self.steps, self.start = 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Count one step's terms (no sync: the sum stays on the device)."""
        self.sums += torch.stack([terms[name] for name in self.names])
        self.steps += 1

    def mean(self, dist_ctx: DistributedContext) -> dict[str, float]:
        """Each term's mean over the window's steps and, under DDP, over all ranks (not rank 0's share alone)."""
        if dist_ctx.enabled:
            torch.distributed.all_reduce(self.sums)
            self.sums /= dist_ctx.world_size
        return dict(zip(self.names, (self.sums / self.steps).tolist(), strict=True))

    def samples_per_second(self) -> float:
        """Scenes (all ranks) per second since the window began."""
        return self.steps * self.batch_size / max(time.perf_counter() - self.start, 1e-9)

    def reset(self) -> None:
        """Start the next window (after the log, so logging's own time counts in neither)."""
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()


def window_metrics(
    window: MetricWindow, terms: dict[str, torch.Tensor], trainer: Trainer, *, step: int
) -> dict[str, float]:
    """The metrics logged at ``step`` (see ``run_training``): the window's mean loss terms over all ranks, its
    throughput, and the last step's lr, EMA momentum, gradient norm, loss scale and bias; GPU memory on CUDA.

    Raises:
        FloatingPointError: a mean loss term is not finite (the run diverged; its checkpoints stay as they are).
    """
    window_means = window.mean(trainer.dist)
    metrics: dict[str, float] = {
        **window_means,
        "lr": float(trainer.scheduler.get_last_lr()[0]),
        "samples_per_second": window.samples_per_second(),
        "ema_momentum": float(terms["ema_momentum"]),
        "grad_norm": float(terms["grad_norm"]),
        "loss_scale": trainer.loss_fn.log_scale.detach().exp().item(),
        "loss_bias": trainer.loss_fn.bias.detach().item(),
        "collapse_warning": float(collapse_warning(window_means["embedding_std"], trainer.config.embed_dim, step=step)),
    }
    if trainer.cuda:
        metrics["gpu_memory_allocated_gb"] = torch.cuda.memory_allocated(trainer.device) / 2**30
        metrics["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    if not all(math.isfinite(value) for value in window_means.values()):
        raise FloatingPointError(f"non-finite loss at step {step}: {window_means}")
    return metrics


def checkpoint_state(
    config: TrainConfig, meta: dict[str, Any], trainer: Trainer, step: int, metrics: dict[str, float]
) -> dict[str, Any]:
    """Everything a checkpoint holds (the format in this module's docstring), taken after ``step`` steps."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": config.model_dump(mode="json"),
        "meta": meta,
        **trainer.state(),
        "rng": rng_state(),
        "metrics": metrics,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` (atomically), then keep only the ``KEEP_CHECKPOINTS`` latest ``step_*.pt``
    beside it: each holds two models and the AdamW moments."""
    write_checkpoint(path, state)
    for old in sorted(path.parent.glob("step_*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()


def load_encoder(checkpoint: str | Path, *, which: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """The teacher encoder (eval mode, CPU) of a checkpoint and its metadata.

    The teacher is the EMA copy, or with ``teacher="stop_gradient"`` the student itself (the checkpoint's teacher
    entries are then the student's).

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
