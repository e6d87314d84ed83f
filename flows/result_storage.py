"""Where the stage tasks' cached results live: object storage named by ``SOFTCON_RESULTS_URL``, or the local default.

Each stage task persists its result (flows/caching.py) under a key made of its inputs, code and data. By default
Prefect writes it under ``<SOFTCON_HOME>/prefect/results``, which dies with a short-lived pod; with
``SOFTCON_RESULTS_URL=s3://bucket/prefix`` every process that names the same URL reads and writes the same
records, whatever its own Prefect database, so a stage already done in one pod is a cache hit in the next.

The storage is a :class:`prefect.filesystems.RemoteFileSystem` built from the setting and never saved as a block
document: nothing has to exist in each pod's Prefect database, and no credential is stored anywhere. fsspec
(s3fs, gcsfs, adlfs) finds the credentials in the process's environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible stores, or an IAM role.
"""

from __future__ import annotations

import logging
import urllib.parse
import uuid
from functools import lru_cache

from prefect.filesystems import RemoteFileSystem

from softcon.compat.prefect_storage import read_path_sync, set_block_id, write_path_sync
from softcon.settings import get_settings

__all__ = ["RESULTS_URL_PROTOCOLS", "ResultStorageError", "check_result_storage", "task_result_storage"]

SETTING = "SOFTCON_RESULTS_URL"
RESULTS_URL_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""Object stores fsspec can write to; a shared local folder is ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``'s job."""
ACCESS_CHECK_KEY = ".softcon-access-check"
"""Object that ``check_result_storage`` writes and reads back under the URL (rewritten with the same bytes)."""
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, plus AWS_ENDPOINT_URL for an S3-compatible store; or a role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the workload's service account",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
_CREDENTIALS |= {"s3a": _CREDENTIALS["s3"], "gcs": _CREDENTIALS["gs"]}
_CREDENTIALS |= {"abfs": _CREDENTIALS["az"], "abfss": _CREDENTIALS["az"]}

logger = logging.getLogger(__name__)


class ResultStorageError(ValueError):
    """The storage named by ``SOFTCON_RESULTS_URL`` cannot be written or read by this process (a setting to fix,
    so the CLI prints it as an error, not a traceback)."""


def task_result_storage() -> RemoteFileSystem | None:
    """The result storage of the stage tasks: the ``SOFTCON_RESULTS_URL`` store, or None for Prefect's local default.

    Touches no network: a wrong URL fails here, access itself in :func:`check_result_storage`.

    Raises:
        ValueError: for a URL that is not ``<protocol>://<bucket>[/<prefix>]`` with a protocol of
            ``RESULTS_URL_PROTOCOLS``, naming the setting.
    """
    url = get_settings().results_url
    if not url:
        return None
    return _remote_storage(url)


@lru_cache
def _remote_storage(url: str) -> RemoteFileSystem:
    """One storage per URL and process, so every stage task shares one fsspec file system (and its connections)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in RESULTS_URL_PROTOCOLS or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"{SETTING}={url!r} is not an object-store URL: expected <protocol>://<bucket>[/<prefix>] with protocol "
            f"one of {', '.join(RESULTS_URL_PROTOCOLS)}, e.g. s3://softcon/prefect-results; unset {SETTING} to keep "
            "cached results under <SOFTCON_HOME>/prefect/results"
        )
    storage = RemoteFileSystem(basepath=url.rstrip("/"))
    # Prefect's task() refuses a block without a document id: it records that id with each result so that a
    # client could fetch the block back from the API. These results are found through the task's own storage
    # (every process builds the same one from the setting), never through the API, so the id names no document:
    # a fixed one per URL, not saved in any Prefect database.
    set_block_id(storage, uuid.uuid5(uuid.NAMESPACE_URL, f"softcon-results:{storage.basepath}"))
    return storage


def check_result_storage() -> None:
    """Write and read back a small object under ``SOFTCON_RESULTS_URL`` (once per process), before stage work starts.

    Without this, Prefect only logs a failed result write after the work is done, and a storage that cannot be
    read looks like an empty cache: every stage would run again without saying why. Nothing happens when the
    setting is unset.

    Raises:
        ValueError: for a malformed URL (see :func:`task_result_storage`).
        ResultStorageError: when the store cannot be written or read (missing or wrong credentials, no such
            bucket, an unreachable endpoint), naming the setting and the credential variables to check.
    """
    url = get_settings().results_url
    if url:
        _check_access(url)


@lru_cache
def _check_access(url: str) -> None:
    storage = _remote_storage(url)
    probe = f"softcon result storage access check for {url}\n".encode()
    try:
        write_path_sync(storage, ACCESS_CHECK_KEY, probe)
        readable = read_path_sync(storage, ACCESS_CHECK_KEY) == probe
    except Exception as error:  # any failure means the cache cannot work; the cause is chained below
        protocol = urllib.parse.urlsplit(url).scheme.lower()
        raise ResultStorageError(
            f"cannot write cached task results to {SETTING}={url!r} ({type(error).__name__}: {error}). Check that "
            f"the bucket exists and that this process's credentials ({_CREDENTIALS[protocol]}) allow writing and "
            f"reading it, or unset {SETTING} to keep them under <SOFTCON_HOME>/prefect/results."
        ) from error
    if not readable:
        raise ResultStorageError(f"{SETTING}={url!r}: an object written there read back different bytes")
    logger.debug("cached task results go to %s", url)
