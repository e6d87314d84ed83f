"""Training loop: a short run learns and checkpoints; resume is exact; the evaluation encoder loads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from store_factory import SyntheticStore, write_store

from softcon import progress
from softcon.config import TrainConfig
from softcon.models.data import StoreDataset, collate_batch, make_loader
from softcon.models.distributed import DistributedContext, ShardedBatchSampler
from softcon.tasks.train import (
    build_trainer,
    collapse_warning,
    decode_threads,
    load_encoder,
    read_checkpoint,
    run_training,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("train") / "store.zarr")


def tiny_config(store: SyntheticStore, out: Path, **overrides) -> TrainConfig:
    values = dict(
        store=str(store.path), out=str(out), backbone="resnet18", steps=6, batch_size=8, warmup_steps=2,
        checkpoint_every=3, mask_patch=4, embed_dim=16, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.mark.slow
def test_short_run_reduces_loss_and_writes_a_checkpoint(store: SyntheticStore, tmp_path: Path) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    config = tiny_config(store, tmp_path, steps=20, batch_size=16, warmup_steps=2, checkpoint_every=10, lr=1e-3)
    reported: list[tuple[str, int, int]] = []
    with progress.listen(lambda *args: reported.append(args)):
        result = run_training(config, on_metrics=lambda step, metrics: logged.append((step, metrics)))
    assert [step for step, _ in logged] == [10, 20]
    assert reported == [("steps", step, 20) for step in range(1, 21)]  # what the CLI's train bar follows
    assert logged[-1][1]["loss"] < logged[0][1]["loss"]
    assert {"loss", "instance", "soft", "lr", "samples_per_second", "embedding_std"} <= set(logged[0][1])
    assert result.steps == 20 and result.in_chans == 12 and result.backbone == "resnet18"
    assert result.checkpoint == tmp_path / "step_000020.pt" and result.checkpoint.is_file()
    assert result.metrics["embedding_std"] > 0
    state = read_checkpoint(result.checkpoint)
    assert {"student", "teacher", "projector", "optimizer", "scheduler", "loss", "rng", "config"} <= set(state)


def test_augmenting_on_the_device_trains_the_same_weights(store: SyntheticStore, tmp_path: Path) -> None:
    """GpuAugment (the default on CUDA) cuts and normalises the same views as the loader's CPU path."""
    options = dict(steps=2, checkpoint_every=2, crop_size=12)
    in_loader = run_training(tiny_config(store, tmp_path / "loader", **options, augment_on_device=False))
    on_device = run_training(tiny_config(store, tmp_path / "device", **options, augment_on_device=True))
    expected, got = read_checkpoint(in_loader.checkpoint), read_checkpoint(on_device.checkpoint)
    for part in ("student", "teacher", "projector"):
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key}"


def test_training_loads_through_make_loader(
    store: SyntheticStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader the data tests check is the one training uses: one ``make_loader`` per epoch, with this rank's
    batches of the epoch, the config's workers, unpinned memory on CPU."""
    calls: list[dict] = []

    def spy(dataset: StoreDataset, batch_size: int | None = None, **options) -> torch.utils.data.DataLoader:
        batches = options["batch_sampler"]
        calls.append({"epoch": dataset.epoch, "batch_size": batch_size, "batches": batches.batches(), **options})
        loader = make_loader(dataset, batch_size, **options)
        calls[-1]["loader"] = loader
        return loader

    monkeypatch.setattr("softcon.tasks.train.make_loader", spy)
    steps_per_epoch = len(StoreDataset(store.path)) // 8
    run_training(tiny_config(store, tmp_path, steps=steps_per_epoch + 1, num_workers=1))
    assert [call["epoch"] for call in calls] == [0, 1]
    assert [len(call["batches"]) for call in calls] == [steps_per_epoch, 1]
    for call in calls:
        assert call["batch_size"] is None and isinstance(call["batch_sampler"], ShardedBatchSampler)
        assert call["num_workers"] == 1 and call["pin_memory"] is False
        assert call["loader"].collate_fn is collate_batch and call["loader"].worker_init_fn is not None


def test_decode_threads_default_to_the_cores_only_for_a_gpu_without_workers(
    store: SyntheticStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert decode_threads(tiny_config(store, tmp_path), cuda=False) == 1  # the CPU model needs the cores
    assert decode_threads(tiny_config(store, tmp_path), cuda=True) == 8
    assert decode_threads(tiny_config(store, tmp_path, num_workers=4), cuda=True) == 1
    assert decode_threads(tiny_config(store, tmp_path, decode_threads=3), cuda=True) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert decode_threads(tiny_config(store, tmp_path), cuda=True) == 1


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(store: SyntheticStore, tmp_path: Path) -> None:
    straight = run_training(tiny_config(store, tmp_path / "straight"))
    interrupted = tiny_config(store, tmp_path / "resumed")
    run_training(interrupted)
    (tmp_path / "resumed" / "step_000006.pt").unlink()  # as if the run had stopped after step 3
    resumed = run_training(interrupted.model_copy(update={"resume": True}))
    assert resumed.steps == 6
    expected, got = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for part in ("student", "teacher", "projector", "loss"):
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key}"


def test_load_encoder_returns_the_teacher_and_metadata(store: SyntheticStore, tmp_path: Path) -> None:
    result = run_training(tiny_config(store, tmp_path, steps=1, batch_size=4))
    encoder, meta = load_encoder(result.checkpoint)
    state = read_checkpoint(result.checkpoint)
    assert all(torch.equal(v, state["teacher"][k]) for k, v in encoder.state_dict().items())
    assert meta["backbone"] == "resnet18" and meta["in_chans"] == 12 and meta["sensor"] == "s2"
    assert len(meta["norm_stats"]["mean"]) == 12 and meta["bands"][3] == "B04"
    with torch.no_grad():
        assert encoder(torch.zeros(2, 12, 16, 16)).shape == (2, 512)


def test_too_small_split_is_refused(store: SyntheticStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than batch_size 1000"):
        run_training(tiny_config(store, tmp_path, batch_size=1000))


def test_checkpoint_holds_everything_a_resume_needs(store: SyntheticStore, tmp_path: Path) -> None:
    result = run_training(tiny_config(store, tmp_path, steps=1, batch_size=4))
    state = read_checkpoint(result.checkpoint)
    expected = {"student", "projector", "teacher", "teacher_projector", "loss", "optimizer", "scheduler", "scaler"}
    assert expected | {"rng", "config", "meta", "step"} <= set(state)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["scheduler"]["last_epoch"] == 1 and state["optimizer"]["state"]  # AdamW moments saved


def test_adamw_runs_fused_and_a_resume_from_an_unfused_checkpoint_stays_fused(
    store: SyntheticStore, tmp_path: Path
) -> None:
    result = run_training(tiny_config(store, tmp_path, steps=1, batch_size=4))
    state = read_checkpoint(result.checkpoint)
    assert {group["fused"] for group in state["optimizer"]["param_groups"]} == {True}
    for group in state["optimizer"]["param_groups"]:  # as a checkpoint from before the fused kernel says
        group.update(fused=None, foreach=None)
    trainer = build_trainer(tiny_config(store, tmp_path), 12, img_size=16, n_classes=len(state["meta"]["class_names"]))
    trainer.load_state(state)
    assert {(group["fused"], group["foreach"]) for group in trainer.optimizer.param_groups} == {(True, None)}
    assert trainer.optimizer.state  # the moments were loaded


@pytest.mark.slow
def test_supervised_head_objective_trains_a_classifier(store: SyntheticStore, tmp_path: Path) -> None:
    logged: list[dict[str, float]] = []
    config = tiny_config(store, tmp_path, objective="supervised", steps=10, log_every=5, lr=3e-3)
    result = run_training(config, on_metrics=lambda step, metrics: logged.append(metrics))
    state = read_checkpoint(result.checkpoint)
    assert state["classifier"]["fc.weight"].shape == (store.n_classes, 512)
    assert state["meta"]["objective"] == "supervised"
    assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["soft"] == 0.0


@pytest.mark.slow
def test_vit_student_is_masked_with_its_mask_token(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store32.zarr", n_locations=12, size=32)
    config = tiny_config(store, tmp_path / "ckpt", backbone="vit_tiny_patch16_224", steps=2, batch_size=4,
                         mask_ratio=0.5)  # fmt: skip
    result = run_training(config)
    state = read_checkpoint(result.checkpoint)
    assert state["student"]["mask_token"].shape == (1, 1, 192)
    # teacher and student start equal; the teacher only trails the student, so they differ only if the
    # student's mask token got gradient steps
    assert not torch.equal(state["student"]["mask_token"], state["teacher"]["mask_token"])
    encoder, _ = load_encoder(result.checkpoint)
    assert torch.equal(encoder.mask_token, state["teacher"]["mask_token"])


def test_collapse_guard_warns_when_the_embedding_std_nears_zero(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="softcon.tasks.train"):
        assert not collapse_warning(1 / 16 * 0.9, 256, step=5)  # healthy: ~1/sqrt(256)
        assert not caplog.records
        assert collapse_warning(1e-4, 256, step=7)
    assert "possible representation collapse at step 7" in caplog.text


def test_indivisible_ddp_batch_is_refused_before_any_work(
    store: SyntheticStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "softcon.tasks.train.init_distributed", lambda device_type: DistributedContext(rank=0, world_size=3)
    )
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by the 3 processes"):
        run_training(tiny_config(store, tmp_path))
    assert not any(tmp_path.iterdir())


def test_vit_with_patches_not_a_multiple_of_its_patch_is_refused(store: SyntheticStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"multiples of its 16 px patch, got 12 px: set crop_size"):
        run_training(tiny_config(store, tmp_path, backbone="vit_tiny_patch16_224", crop_size=12))
