"""Check a cube or a training store against the data contracts (``docs/design.md``, "Data contracts").

``check_store(path)`` finds out which of the two ``path`` holds and checks it through zarr alone (xarray refuses
some damaged tiles outright, and the point is to say what is wrong):

- cube, per tile ``tiles/<tile_id>``: every array present with the contract's dtype and dimension names; every
  chunk readable (decompresses) and no chunk of ``s2``, ``scl``, ``s1`` (within the committed time steps) or of
  a coordinate missing (a lost file reads as nodata); the data arrays as long as their time coordinate (longer:
  an interrupted append, which the next ingest truncates); the ``s2_items`` / ``s1_items`` attributes naming one
  day per time step; no time step or item twice; band and pol names from the contract; the land cover (once
  labelled) on the tile's grid.
- training store: ``schema_version`` this code reads, ``complete`` set, ``blocks_done`` every write block (and
  each done block's image shard present); once complete, the files, metadata and attributes the store recorded
  in its manifest when it was finished; every array as long as the samples, with the contract's dtype and
  dimension names, every chunk readable; labels multi-hot in {0, 1} with one column per class name, fractions
  in [0, 1], split values naming a split, tile indices naming a tile, no sample twice; optional ``masks`` the
  patches' size and holding class indices or 255 (no class).

Each problem names where it is, what is wrong, and what fixes it; ``StoreCheck.ok`` is true when there are none.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
import zarr
from xarray.coding.times import decode_cf_datetime

from softcon.compat.zarr_internals import chunk_key, dimension_names, has_consolidated_metadata
from softcon.compat.zarr_internals import sync as zarr_sync
from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS
from softcon.models.training_store import (
    MANIFEST_ATTR,
    MASK_NODATA,
    PLAN_DTYPES,
    SCHEMA_VERSION,
    block_bounds,
    find_damage,
)
from softcon.tasks.cube_store import (
    INGEST_AGAIN,
    REBUILD_TILE,
    RECREATE_TILE,
    TILES,
    tile_group,
    tile_ids,
    tile_path,
)

log = logging.getLogger(__name__)

CUBE_ARRAYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "s2": (("time", "band", "y", "x"), ("uint16",)),
    "scl": (("time", "y", "x"), ("uint8",)),
    "s1": (("time_s1", "pol", "y", "x"), ("float32",)),
    "time": (("time",), ("int64", "datetime64[ns]")),
    "time_s1": (("time_s1",), ("int64", "datetime64[ns]")),
    "band": (("band",), ()),
    "pol": (("pol",), ()),
    "x": (("x",), ("float64",)),
    "y": (("y",), ("float64",)),
    "spatial_ref": ((), ()),
}
"""Tile array -> (dimension names, allowed dtypes; empty = any) as the cube contract has them."""
CUBE_OPTIONAL = ("s1", "time_s1", "pol")
"""A tile without Sentinel-1 may lack these three together."""
LANDCOVER = (("y", "x"), ("uint8",))
TIME_SERIES = {"time": (("s2", "scl"), "s2_items"), "time_s1": (("s1",), "s1_items")}
"""Time coordinate -> (the data arrays along it, the attribute naming its item ids per day)."""
STEP_ARRAYS = {"s2": "time", "scl": "time", "s1": "time_s1"}
"""Data array -> its time coordinate. Ingest writes a chunk file for every step it commits, even one of fill values."""
LOST_CHUNK_ARRAYS = (*STEP_ARRAYS, "time", "time_s1", "x", "y", "band", "pol")
"""Arrays of which every chunk is written (for the data arrays: every chunk of a committed step)."""

STORE_IMAGE_ARRAYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "s2": (("sample", "band", "h", "w"), ("uint16",)),
    "s1": (("sample", "pol", "h", "w"), ("float32", "float16")),
}
STORE_MASKS = (("sample", "h", "w"), ("uint8",))
"""The optional per-pixel class-index masks (preprocess ``masks``)."""
STORE_TABLE_DIMS = {"labels": ("sample", "class"), "fractions": ("sample", "class")}
"""Training-store arrays with a class axis; the other plan arrays are (sample,)."""

REINGEST_STEPS = (
    "re-run `softcon ingest` with the same --cube over the day(s) {days}: it writes the lost steps again from the same "
    "items; or " + REBUILD_TILE
)
PREPROCESS_AGAIN = "re-run `softcon preprocess` with the same parameters: it resumes and writes only missing blocks"
REBUILD_STORE = "delete the store and re-run `softcon preprocess` to write it again"
REPAIR_STORE = (
    "re-run `softcon preprocess` with the same parameters: it writes lost or changed image shards again and "
    "rebuilds a store whose metadata, attributes or tables changed"
)


@dataclass(frozen=True)
class Problem:
    """One way the store breaks its contract."""

    path: str
    """Where, inside the store (``tiles/<id>/s2``, ``labels``; empty for the root)."""
    what: str
    fix: str
    steps: tuple[int, ...] = ()
    """The committed time steps a lost chunk file of a data array (``s2``, ``scl``, ``s1``) holds: the damage
    is confined to them, and re-ingesting their days repairs it."""


@dataclass(frozen=True)
class StoreCheck:
    """The outcome of ``check_store``."""

    store: str
    kind: str
    """``cube``, ``training store`` or ``unknown``."""
    problems: list[Problem] = field(default_factory=list)
    summary: list[dict[str, str]] = field(default_factory=list)
    """One row per tile (cube) or one row (training store), for a table."""

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------------- helpers


def _stored_keys(array: zarr.Array) -> set[str]:
    """Keys of the objects stored under the array, relative to it (``zarr.json``, ``c/0/0``…)."""
    store, prefix = array.store_path.store, array.store_path.path.rstrip("/") + "/"

    async def listing() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return {key[len(prefix) :] for key in zarr_sync(listing())}


def _chunk_key(array: zarr.Array, index: tuple[int, ...]) -> str:
    return chunk_key(array, index)


def missing_chunks(array: zarr.Array) -> list[str]:
    """Chunk (shard, for a sharded array) keys of the array's grid that the store does not hold."""
    grid = array.shards or array.chunks
    counts = [math.ceil(size / step) for size, step in zip(array.shape, grid, strict=True)]
    expected = [_chunk_key(array, index) for index in itertools.product(*(range(n) for n in counts))]
    stored = _stored_keys(array)
    return [key for key in expected if key not in stored]


def missing_steps(array: zarr.Array, steps: int) -> tuple[list[str], list[int]]:
    """Chunk (shard) files missing among those holding indices below ``steps`` along axis 0, and those indices
    (they read as fill values)."""
    grid = array.shards or array.chunks
    counts = [math.ceil(size / step) for size, step in zip(array.shape, grid, strict=True)]
    stored = _stored_keys(array)
    keys: list[str] = []
    lost: set[int] = set()
    for index in itertools.product(*(range(n) for n in counts)):
        if index[0] * grid[0] < steps and _chunk_key(array, index) not in stored:
            keys.append(_chunk_key(array, index))
            lost.update(range(index[0] * grid[0], min((index[0] + 1) * grid[0], steps)))
    return keys, sorted(lost)


def read_whole(array: zarr.Array) -> tuple[np.ndarray | None, str | None]:
    """Read the array one chunk (shard) of its first axis at a time: (values or None, first error or None).

    The values are returned only for arrays of at most two dimensions (coordinates and tables); images are
    read and dropped, so a large cube is checked in bounded memory.
    """
    keep = array.ndim <= 2
    if array.ndim == 0:
        try:
            return np.asarray(array[...]), None
        except Exception as error:
            return None, f"{type(error).__name__}: {error}"
    step = (array.shards or array.chunks)[0]
    parts = []
    for start in range(0, array.shape[0], step):
        try:
            part = array[start : start + step]
        except Exception as error:
            return None, f"steps {start}..{min(start + step, array.shape[0]) - 1}: {type(error).__name__}: {error}"
        if keep:
            parts.append(np.asarray(part))
    if not keep:
        return None, None
    return (np.concatenate(parts) if parts else np.asarray(array[...])), None


def _dtype_name(array: zarr.Array) -> str:
    return str(np.dtype(array.dtype)) if not str(array.dtype).startswith("StringDType") else "str"


def _check_layout(
    array: zarr.Array, path: str, dims: tuple[str, ...], dtypes: tuple[str, ...], fix: str
) -> list[Problem]:
    problems = []
    names = dimension_names(array)
    if names != dims:
        problems.append(Problem(path, f"dimension names {names or None}, the contract has {dims}", fix))
    if dtypes and _dtype_name(array) not in dtypes:
        problems.append(Problem(path, f"dtype {_dtype_name(array)}, the contract has {' or '.join(dtypes)}", fix))
    return problems


def _open_root(path: str) -> zarr.Group | None:
    """The root group as its ``zarr.json`` files have it (not through consolidated metadata, checked apart)."""
    try:
        return zarr.open_group(path, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None


def check_consolidated(path: str, root: zarr.Group) -> list[Problem]:
    """Arrays whose shape or dtype in the consolidated metadata (what xarray reads) differ from their own."""
    try:
        consolidated = zarr.open_group(path, mode="r", use_consolidated=True)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return []
    if not has_consolidated_metadata(consolidated):
        return []
    problems = []
    actual = dict(root.arrays())
    for name, array in consolidated.arrays():
        real = actual.get(name)
        if real is None or (real.shape, real.dtype) != (array.shape, array.dtype):
            what = f"consolidated metadata says {array.shape} {array.dtype}, the array is " + (
                f"{real.shape} {real.dtype}" if real is not None else "missing"
            )
            problems.append(Problem(name, what, REBUILD_STORE))
    return problems


def check_store(path: str) -> StoreCheck:
    """Check the cube or training store at ``path`` (a local path or an fsspec URL)."""
    with warnings.catch_warnings():
        # The cube's lock folder is not a Zarr node; string coordinates have no v3 spec yet: both expected.
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        warnings.simplefilter("ignore", zarr.errors.UnstableSpecificationWarning)
        return _check(path)


def _check(path: str) -> StoreCheck:
    root = _open_root(path)
    if root is None:
        fix = "give the path of a cube (`softcon ingest --cube`) or a training store (`softcon preprocess --out`)"
        return StoreCheck(path, "unknown", [Problem("", f"no Zarr group at {path!r}", fix)])
    members = dict(root.members())
    if isinstance(members.get(TILES), zarr.Group):
        return check_cube(root, path)
    if "schema_version" in root.attrs or ("labels" in members and "s2" in members):
        return check_training_store(root, path)
    fix = "point check-store at the cube's or the store's root folder"
    return StoreCheck(path, "unknown", [Problem("", "neither a cube (no tiles/ group) nor a training store", fix)])


# ---------------------------------------------------------------------------------------------- cube


def _days_of(seconds: np.ndarray, units: str, calendar: str) -> list[date]:
    if np.issubdtype(seconds.dtype, np.datetime64):
        decoded = seconds.astype("datetime64[D]")
    else:
        decoded = decode_cf_datetime(seconds, units, calendar).astype("datetime64[D]")
    return [date.fromisoformat(str(day)) for day in decoded]


def _check_time_series(
    tile: zarr.Group, prefix: str, time_dim: str, arrays: dict[str, zarr.Array], times: np.ndarray
) -> tuple[list[Problem], list[date]]:
    """Length of the data arrays and the item ids along one time coordinate, and duplicates in it."""
    problems: list[Problem] = []
    data_names, attr = TIME_SERIES[time_dim]
    steps = len(times)
    rebuild = REBUILD_TILE.format(path=prefix)
    for name in data_names:
        if name not in arrays:
            continue
        length = arrays[name].shape[0]
        if length > steps:
            what = f"{length} steps but {time_dim} has {steps}: an interrupted append (hidden from readers)"
            problems.append(Problem(f"{prefix}/{name}", what, INGEST_AGAIN))
        elif length < steps:
            problems.append(Problem(f"{prefix}/{name}", f"{length} steps but {time_dim} has {steps}", rebuild))
    units = str(arrays[time_dim].attrs.get("units", "seconds since 1970-01-01"))
    days = _days_of(times, units, str(arrays[time_dim].attrs.get("calendar", "proleptic_gregorian")))
    repeated = sorted({str(value) for value, count in Counter(times.tolist()).items() if count > 1})
    if repeated:
        what = f"time step(s) {', '.join(repeated)} stored more than once (days {sorted(set(map(str, days)))})"
        problems.append(Problem(f"{prefix}/{time_dim}", what, rebuild))
    items = tile.attrs.get(attr)
    legacy = tile.attrs.get(attr.replace("_items", "_item_ids"))  # a list, one entry per step
    if isinstance(items, dict):
        if len(items) != steps:
            what = f"{attr} names {len(items)} days but {time_dim} has {steps} steps"
            fix = INGEST_AGAIN if len(items) > steps else rebuild
            problems.append(Problem(f"{prefix} attrs", what, fix))
        # Item ids are keyed by solar day, times are UTC: a key may be one day off its step's UTC date.
        near = {day + timedelta(days=k) for day in days for k in (-1, 0, 1)}
        stray = sorted(key for key in items if date.fromisoformat(key) not in near)
        if stray:
            problems.append(Problem(f"{prefix} attrs", f"{attr} days {stray} match no {time_dim} step", INGEST_AGAIN))
        ids = [item for day_ids in items.values() for item in day_ids]
        twice = sorted(item for item, count in Counter(ids).items() if count > 1)
        if twice:
            problems.append(Problem(f"{prefix} attrs", f"{attr}: item(s) {twice} behind more than one day", rebuild))
    elif isinstance(legacy, list):
        if len(legacy) != steps:
            what = f"{attr.replace('_items', '_item_ids')} lists {len(legacy)} ids but {time_dim} has {steps} steps"
            problems.append(Problem(f"{prefix} attrs", what, rebuild))
    elif steps:
        problems.append(Problem(f"{prefix} attrs", f"no {attr} attribute for {steps} {time_dim} steps", rebuild))
    return problems, days


def check_tile(tile: zarr.Group, prefix: str, *, read_chunks: bool = True) -> tuple[list[Problem], dict[str, str]]:
    """Problems of one cube tile, and its summary row.

    ``read_chunks=False`` checks from the listing and the metadata only, reading no chunk but those of the 1-D
    coordinates (what ingest checks before it writes): lost chunk files, lengths, item ids, layout.
    """
    problems: list[Problem] = []
    rebuild = REBUILD_TILE.format(path=prefix)
    arrays = dict(tile.arrays())
    lost_steps: dict[str, tuple[list[str], list[int]]] = {}
    has_s1 = any(name in arrays for name in CUBE_OPTIONAL)
    required = [name for name in CUBE_ARRAYS if has_s1 or name not in CUBE_OPTIONAL]
    absent = [name for name in required if name not in arrays]
    if absent:
        what = f"arrays {absent} missing (a tile whose creation was interrupted, or damaged)"
        problems.append(Problem(prefix, what, RECREATE_TILE))
    values: dict[str, np.ndarray] = {}
    for name, array in sorted(arrays.items()):
        path = f"{prefix}/{name}"
        if name in CUBE_ARRAYS:
            problems += _check_layout(array, path, *CUBE_ARRAYS[name], fix=rebuild)
        elif name == "landcover":
            problems += _check_layout(array, path, *LANDCOVER, fix="re-run `softcon labels` on the cube")
        data, error = read_whole(array) if read_chunks or array.ndim <= 1 else (None, None)
        if error:
            problems.append(Problem(path, f"unreadable chunk ({error})", rebuild))
        elif data is not None:
            values[name] = data
        if name in STEP_ARRAYS:
            if STEP_ARRAYS[name] in arrays:  # steps past the time coordinate are an interrupted append's
                lost_steps[name] = missing_steps(array, arrays[STEP_ARRAYS[name]].shape[0])
        elif name in LOST_CHUNK_ARRAYS:
            lost = missing_chunks(array)
            if lost:
                what = f"{len(lost)} chunk file(s) missing ({', '.join(lost[:3])}): they read as nodata"
                problems.append(Problem(path, what, rebuild))
    for coordinate, allowed in (("band", S2_L1C_BANDS), ("pol", S1_POLARIZATIONS)):
        if coordinate in values:
            names = [str(value) for value in values[coordinate]]
            unknown = [name for name in names if name not in allowed]
            if unknown or len(set(names)) != len(names):
                problems.append(Problem(f"{prefix}/{coordinate}", f"names {names}, expected from {allowed}", rebuild))
    for name, (dims, _) in {**CUBE_ARRAYS, "landcover": LANDCOVER}.items():
        if name not in arrays:
            continue
        for axis, dim in enumerate(dims):
            if dim in ("band", "pol", "y", "x") and dim in arrays and arrays[name].shape[axis] != arrays[dim].shape[0]:
                what = f"{arrays[name].shape[axis]} along {dim}, the {dim} coordinate has {arrays[dim].shape[0]}"
                fix = "re-run `softcon labels` on the cube" if name == "landcover" else rebuild
                problems.append(Problem(f"{prefix}/{name}", what, fix))
    if "spatial_ref" in arrays and not ({"crs_wkt", "spatial_ref"} & set(arrays["spatial_ref"].attrs)):
        problems.append(Problem(f"{prefix}/spatial_ref", "no CRS (crs_wkt) on the grid mapping", rebuild))
    days: dict[str, list[date]] = {}
    for time_dim in TIME_SERIES:
        if time_dim in values:
            found, days[time_dim] = _check_time_series(tile, prefix, time_dim, arrays, values[time_dim])
            problems += found
    for name, (keys, steps) in lost_steps.items():
        if not steps:
            continue
        step_days = days.get(STEP_ARRAYS[name], [])
        lost_days = sorted({str(step_days[step]) for step in steps if step < len(step_days)})
        what = f"{len(keys)} chunk file(s) missing ({', '.join(keys[:3])}): they read as nodata; steps {steps}"
        fix = REINGEST_STEPS.format(days=", ".join(lost_days) or "of those steps", path=prefix)
        problems.append(Problem(f"{prefix}/{name}", what, fix, steps=tuple(steps)))
    s2_days = sorted(days.get("time", []))
    row = {
        "tile": prefix.rsplit("/", 1)[-1],
        "S2 steps": str(len(s2_days)),
        "S1 steps": str(len(days.get("time_s1", []))),
        "S2 dates": f"{s2_days[0]}..{s2_days[-1]}" if s2_days else "-",
        "land cover": "yes" if "landcover" in arrays else "no",
    }
    return problems, row


def check_cube(root: zarr.Group, store: str) -> StoreCheck:
    """Check every tile of a cube (see the module doc); a cube without tiles is empty, not broken."""
    problems: list[Problem] = []
    rows = []
    for tile_id in tile_ids(root):
        tile = tile_group(root, tile_id)
        assert tile is not None
        found, row = check_tile(tile, tile_path(tile_id))
        problems += found
        rows.append(row)
    return StoreCheck(store, "cube", problems, rows)


# ------------------------------------------------------------------------------------------ training store


def check_training_store(root: zarr.Group, store: str) -> StoreCheck:
    """Check a training store (see the module doc)."""
    problems: list[Problem] = []
    attrs: dict[str, Any] = dict(root.attrs)
    arrays = dict(root.arrays())
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        what = f"schema_version {version!r}; this code reads {SCHEMA_VERSION}"
        problems.append(Problem("", what, "re-run `softcon preprocess` with this version into a new --out"))
    expected = {**STORE_IMAGE_ARRAYS, **{name: (STORE_TABLE_DIMS.get(name, ("sample",)), (dtype,))
                                         for name, dtype in PLAN_DTYPES.items()}}  # fmt: skip
    if "masks" in arrays:
        expected["masks"] = STORE_MASKS
    absent = [name for name in expected if name not in arrays]
    if absent:
        problems.append(Problem("", f"arrays {absent} missing", REBUILD_STORE))
    n_samples = arrays["s2"].shape[0] if "s2" in arrays else 0
    values: dict[str, np.ndarray] = {}
    for name, array in sorted(arrays.items()):
        if name in expected:
            problems += _check_layout(array, name, *expected[name], fix=REBUILD_STORE)
        if array.ndim and array.shape[0] != n_samples:
            problems.append(Problem(name, f"{array.shape[0]} samples, s2 has {n_samples}", REBUILD_STORE))
        data, error = read_whole(array)
        if error:
            problems.append(Problem(name, f"unreadable chunk ({error})", REBUILD_STORE))
        elif data is not None:
            values[name] = data

    complete = attrs.get("complete")
    per_block = 0
    if "s2" in arrays:
        per_block = int(attrs.get("samples_per_block") or (arrays["s2"].shards or arrays["s2"].chunks)[0])
    bounds = block_bounds(n_samples, per_block) if per_block else []
    done = attrs.get("blocks_done")
    if not isinstance(done, list) or not all(isinstance(block, int) for block in done):
        problems.append(Problem("", f"blocks_done is {done!r}, not a list of block numbers", REBUILD_STORE))
        done = []
    outside = sorted(block for block in done if not 0 <= block < len(bounds))
    if outside or len(set(done)) != len(done):
        what = f"blocks_done {sorted(done)} names blocks outside 0..{len(bounds) - 1} or twice"
        problems.append(Problem("", what, REBUILD_STORE))
    if complete is not True:
        what = f"not complete ({len(set(done))} of {len(bounds)} write blocks done): preprocessing was interrupted"
        problems.append(Problem("", what, PREPROCESS_AGAIN))
    elif sorted(set(done)) != list(range(len(bounds))):
        missing = sorted(set(range(len(bounds))) - set(done))
        problems.append(Problem("", f"marked complete but blocks {missing} are not done", REBUILD_STORE))
    if complete is True and "norm_stats" not in attrs:
        problems.append(Problem("", "marked complete without norm_stats", REBUILD_STORE))
    if "s2" in arrays and arrays["s2"].shards:
        stored = _stored_keys(arrays["s2"])
        ndim = arrays["s2"].ndim
        blocks = sorted(set(done) & set(range(len(bounds))))
        lost = [block for block in blocks if _chunk_key(arrays["s2"], (block,) + (0,) * (ndim - 1)) not in stored]
        if lost:
            what = f"image shard(s) of done block(s) {sorted(lost)} missing: they read as nodata"
            problems.append(Problem("s2", what, REPAIR_STORE))
    if complete is True and MANIFEST_ATTR in attrs:  # an older version wrote none
        damage = find_damage(store, attrs)
        for what in damage.rebuild:
            problems.append(
                Problem("", f"differs from the manifest written when it was finished: {what}", REPAIR_STORE)
            )
        for shard in damage.shards:
            if (shard.array, shard.change) != ("s2", "missing"):  # reported above
                problems.append(Problem(shard.array, f"shard of block {shard.block} {shard.change}", REPAIR_STORE))

    problems += _check_store_values(attrs, arrays, values)
    if "masks" in arrays:
        problems += _check_masks(arrays["masks"], arrays.get("s2"), len(attrs.get("class_names", [])))
    problems += check_consolidated(store, root)
    split_names = list(attrs.get("split_names", ["train", "val", "test"]))
    split = values.get("split", np.zeros(0, np.uint8))
    row = {
        "samples": str(n_samples),
        **{name: str(int((split == k).sum())) for k, name in enumerate(split_names)},
        "classes": str(len(attrs.get("class_names", []))),
        "blocks done": f"{len(set(done))}/{len(bounds)}",
        "complete": str(complete is True).lower(),
        "schema": str(version),
    }
    return StoreCheck(store, "training store", problems, [row])


def _check_masks(masks: zarr.Array, s2: zarr.Array | None, n_classes: int) -> list[Problem]:
    """Masks the size of the patches, holding class indices or ``MASK_NODATA`` only (read a shard at a time)."""
    problems = []
    if s2 is not None and masks.shape[1:] != s2.shape[2:]:
        what = f"{masks.shape[1]} x {masks.shape[2]} px, the s2 patches are {s2.shape[2]} x {s2.shape[3]}"
        problems.append(Problem("masks", what, REBUILD_STORE))
    bad: set[int] = set()
    step = (masks.shards or masks.chunks)[0]
    for start in range(0, masks.shape[0], step):
        try:
            values = np.unique(masks[start : start + step])
        except Exception:  # an unreadable chunk: reported by read_whole already
            return problems
        bad |= {int(v) for v in values if v >= n_classes and v != MASK_NODATA}
    if bad:
        what = f"values {sorted(bad)[:5]} are neither a class index (< {n_classes}) nor {MASK_NODATA} (no class)"
        problems.append(Problem("masks", what, REBUILD_STORE))
    return problems


def _check_store_values(
    attrs: dict[str, Any], arrays: dict[str, zarr.Array], values: dict[str, np.ndarray]
) -> list[Problem]:
    """Attribute/shape agreement and value ranges of a training store's tables."""
    problems = []
    for name, attr in (("s2", "bands"), ("s1", "pols")):
        if name in arrays and attr in attrs and arrays[name].shape[1] != len(attrs[attr]):
            what = f"{arrays[name].shape[1]} channels but attrs {attr} names {len(attrs[attr])}"
            problems.append(Problem(name, what, REBUILD_STORE))
    class_names = attrs.get("class_names")
    for name in ("labels", "fractions"):
        if name in arrays and class_names is not None and arrays[name].shape[1] != len(class_names):
            what = f"{arrays[name].shape[1]} classes but attrs class_names names {len(class_names)}"
            problems.append(Problem(name, what, REBUILD_STORE))
    if "labels" in values and values["labels"].size:
        bad = np.unique(values["labels"][(values["labels"] != 0) & (values["labels"] != 1)])
        if bad.size:
            problems.append(Problem("labels", f"values {bad.tolist()[:5]} (multi-hot is 0 or 1)", REBUILD_STORE))
    if "fractions" in values and values["fractions"].size:
        fractions = values["fractions"]
        if not np.isfinite(fractions).all() or (fractions < 0).any() or (fractions > 1 + 1e-6).any():
            problems.append(Problem("fractions", "values outside [0, 1] or not finite", REBUILD_STORE))
    split_names = attrs.get("split_names", ["train", "val", "test"])
    if "split" in values and values["split"].size and int(values["split"].max()) >= len(split_names):
        codes = sorted({int(v) for v in values["split"] if v >= len(split_names)})
        problems.append(Problem("split", f"values {codes} name no split of {split_names}", REBUILD_STORE))
    tiles = attrs.get("tiles")
    tile_index = values.get("tile", np.zeros(0, np.int32))
    if tiles is not None and tile_index.size and (int(tile_index.min()) < 0 or int(tile_index.max()) >= len(tiles)):
        problems.append(Problem("tile", f"indices outside the {len(tiles)} tiles of attrs tiles", REBUILD_STORE))
    # A sample is one location at one time; a cube's location is its (tile, row, col), an imported corpus's its own.
    key_names = ("location", "tile", "time", "row", "col")
    keys = [values[name] for name in key_names if name in values]
    if len(keys) == len(key_names) and len(keys[0]):
        table = np.rec.fromarrays([np.asarray(k).astype(np.int64) for k in keys])
        _, counts = np.unique(table, return_counts=True)
        if (counts > 1).any():
            what = f"{int((counts > 1).sum())} (location, tile, time, row, col) sample(s) stored more than once"
            problems.append(Problem("", what, REBUILD_STORE))
    return problems
