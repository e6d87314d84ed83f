"""EMA teacher: cosine momentum schedule and the update rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softcon.models.ema import ema_momentum, ema_update, make_teacher


def test_momentum_schedule_goes_from_base_to_one() -> None:
    assert ema_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_ema_update_moves_the_teacher_towards_the_student() -> None:
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student[1].running_mean.fill_(5.0)
    before = teacher[0].weight.clone()
    ema_update(teacher, student, momentum=0.9)
    assert torch.allclose(teacher[0].weight, 0.9 * before + 0.1 * student[0].weight)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)
