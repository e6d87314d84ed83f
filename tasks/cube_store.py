"""The cube's storage: tile groups, their locks, crash-safe appends, repair, roll-back and damage checks.

This module owns the cube format (``docs/design.md``, "Data contracts"): it writes, reads back, repairs and
checks it; the ingest run loop (``tasks/ingest.py``) only hands it loaded tile-dates.

Layout (Zarr v3, zstd-compressed), one group per tile ``tiles/<tile_id>/``:

    s2        (time, band, y, x)     uint16 reflectance x10000 (baseline >= 04.00 offset removed), 0 = nodata
    scl       (time, y, x)           uint8 Sen2Cor scene classification (0 where the item has none)
    s1        (time_s1, pol, y, x)   float32 backscatter dB, NaN = nodata
    x, y (pixel centres), band, pol, time, time_s1 (acquisition time of the first item of the solar day),
    spatial_ref (CF grid mapping, rioxarray); group attrs ``s2_items`` / ``s1_items``: solar day -> item ids.

Chunks are one time step per chunk: (1, band, y, x) for s2, (1, y, x) for scl, (1, pol, y, x) for s1. A tile is
created with its first time step (by the first append). Time steps are in append order, not sorted: readers
that need order use ``ds.sortby("time")``.

Crash safety: an append writes the new chunks of every array *before* it grows any array's shape (through a
view of the array at its future shape), then grows the data arrays, records the item ids, and grows the
time coordinate last. Each shape change is one atomic metadata write (Zarr's local store writes a temporary
file and renames it), so a reader sees either the old tile or, while only the data arrays have grown, arrays
longer than ``time`` (``xr.open_zarr`` refuses such a tile rather than showing a partial step); a killed
append never shows a time step with missing data. ``open_tile`` truncates the data arrays back to the
time coordinate and drops item ids of days that are not in it, before anything else. A full disk
(``ENOSPC``/``EDQUOT``) during an append rolls the tile back at once (deletes the chunks written ahead or a
half-created tile, freeing their space) and raises ``StoreFullError`` naming the cube and what to do
(``rolled_back_on_full_disk``).

Concurrent writers: every change to a tile (creation, repair, append) happens under an exclusive lock on
``<cube>/.ingest-locks/<tile_id>.lock`` (``tile_lock``): locally ``fcntl.flock``, released by the kernel if the
process dies; on object storage a lease object created with a conditional write, taken over once stale
(``tasks/object_writes.py``). Callers re-read the tile's existing days under the lock just before appending.
Tiles share no written object, so writers of different tiles never wait for each other.

Damage: ``check_tiles`` checks existing tiles from their listing and metadata (``tasks/check_store.py:
check_tile`` without reading image chunks). Every committed step has a chunk file of each of its data arrays
(fill values included), so a lost file is seen; such a step whose day the run holds with the same item ids is
returned as a ``LostStep`` to load again and write in place (``write_lost_steps``). Any other damage (a lost
step of a day outside the run, a lost coordinate chunk, a data array shorter than its time coordinate, item
ids that do not match the steps) raises ``CubeDamageError`` before any write, naming each problem and its
fix. An interrupted append or tile creation is not damage: ``open_tile`` repairs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr

from softcon.compat.zarr_internals import AsyncArray, array_from_async, create_array_async, shape_view
from softcon.compat.zarr_internals import sync as zarr_sync
from softcon.tasks.grid import Tile
from softcon.tasks.object_writes import conditional_writes, object_lease
from softcon.tasks.stac_access import is_url

try:  # POSIX advisory locks; on other systems concurrent writers are not protected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ITEM_ATTRS",
    "S1_POLS",
    "SENSOR_ARRAYS",
    "TILE_ARRAYS",
    "TIME_UNITS",
    "CubeDamageError",
    "LostStep",
    "NewSteps",
    "OpenTile",
    "StoreFullError",
    "append_steps",
    "check_tiles",
    "create_tile",
    "existing_days",
    "open_tile",
    "rolled_back_on_full_disk",
    "solar_day",
    "tile_centre_lon",
    "tile_exists",
    "tile_lock",
    "write_lost_steps",
]

log = logging.getLogger(__name__)

LOCKS = ".ingest-locks"
"""Folder of the per-tile lock files inside a local cube; not a Zarr node (see ``quiet_lock_folder``)."""
TILES = "tiles"
"""The group that holds one group per tile; nothing outside this module spells a path inside the cube."""
INGEST_AGAIN = "re-run `softcon ingest` with the same --cube: it truncates an interrupted append and continues"
RECREATE_TILE = "re-run `softcon ingest` over the tile's dates: it recreates a tile that lacks arrays"
REBUILD_TILE = "delete the tile group {path} and re-run `softcon ingest` over its dates to write it again"


@contextlib.contextmanager
def quiet_lock_folder() -> Iterator[None]:
    """Listing a local cube meets its lock folder, which is no Zarr node: keep zarr from warning about it.

    Without it every reader that lists the cube (``softcon reproduce``, check-store, the cache's fingerprints)
    printed "Object at .ingest-locks is not recognized as a component of a Zarr hierarchy".
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=rf"Object at {re.escape(LOCKS)} is not recognized")
        yield


def tile_path(tile_id: str) -> str:
    """The path of a tile's group inside the cube."""
    return f"{TILES}/{tile_id}"


def open_cube(cube: str, mode: Literal["r", "r+", "a"] = "r", *, consolidated: bool | None = None) -> zarr.Group:
    """The cube's root group (Zarr v3). ``consolidated=False`` reads each node's own ``zarr.json``.

    Raises:
        FileNotFoundError: when there is no cube at ``cube`` (zarr's ``GroupNotFoundError`` is one).
    """
    return zarr.open_group(cube, mode=mode, zarr_format=3, use_consolidated=consolidated)


def ensure_cube(cube: str) -> zarr.Group:
    """The cube's root group, created (with its ``tiles`` group) if absent; safe when several writers create it at
    once (ingest workers creating the first tiles of a new cube): the one that loses the race opens what the winner
    wrote."""
    try:
        root = open_cube(cube, mode="r+")
    except FileNotFoundError:
        try:
            root = zarr.open_group(cube, mode="a", zarr_format=3)
        except zarr.errors.ContainsGroupError:
            root = open_cube(cube, mode="r+")
    if TILES not in root:
        with contextlib.suppress(zarr.errors.ContainsGroupError):
            root.create_group(TILES)
    return root


def tile_ids(root: zarr.Group) -> list[str]:
    """The ids of the cube's tiles, sorted; empty when it has none."""
    tiles = root.get(TILES)
    return sorted(tiles.group_keys()) if isinstance(tiles, zarr.Group) else []


def _read(node: zarr.Array | zarr.Group) -> np.ndarray:
    """All the values of an array (a coordinate, a time axis) as a numpy array."""
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{node.path} is a group, not an array")
    return np.asarray(node[:])


def _attr(node: zarr.Array | zarr.Group, name: str, default: Any) -> Any:
    """The attribute ``name`` of a group or array (a JSON value), or ``default``."""
    return node.attrs.get(name, default)


def tile_group(root: zarr.Group, tile_id: str) -> zarr.Group | None:
    """A tile's group under the cube's root group; None when the cube has no such tile."""
    group = root.get(tile_path(tile_id))
    return group if isinstance(group, zarr.Group) else None


def read_cube_tiles(cube: str) -> list[Tile]:
    """The tiles of a cube, rebuilt from each group's coordinates and CRS.

    Raises:
        ValueError: when there is no cube at ``cube`` or it holds no tile (both say to run ingest first).
    """
    try:
        root = open_cube(cube)
    except FileNotFoundError as error:
        raise ValueError(f"no cube at {cube!r}; run `softcon ingest --cube {cube}` first") from error
    tiles = []
    for tile_id in tile_ids(root):
        group = tile_group(root, tile_id)
        assert group is not None
        xs, ys = _read(group["x"]), _read(group["y"])
        resolution = float(xs[1] - xs[0])
        epsg = int(tile_id.split("_")[0])
        tiles.append(Tile(epsg, float(xs[0] - resolution / 2), float(ys[0] + resolution / 2), resolution, len(xs)))
    if not tiles:
        raise ValueError(f"{cube} has no {TILES}/ group; run `softcon ingest --cube {cube}` first")
    return tiles


def open_tile_dataset(cube: str, tile_id: str, **open_kwargs: Any) -> xr.Dataset:
    """A cube tile as a lazy xarray Dataset (``open_kwargs`` go to ``xr.open_zarr``, e.g. ``chunks=None``)."""
    return xr.open_zarr(cube, group=tile_path(tile_id), consolidated=False, **open_kwargs)


def write_land_cover(cube: str, tile_id: str, land_cover: np.ndarray, attrs: dict[str, Any]) -> None:
    """(Re)write a tile's ``landcover`` array whole (``y``, ``x``; 0 = nodata): same input, same bytes."""
    group = zarr.open_group(cube, path=tile_path(tile_id), mode="a", zarr_format=3)
    array = group.create_array(
        "landcover", shape=land_cover.shape, dtype="uint8", chunks=land_cover.shape, fill_value=0,
        dimension_names=("y", "x"), overwrite=True,
        attributes={**attrs, "grid_mapping": "spatial_ref", "coordinates": "spatial_ref", "nodata": 0},
    )  # fmt: skip
    array[...] = land_cover


TIME_UNITS = "seconds since 1970-01-01"
S1_POLS = ("VV", "VH")
"""The cube's ``pol`` coordinate: the order of S1 polarizations in ``s1`` (a missing one is all NaN)."""


class CubeDamageError(ValueError):
    """Tiles the run would write hold damage that re-running cannot repair; raised before anything is written."""


class StoreFullError(OSError):
    """The disk (or quota) holding the cube ran out of space; the cube is left as it was before the append."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent); None for URLs."""
    if is_url(path):
        return None
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def solar_day(when: datetime, lon: float) -> date:
    """Local solar day of an acquisition at longitude ``lon`` (odc-stac's ``solar_day`` grouping)."""
    return (when + timedelta(hours=lon / 15)).date()


def tile_centre_lon(tile: Tile) -> float:
    """The longitude whose solar day keys a tile's time steps (the tile's centre)."""
    west, _, east, _ = tile.lonlat_bounds
    return (west + east) / 2


def tile_template(tile: Tile, bands: Sequence[str]) -> tuple[xr.Dataset, dict[str, Any]]:
    """Empty (zero time steps) tile dataset with coords and CRS, and its Zarr encoding."""
    size = tile.size
    xs = tile.x0 + tile.resolution * (0.5 + np.arange(size))
    ys = tile.y0 - tile.resolution * (0.5 + np.arange(size))
    empty_time = np.array([], dtype="datetime64[ns]")
    ds = xr.Dataset(
        {
            "s2": (("time", "band", "y", "x"), np.zeros((0, len(bands), size, size), np.uint16)),
            "scl": (("time", "y", "x"), np.zeros((0, size, size), np.uint8)),
            "s1": (("time_s1", "pol", "y", "x"), np.zeros((0, len(S1_POLS), size, size), np.float32)),
        },
        coords={
            "time": empty_time, "time_s1": empty_time, "band": np.array(list(bands), dtype=object),
            "pol": np.array(list(S1_POLS), dtype=object), "y": ys, "x": xs,
        },
    )  # fmt: skip
    ds = ds.rio.write_crs(f"EPSG:{tile.epsg}").rio.write_transform(tile.transform)
    ds.attrs.update({"tile_id": tile.tile_id, "resolution": tile.resolution, "s2_items": {}, "s1_items": {}})
    ds["s2"].attrs.update({"long_name": "Sentinel-2 L2A surface reflectance x10000", "nodata": 0})
    ds["scl"].attrs.update({"long_name": "Sen2Cor scene classification", "nodata": 0})
    ds["s1"].attrs.update({"long_name": "Sentinel-1 backscatter", "units": "dB"})
    for name in ("s2", "scl", "s1"):
        ds[name].encoding["coordinates"] = "spatial_ref"  # keeps spatial_ref a coordinate when read back
    time_encoding = {"units": TIME_UNITS, "calendar": "proleptic_gregorian", "dtype": "int64", "chunks": (4096,)}
    encoding = {
        "s2": {"chunks": (1, len(bands), size, size), "_FillValue": None},
        "scl": {"chunks": (1, size, size), "_FillValue": None},
        "s1": {"chunks": (1, len(S1_POLS), size, size), "_FillValue": np.nan},
        "time": time_encoding,
        "time_s1": time_encoding,
    }
    return ds, encoding


TILE_ARRAYS = ("s2", "scl", "s1", "time", "time_s1", "band", "pol", "x", "y", "spatial_ref")
_NAN_FILL = base64.standard_b64encode(np.array(np.nan, "<f8").tobytes()).decode()
"""xarray's CF ``_FillValue`` attribute for NaN in Zarr v3 (base64 of the float64 bytes)."""


def create_tile(cube: str, tile: Tile, bands: Sequence[str]) -> tuple[zarr.Group, dict[str, zarr.Array]]:
    """Create the empty tile group directly with zarr: the same arrays, dtypes, chunks, codecs, attributes and
    ``dimension_names`` that ``tile_template(...).to_zarr`` writes (a test compares the two), in ~1/10 the time.

    The coordinates and ``spatial_ref`` are written before the two time coordinates are created, so a tile that
    lists every array of ``TILE_ARRAYS`` has all its coordinate values (``open_tile`` recreates it otherwise).
    Call it holding the tile lock.
    """
    template, encoding = tile_template(tile, bands)
    group = ensure_cube(cube).create_group(tile_path(tile.tile_id), attributes=dict(template.attrs), overwrite=True)
    specs: dict[str, tuple[dict[str, Any], np.ndarray | None]] = {}
    time_attrs = {"units": TIME_UNITS, "calendar": "proleptic_gregorian"}
    for name in ("s2", "scl", "s1", "band", "pol", "x", "y", "spatial_ref", "time_s1", "time"):
        variable = template[name].variable
        attrs = dict(variable.attrs)
        values: np.ndarray | None = None
        chunks: tuple[int, ...] = variable.shape
        dtype: Any = variable.dtype
        fill: Any = 0
        if name in ("s2", "scl", "s1"):
            chunks = encoding[name]["chunks"]
            attrs["coordinates"] = "spatial_ref"
            if name == "s1":
                attrs["_FillValue"], fill = _NAN_FILL, np.nan
        elif name in ("band", "pol"):
            dtype, fill, values = str, "", np.asarray(variable.values, dtype=object)
        elif name in ("x", "y"):
            attrs["_FillValue"], fill, values = _NAN_FILL, np.nan, variable.values
        elif name == "spatial_ref":
            dtype, fill = np.int64, 0  # its value 0 is the fill value: no chunk to write
        else:  # time, time_s1
            dtype, chunks, attrs = np.int64, encoding[name]["chunks"], time_attrs
        specs[name] = (
            {"shape": variable.shape, "dtype": dtype, "chunks": chunks, "fill_value": fill, "attributes": attrs,
             "dimension_names": list(variable.dims) if variable.dims else None},
            values,
        )  # fmt: skip

    async def create(name: str) -> AsyncArray[Any]:
        kwargs, values = specs[name]
        array = await create_array_async(group, name, **kwargs)
        if values is not None:
            await array.setitem(Ellipsis, values)
        return array

    async def create_all() -> dict[str, AsyncArray[Any]]:
        # Concurrently (few event-loop round trips); the time coordinates only once the rest is written.
        first = [name for name in specs if name not in SENSOR_ARRAYS]
        created = dict(zip(first, await asyncio.gather(*(create(name) for name in first)), strict=True))
        created.update(zip(SENSOR_ARRAYS, await asyncio.gather(*(create(name) for name in SENSOR_ARRAYS)), strict=True))
        return created

    arrays = {name: array_from_async(array) for name, array in zarr_sync(create_all()).items()}
    return group, arrays


@contextlib.contextmanager
def tile_lock(cube: str, tile_id: str) -> Iterator[None]:
    """Exclusive lock on one tile of the cube, held across processes and machines: ``flock`` on a local cube,
    a lease object written conditionally on S3-compatible object storage (``tasks/object_writes.py``); no lock on
    other object stores (``gs://``, ``az://``), where a cube takes one writer at a time."""
    if is_url(cube) and conditional_writes(cube):
        with object_lease(f"{cube.rstrip('/')}/{LOCKS}/{tile_id}.lock"):
            yield
        return
    if is_url(cube) or fcntl is None:  # other object stores: one writer per cube
        yield
        return
    folder = Path(cube) / LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{tile_id}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


SENSOR_ARRAYS = {"time": ("s2", "scl"), "time_s1": ("s1",)}
"""Time coordinate -> the data arrays along it."""
ITEM_ATTRS = {"time": "s2_items", "time_s1": "s1_items"}
"""Time coordinate -> the group attribute recording its item ids per solar day."""


@dataclass
class OpenTile:
    """A tile's group with handles to its arrays, their metadata read in one listing (few store round trips)."""

    group: zarr.Group
    arrays: dict[str, zarr.Array]
    seconds: dict[str, np.ndarray]
    """Time coordinate (``time``, ``time_s1``) -> its stored values, seconds since 1970."""

    def days(self, time_dim: str, lon: float) -> set[date]:
        """Solar days already in the tile along ``time`` or ``time_s1``."""
        return {solar_day(_decode_time(int(s)), lon) for s in self.seconds[time_dim]}


def _open_existing(cube: str, path: str) -> zarr.Group | None:
    try:
        return zarr.open_group(cube, path=path, mode="r+", zarr_format=3)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one too
        return None


def tile_exists(cube: str, tile: Tile) -> bool:
    """Whether the cube holds a group for the tile (complete or not)."""
    return _open_existing(cube, tile_path(tile.tile_id)) is not None


def open_tile(cube: str, tile: Tile, bands: Sequence[str], *, check_bands: bool = True) -> OpenTile:
    """The tile's group, created empty if missing and repaired after an interrupted append.

    Call it holding ``tile_lock(cube, tile.tile_id)``.

    Raises:
        ValueError: when the tile holds other bands than ``bands`` (with ``check_bands``).
    """
    path = tile_path(tile.tile_id)
    group = _open_existing(cube, path)
    arrays = dict(group.arrays()) if group is not None else {}
    if group is not None and not set(TILE_ARRAYS) <= set(arrays):
        # A run killed while creating the tile: it holds no time step yet, so start it again.
        log.warning("tile %s in %s is incomplete (interrupted creation); recreating it", tile.tile_id, cube)
        del zarr.open_group(cube, mode="a", zarr_format=3)[path]
        group = None
    if group is None:
        group, arrays = create_tile(cube, tile, bands)
    if check_bands:
        stored_bands = [str(b) for b in _read(arrays["band"])]
        if stored_bands != list(bands):
            raise ValueError(
                f"tile {tile.tile_id} in {cube} holds bands {stored_bands}, not the requested {list(bands)}"
            )
    opened = OpenTile(group, arrays, {time_dim: _read(arrays[time_dim]) for time_dim in SENSOR_ARRAYS})
    _repair(opened)
    return opened


def _repair(tile: OpenTile) -> None:
    """Undo an interrupted append: truncate data arrays to their time coordinate, drop ids of unwritten days."""
    stale_ids: dict[str, dict[str, list[str]]] = {}
    for time_dim, names in SENSOR_ARRAYS.items():
        steps = len(tile.seconds[time_dim])
        for name in names:
            array = tile.arrays[name]
            if array.shape[0] != steps:
                log.warning(
                    "tile %s: %s has %d steps, %s %d; truncating", tile.group.path, name, array.shape[0], time_dim,
                    steps,
                )  # fmt: skip
                array.resize((steps, *array.shape[1:]))
        attr = ITEM_ATTRS[time_dim]
        recorded = dict(_attr(tile.group, attr, {}))
        days = {_decode_time(int(s)).date().isoformat() for s in tile.seconds[time_dim]}
        # Item ids are keyed by solar day, time by acquisition time: a day's id key may differ from its
        # UTC date by one, so keep keys within a day of a stored time.
        near = {(date.fromisoformat(d) + timedelta(days=k)).isoformat() for d in days for k in (-1, 0, 1)}
        stale = [day for day in recorded if day not in near]
        if stale:
            log.warning("tile %s: dropping item ids of unwritten days %s", tile.group.path, stale)
            stale_ids[attr] = {day: ids for day, ids in recorded.items() if day not in stale}
    if stale_ids:
        tile.group.update_attributes(stale_ids)


def _drop_chunks_from(array: zarr.Array, steps: int) -> None:
    """Delete the stored chunks of ``array`` that start at or past ``steps`` along axis 0 (written ahead of an
    append that never committed; readers do not see them, but they hold disk space)."""
    store, prefix = array.store_path.store, f"{array.store_path.path}/c/"
    per_chunk = array.chunks[0]

    async def drop() -> None:
        keys = [key async for key in store.list_prefix(prefix)]
        stale = [key for key in keys if int(key[len(prefix) :].split("/")[0]) * per_chunk >= steps]
        await asyncio.gather(*(store.delete(key) for key in stale))

    zarr_sync(drop())


def _roll_back(cube: str, tile: Tile) -> None:
    """Put a tile back as it was before a failed append (a full disk): delete a half-created tile, or the chunks
    written ahead, then truncate grown arrays and drop item ids of unwritten days. Best effort: what is left,
    the next ingest repairs. Call it holding the tile lock."""
    path = tile_path(tile.tile_id)
    try:
        group = _open_existing(cube, path)
        if group is None:
            return
        arrays = dict(group.arrays())
        if not set(TILE_ARRAYS) <= set(arrays):  # creation interrupted: nothing committed, remove it all
            del zarr.open_group(cube, mode="a", zarr_format=3)[path]
            return
        seconds = {time_dim: _read(arrays[time_dim]) for time_dim in SENSOR_ARRAYS}
        for time_dim, names in SENSOR_ARRAYS.items():
            for name in names:
                _drop_chunks_from(arrays[name], len(seconds[time_dim]))
        _repair(OpenTile(group, arrays, seconds))
    except Exception as error:  # the disk may still be full; the next run's open_tile repairs
        log.warning("could not roll back tile %s of %s after a failed append (%s)", tile.tile_id, cube, error)


@contextlib.contextmanager
def rolled_back_on_full_disk(cube: str, tile: Tile) -> Iterator[None]:
    """On a full disk (``ENOSPC``/``EDQUOT``) in the block, roll the tile back and raise ``StoreFullError``.

    Wrap the opening and the append of a tile in it, inside ``tile_lock`` (the roll-back needs the lock).

    Raises:
        StoreFullError: naming the cube, the tile, the space left and what to do.
    """
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        _roll_back(cube, tile)
        free = _free_bytes(cube)
        raise StoreFullError(
            error.errno,
            f"no space left on the disk holding cube {cube} ({'?' if free is None else f'{free / 2**20:.1f}'} "
            f"MiB free) while writing tile {tile.tile_id}; the cube is unchanged past its last complete time step. "
            "Free space there (or give --cube on a larger disk) and run softcon ingest again: it continues "
            "with the dates still missing",
        ) from error


def _decode_time(seconds: int) -> datetime:
    return datetime(1970, 1, 1) + timedelta(seconds=seconds)


def existing_days(group: zarr.Group, time_dim: str, lon: float) -> set[date]:
    """Solar days already in a tile along ``time`` or ``time_s1``."""
    return {solar_day(_decode_time(int(s)), lon) for s in _read(group[time_dim])}


def _future_view(array: zarr.Array, length: int) -> AsyncArray[Any]:
    """The array at a longer length along axis 0, without writing that length to the store.

    It writes a chunk of fill values too (zarr skips those by default), so that every committed step has its
    chunk files and a lost one shows in a listing (``check_tiles``).
    """
    return shape_view(array, (length, *array.shape[1:]), write_empty_chunks=True)


def write_ahead(writes: Sequence[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """Write each ``values`` at ``start:`` along axis 0 of its array *without* changing the stored shapes.

    Views of the arrays at their future shapes write the new chunks, all concurrently; the shapes (what
    readers see) only grow when ``grow_arrays`` writes the metadata, so a crash before that leaves no visible trace.
    """

    async def write_all() -> None:
        await asyncio.gather(
            *(_future_view(array, max(array.shape[0], start + len(values)))
              .setitem(slice(start, start + len(values)), values)
              for array, start, values in writes)
        )  # fmt: skip

    zarr_sync(write_all())


def grow_arrays(array: zarr.Array, steps: int) -> None:
    """Make ``steps`` the array's length along axis 0 (one metadata write)."""
    array.resize((steps, *array.shape[1:]))


@dataclass
class NewSteps:
    """Time steps of one sensor to append to a tile."""

    time_dim: str
    """``time`` (S2: arrays s2, scl) or ``time_s1`` (S1: array s1)."""
    arrays: dict[str, list[np.ndarray]]
    times: Sequence[datetime]
    item_ids: dict[str, list[str]]
    """Solar day (ISO) -> item ids."""


def append_steps(tile: OpenTile, appends: Sequence[NewSteps]) -> int:
    """Append time steps of one or both sensors crash-safely (see the module doc); returns pixel bytes written.

    Order: every new chunk written ahead, then data arrays grown, then the item ids recorded, then the
    time coordinates grown: the commit point of each sensor.
    """
    appends = [a for a in appends if a.times]
    if not appends:
        return 0
    epoch = datetime(1970, 1, 1)
    writes, grows, commits, attrs, pixel_bytes = [], [], [], {}, 0
    for append in appends:
        steps = len(tile.seconds[append.time_dim])
        new = steps + len(append.times)
        for name, values in append.arrays.items():
            stacked = np.stack(values)
            writes.append((tile.arrays[name], steps, stacked))
            grows.append((tile.arrays[name], new))
            pixel_bytes += stacked.nbytes
        seconds = np.array([int((t.replace(tzinfo=None) - epoch).total_seconds()) for t in append.times], np.int64)
        writes.append((tile.arrays[append.time_dim], steps, seconds))
        commits.append((tile.arrays[append.time_dim], new))
        tile.seconds[append.time_dim] = np.concatenate([tile.seconds[append.time_dim], seconds])
        attr = ITEM_ATTRS[append.time_dim]
        attrs[attr] = {**_attr(tile.group, attr, {}), **append.item_ids}
    write_ahead(writes)
    for array, steps in grows:
        grow_arrays(array, steps)
    tile.group.update_attributes(attrs)
    for array, steps in commits:
        grow_arrays(array, steps)
    return int(pixel_bytes)


@dataclass(frozen=True)
class LostStep:
    """A committed time step of a tile whose chunk files are lost, and the items to load it from again."""

    time_dim: str
    step: int
    day: date
    """The step's solar day (its key in ``s2_items`` / ``s1_items``)."""
    arrays: tuple[str, ...]
    """The data arrays whose chunk of the step is lost."""
    items: list[dict[str, Any]]


def check_tiles(cube: str, tiles: Sequence[Tile], items: Sequence[dict[str, Any]]) -> dict[str, list[LostStep]]:
    """Check the existing tiles a run will write before it writes anything, from their listing and metadata.

    An interrupted append or tile creation is left to ``open_tile`` (it repairs them), a land cover problem to
    the labels stage. Lost chunk files of committed steps whose item ids (as the tile recorded them for the
    step's day) are all among ``items`` are returned, to be written again from those items; any other problem
    is an error.

    Returns:
        Tile id -> its steps to load and write again.

    Raises:
        CubeDamageError: naming every problem found that this run cannot repair (where, what, and the fix).
    """
    from softcon.tasks.check_store import check_tile  # the checker reads the layout defined here

    lost_steps: dict[str, list[LostStep]] = {}
    errors: list[str] = []
    by_id = {item["id"]: item for item in items}
    for tile in tiles:
        prefix = tile_path(tile.tile_id)
        if _open_existing(cube, prefix) is None:
            continue
        with tile_lock(cube, tile.tile_id):
            group = _open_existing(cube, prefix)
            assert group is not None  # tiles are never deleted while their lock is held
            arrays = dict(group.arrays())
            if not set(TILE_ARRAYS) <= set(arrays):
                held = {dim: arrays[dim].shape[0] for dim in SENSOR_ARRAYS if dim in arrays}
                if any(held.values()):  # an interrupted creation holds no step: open_tile creates it again
                    absent = sorted(set(TILE_ARRAYS) - set(arrays))
                    errors.append(f"{prefix}: arrays {absent} missing from a tile holding steps {held}. Fix: "
                                  f"{REBUILD_TILE.format(path=prefix)}")  # fmt: skip
                continue
            problems, _ = check_tile(group, prefix, read_chunks=False)
            seconds = {dim: _read(arrays[dim]) for dim in SENSOR_ARRAYS}
            recorded = {dim: dict(_attr(group, ITEM_ATTRS[dim], {})) for dim in SENSOR_ARRAYS}
        lon = tile_centre_lon(tile)
        lost: dict[tuple[str, int], list[str]] = defaultdict(list)
        for problem in problems:
            if problem.fix in (INGEST_AGAIN, RECREATE_TILE) or problem.path.endswith("/landcover"):
                continue
            if not problem.steps:
                errors.append(f"{problem.path}: {problem.what}. Fix: {problem.fix}")
                continue
            name = problem.path.rsplit("/", 1)[-1]
            time_dim = next(dim for dim, names in SENSOR_ARRAYS.items() if name in names)
            for step in problem.steps:
                lost[(time_dim, step)].append(name)
        for (time_dim, step), names in sorted(lost.items()):
            when = _decode_time(int(seconds[time_dim][step]))
            day = solar_day(when, lon)
            ids = sorted(recorded[time_dim].get(day.isoformat(), []))
            day_items = [by_id[item_id] for item_id in ids if item_id in by_id]
            if ids and len(day_items) == len(ids):
                lost_steps.setdefault(tile.tile_id, []).append(LostStep(time_dim, step, day, tuple(names), day_items))
                continue
            absent = sorted(set(ids) - set(by_id))
            why = f"its items {absent} are not among the run's" if ids else f"the tile records no item ids for {day}"
            errors.append(
                f"{prefix}/{','.join(names)}: the chunk file(s) of step {step} ({day}) are missing: they read as "
                f"nodata, and this run cannot write them again ({why}). Fix: re-run `softcon ingest` with the same "
                f"--cube and --start {when.date()} --end {when.date()}: it writes the lost step again from the same "
                f"items; or {REBUILD_TILE.format(path=prefix)}"
            )
    if errors:
        raise CubeDamageError(
            f"cube {cube}: {len(errors)} problem(s) in the tiles this run would write; nothing written:\n  "
            + "\n  ".join(errors)
        )
    return lost_steps


def write_lost_steps(
    cube: str, tile: Tile, bands: Sequence[str], steps: Sequence[tuple[LostStep, Mapping[str, np.ndarray]]]
) -> None:
    """Write the lost chunk files of committed steps in place, under the tile lock (no shape changes).

    Args:
        steps: each lost step with its values loaded again: data array name (``s2``, ``scl``, ``s1``) -> the
            step's pixels; only the arrays in ``step.arrays`` are written.
    """
    with tile_lock(cube, tile.tile_id):
        opened = open_tile(cube, tile, bands, check_bands=False)
        write_ahead([
            (opened.arrays[name], step.step, values[name][None]) for step, values in steps for name in step.arrays
        ])  # fmt: skip
