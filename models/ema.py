"""EMA teacher: an exponential moving average of the student, momentum rising to 1 on a cosine.

The teacher's weights follow the student's; its BatchNorm statistics are its own. The student sees masked views
(30 % of pixels zeroed), so its running means and variances describe masked images; the teacher runs in train mode
on the unmasked view, so its BatchNorm layers keep the statistics of unmasked inputs, which is what the encoder is
evaluated on (the teacher is the encoder ``load_encoder`` returns). Other buffers are copied from the student.
Under DDP each rank's teacher keeps statistics of its own batches; rank 0's are the ones checkpointed.
"""

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


NORMALISATION_WITH_STATISTICS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _own_statistics(module: nn.Module) -> set[str]:
    """Names of the buffers that hold normalisation statistics (BatchNorm running mean, variance, batch count)."""
    return {
        f"{name}.{buffer}" if name else buffer
        for name, child in module.named_modules()
        if isinstance(child, NORMALISATION_WITH_STATISTICS)
        for buffer, _ in child.named_buffers(recurse=False)
    }


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for the weights; the teacher's normalisation
    statistics stay its own (see the module docstring), other buffers are copied."""
    teacher_params: list[torch.Tensor] = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
    own = _own_statistics(teacher)
    student_buffers = dict(student.named_buffers())
    for name, teacher_buffer in teacher.named_buffers():
        if name not in own:
            teacher_buffer.copy_(student_buffers[name])
