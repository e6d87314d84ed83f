"""The loader's lookup-table normalisation as one compiled kernel.

Kept apart from ``models.data`` so that numba (about 100 MB of LLVM per process) is imported only by processes
that normalise on the CPU, not by loader workers that only decode for the GPU.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def lookup_into(raw: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``out[c, i, j] = table[c, raw[c, i, j]]`` for a (C, H, W) uint8/uint16 view of any strides (a cropped,
    flipped, turned decode buffer) into a (C, H, W) float32 slot.

    Compiled and without the GIL, so decode threads run it side by side, and without numpy ``take``'s conversion
    of the indices to intp: 0.43 vs 0.76 ms per 12 x 224 x 224 crop, the same values bit for bit.
    """
    for c in range(raw.shape[0]):
        row = table[c]
        for i in range(raw.shape[1]):
            for j in range(raw.shape[2]):
                out[c, i, j] = row[raw[c, i, j]]
