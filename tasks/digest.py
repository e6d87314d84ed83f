"""Content digests of stores and checkpoints, to tell whether a reproduced stage wrote the same thing.

Digests cover the arrays' bytes, dtype and shape, never file times, chunk layout or attributes (attributes
hold paths and timestamps that differ between runs by design). Arrays along ``time``/``time_s1`` are digested
per time step and keyed by the step's time value, so a cube written in another order (a backfill of earlier
dates after later ones) has the same digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from softcon.tasks.cube_store import quiet_lock_folder

TIME_DIMS = ("time", "time_s1")


def _hash_array(values: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{values.dtype.str}:{values.shape}".encode())
    if values.dtype.kind == "O":
        digest.update("\x1f".join(str(v) for v in values.ravel()).encode())
    else:
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _decoded_times(coord: zarr.Array) -> np.ndarray:
    """CF-decoded time values (``days since <first date>`` differs between stores with other first dates)."""
    values = np.asarray(coord[:])
    units = coord.attrs.get("units")
    if units and " since " in str(units):
        from xarray.coding.times import decode_cf_datetime

        calendar = coord.attrs.get("calendar")
        if calendar is not None and not isinstance(calendar, str):
            raise ValueError(f"time coordinate {coord.path!r} has a calendar that is not a string: {calendar!r}")
        return decode_cf_datetime(values, str(units), calendar)
    return values


def _walk(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array, zarr.Group]]:
    found = []
    for name, member in sorted(group.members(), key=lambda pair: pair[0]):
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            found.extend(_walk(member, f"{path}/"))
        else:
            found.append((path, member, group))
    return found


def array_digests(store: str | Path) -> dict[str, str]:
    """``{array path: sha256}`` for every array of a Zarr store; ``path@<time>`` per step along a time dim.

    Raises:
        FileNotFoundError: when there is no Zarr group at ``store``.
    """
    try:
        root = zarr.open_group(str(store), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise FileNotFoundError(f"no Zarr store at {store}") from error
    digests: dict[str, str] = {}
    with quiet_lock_folder():
        walked = _walk(root)
    for path, array, group in walked:
        dims = tuple(getattr(array.metadata, "dimension_names", None) or ())
        name = path.rsplit("/", 1)[-1]
        if name in TIME_DIMS:
            continue  # the time coordinates are the keys of the per-step digests below
        if dims and dims[0] in TIME_DIMS and dims[0] in group:
            coord = group[dims[0]]
            if not isinstance(coord, zarr.Array):
                raise ValueError(f"{path}'s time dimension {dims[0]!r} is a group, not a coordinate array")
            times = _decoded_times(coord)
            for index, when in enumerate(times):
                digests[f"{path}@{when}"] = _hash_array(np.asarray(array[index]))
        else:
            digests[path] = _hash_array(np.asarray(array[...]))
    return digests


def store_digest(store: str | Path) -> str:
    """One sha256 over all of :func:`array_digests`."""
    digest = hashlib.sha256()
    for key, value in sorted(array_digests(store).items()):
        digest.update(f"{key}={value}\n".encode())
    return digest.hexdigest()


def compare_digests(reproduced: Mapping[str, str], original: Mapping[str, str], *, subset: bool = False) -> list[str]:
    """Keys whose digests differ (or are missing); ``subset=True`` allows ``original`` to hold more keys.

    ``subset`` is for a cube that gained dates after the run being reproduced.
    """
    problems = [key for key in sorted(reproduced) if original.get(key) != reproduced[key]]
    if not subset:
        problems += [f"{key} (missing)" for key in sorted(set(original) - set(reproduced))]
    return problems


def state_dict_digests(checkpoint: str | Path, keys: tuple[str, ...] = ("student", "teacher")) -> dict[str, str]:
    """``{"student.layer.weight": sha256}`` over the tensors of a training checkpoint's state dicts."""
    from softcon.models.encoder import load_torch_file

    state: dict[str, Any] = load_torch_file(checkpoint, what="checkpoint")
    digests = {}
    for key in keys:
        for name, tensor in state[key].items():
            digests[f"{key}.{name}"] = _hash_array(tensor.detach().cpu().numpy())
    return digests
