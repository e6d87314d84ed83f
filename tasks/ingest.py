"""Ingest: search a STAC source for Sentinel-2 L2A and Sentinel-1 and load them onto the tile grid.

Cube layout (Zarr v3, zstd-compressed), one group per tile ``tiles/<tile_id>/``:

    s2        (time, band, y, x)     uint16 reflectance x10000 (baseline >= 04.00 offset removed), 0 = nodata
    scl       (time, y, x)           uint8 Sen2Cor scene classification (0 where the item has none)
    s1        (time_s1, pol, y, x)   float32 backscatter dB, NaN = nodata
    x, y (pixel centres), band, pol, time, time_s1 (acquisition time of the first item of the solar day),
    spatial_ref (CF grid mapping, rioxarray); group attrs ``s2_items`` / ``s1_items``: solar day -> item ids.

Chunks are one time step per chunk: (1, band, y, x) for s2, (1, y, x) for scl, (1, pol, y, x) for s1.

Idempotence and appends: a tile-date (solar day) already in the tile is never loaded or written again,
so a re-run writes nothing. New dates are appended along ``time`` in the order they are ingested (sorted
within one run); a backfill of earlier dates lands after later ones, so readers that need order use
``ds.sortby("time")``. A tile is created with its first time step: a run that writes nothing (no items, none
usable, every tile-date cloudy or empty) leaves no empty tile and no empty cube.

Crash safety: an append writes the new chunks of every array *before* it grows any array's shape (through a
view of the array at its future shape), then grows the data arrays, records the item ids, and grows the
time coordinate last. Each shape change is one atomic metadata write (Zarr's local store writes a temporary
file and renames it), so a reader sees either the old tile or, while only the data arrays have grown, arrays
longer than ``time`` (``xr.open_zarr`` refuses such a tile rather than showing a partial step); a killed
append never shows a time step with missing data. The next ingest truncates the data arrays back to the
time coordinate and drops item ids of days that are not in it, before doing anything else. A full disk
(``ENOSPC``/``EDQUOT``) during an append rolls the tile back at once (deletes the chunks written ahead or a
half-created tile, freeing their space) and raises ``StoreFullError`` naming the cube and what to do.

Concurrent runs: every change to a tile (creation, repair, append) happens under an exclusive lock on
``<cube>/.ingest-locks/<tile_id>.lock`` (``fcntl.flock``, released by the kernel if the process dies), and
the tile's existing days are re-read under the lock just before appending, so two runs over the same or
different date ranges of one local store never duplicate or lose a step; loading from STAC happens outside
the lock, in parallel. Stores given as URLs (object storage) get no lock: run one writer per cube there.

Damage: before it writes anything, a run checks the existing tiles it will write from their listing and metadata
(``tasks/check_store.py: check_tile`` without reading image chunks). Every committed step has a chunk file of each
of its data arrays (fill values included), so a lost file is seen; such a step whose day this run holds with the
same item ids is loaded again and written in place (``IngestReport.tile_dates_repaired``). Any other damage (a lost
step of a day outside the run, a lost coordinate chunk, a data array shorter than its time coordinate, item ids
that do not match the steps) stops the run before any write with ``CubeDamageError``, naming each problem and its
fix. An interrupted append or tile creation is not damage: it is repaired as described above.

Network: transient read failures (HTTP 5xx, timeouts, connection resets) are retried with exponential
backoff (``retries``, ``retry_delay``); an item that still fails, or whose file is corrupt or missing, is
skipped, named in ``IngestReport.items_failed`` with the reason, and the other items of its day are loaded.
Planetary Computer asset URLs are signed (``planetary-computer`` package) as odc-stac opens them; other
APIs get HTTP headers whose values come from environment variables (``IngestConfig.headers``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import odc.stac
import pystac
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity
from zarr.core.array import AsyncArray
from zarr.core.sync import sync as zarr_sync

from softcon.config import IngestConfig
from tasks.aligned_reads import ALIGNED_DRIVER
from tasks.check_store import INGEST_AGAIN, REBUILD_TILE, RECREATE_TILE, check_tile
from tasks.collections import CollectionSpec, sensor_of, spec_for_item
from tasks.grid import Tile, tiles_for_bbox

try:  # POSIX advisory locks; on other systems concurrent writers are not protected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCL_CLOUD_CODES = (3, 8, 9, 10)
"""Sen2Cor cloud shadow, cloud medium/high probability, thin cirrus."""
TIME_UNITS = "seconds since 1970-01-01"
S1_POLS = ("VV", "VH")
PLANETARY_COMPUTER_HOST = "planetarycomputer.microsoft.com"
PROGRESS_EXTRA = "ingest_progress"
"""Key of the ``extra`` dict on this module's progress log records: ``(tiles done, tiles total)``."""
WRITE_BATCH = 8
"""Tile-dates held in memory before they are appended (bounds memory on long date ranges)."""
_PERMANENT_ERRORS = (
    "no such file", "not recognized as", "not a supported file format", "http response code: 404",
    "http response code: 403", "http response code: 401", "tiffreaddirectory", "not a tiff", "does not exist",
    "permission denied",
)  # fmt: skip
"""Read-error texts that no retry will fix (missing, forbidden or corrupt files)."""
T = TypeVar("T")


class CubeDamageError(ValueError):
    """Tiles the run would write hold damage that re-running cannot repair; raised before anything is written."""


class StoreFullError(OSError):
    """The disk (or quota) holding the cube ran out of space; the cube is left as it was before the append."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent); None for URLs."""
    if "://" in path:
        return None
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


@dataclass(frozen=True)
class IngestReport:
    """What one ingest run found, skipped and wrote."""

    cube: str
    tiles: list[str]
    items_found: int
    """Items the search returned."""
    items_filtered: int
    """Items dropped by the eo:cloud_cover filter (client side)."""
    items_ingested: int
    """Items behind the tile-dates written in this run."""
    items_failed: list[str]
    """Items skipped because an asset is missing or could not be read (after retries)."""
    tile_dates_written: int
    tile_dates_skipped: dict[str, int] = field(default_factory=dict)
    """Reason (``exists``, ``cloud``, ``nodata``) -> count."""
    tile_dates_repaired: int = 0
    """Committed tile-dates whose lost chunk files this run wrote again (see the module doc, "Damage")."""
    bytes_written: int = 0
    """Bytes added to the store on disk (compressed); 0 for object-storage URLs."""
    pixel_bytes: int = 0
    """Uncompressed bytes of the pixel arrays written (what MB/s is measured on)."""
    seconds: float = 0.0
    dates: int = 0
    """Distinct Sentinel-2 days in the cube's tiles after this run."""
    failures: dict[str, str] = field(default_factory=dict)
    """Failed item id -> why."""
    items: dict[str, str] = field(default_factory=dict)
    """Every item found -> what happened to it (``ingested``, ``filtered``, ``failed``, ``not written``)."""

    @property
    def mb_per_s(self) -> float:
        """Pixel megabytes (1e6 bytes) written per second of the whole run."""
        return self.pixel_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics for MLflow."""
        metrics = {
            "items_found": float(self.items_found),
            "items_filtered": float(self.items_filtered),
            "items_ingested": float(self.items_ingested),
            "items_failed": float(len(self.items_failed)),
            "tiles": float(len(self.tiles)),
            "tile_dates_written": float(self.tile_dates_written),
            "tile_dates_repaired": float(self.tile_dates_repaired),
            "dates": float(self.dates),
            "bytes_written": float(self.bytes_written),
            "pixel_bytes": float(self.pixel_bytes),
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
        }
        metrics.update({f"tile_dates_skipped_{k}": float(v) for k, v in self.tile_dates_skipped.items()})
        return metrics


# ----------------------------------------------------------------------------------------- access


def request_headers(config: IngestConfig) -> dict[str, str]:
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


def url_signer(config: IngestConfig) -> Callable[[str], str] | None:
    """The asset URL patcher for ``config.sign``: Planetary Computer SAS signing, or ``None`` (no patching)."""
    mode = config.sign
    if mode == "auto":
        mode = "planetary-computer" if PLANETARY_COMPUTER_HOST in config.stac else "none"
    if mode == "none":
        return None
    try:
        import planetary_computer
    except ImportError as error:  # pragma: no cover (a dependency)
        raise ValueError("sign=planetary-computer needs the planetary-computer package: pip install it") from error

    def sign(href: str) -> str:
        # Local paths and non-Azure URLs pass through unchanged; tokens are cached until they expire.
        return planetary_computer.sign_url(href) if href.startswith("http") else href

    return sign


def _gdal_options(headers: dict[str, str], *, retries: int, retry_delay: float) -> dict[str, Any]:
    """GDAL settings for asset reads: headers, no directory listings, and GDAL's own retries of HTTP 429/5xx
    (per range request, with the run's retry count and first delay; it backs off itself) below ours (per load)."""
    options: dict[str, Any] = {
        "GDAL_HTTP_MAX_RETRY": retries, "GDAL_HTTP_RETRY_DELAY": retry_delay,
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_TIMEOUT": 60,
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


# --------------------------------------------------------------------------------------------- search


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _datetime_range(start: date, end: date) -> str:
    return f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59Z"


def read_static_items(path: str | Path) -> list[dict[str, Any]]:
    """Items of a static ItemCollection / FeatureCollection, a single Item, or a catalog (recursively)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STAC source {path} is neither a URL nor an existing file")
    data = json.loads(path.read_text())
    kind = data.get("type")
    if kind == "FeatureCollection":
        return list(data["features"])
    if kind == "Feature":
        return [data]
    if kind in ("Catalog", "Collection"):
        catalog = pystac.read_file(str(path))
        return [item.to_dict() for item in catalog.get_items(recursive=True)]  # type: ignore[union-attr]
    raise ValueError(f"{path} is a {kind!r}; expected a FeatureCollection, Item, Catalog or Collection")


def read_area(config: IngestConfig) -> BaseGeometry:
    """The area to ingest as one lon/lat geometry: ``config.area``'s geometries (clipped to ``bbox``) or ``bbox``.

    Raises:
        FileNotFoundError: a missing area file.
        ValueError: an area file without geometries, with invalid (e.g. self-intersecting) ones, or one that
            does not meet the bbox.
    """
    bbox_geometry = box(*config.bbox) if config.bbox is not None else None
    if config.area is None:
        assert bbox_geometry is not None  # the config validator requires one of the two
        return bbox_geometry
    import geopandas

    path = Path(config.area)
    if not path.is_file():
        raise FileNotFoundError(f"area file {path} does not exist; give a GeoJSON or GeoPackage")
    frame = geopandas.read_file(path)
    frame = frame[[geometry is not None and not geometry.is_empty for geometry in frame.geometry]]
    if frame.empty:
        raise ValueError(f"area file {path} holds no geometries (all empty); draw the area again or give a bbox")
    invalid = {index: explain_validity(g) for index, g in enumerate(frame.geometry) if not g.is_valid}
    if invalid:
        raise ValueError(
            f"area file {path} holds invalid geometries (feature index: reason): {invalid}; repair them "
            "(shapely.make_valid, QGIS 'Fix geometries') or give a bbox"
        )
    if frame.crs is None:
        log.warning("area file %s has no CRS; taking lon/lat (EPSG:4326)", path)
        frame = frame.set_crs("EPSG:4326")
    geometry = frame.to_crs("EPSG:4326").geometry.union_all()
    if bbox_geometry is not None:
        geometry = geometry.intersection(bbox_geometry)
        if geometry.is_empty:
            raise ValueError(f"area {path} does not meet bbox {config.bbox}")
    return geometry


def _item_datetime(item: dict[str, Any]) -> datetime:
    props = item["properties"]
    text = props.get("datetime") or props.get("start_datetime")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _matches(item: dict[str, Any], collections: Sequence[str], area: BaseGeometry, start: date, end: date) -> bool:
    if item.get("collection") not in collections:
        return False
    if not shape(item["geometry"]).intersects(area):
        return False
    return start <= _item_datetime(item).date() <= end


def search_items(config: IngestConfig, area: BaseGeometry | None = None) -> list[dict[str, Any]]:
    """Items of ``config.collections`` over the area and the date range, as STAC dicts.

    A STAC API is searched with pystac-client (``intersects`` the area, an ``eo:cloud_cover`` query on
    Sentinel-2 when the server conforms to the Query extension, HTTP retries with backoff, the configured
    headers); a file is read and filtered here.
    """
    area = area if area is not None else read_area(config)
    collections = list(config.collections)
    if not _is_url(config.stac):
        items = read_static_items(config.stac)
        return [i for i in items if _matches(i, collections, area, config.start, config.end)]
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    retry = Retry(
        total=config.retries, backoff_factor=config.retry_delay, status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,  # POST searches too
    )  # fmt: skip
    headers = request_headers(config)
    stac_io = StacApiIO(headers=headers, max_retries=retry, timeout=60)
    client = with_retries(
        lambda: Client.open(config.stac, headers=headers, stac_io=stac_io),
        what=f"opening {config.stac}", retries=config.retries, delay=config.retry_delay,
    )  # fmt: skip
    found: list[dict[str, Any]] = []
    for sensor in ("s2", "s1"):
        names = [c for c in collections if sensor_of(c) == sensor]
        if not names:
            continue
        query = None
        if sensor == "s2" and client.conforms_to(ConformanceClasses.QUERY):
            query = {"eo:cloud_cover": {"lte": config.max_cloud}}
        # A bbox search (every API supports it), then the exact area here.
        search = client.search(
            collections=names, bbox=area.bounds, datetime=_datetime_range(config.start, config.end),
            query=query, limit=100,
        )  # fmt: skip
        found.extend(
            item for item in with_retries(
                lambda search=search: list(search.items_as_dicts()),
                what=f"searching {config.stac}", retries=config.retries, delay=config.retry_delay,
            )
            if shape(item["geometry"]).intersects(area)
        )  # fmt: skip
    return found


def filter_cloudy_items(items: Iterable[dict[str, Any]], max_cloud: float) -> tuple[list[dict], list[str]]:
    """Split S2 items by ``eo:cloud_cover <= max_cloud`` (items without the field are kept)."""
    kept, dropped = [], []
    for item in items:
        cover = item["properties"].get("eo:cloud_cover")
        if cover is not None and float(cover) > max_cloud:
            dropped.append(item["id"])
        else:
            kept.append(item)
    return kept, dropped


# ----------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class ReadOptions:
    """How assets are read: URL patching (signing), GDAL settings, retry policy."""

    patch_url: Callable[[str], str] | None = None
    gdal: dict[str, Any] = field(default_factory=dict)
    retries: int = 3
    retry_delay: float = 1.0
    threads: int | None = None
    """Reads run at once within one load (odc-stac's ``pool``; each thread gets the same GDAL settings);
    None: ``REMOTE_READ_THREADS`` for assets read over the network, one at a time for local files."""
    stac_items: dict[tuple[str, str], pystac.Item] = field(default_factory=dict, compare=False, repr=False)
    """Parsed pystac Items by (collection, id), shared by the loads of a run (an item covers several tiles)."""

    def pystac_item(self, item: dict[str, Any]) -> pystac.Item:
        """The item as a pystac Item, without its links (a "self" link to an API would turn local paths into
        API URLs)."""
        key = (str(item.get("collection")), str(item["id"]))
        if key not in self.stac_items:
            self.stac_items[key] = pystac.Item.from_dict({**item, "links": []})
        return self.stac_items[key]


def solar_day(when: datetime, lon: float) -> date:
    """Local solar day of an acquisition at longitude ``lon`` (odc-stac's ``solar_day`` grouping)."""
    return (when + timedelta(hours=lon / 15)).date()


def _tile_centre_lon(tile: Tile) -> float:
    west, _, east, _ = tile.lonlat_bounds
    return (west + east) / 2


def group_by_solar_day(items: Iterable[dict[str, Any]], lon: float) -> dict[date, list[dict[str, Any]]]:
    groups: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[solar_day(_item_datetime(item), lon)].append(item)
    return dict(sorted(groups.items()))


def load_s2_day(
    items: Sequence[dict[str, Any]], tile: Tile, bands: Sequence[str], read: ReadOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One solar day of S2 on the tile grid: (band, y, x) uint16 harmonized reflectance, (y, x) SCL."""
    ((_, loaded),) = load_s2_days({date.min: list(items)}, tile, bands, read).items()
    return loaded


def load_s2_days(
    days: dict[date, list[dict[str, Any]]], tile: Tile, bands: Sequence[str], read: ReadOptions | None = None
) -> dict[date, tuple[np.ndarray, np.ndarray]]:
    """Several solar days of S2 in one odc-stac load: day -> (band, y, x) uint16 reflectance, (y, x) SCL.

    Each day's items are mosaicked together (one time step per key of ``days``), exactly as a load of
    that day alone; the items must share a collection spec and all carry SCL or all lack it.
    """
    items = [item for day_items in days.values() for item in day_items]
    spec = spec_for_item(items[0])
    band_keys = [spec.asset_key(band) for band in bands]
    with_scl = all(spec.assets["SCL"] in item["assets"] for item in items)
    keys = [*band_keys, spec.assets["SCL"]] if with_scl else band_keys
    resampling = {"*": "bilinear", spec.assets["SCL"]: "nearest"}
    data = _odc_load(days, keys, tile, resampling, read=read)
    out = {}
    for t, (day, day_items) in enumerate(sorted(days.items())):
        stack = np.stack([data[key].values[t] for key in band_keys])  # (band, y, x)
        offset = spec.s2_offset(day_items[0])
        stack = _harmonize(stack, offset)
        scl = data[spec.assets["SCL"]].values[t].astype(np.uint8) if with_scl else np.zeros(stack.shape[1:], np.uint8)
        out[day] = (stack, scl)
    return out


def _harmonize(stack: np.ndarray, offset: int) -> np.ndarray:
    """Reflectance as uint16 with the BOA offset (``<= 0``) added: 0 stays nodata, valid pixels clip to 1."""
    if stack.dtype != np.uint16:  # odc-stac keeps the assets' dtype; other types are clipped in
        if stack.dtype.kind == "f":  # NaN and inf (float assets) are nodata, never a saturated 65535
            stack = np.where(np.isfinite(stack), stack, 0)
        stack = np.clip(stack, 0, 65535).astype(np.uint16)
    if not offset:
        return stack
    nodata = stack == 0
    out = np.maximum(stack, 1 - offset)  # valid pixels end at least at 1: no uint16 wrap-around below
    out -= np.uint16(-offset)
    out[nodata] = 0
    return out


def load_s1_day(items: Sequence[dict[str, Any]], tile: Tile, read: ReadOptions | None = None) -> np.ndarray:
    """One solar day of S1 on the tile grid: (pol, y, x) float32 dB, NaN where there is no data.

    A polarization that the day's items do not all carry (single-pol VV products) is all NaN.
    """
    ((_, loaded),) = load_s1_days({date.min: list(items)}, tile, read).items()
    return loaded


def load_s1_days(
    days: dict[date, list[dict[str, Any]]], tile: Tile, read: ReadOptions | None = None
) -> dict[date, np.ndarray]:
    """Several solar days of S1 in one odc-stac load: day -> (pol, y, x) float32 dB, NaN = no data.

    A polarization that the items do not all carry is all NaN; the items must share a collection spec.
    """
    items = [item for day_items in days.values() for item in day_items]
    spec: CollectionSpec = spec_for_item(items[0])
    pols = [pol for pol in S1_POLS if all(spec.assets[pol] in item["assets"] for item in items)]
    if not pols:
        raise KeyError(f"items {[i['id'] for i in items]} carry none of the assets {[spec.assets[p] for p in S1_POLS]}")
    keys = {pol: spec.asset_key(pol) for pol in pols}
    data = _odc_load(days, list(keys.values()), tile, {"*": "bilinear"}, dtype="float32", read=read)
    result = {}
    for t, (day, day_items) in enumerate(sorted(days.items())):
        scale = spec.s1_value_scale(day_items[0])
        nodata = spec.asset_nodata(day_items[0], pols[0])
        raw = {pol: data[keys[pol]].values[t].astype(np.float64) for pol in keys}
        for values in raw.values():
            values[(values == nodata) | ~np.isfinite(values)] = np.nan  # inf is nodata too, never stored
        check_s1_scale(np.stack(list(raw.values())), scale, f"S1 items {[i['id'] for i in day_items]}")
        out = []
        for pol in S1_POLS:
            if pol not in keys:
                out.append(np.full(tile.geobox.shape, np.nan, np.float32))
                continue
            values = raw[pol]
            if scale != "db":
                values[values <= 0] = np.nan
                with np.errstate(invalid="ignore", divide="ignore"):
                    # linear power -> 10 log10; amplitude digital numbers (GRD) -> 20 log10, uncalibrated.
                    values = (20 if scale == "amplitude" else 10) * np.log10(values)
            out.append(values.astype(np.float32))
        result[day] = np.stack(out)
    return result


S1_MIN_VALUES_TO_JUDGE = 100
"""Valid pixels needed before the value range is used to check an S1 scale."""
S1_NEGATIVE_FRACTION = 0.01
"""Linear power and amplitude are never negative; dB backscatter of land and water nearly always is."""


def check_s1_scale(values: np.ndarray, scale: str, what: str) -> None:
    """Refuse S1 values whose range contradicts their declared scale (NaN = nodata, ignored).

    Raises:
        ValueError: negative values declared linear power or amplitude (they are dB already), or values
            declared dB without negative ones (linear power or amplitude mislabelled as dB).
    """
    valid = values[np.isfinite(values)]
    if valid.size < S1_MIN_VALUES_TO_JUDGE:
        return
    negative = float((valid < 0).mean())
    if scale != "db" and negative > S1_NEGATIVE_FRACTION:
        raise ValueError(
            f"{what}: {negative:.0%} of the values are negative, impossible for {scale} backscatter; they look "
            "like dB already. Declare raster:bands unit 'dB' on the VV/VH assets (or fix the collection's "
            "s1_scale in tasks/collections.py)"
        )
    if scale == "db" and negative < S1_NEGATIVE_FRACTION:
        raise ValueError(
            f"{what}: declared dB but {1 - negative:.0%} of the values are >= 0 (median {np.median(valid):.3g}); "
            "they look like linear power or amplitude. Fix the assets' raster:bands unit ('linear' or drop it)"
        )


REMOTE_READ_THREADS = 4
"""Concurrent reads of one load when its assets are URLs: COG range requests wait on the network, not a core."""


def _read_pool(items: Sequence[pystac.Item], threads: int | None) -> int | None:
    """odc-stac's ``pool`` for a load: ``threads``, or by default concurrent reads for remote assets only."""
    if threads is None:
        hrefs = (asset.href for item in items for asset in item.assets.values())
        remote = any("://" in href and not href.startswith("file://") for href in hrefs)
        threads = REMOTE_READ_THREADS if remote else 1
    return threads if threads > 1 else None


def _odc_load(
    days: dict[date, list[dict[str, Any]]],
    keys: Sequence[str],
    tile: Tile,
    resampling: dict[str, str],
    dtype: str | None = None,
    read: ReadOptions | None = None,
) -> xr.Dataset:
    """One odc-stac load of the days' items onto the tile; time step ``t`` is the ``t``-th day in date order."""
    read = read or ReadOptions()
    stac_items = [read.pystac_item(item) for day_items in days.values() for item in day_items]
    day_of = [day for day, day_items in days.items() for _ in day_items]
    with warnings.catch_warnings(), rasterio.Env(**read.gdal):
        warnings.simplefilter("ignore")  # odc-stac warns about common-name aliases
        # fail_on_error: a read error must raise (and be retried or reported), never become silent nodata.
        # Grouped by the day keys given (the tile's solar day), not odc's own solar-day guess.
        data = odc.stac.load(
            stac_items, bands=list(keys), geobox=tile.geobox, resampling=resampling,
            groupby=lambda _item, _parsed, index: day_of[index], chunks=None, fail_on_error=True, dtype=dtype,
            patch_url=read.patch_url, pool=_read_pool(stac_items, read.threads), driver=ALIGNED_DRIVER,
        )  # fmt: skip
    if data.sizes["time"] != len(days):  # pragma: no cover (a grouping bug)
        raise AssertionError(f"odc-stac returned {data.sizes['time']} time steps for {len(days)} days")
    return data


def load_day_isolating(
    items: Sequence[dict[str, Any]], load: Callable[[Sequence[dict[str, Any]]], T], read: ReadOptions, what: str
) -> tuple[T | None, dict[str, str]]:
    """Load one tile-date with retries; if it keeps failing, find the failing items and load the rest.

    Returns:
        (the loaded day or ``None`` when every item failed, failed item id -> error text)
    """

    def attempt(subset: Sequence[dict[str, Any]]) -> T:
        return with_retries(lambda: load(subset), what=what, retries=read.retries, delay=read.retry_delay)

    try:
        return attempt(items), {}
    except Exception as error:
        if len(items) == 1:
            return None, {items[0]["id"]: describe_error(error)}
    good, failed = [], {}
    for item in items:
        try:
            attempt([item])
            good.append(item)
        except Exception as error:
            failed[item["id"]] = describe_error(error)
    if not good:
        return None, failed
    try:
        return attempt(good), failed
    except Exception as error:  # every item alone reads but not together: report them all
        return None, {**failed, **{item["id"]: describe_error(error) for item in good}}


def s2_day_quality(s2: np.ndarray, scl: np.ndarray) -> tuple[float, float]:
    """(cloud fraction, nodata fraction) of one tile-date: SCL 3/8/9/10, and all-zero or SCL 0 pixels."""
    nodata = (s2 == 0).all(axis=0)
    if scl.any():
        nodata |= scl == 0
    return float(np.isin(scl, SCL_CLOUD_CODES).mean()), float(nodata.mean())


# ---------------------------------------------------------------------------------------------- write


def _tile_template(tile: Tile, bands: Sequence[str]) -> tuple[xr.Dataset, dict[str, Any]]:
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
    ``dimension_names`` that ``_tile_template(...).to_zarr`` writes (a test compares the two), in ~1/10 the time.

    The coordinates and ``spatial_ref`` are written before the two time coordinates are created, so a tile that
    lists every array of ``TILE_ARRAYS`` has all its coordinate values (``open_tile`` recreates it otherwise).
    Call it holding the tile lock.
    """
    template, encoding = _tile_template(tile, bands)
    group = zarr.open_group(cube, mode="a", zarr_format=3).create_group(
        f"tiles/{tile.tile_id}", attributes=dict(template.attrs), overwrite=True
    )
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

    async def create(name: str) -> AsyncArray:
        kwargs, values = specs[name]
        array = await group._async_group.create_array(name, **kwargs)
        if values is not None:
            await array.setitem(Ellipsis, values)
        return array

    async def create_all() -> dict[str, AsyncArray]:
        # Concurrently (few event-loop round trips); the time coordinates only once the rest is written.
        first = [name for name in specs if name not in SENSOR_ARRAYS]
        created = dict(zip(first, await asyncio.gather(*(create(name) for name in first)), strict=True))
        created.update(zip(SENSOR_ARRAYS, await asyncio.gather(*(create(name) for name in SENSOR_ARRAYS)), strict=True))
        return created

    arrays = {name: zarr.Array(array) for name, array in zarr_sync(create_all()).items()}
    return group, arrays


@contextlib.contextmanager
def tile_lock(cube: str, tile_id: str) -> Iterator[None]:
    """Exclusive lock on one tile of a local cube, held across processes (none for URLs, see module doc)."""
    if "://" in cube or fcntl is None:
        yield
        return
    folder = Path(cube) / ".ingest-locks"
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


def open_tile(cube: str, tile: Tile, bands: Sequence[str], *, check_bands: bool = True) -> OpenTile:
    """The tile's group, created empty if missing and repaired after an interrupted append.

    Call it holding ``tile_lock(cube, tile.tile_id)``.

    Raises:
        ValueError: when the tile holds other bands than ``bands`` (with ``check_bands``).
    """
    path = f"tiles/{tile.tile_id}"
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
        stored_bands = [str(b) for b in arrays["band"][:]]
        if stored_bands != list(bands):
            raise ValueError(
                f"tile {tile.tile_id} in {cube} holds bands {stored_bands}, not the requested {list(bands)}"
            )
    opened = OpenTile(group, arrays, {time_dim: arrays[time_dim][:] for time_dim in SENSOR_ARRAYS})
    _repair(opened)
    return opened


def open_tile_group(cube: str, tile: Tile, bands: Sequence[str]) -> zarr.Group:
    """The tile's Zarr group (see ``open_tile``)."""
    return open_tile(cube, tile, bands).group


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
        recorded = dict(tile.group.attrs.get(attr, {}))
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
    path = f"tiles/{tile.tile_id}"
    try:
        group = _open_existing(cube, path)
        if group is None:
            return
        arrays = dict(group.arrays())
        if not set(TILE_ARRAYS) <= set(arrays):  # creation interrupted: nothing committed, remove it all
            del zarr.open_group(cube, mode="a", zarr_format=3)[path]
            return
        seconds = {time_dim: arrays[time_dim][:] for time_dim in SENSOR_ARRAYS}
        for time_dim, names in SENSOR_ARRAYS.items():
            for name in names:
                _drop_chunks_from(arrays[name], len(seconds[time_dim]))
        _repair(OpenTile(group, arrays, seconds))
    except Exception as error:  # the disk may still be full; the next run's open_tile repairs
        log.warning("could not roll back tile %s of %s after a failed append (%s)", tile.tile_id, cube, error)


def _decode_time(seconds: int) -> datetime:
    return datetime(1970, 1, 1) + timedelta(seconds=seconds)


def existing_days(group: zarr.Group, time_dim: str, lon: float) -> set[date]:
    """Solar days already in a tile along ``time`` or ``time_s1``."""
    return {solar_day(_decode_time(int(s)), lon) for s in group[time_dim][:]}


def _future_view(array: zarr.Array, length: int) -> AsyncArray:
    """The array at a longer length along axis 0, without writing that length to the store.

    It writes a chunk of fill values too (zarr skips those by default), so that every committed step has its
    chunk files and a lost one shows in a listing (``check_tiles``).
    """
    current = array._async_array
    future = current.metadata.update_shape((length, *array.shape[1:]))
    return AsyncArray(future, current.store_path, dataclasses.replace(current.config, write_empty_chunks=True))


def _write_ahead(writes: Sequence[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """Write each ``values`` at ``start:`` along axis 0 of its array *without* changing the stored shapes.

    Views of the arrays at their future shapes write the new chunks, all concurrently; the shapes (what
    readers see) only grow when ``_grow`` writes the metadata, so a crash before that leaves no visible trace.
    """

    async def write_all() -> None:
        await asyncio.gather(
            *(_future_view(array, max(array.shape[0], start + len(values)))
              .setitem(slice(start, start + len(values)), values)
              for array, start, values in writes)
        )  # fmt: skip

    zarr_sync(write_all())


def _grow(array: zarr.Array, steps: int) -> None:
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
        attrs[attr] = {**tile.group.attrs.get(attr, {}), **append.item_ids}
    _write_ahead(writes)
    for array, steps in grows:
        _grow(array, steps)
    tile.group.update_attributes(attrs)
    for array, steps in commits:
        _grow(array, steps)
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
    lost_steps: dict[str, list[LostStep]] = {}
    errors: list[str] = []
    by_id = {item["id"]: item for item in items}
    for tile in tiles:
        prefix = f"tiles/{tile.tile_id}"
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
            seconds = {dim: arrays[dim][:] for dim in SENSOR_ARRAYS}
            recorded = {dim: dict(group.attrs.get(ITEM_ATTRS[dim], {})) for dim in SENSOR_ARRAYS}
        lon = _tile_centre_lon(tile)
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


def rewrite_lost_steps(cube: str, tile: Tile, bands: Sequence[str], lost: Sequence[LostStep], read: ReadOptions) -> int:
    """Load the lost steps again (the same items as when they were written) and write their lost chunk files in
    place, under the tile lock; returns the steps written.

    Raises:
        CubeDamageError: when an item of a lost step fails to load now (the step stays as it is).
    """
    loaded: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for step in lost:
        sensor = "s2" if step.time_dim == "time" else "s1"
        ((_, _, values, failed),) = load_days(sensor, {step.day: step.items}, tile, bands, read)
        if values is None or failed:
            raise CubeDamageError(
                f"tiles/{tile.tile_id}: lost step {step.step} ({step.day}) of {sensor} cannot be loaded again: "
                f"{failed or 'no pixels'}; re-run softcon ingest once the items read"
            )
        arrays = values if sensor == "s2" else (values,)  # (s2, scl) or s1
        loaded[(step.time_dim, step.step)] = dict(zip(SENSOR_ARRAYS[step.time_dim], arrays, strict=True))
    with tile_lock(cube, tile.tile_id):
        opened = open_tile(cube, tile, bands, check_bands=False)
        _write_ahead([
            (opened.arrays[name], step.step, loaded[(step.time_dim, step.step)][name][None])
            for step in lost for name in step.arrays
        ])  # fmt: skip
    log.warning("tile %s: wrote %d lost step(s) again: %s", tile.tile_id, len(lost),
                [f"{step.day} {','.join(step.arrays)}" for step in lost])  # fmt: skip
    return len(lost)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------------------------ run


def _intersecting(items: Iterable[dict[str, Any]], tile: Tile) -> list[dict[str, Any]]:
    footprint = box(*tile.lonlat_bounds)
    return [item for item in items if shape(item["geometry"]).intersects(footprint)]


def tiles_for_area(area: BaseGeometry, *, resolution: float, tile_size: int, epsg: int | None = None) -> list[Tile]:
    """Grid tiles of the area's bounding box that the area itself touches (all of them for a bbox)."""
    tiles = tiles_for_bbox(area.bounds, resolution=resolution, tile_size=tile_size, epsg=epsg)
    return [tile for tile in tiles if box(*tile.lonlat_bounds).intersects(area)]


@dataclass
class _TileBatch:
    """Tile-dates of one sensor loaded and waiting to be appended."""

    time_dim: str
    arrays: dict[str, list[np.ndarray]]
    times: list[datetime] = field(default_factory=list)
    days: list[date] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, day: date, values: dict[str, np.ndarray], when: datetime, ids: list[str]) -> None:
        for name, array in values.items():
            self.arrays[name].append(array)
        self.times.append(when)
        self.days.append(day)
        self.ids[day.isoformat()] = ids

    def __len__(self) -> int:
        return len(self.times)

    def clear(self) -> None:
        self.times.clear()
        self.days.clear()
        self.ids.clear()
        for values in self.arrays.values():
            values.clear()


@dataclass
class _RunState:
    skipped: Counter[str] = field(default_factory=Counter)
    ingested: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    written: int = 0
    repaired: int = 0
    pixel_bytes: int = 0


def _flush(
    cube: str, tile: Tile, bands: Sequence[str], batches: Sequence[_TileBatch], lon: float, state: _RunState, *,
    check_bands: bool = False,
) -> tuple[OpenTile | None, list[int]]:  # fmt: skip
    """Append the batches (S2, S1) under one hold of the tile lock, creating the tile if needed and dropping
    days another run wrote since they were loaded; returns the tile as left (``None`` when there was nothing
    to append) and steps per batch. ``check_bands`` when the run has not checked an existing tile's bands."""
    if not any(batches):
        return None, [0] * len(batches)
    appends, ingested = [], []
    with tile_lock(cube, tile.tile_id):
        try:
            opened = open_tile(cube, tile, bands, check_bands=check_bands)
            for batch in batches:
                have = opened.days(batch.time_dim, lon)
                keep = [k for k, day in enumerate(batch.days) if day not in have]
                state.skipped["exists"] += len(batch) - len(keep)
                ids = {batch.days[k].isoformat(): batch.ids[batch.days[k].isoformat()] for k in keep}
                arrays = {name: [values[k] for k in keep] for name, values in batch.arrays.items()}
                appends.append(NewSteps(batch.time_dim, arrays, [batch.times[k] for k in keep], ids))
                ingested.append((len(keep), ids))
            state.pixel_bytes += append_steps(opened, appends)
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
    for written, ids in ingested:
        state.written += written
        for day_ids in ids.values():
            state.ingested.update(day_ids)
    for batch in batches:
        batch.clear()
    return opened, [written for written, _ in ingested]


def _combinable(items: Sequence[dict[str, Any]], sensor: str, bands: Sequence[str]) -> bool:
    """Whether items of several days can go through one load: one collection spec, the same assets used."""
    spec = spec_for_item(items[0])
    if any(spec_for_item(item) != spec for item in items[1:]):
        return False
    keys = [spec.assets["SCL"]] if sensor == "s2" else [spec.assets[pol] for pol in S1_POLS]
    return len({tuple(key in item["assets"] for key in keys) for item in items}) == 1


def load_days(
    sensor: str, days: dict[date, list[dict[str, Any]]], tile: Tile, bands: Sequence[str], read: ReadOptions,
) -> Iterator[tuple[date, list[dict[str, Any]], Any, dict[str, str]]]:  # fmt: skip
    """Load several tile-dates of one sensor: (day, its items that loaded, pixels or ``None``, failed items).

    First one odc-stac load for all the days (with retries: one setup, one dataset, instead of one per
    day); if that keeps failing, each day is loaded on its own and its failing items are isolated
    (``load_day_isolating``), so one bad item costs only its own pixels.
    """
    if not days:
        return
    items = [item for day_items in days.values() for item in day_items]
    what = f"{tile.tile_id} {sensor.upper()} {min(days)}..{max(days)}"
    if len(days) > 1 and _combinable(items, sensor, bands):
        try:
            if sensor == "s2":
                loaded = with_retries(
                    lambda: load_s2_days(days, tile, bands, read), what=what, retries=read.retries,
                    delay=read.retry_delay,
                )  # fmt: skip
            else:
                loaded = with_retries(
                    lambda: load_s1_days(days, tile, read), what=what, retries=read.retries, delay=read.retry_delay
                )
        except Exception as error:
            log.info("%s: loading the days together failed (%s); loading day by day", what, error)
        else:
            for day in sorted(days):
                yield day, days[day], loaded.pop(day), {}
            return
    for day in sorted(days):
        what = f"{tile.tile_id} {day} {sensor.upper()}"
        load_one: Callable[[Sequence[dict[str, Any]]], Any] = (
            (lambda subset: load_s2_day(subset, tile, bands, read))
            if sensor == "s2"
            else (lambda subset: load_s1_day(subset, tile, read))
        )
        one, failed = load_day_isolating(days[day], load_one, read, what)
        yield day, [i for i in days[day] if i["id"] not in failed], one, failed


def _ingest_tile(
    config: IngestConfig, tile: Tile, items: list[dict[str, Any]], read: ReadOptions, state: _RunState,
    progress: Callable[[str], None], lost: Sequence[LostStep] = (),
) -> set[date]:  # fmt: skip
    """Write the tile's ``lost`` steps again, load its new days and append them; returns the tile's Sentinel-2
    days afterwards.

    A tile that does not exist yet is created only when a tile-date is appended, so a run that writes nothing
    (every tile-date cloudy or empty) leaves no empty tile, nor an empty cube.
    """
    lon = _tile_centre_lon(tile)
    if lost:
        state.repaired += rewrite_lost_steps(config.cube, tile, config.bands, lost, read)
    opened: OpenTile | None = None
    if _open_existing(config.cube, f"tiles/{tile.tile_id}") is not None:
        with tile_lock(config.cube, tile.tile_id):
            opened = open_tile(config.cube, tile, config.bands)
    new_days: dict[str, list[tuple[date, list[dict[str, Any]]]]] = {}
    for sensor, time_dim in (("s2", "time"), ("s1", "time_s1")):
        sensor_items = [i for i in items if sensor_of(i["collection"]) == sensor and i["id"] not in state.failures]
        have = opened.days(time_dim, lon) if opened is not None else set()
        new_days[sensor] = []
        for day, day_items in group_by_solar_day(sensor_items, lon).items():
            if day in have:
                state.skipped["exists"] += 1
            else:
                new_days[sensor].append((day, day_items))
    batches = {"s2": _TileBatch("time", {"s2": [], "scl": []}), "s1": _TileBatch("time_s1", {"s1": []})}
    counts = Counter[str]()
    # Rounds of up to WRITE_BATCH days per sensor: one load per sensor, one append of both under one lock
    # hold; bounded memory on long date ranges.
    rounds = max(len(days) for days in new_days.values())
    for first in range(0, rounds, WRITE_BATCH):
        for sensor, batch in batches.items():
            chunk = dict(new_days[sensor][first : first + WRITE_BATCH])
            for day, day_items, loaded, failed in load_days(sensor, chunk, tile, config.bands, read):
                for item_id, reason in failed.items():
                    log.warning("skipping item %s: %s", item_id, reason)
                state.failures.update(failed)
                if loaded is None:
                    continue
                what = f"{tile.tile_id} {day} {sensor.upper()}"
                if sensor == "s2":
                    s2, scl = loaded
                    cloud, nodata = s2_day_quality(s2, scl)
                    values = {"s2": s2, "scl": scl}
                else:
                    cloud, nodata = 0.0, float(np.isnan(loaded).all(axis=0).mean())
                    values = {"s1": loaded}
                if nodata > config.max_tile_nodata:
                    state.skipped["nodata"] += 1
                    progress(f"{what}: nodata {nodata:.2f} > {config.max_tile_nodata}; skipped")
                    continue
                if cloud > config.max_tile_cloud:
                    state.skipped["cloud"] += 1
                    progress(f"{what}: cloud {cloud:.2f} > {config.max_tile_cloud}; skipped")
                    continue
                batch.add(day, values, min(_item_datetime(i) for i in day_items), sorted(i["id"] for i in day_items))
        flushed, written = _flush(
            config.cube, tile, config.bands, list(batches.values()), lon, state, check_bands=opened is None
        )
        opened = flushed or opened
        counts.update(dict(zip(batches, written, strict=True)))
    progress(f"{tile.tile_id}: wrote {counts['s2']} S2 and {counts['s1']} S1 dates")
    return opened.days("time", lon) if opened is not None else set()


def run_ingest(config: IngestConfig, *, on_progress: Callable[[str], None] | None = None) -> IngestReport:
    """Search, filter and load Sentinel-2/-1 items onto the tile grid of the area into the cube.

    Progress goes to ``on_progress`` (messages) and to this module's logger: one INFO record per tile done
    carrying ``extra={"ingest_progress": (done, total)}``, which a CLI handler turns into a progress bar.

    Example:
        >>> config = IngestConfig(stac=url, bbox=(11.0, 46.49, 11.02, 46.51), start=date(2024, 6, 1),
        ...                       end=date(2024, 6, 30), cube="cube.zarr")
        >>> report = run_ingest(config)
        >>> xr.open_zarr("cube.zarr", group=f"tiles/{report.tiles[0]}").s2

    Raises:
        ValueError: when the search finds no items or none is usable (no store is created), the cube holds
            other bands, or a header's environment variable is unset.
        FileNotFoundError: a missing static STAC file or area file.
    """
    started = time.perf_counter()
    progress = on_progress or (lambda message: log.info(message))
    read = ReadOptions(
        patch_url=url_signer(config),
        gdal=_gdal_options(request_headers(config), retries=config.retries, retry_delay=config.retry_delay),
        retries=config.retries,
        retry_delay=config.retry_delay,
        threads=config.read_threads,
    )  # fmt: skip
    area = read_area(config)
    found = search_items(config, area)
    if not found:
        raise ValueError(
            f"no STAC items in {config.stac} for collections {list(config.collections)}, area {area.bounds}, "
            f"dates {config.start}..{config.end}; nothing written. Check the area (lon/lat W,S,E,N: open sea has "
            "no Sentinel-2 granules), the dates and the collection names"
        )
    s2_items = [i for i in found if sensor_of(i["collection"]) == "s2"]
    s1_items = [i for i in found if sensor_of(i["collection"]) == "s1"]
    s2_items, filtered = filter_cloudy_items(s2_items, config.max_cloud)
    progress(f"found {len(found)} items, {len(filtered)} over {config.max_cloud}% cloud")

    state = _RunState()
    usable: list[dict[str, Any]] = []
    for item in s2_items + s1_items:
        spec = spec_for_item(item)
        try:
            if spec.sensor == "s2":
                for band in config.bands:
                    spec.asset_key(band, item)
            elif not any(spec.assets[pol] in item["assets"] for pol in S1_POLS):  # single-pol is fine
                raise KeyError(f"item {item['id']} has none of the S1 assets {[spec.assets[p] for p in S1_POLS]}")
        except KeyError as error:
            log.warning("skipping item %s: %s", item["id"], error.args[0])
            state.failures[item["id"]] = f"missing asset: {error.args[0]}"
            continue
        usable.append(item)
    if not usable:
        raise ValueError(
            f"none of the {len(found)} STAC items is usable: {len(filtered)} over max_cloud {config.max_cloud}% "
            f"(raise it), {len(state.failures)} without a requested asset {dict(state.failures)} (request other "
            "bands); nothing written"
        )

    tiles = tiles_for_area(area, resolution=config.resolution, tile_size=config.tile_size, epsg=config.epsg)
    lost_steps = check_tiles(config.cube, tiles, usable)
    local = None if "://" in config.cube else Path(config.cube)
    bytes_before = {tile.tile_id: _tree_bytes(local / "tiles" / tile.tile_id) for tile in tiles} if local else {}
    cube_days: set[date] = set()
    for done, tile in enumerate(tiles, start=1):
        cube_days |= _ingest_tile(
            config, tile, _intersecting(usable, tile), read, state, progress, lost_steps.get(tile.tile_id, ())
        )
        log.info("tile %d/%d done: %s", done, len(tiles), tile.tile_id, extra={PROGRESS_EXTRA: (done, len(tiles))})

    bytes_written = (
        sum(max(0, _tree_bytes(local / "tiles" / t.tile_id) - bytes_before[t.tile_id]) for t in tiles) if local else 0
    )
    filtered_set = set(filtered)
    statuses = {}
    for item in found:
        item_id = item["id"]
        if item_id in state.failures:
            statuses[item_id] = "failed"
        elif item_id in filtered_set:
            statuses[item_id] = "filtered"
        elif item_id in state.ingested:
            statuses[item_id] = "ingested"
        else:
            statuses[item_id] = "not written"  # its tile-dates exist already, or were cloudy / empty
    report = IngestReport(
        cube=config.cube, tiles=[t.tile_id for t in tiles], items_found=len(found), items_filtered=len(filtered),
        items_ingested=len(state.ingested), items_failed=sorted(state.failures), tile_dates_written=state.written,
        tile_dates_skipped=dict(state.skipped), tile_dates_repaired=state.repaired, bytes_written=bytes_written,
        pixel_bytes=state.pixel_bytes,
        seconds=time.perf_counter() - started, dates=len(cube_days), failures=dict(state.failures),
        items=statuses,
    )  # fmt: skip
    progress(f"ingest done: {report.metrics()}")
    return report
