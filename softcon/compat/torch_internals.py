"""torch's internal storage reference count and fused foreach lerp, for ``models/data.py``'s pool of reused batch
tensors and ``models/ema.py``'s EMA teacher update.

Checked against torch 2.14.1 (installed by setup.sh; pinned ``torch>=2.5,<3`` in pyproject.toml). Private APIs
wrapped here:

- ``torch._C._storage_Use_Count(cdata)`` with ``UntypedStorage._cdata``: the reference count of a storage's
  ``StorageImpl``: one per tensor and per Python storage object that holds it (``storage_use_count``);
- ``torch._foreach_lerp_(targets, sources, weight)``: ``torch.lerp_`` over lists of tensors in one fused kernel
  per device and dtype (``foreach_lerp_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["foreach_lerp_", "storage_use_count"]


def storage_use_count(tensor_or_storage: torch.Tensor | torch.UntypedStorage) -> int | None:
    """How many holders share the storage of a tensor (or the storage itself): tensors and Python storage objects,
    the given ones included but not the temporary storage object this call makes of a tensor's. None where torch
    does not tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    if isinstance(tensor_or_storage, torch.Tensor):
        return int(use_count(tensor_or_storage.untyped_storage()._cdata)) - 1  # less the temporary storage object
    return int(use_count(tensor_or_storage._cdata))


def foreach_lerp_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], weight: float) -> None:
    """``target.lerp_(source, weight)`` for each pair, in place: target <- target + weight * (source - target)."""
    torch._foreach_lerp_(list(targets), list(sources), weight)
