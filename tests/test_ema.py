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
    assert torch.equal(teacher[1].running_mean, torch.zeros(2))  # its own statistics, not the student's


def test_the_teacher_keeps_batchnorm_statistics_of_unmasked_inputs() -> None:
    """The student normalises masked views (30 % of pixels zeroed); copying its running statistics gave every
    evaluated ResNet the statistics of masked images. The teacher, in train mode on the unmasked view, keeps its own."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    teacher = make_teacher(student)
    reference = nn.BatchNorm2d(4)  # what statistics of the unmasked views alone look like
    for _ in range(20):
        images = torch.rand(8, 3, 16, 16) + 1.0
        masked = images * (torch.rand(8, 1, 16, 16) > 0.3)
        student(masked).sum().backward()
        with torch.no_grad():
            features = teacher[0](images)
            teacher(images)
            reference(features)
        ema_update(teacher, student, momentum=1.0)  # weights frozen: only the statistics can differ
    assert torch.allclose(teacher[1].running_mean, reference.running_mean, atol=1e-5)
    assert torch.allclose(teacher[1].running_var, reference.running_var, atol=1e-5)
    assert not torch.allclose(teacher[1].running_mean, student[1].running_mean, atol=1e-2)
    assert teacher[1].num_batches_tracked == 20
