"""zarr's internal APIs that the cube writer, the store checker and the training loader rely on.

Checked against zarr 3.1.6 (pinned ``zarr>=3.0,<3.2`` in pyproject.toml). zarr documents everything under
``zarr.core`` as internal, and ``Array``/``Group`` keep their async counterparts in private fields. Wrapped here:

- ``zarr.core.sync.sync``: runs a coroutine on zarr's own event loop (``sync``);
- ``zarr.core.array.AsyncArray`` and ``zarr.Array._async_array``, and ``zarr.Array(async_array)`` (a positional
  argument to that private field): an array's async view and back (``AsyncArray``, ``async_array``,
  ``array_from_async``);
- ``zarr.Group._async_group`` with ``AsyncGroup.create_array``: arrays created concurrently
  (``create_array_async``);
- ``AsyncArray(metadata, store_path, config)``, ``ArrayV3Metadata.update_shape`` and ``ArrayConfig`` (its
  ``write_empty_chunks``): a view of an array at another shape whose writes store chunks but no metadata
  (``shape_view``);
- ``ArrayV3Metadata.encode_chunk_key`` and ``.dimension_names`` (``chunk_key``, ``dimension_names``);
- ``ArrayV3Metadata.codecs`` holding one ``ShardingCodec``, and that codec's ``chunk_shape``, ``codecs``,
  ``index_codecs`` and ``index_location`` (``sharding_layout``);
- ``GroupMetadata.consolidated_metadata`` (``has_consolidated_metadata``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.array import AsyncArray
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync as _zarr_sync

__all__ = [
    "AsyncArray",
    "ShardingLayout",
    "array_from_async",
    "async_array",
    "chunk_key",
    "create_array_async",
    "dimension_names",
    "has_consolidated_metadata",
    "shape_view",
    "sharding_layout",
    "sync",
]

T = TypeVar("T")


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on zarr's event loop (the one its synchronous API uses) and return its result."""
    return _zarr_sync(coro)


def async_array(array: zarr.Array) -> AsyncArray[Any]:
    """The async array behind ``array`` (the same store, metadata and config)."""
    return array._async_array


def array_from_async(array: AsyncArray[Any]) -> zarr.Array:
    """The synchronous ``zarr.Array`` over an async one."""
    return zarr.Array(array)


async def create_array_async(group: zarr.Group, name: str, **kwargs: Any) -> AsyncArray[Any]:
    """Create the array ``name`` in ``group`` on zarr's event loop, with ``Group.create_array``'s keywords (shape,
    dtype, chunks, fill_value, attributes, dimension_names...); many can be created concurrently."""
    return await group._async_group.create_array(name, **kwargs)


def shape_view(array: zarr.Array, shape: tuple[int, ...], *, write_empty_chunks: bool) -> AsyncArray[Any]:
    """An async view of ``array`` at ``shape`` (its store, codecs and chunks) that writes chunks without writing
    that shape to the store; ``write_empty_chunks`` as in zarr's array config."""
    current = array._async_array
    future = current.metadata.update_shape(shape)
    config = dataclasses.replace(current.config, write_empty_chunks=write_empty_chunks)
    return AsyncArray(future, current.store_path, config)


def chunk_key(array: zarr.Array, index: tuple[int, ...]) -> str:
    """The store key, relative to the array, of the chunk (shard, for a sharded array) at grid ``index``."""
    return array.metadata.encode_chunk_key(index)


def dimension_names(array: zarr.Array) -> tuple[str | None, ...]:
    """The array's ``dimension_names`` as its metadata records them; () when there are none (or for Zarr v2)."""
    metadata = array.metadata
    names = metadata.dimension_names if isinstance(metadata, ArrayV3Metadata) else None
    return tuple(names or ())


def has_consolidated_metadata(group: zarr.Group) -> bool:
    """Whether ``group`` was opened from consolidated metadata."""
    return group.metadata.consolidated_metadata is not None


@dataclass(frozen=True)
class ShardingLayout:
    """How an array's shard files are laid out: what a reader of their bytes needs, in plain values.

    Codecs are named as in the Zarr v3 metadata ("bytes", "blosc", "crc32c"), any other by its class name.
    """

    chunk_shape: tuple[int, ...]
    """The inner chunks' shape (the shards' is the array's ``shards``)."""
    codecs: tuple[str, ...]
    """The inner chunks' codecs, in order, e.g. ("bytes", "blosc")."""
    endian: str | None
    """The byte order of the inner chunks' first codec when it is "bytes": "little", "big", or None (none given)."""
    index_codecs: tuple[str, ...]
    """The shard index's codecs, e.g. ("bytes", "crc32c")."""
    index_at_end: bool
    """Whether the index is at the end of each shard file (else at its start)."""


def _codec_name(codec: object) -> str:
    if isinstance(codec, BytesCodec):
        return "bytes"
    if isinstance(codec, BloscCodec):
        return "blosc"
    if isinstance(codec, Crc32cCodec):
        return "crc32c"
    return type(codec).__name__


def sharding_layout(array: zarr.Array) -> ShardingLayout | None:
    """The layout of ``array``'s shards when its only codec is the sharding codec, else None."""
    metadata = array.metadata
    if not isinstance(metadata, ArrayV3Metadata):
        return None
    codecs = metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = tuple(sharding.codecs)
    first = inner[0] if inner else None
    endian = first.endian.value if isinstance(first, BytesCodec) and first.endian is not None else None
    return ShardingLayout(
        chunk_shape=tuple(int(n) for n in sharding.chunk_shape),
        codecs=tuple(_codec_name(codec) for codec in inner),
        endian=endian,
        index_codecs=tuple(_codec_name(codec) for codec in sharding.index_codecs),
        index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
    )
