"""Prefect's result-storage block internals, for ``flows/result_storage.py``'s ``SOFTCON_RESULTS_URL`` storage.

Checked against prefect 3.9.1 (pinned ``prefect>=3.4,<4`` in pyproject.toml). Private APIs wrapped here:

- ``Block._block_document_id``: the id of the block's saved document. ``prefect.Task`` refuses a block as
  ``result_storage`` without one, and ``ResultRecord`` records it with each result (``result_storage_block_id``);
  a storage that is never saved gets a fixed id set by hand (``block_document_id``, ``set_block_id``);
- the ``_sync=True`` keyword that Prefect's ``async_dispatch`` decorator (``prefect._internal.compatibility``)
  takes on ``RemoteFileSystem.write_path`` and ``read_path``: it runs the synchronous implementation even where
  Prefect would otherwise return a coroutine (an async task or flow, a running event loop)
  (``write_path_sync``, ``read_path_sync``).
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect.filesystems import RemoteFileSystem

__all__ = ["block_document_id", "read_path_sync", "set_block_id", "write_path_sync"]


def block_document_id(storage: RemoteFileSystem) -> uuid.UUID | None:
    """The id Prefect records as ``storage``'s block document; None for a block neither saved nor given one."""
    found: uuid.UUID | None = storage._block_document_id
    return found


def set_block_id(storage: RemoteFileSystem, document_id: uuid.UUID) -> None:
    """Give ``storage`` the block document id ``document_id`` without saving it, so that ``prefect.task`` takes it
    as ``result_storage``."""
    storage._block_document_id = document_id


def write_path_sync(storage: RemoteFileSystem, key: str, content: bytes) -> str:
    """Write ``content`` to ``key`` under ``storage``'s base path, synchronously in any context; the full path."""
    write: Any = storage.write_path
    written: str = write(key, content=content, _sync=True)
    return written


def read_path_sync(storage: RemoteFileSystem, key: str) -> bytes:
    """The bytes at ``key`` under ``storage``'s base path, read synchronously in any context."""
    read: Any = storage.read_path
    content: bytes = read(key, _sync=True)
    return content
