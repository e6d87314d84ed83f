"""Training ablations: the soft term's form and the teacher are chosen in TrainConfig and reach the run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from store_factory import SyntheticStore, write_store
from test_train import tiny_config

from softcon.config import TrainConfig
from softcon.tasks.train import build_trainer, load_encoder, read_checkpoint, run_training

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("ablations") / "store.zarr")


@pytest.mark.parametrize("soft_loss", ["mse", "soft_ce"])
def test_short_run_trains_with_the_soft_loss_form(store: SyntheticStore, tmp_path: Path, soft_loss: str) -> None:
    logged: list[dict[str, float]] = []
    config = tiny_config(store, tmp_path, soft_loss=soft_loss, steps=2, checkpoint_every=2, log_every=1)
    result = run_training(config, on_metrics=lambda step, metrics: logged.append(metrics))
    assert all(math.isfinite(metrics[name]) for metrics in logged for name in ("loss", "instance", "soft"))
    assert all(metrics["soft"] > 0 for metrics in logged)
    state = read_checkpoint(result.checkpoint)
    assert state["config"]["soft_loss"] == soft_loss
    assert logged[-1]["loss_scale"] == pytest.approx(10.0) and logged[-1]["loss_bias"] == 0.0  # unused, unmoved


def test_stop_gradient_teacher_is_the_student(store: SyntheticStore, tmp_path: Path) -> None:
    """No copy is made or moved: the checkpoint's teacher is the trained student, which load_encoder returns."""
    logged: list[dict[str, float]] = []
    config = tiny_config(store, tmp_path, teacher="stop_gradient", steps=2, checkpoint_every=2, log_every=1)
    result = run_training(config, on_metrics=lambda step, metrics: logged.append(metrics))
    state = read_checkpoint(result.checkpoint)
    for student_part, teacher_part in (("student", "teacher"), ("projector", "teacher_projector")):
        for key, value in state[student_part].items():
            assert torch.equal(value, state[teacher_part][key]), f"{teacher_part}.{key}"
    initial = build_trainer(config, 12, img_size=16, device=torch.device("cpu")).student.encoder.state_dict()
    assert not torch.equal(state["student"]["conv1.weight"], initial["conv1.weight"])  # it trained
    assert [metrics["ema_momentum"] for metrics in logged] == [0.0, 0.0]
    encoder, _ = load_encoder(result.checkpoint)
    assert all(torch.equal(value, state["student"][key]) for key, value in encoder.state_dict().items())


@pytest.mark.parametrize(("teacher", "is_student"), [("ema", False), ("stop_gradient", True)])
def test_trainer_makes_a_teacher_copy_only_for_ema(teacher: str, is_student: bool) -> None:
    trainer = build_trainer(TrainConfig(teacher=teacher, embed_dim=16), 12, img_size=16, device=torch.device("cpu"))
    assert (trainer.teacher is trainer.student) == is_student


def test_stop_gradient_resume_loads_the_student_not_a_teacher(tmp_path: Path) -> None:
    """A stop_gradient trainer fed a checkpoint with a distinct teacher keeps the checkpoint's student."""
    options = dict(embed_dim=16, device="cpu", out=str(tmp_path))
    ema = build_trainer(TrainConfig(**options), 12, img_size=16)
    with torch.no_grad():
        for parameter in ema.teacher.parameters():
            parameter.add_(1.0)
    state = ema.state()
    stop_gradient = build_trainer(TrainConfig(teacher="stop_gradient", **options), 12, img_size=16)
    stop_gradient.load_state(state)
    for key, value in stop_gradient.student.encoder.state_dict().items():
        assert torch.equal(value, state["student"][key]), key


def test_ablation_choices_are_logged_as_params_and_validated() -> None:
    from softcon.flows.tracking import flatten_params

    params = flatten_params(TrainConfig(soft_loss="soft_ce", teacher="stop_gradient"))
    assert params["soft_loss"] == "soft_ce" and params["teacher"] == "stop_gradient"
    assert flatten_params(TrainConfig())["soft_loss"] == "sigmoid" and flatten_params(TrainConfig())["teacher"] == "ema"
    with pytest.raises(ValueError, match="'sigmoid', 'mse' or 'soft_ce'"):
        TrainConfig(soft_loss="hinge")
    with pytest.raises(ValueError, match="'ema' or 'stop_gradient'"):
        TrainConfig(teacher="momentum")
