"""Reading and writing the training store (Zarr v3): layout, resumable block writes, final attributes.

Layout (``sample`` is ordered by location then time, so all dates of a location are contiguous)::

    s2        (sample, band, h, w)  uint16   shards of one block of samples, inner chunks of 1 sample
    s1        (sample, pol, h, w)   float32  same; NaN where no S1 date matched
    labels    (sample, class)       uint8    multi-hot
    fractions (sample, class)       float32
    labelled, split, location, tile, time, row, col  (sample,)   chunks of one block
    masks     (sample, h, w)        uint8    optional (preprocess ``masks``): per-pixel index into class_names,
                                             MASK_NODATA where the land cover has no class; sharded like s2

Resumability: ``create_store`` writes every per-sample array (the "plan") up front and records
``blocks_done = []``; each block of images is one shard, written whole by one worker and then marked
done by the driver (the single writer of attributes). A killed run leaves unmarked blocks, which the
next run with the same fingerprint rewrites; ``complete = True`` is set last, after the statistics.

Manifest: ``finish_store`` records, in the same attribute write that sets ``complete``, what the store
consists of (root attribute ``manifest``): per array the size of each block's chunk or shard file (0 = no
file: a block of fill values), a digest of every node's ``zarr.json`` (the root's without its attributes)
and one of every root attribute except the manifest. ``find_damage`` compares a store with it from one
listing and the metadata files (no chunk is decoded; local paths and fsspec URLs alike): image shards
missing or changed are blocks to write again, anything else means the store must be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA_VERSION = 1
# Images are written once and decoded every epoch: LZ4HC with byte shuffle decodes about 3x faster than
# zstd + bitshuffle for about 5 % more bytes (real S2 L1C patches: ratio 1.80 vs 1.89, 0.13 vs 0.39 ms per
# 13x120x120 decode); bench/bench_loader.py measures what that buys the loader.
IMAGE_COMPRESSOR = BloscCodec(cname="lz4hc", clevel=5, shuffle="shuffle")
TABLE_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
MASK_NODATA = 255
"""Value of a ``masks`` pixel without a class (land-cover nodata, or a code outside the scheme): the ignore index."""


@dataclass(frozen=True)
class SamplePlan:
    """Every per-sample value of the store except the images; arrays of length n_samples."""

    location: np.ndarray  # int64
    tile: np.ndarray  # int32, index into tile ids
    time: np.ndarray  # datetime64[ns]
    row: np.ndarray  # int32
    col: np.ndarray  # int32
    split: np.ndarray  # uint8
    labels: np.ndarray  # uint8 (sample, class)
    fractions: np.ndarray  # float32 (sample, class)
    labelled: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.location)

    def select(self, start: int, stop: int) -> SamplePlan:
        """The plan of samples [start, stop)."""
        return SamplePlan(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})


PLAN_DTYPES: dict[str, str] = {
    "location": "int64",
    "tile": "int32",
    "time": "datetime64[ns]",
    "row": "int32",
    "col": "int32",
    "split": "uint8",
    "labels": "uint8",
    "fractions": "float32",
    "labelled": "bool",
}


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a store's group; a clear error when the store holds a group there instead."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"training store {group.store}: {name!r} is a group, not an array")
    return node


def _attrs(group: zarr.Group) -> dict[str, Any]:
    """A group's attributes as a plain dict (zarr types the values as JSON, which narrows nothing here)."""
    return dict(group.attrs)


def block_bounds(n_samples: int, samples_per_block: int) -> list[tuple[int, int]]:
    """[start, stop) sample ranges of the write blocks (each one shard of the image arrays)."""
    return [(start, min(start + samples_per_block, n_samples)) for start in range(0, n_samples, samples_per_block)]


def open_store(store: str | Path) -> zarr.Group:
    """Open a training store read-only, refusing one with an unknown schema version."""
    try:
        group = zarr.open_group(str(store), mode="r")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"training store {store} does not exist") from error
    version = group.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"training store {store} has schema_version {version!r}; this code reads schema_version "
            f"{SCHEMA_VERSION} (re-run `softcon preprocess` to rewrite it)"
        )
    return group


def read_store_attrs(out: str) -> dict[str, Any] | None:
    """The store's attributes, or None when there is no readable store at ``out``."""
    try:
        return dict(zarr.open_group(out, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None


def create_store(
    out: str,
    plan: SamplePlan,
    *,
    n_bands: int,
    n_pols: int,
    patch_size: int,
    samples_per_block: int,
    attrs: dict[str, Any],
    masks: bool = False,
) -> None:
    """Create (overwriting) the store: empty image arrays (and ``masks`` when asked), the full plan, and ``attrs``."""
    n_samples, n_classes = len(plan), plan.labels.shape[1]
    block = max(1, min(samples_per_block, n_samples))
    # The old root metadata goes first: a run killed while the old store is deleted (an object store deletes
    # key by key, the root's ``zarr.json`` last) must not leave its fingerprint and ``complete`` over the rest.
    fs, root = _store_fs(out)
    if fs.exists(f"{root}/zarr.json"):
        fs.rm(f"{root}/zarr.json")
    group = zarr.open_group(out, mode="w", zarr_format=3)
    for name, n_channels, dtype, fill, channel_dim in (
        ("s2", n_bands, "uint16", 0, "band"),
        ("s1", n_pols, "float32", np.nan, "pol"),
    ):
        group.create_array(
            name,
            shape=(n_samples, n_channels, patch_size, patch_size),
            dtype=dtype,
            chunks=(1, n_channels, patch_size, patch_size),
            shards=(block, n_channels, patch_size, patch_size),
            compressors=IMAGE_COMPRESSOR,
            fill_value=fill,
            dimension_names=("sample", channel_dim, "h", "w"),
        )
    if masks:
        group.create_array(
            "masks",
            shape=(n_samples, patch_size, patch_size),
            dtype="uint8",
            chunks=(1, patch_size, patch_size),
            shards=(block, patch_size, patch_size),
            compressors=IMAGE_COMPRESSOR,
            fill_value=MASK_NODATA,
            dimension_names=("sample", "h", "w"),
        )
    for name, dtype in PLAN_DTYPES.items():
        values = getattr(plan, name)
        two_d = name in ("labels", "fractions")
        array = group.create_array(
            name,
            shape=(n_samples, n_classes) if two_d else (n_samples,),
            dtype=dtype,
            chunks=(block, n_classes) if two_d else (block,),
            compressors=TABLE_COMPRESSOR,
            dimension_names=("sample", "class") if two_d else ("sample",),
        )
        if n_samples:
            array[...] = np.asarray(values, dtype=dtype)
    group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "blocks_done": [], "complete": False})


def read_plan(out: str) -> SamplePlan:
    """Read the per-sample plan back from a store (to resume writing)."""
    group = zarr.open_group(out, mode="r")
    return SamplePlan(**{name: np.asarray(_array(group, name)[...]) for name in PLAN_DTYPES})


def write_images(out: str, start: int, s2: np.ndarray, s1: np.ndarray) -> None:
    """Write one block of (sample, band, h, w) S2 and S1 patches at sample offset ``start``."""
    group = zarr.open_group(out, mode="r+")
    stop = start + len(s2)
    _array(group, "s2")[start:stop] = s2
    _array(group, "s1")[start:stop] = s1


def write_masks(out: str, start: int, masks: np.ndarray) -> None:
    """Write one block of (sample, h, w) class-index masks at sample offset ``start``."""
    _array(zarr.open_group(out, mode="r+"), "masks")[start : start + len(masks)] = masks


def read_images(out: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S2, S1 and split of samples [start, stop)."""
    group = zarr.open_group(out, mode="r")
    return (
        np.asarray(_array(group, "s2")[start:stop]),
        np.asarray(_array(group, "s1")[start:stop]),
        np.asarray(_array(group, "split")[start:stop]),
    )


def mark_blocks_done(out: str, blocks: list[int]) -> None:
    """Record finished blocks (call from one process only: attributes are rewritten whole)."""
    group = zarr.open_group(out, mode="r+")
    done = sorted(set(_attrs(group).get("blocks_done", [])) | set(blocks))
    group.attrs["blocks_done"] = done


def finish_store(out: str, attrs: dict[str, Any]) -> None:
    """Set the final attributes, consolidate the metadata, then mark the store complete with its manifest.

    ``complete`` and the manifest are one attribute write, the last one: a run killed before it leaves an
    incomplete store (which the next run resumes), never a complete one that cannot be checked.
    """
    group = zarr.open_group(out, mode="r+")
    group.attrs.update(attrs)
    with warnings.catch_warnings():
        # Consolidated metadata is a zarr-python extension of v3; it spares xarray a listing per array.
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(out)
    group = zarr.open_group(out, mode="r+")  # with the consolidated metadata, which the next write keeps
    final = {**dict(group.attrs), "complete": True}
    final[MANIFEST_ATTR] = build_manifest(out, final)
    group.attrs.put(final)


# ------------------------------------------------------------------------------------------------ manifest

MANIFEST_ATTR = "manifest"
MANIFEST_VERSION = 1
IMAGE_ARRAYS = ("s2", "s1", "masks")
"""Arrays written block by block after the plan: a lost or changed shard of theirs is written again by resuming."""
STORE_ENTRIES = frozenset({"zarr.json", *IMAGE_ARRAYS, *PLAN_DTYPES})
"""Names directly under a training store's root."""


@dataclass(frozen=True)
class ShardChange:
    """An image shard that differs from the manifest (or, store not complete, a done block's missing S2 shard)."""

    array: str
    block: int
    change: str
    """``missing``, ``added`` or ``changed (A -> B bytes)``."""

    def __str__(self) -> str:
        return f"{self.array}: the shard of block {self.block} is {self.change}"


@dataclass(frozen=True)
class StoreDamage:
    """How a store differs from its manifest (complete) or from its done blocks (not complete yet)."""

    rebuild: tuple[str, ...] = ()
    """Damage that only a rebuild repairs (metadata, attributes, plan chunks, no manifest), one line each."""
    shards: tuple[ShardChange, ...] = ()
    """Image shards lost or changed: resuming writes their blocks again."""

    @property
    def lost_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({shard.block for shard in self.shards}))

    def describe(self) -> str:
        return "; ".join([*self.rebuild, *map(str, self.shards)])


def _store_fs(out: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``out`` (local or an fsspec URL, with the credentials zarr would use) and its root path."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # object stores: listings cached before this process wrote would be stale
    return fs, root


def _store_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """Every file of the store, relative key -> size in bytes, from one recursive listing."""
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {name[len(root) + 1 :]: int(info["size"]) for name, info in found.items() if name.startswith(f"{root}/")}


def _read_metadata(fs: fsspec.AbstractFileSystem, root: str, files: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Node path ("" for the root) -> its parsed ``zarr.json``, all read in one batch."""
    keys = sorted(key for key in files if key.rsplit("/", 1)[-1] == "zarr.json")
    raw = fs.cat([f"{root}/{key}" for key in keys])
    return {key.removesuffix("zarr.json").rstrip("/"): json.loads(raw[f"{root}/{key}"]) for key in keys}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _n_blocks(metadata: dict[str, Any]) -> int:
    """Chunks (shards) along the sample axis of an array, from its ``zarr.json``."""
    shape, chunk = metadata["shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"]
    return -(-shape[0] // chunk[0]) if shape else 1


def _chunk_files(files: dict[str, int]) -> dict[str, dict[str, int]]:
    """Array name -> its chunk (shard) files: key under ``<name>/c/`` -> size."""
    chunks: dict[str, dict[str, int]] = {}
    for key, size in files.items():
        name, _, rest = key.partition("/c/")
        if rest and "/" not in name:
            chunks.setdefault(name, {})[rest] = size
    return chunks


def _block_of(key: str) -> int | None:
    """The block of a chunk key under ``c/``: every array of the store has one chunk across its other axes, so
    block ``i`` is ``i/0/...``; None for a key of another form."""
    parts = key.split("/")
    if not all(part.isdigit() for part in parts) or any(int(part) for part in parts[1:]):
        return None
    return int(parts[0])


def _block_sizes(chunks: dict[str, int], n_blocks: int) -> tuple[list[int], list[str]]:
    """Size of each block's chunk file (0: no file), and the chunk keys that fit no block."""
    sizes, stray = [0] * n_blocks, []
    for key, size in chunks.items():
        block = _block_of(key)
        if block is None or block >= n_blocks:
            stray.append(key)
        else:
            sizes[block] = size
    return sizes, stray


def _node_name(node: str) -> str:
    return f"{node}/zarr.json" if node else "zarr.json (root group)"


def build_manifest(out: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """What the store at ``out`` consists of, once its root attributes are ``attrs`` (see the module doc)."""
    fs, root = _store_fs(out)
    files = _store_files(fs, root)
    nodes, chunks = _read_metadata(fs, root, files), _chunk_files(files)
    return {
        "version": MANIFEST_VERSION,
        "metadata": {node: _digest({**doc, "attributes": None} if not node else doc) for node, doc in nodes.items()},
        "attributes": {key: _digest(value) for key, value in attrs.items() if key != MANIFEST_ATTR},
        "files": {
            node: _block_sizes(chunks.get(node, {}), _n_blocks(doc))[0]
            for node, doc in nodes.items()
            if doc.get("node_type") == "array"
        },
    }


def _changes(kind: str, recorded: dict[str, str], now: dict[str, str], name: Any = str) -> list[str]:
    return [
        f"{kind} {name(key)} " + ("removed" if key not in now else "added" if key not in recorded else "changed")
        for key in sorted(set(recorded) | set(now))
        if recorded.get(key) != now.get(key)
    ]


def find_damage(out: str, attrs: dict[str, Any]) -> StoreDamage:
    """Compare the store at ``out`` (root attributes ``attrs``) with what it recorded, from a listing and its
    metadata files only (no chunk is read).

    A complete store is compared with its manifest: image shards missing, changed in size or added are
    ``shards`` (their blocks are written again); changed metadata, attributes or plan chunks, or no manifest at
    all, are ``rebuild``. An incomplete store has no manifest yet: a done block whose S2 shard is missing is
    written again (an S1 shard may be absent by right, when no S1 date matched any of its samples).
    """
    fs, root = _store_fs(out)
    files = _store_files(fs, root)
    if attrs.get("complete") is not True:
        done = sorted(block for block in attrs.get("blocks_done", []) if isinstance(block, int) and block >= 0)
        sizes, _ = _block_sizes(_chunk_files(files).get("s2", {}), max(done, default=-1) + 1)
        return StoreDamage(shards=tuple(ShardChange("s2", block, "missing") for block in done if not sizes[block]))
    manifest = attrs.get(MANIFEST_ATTR)
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return StoreDamage(rebuild=("marked complete without a manifest of its files (an older version wrote it)",))
    nodes = _read_metadata(fs, root, files)
    stored_attrs = nodes.get("", {}).get("attributes", {})
    rebuild = _changes(
        "attribute", manifest["attributes"], {k: _digest(v) for k, v in stored_attrs.items() if k != MANIFEST_ATTR}
    )
    metadata = {node: _digest({**doc, "attributes": None} if not node else doc) for node, doc in nodes.items()}
    rebuild += _changes("metadata", manifest["metadata"], metadata, _node_name)
    shards, chunks = [], _chunk_files(files)
    for name, recorded in manifest["files"].items():
        sizes, stray = _block_sizes(chunks.get(name, {}), len(recorded))
        rebuild += [f"{name}/c/{key}: a file the finished store did not hold" for key in stray]
        for block, (was, now) in enumerate(zip(recorded, sizes, strict=True)):
            if was == now:
                continue
            change = "missing" if not now else "added" if not was else f"changed ({was} -> {now} bytes)"
            if name in IMAGE_ARRAYS:
                shards.append(ShardChange(name, block, change))
            else:
                rebuild.append(f"{name}: the chunk of block {block} is {change}")
    return StoreDamage(rebuild=tuple(rebuild), shards=tuple(shards))


def reopen_blocks(out: str, blocks: tuple[int, ...]) -> None:
    """Mark ``blocks`` not done (the store incomplete, its manifest dropped: one attribute write), then delete
    their image shards, so that resuming writes them afresh."""
    group = zarr.open_group(out, mode="r+")
    attrs = _attrs(group)
    attrs["blocks_done"] = sorted(set(attrs.get("blocks_done", [])) - set(blocks))
    attrs["complete"] = False
    attrs.pop(MANIFEST_ATTR, None)
    group.attrs.put(attrs)
    fs, root = _store_fs(out)
    chunks = _chunk_files(_store_files(fs, root))
    doomed = [
        f"{root}/{name}/c/{key}" for name in IMAGE_ARRAYS for key in chunks.get(name, {}) if _block_of(key) in blocks
    ]
    if doomed:
        fs.rm(doomed)


def check_replaceable(out: str) -> None:
    """Refuse to write a new store over something that is not a training store (or the remains of one).

    Raises:
        ValueError: naming what ``out`` holds besides a training store's arrays.
    """
    attrs = read_store_attrs(out)
    if attrs is not None and ("fingerprint" in attrs or "schema_version" in attrs):
        return
    fs, root = _store_fs(out)
    try:
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return
    other = sorted(names - STORE_ENTRIES)
    if other:
        raise ValueError(
            f"{out} holds {other[:5]}{' ...' if len(other) > 5 else ''}, which are not part of a training store; "
            "writing the store there would delete them. Give softcon preprocess another --out (or move them away)"
        )
