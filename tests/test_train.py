"""Training loop: a short run learns and checkpoints; resume is exact; the evaluation encoder loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from store_factory import SyntheticStore, write_store

from softcon.config import TrainConfig
from tasks.train import load_encoder, read_checkpoint, run_training

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
    result = run_training(config, on_metrics=lambda step, metrics: logged.append((step, metrics)))
    assert [step for step, _ in logged] == [10, 20]
    assert logged[-1][1]["loss"] < logged[0][1]["loss"]
    assert {"loss", "instance", "soft", "lr", "samples_per_second", "embedding_std"} <= set(logged[0][1])
    assert result.steps == 20 and result.in_chans == 12 and result.backbone == "resnet18"
    assert result.checkpoint == tmp_path / "step_000020.pt" and result.checkpoint.is_file()
    assert result.metrics["embedding_std"] > 0
    state = read_checkpoint(result.checkpoint)
    assert {"student", "teacher", "projector", "optimizer", "scheduler", "loss", "rng", "config"} <= set(state)


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
