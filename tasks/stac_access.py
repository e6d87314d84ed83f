"""STAC access: how the ingest and labels stages reach a STAC source and its assets.

One ``StacAccess`` per run, built from the stage's config before any request (``StacAccess.from_config``):

- headers: each configured HTTP header's value is read from the environment variable the config names (never
  the secret itself), sent to the STAC API and, through GDAL, on asset reads; an unset variable is an error;
- signing: Planetary Computer asset URLs are signed (``planetary-computer`` package, SAS tokens cached until
  they expire) as odc-stac opens them, with ``sign="auto"`` whenever the source is on Planetary Computer;
- retries at three levels, all with the config's ``retries`` and first ``retry_delay`` (doubling): the STAC
  API's HTTP 429/5xx (urllib3 under pystac-client), GDAL's HTTP 429/5xx per range request, and whole actions
  (opening the API, paging a search, one odc-stac load) on transient errors (``with_retries``). Errors that no
  retry fixes (a missing, forbidden or corrupt file) fail at once.

``is_url`` / ``is_http_url`` are the one test of "is this a URL" in ``tasks/``: any scheme (a cube on object
storage) or HTTP only (a STAC API, a raster read through ``/vsicurl/``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import rasterio

from softcon.config import IngestConfig, LabelsConfig

if TYPE_CHECKING:
    from pystac_client import Client, ItemSearch

__all__ = [
    "PLANETARY_COMPUTER_HOST",
    "StacAccess",
    "StacConfig",
    "describe_error",
    "gdal_options",
    "is_http_url",
    "is_transient",
    "is_url",
    "request_headers",
    "stac_source",
    "url_signer",
    "with_retries",
]

log = logging.getLogger(__name__)

PLANETARY_COMPUTER_HOST = "planetarycomputer.microsoft.com"
HTTP_TIMEOUT = 60
"""Seconds before a STAC API request or a GDAL HTTP read times out (and counts as transient)."""
_PERMANENT_ERRORS = (
    "no such file", "not recognized as", "not a supported file format", "http response code: 404",
    "http response code: 403", "http response code: 401", "tiffreaddirectory", "not a tiff", "does not exist",
    "permission denied",
)  # fmt: skip
"""Read-error texts that no retry will fix (missing, forbidden or corrupt files)."""
T = TypeVar("T")

StacConfig = IngestConfig | LabelsConfig
"""Stage configs that reach a STAC source; both carry ``sign``, ``headers``, ``retries`` and ``retry_delay``."""


def is_url(location: str) -> bool:
    """Whether ``location`` is a URL of any scheme (``s3://``, ``https://``, …) rather than a local path."""
    return "://" in location


def is_http_url(source: str) -> bool:
    """Whether ``source`` is an HTTP(S) URL: a STAC API, or a file GDAL reads through ``/vsicurl/``."""
    return source.startswith(("http://", "https://"))


def stac_source(config: StacConfig) -> str:
    """The STAC API URL or STAC file a stage reads (ingest's ``stac``, labels' ``source``)."""
    return config.stac if isinstance(config, IngestConfig) else config.source


def request_headers(config: StacConfig) -> dict[str, str]:
    """HTTP headers for the STAC API and asset reads, each value read from the environment variable named.

    Raises:
        ValueError: naming the header and the variable when a variable is not set (before any request).
    """
    headers, missing = {}, []
    for name, variable in config.headers.items():
        value = os.environ.get(variable)
        if value is None:
            missing.append(f"{name} (from ${variable})")
        else:
            headers[name] = value
    if missing:
        raise ValueError(f"header(s) {', '.join(missing)} need their environment variable set; export it first")
    return headers


def url_signer(config: StacConfig) -> Callable[[str], str] | None:
    """The asset URL patcher for ``config.sign``: Planetary Computer SAS signing, or ``None`` (no patching)."""
    mode = config.sign
    if mode == "auto":
        mode = "planetary-computer" if PLANETARY_COMPUTER_HOST in stac_source(config) else "none"
    if mode == "none":
        return None
    try:
        import planetary_computer
    except ImportError as error:  # pragma: no cover (a dependency)
        raise ValueError("sign=planetary-computer needs the planetary-computer package: pip install it") from error

    def sign(href: str) -> str:
        # Local paths and non-Azure URLs pass through unchanged; tokens are cached until they expire.
        return planetary_computer.sign_url(href) if is_http_url(href) else href

    return sign


def gdal_options(headers: Mapping[str, str], *, retries: int, retry_delay: float) -> dict[str, Any]:
    """GDAL settings for asset reads: headers, no directory listings, and GDAL's own retries of HTTP 429/5xx
    (per range request, with the run's retry count and first delay; it backs off itself) below ours (per load)."""
    options: dict[str, Any] = {
        "GDAL_HTTP_MAX_RETRY": retries, "GDAL_HTTP_RETRY_DELAY": retry_delay,
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_TIMEOUT": HTTP_TIMEOUT,
    }  # fmt: skip
    if headers:
        options["GDAL_HTTP_HEADERS"] = "\r\n".join(f"{name}: {value}" for name, value in headers.items())
    return options


def describe_error(error: BaseException) -> str:
    """The error with the messages of its causes: GDAL's "Read failed. See previous exception" names the file
    and what failed (a truncated tile, a missing file) only in the chained exceptions."""
    parts, seen, cause = [f"{type(error).__name__}: {error}"], {id(error)}, error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause) and str(cause) not in parts[-1]:
            parts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)


def is_transient(error: BaseException) -> bool:
    """Whether a read error may go away on retry (network, server 5xx) rather than a missing/corrupt file."""
    text = describe_error(error).lower()
    if isinstance(error, (KeyError, ValueError, TypeError)) and not isinstance(error, rasterio.errors.RasterioError):
        return False
    return not any(marker in text for marker in _PERMANENT_ERRORS)


def with_retries(
    action: Callable[[], T], *, what: str, retries: int, delay: float, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Call ``action``; on a transient error retry up to ``retries`` times, waiting delay, 2 delay, 4 delay, ….

    Raises:
        The last error, or at once a permanent one (see ``is_transient``).
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if attempt == retries or not is_transient(error):
                raise
            wait = delay * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, error, attempt + 1, retries, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class StacAccess:
    """How one run reaches a STAC source and its assets: resolved headers, URL signing and the retry policy."""

    source: str
    """The STAC API URL or STAC file."""
    headers: dict[str, str] = field(default_factory=dict)
    """Header name -> value (already read from the environment)."""
    patch_url: Callable[[str], str] | None = None
    """Asset URL patcher (Planetary Computer signing) handed to odc-stac; ``None``: hrefs as they are."""
    retries: int = 3
    retry_delay: float = 1.0

    @classmethod
    def from_config(cls, config: StacConfig) -> StacAccess:
        """The access a stage's config asks for.

        Raises:
            ValueError: a header's environment variable is unset (before any request is sent).
        """
        return cls(
            stac_source(config), patch_url=url_signer(config), headers=request_headers(config),
            retries=config.retries, retry_delay=config.retry_delay,
        )  # fmt: skip

    def gdal_options(self) -> dict[str, Any]:
        """GDAL settings for asset reads (``rasterio.Env(**access.gdal_options())``); see ``gdal_options``."""
        return gdal_options(self.headers, retries=self.retries, retry_delay=self.retry_delay)

    def retrying(self, action: Callable[[], T], what: str) -> T:
        """``action()`` under this run's retry policy (``with_retries``)."""
        return with_retries(action, what=what, retries=self.retries, delay=self.retry_delay)

    def open_api(self) -> Client:
        """A pystac-client ``Client`` of the STAC API ``source``: the headers on every request, HTTP 429/5xx
        retried with backoff (POST searches too), and the opening itself retried on transient errors."""
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO
        from urllib3.util.retry import Retry

        retry = Retry(
            total=self.retries, backoff_factor=self.retry_delay, status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=None,  # POST searches too
        )  # fmt: skip
        stac_io = StacApiIO(headers=self.headers, max_retries=retry, timeout=HTTP_TIMEOUT)
        return self.retrying(
            lambda: Client.open(self.source, headers=self.headers, stac_io=stac_io), what=f"opening {self.source}"
        )

    def fetch_items(self, search: ItemSearch, what: str) -> list[dict[str, Any]]:
        """Every item of a pystac-client search as STAC dicts, the paging retried on transient errors."""
        return self.retrying(lambda: list(search.items_as_dicts()), what=what)
