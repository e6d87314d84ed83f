"""EMA teacher: an exponential moving average of the student, momentum rising to 1 on a cosine."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from softcon.compat.torch_internals import foreach_lerp_


def ema_momentum(step: int, total_steps: int, base: float) -> float:
    """Cosine schedule from ``base`` at step 0 to 1.0 at ``total_steps`` (BYOL / DINO)."""
    if total_steps <= 0:
        return 1.0
    progress = min(step / total_steps, 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student: no gradients, updated only by ``ema_update``."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student; buffers (BN statistics) are copied."""
    teacher_params: list[torch.Tensor] = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers(), strict=True):
        teacher_buffer.copy_(student_buffer)
