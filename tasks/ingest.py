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
``ds.sortby("time")``.

No partial time step is ever readable as data: each append first grows and fills the data arrays,
then grows the time coordinate, and only then records the item ids. A run that dies in between leaves
data arrays longer than ``time`` (``xr.open_zarr`` refuses such a tile rather than showing a partial
step); the next ingest truncates them back to the time coordinate before doing anything else.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import odc.stac
import pystac
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from shapely.geometry import box, shape

from softcon.config import IngestConfig
from tasks.collections import CollectionSpec, sensor_of, spec_for_item
from tasks.grid import Tile, tiles_for_bbox

log = logging.getLogger(__name__)

SCL_CLOUD_CODES = (3, 8, 9, 10)
"""Sen2Cor cloud shadow, cloud medium/high probability, thin cirrus."""
TIME_UNITS = "seconds since 1970-01-01"
S1_POLS = ("VV", "VH")


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
    """Items skipped because an asset could not be read."""
    tile_dates_written: int
    tile_dates_skipped: dict[str, int] = field(default_factory=dict)
    """Reason (``exists``, ``cloud``, ``nodata``) -> count."""
    bytes_written: int = 0
    seconds: float = 0.0
    dates: int = 0
    """Distinct Sentinel-2 days in the cube's tiles after this run."""

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics for MLflow."""
        metrics = {
            "items_found": float(self.items_found),
            "items_filtered": float(self.items_filtered),
            "items_ingested": float(self.items_ingested),
            "items_failed": float(len(self.items_failed)),
            "tiles": float(len(self.tiles)),
            "tile_dates_written": float(self.tile_dates_written),
            "dates": float(self.dates),
            "bytes_written": float(self.bytes_written),
            "seconds": self.seconds,
        }
        metrics.update({f"tile_dates_skipped_{k}": float(v) for k, v in self.tile_dates_skipped.items()})
        return metrics


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
    import json

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


def _item_datetime(item: dict[str, Any]) -> datetime:
    props = item["properties"]
    text = props.get("datetime") or props.get("start_datetime")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _matches(item: dict[str, Any], collections: Sequence[str], bbox: Sequence[float], start: date, end: date) -> bool:
    if item.get("collection") not in collections:
        return False
    if not shape(item["geometry"]).intersects(box(*bbox)):
        return False
    return start <= _item_datetime(item).date() <= end


def search_items(config: IngestConfig) -> list[dict[str, Any]]:
    """Items of ``config.collections`` over ``config.bbox`` and the date range, as STAC dicts.

    A STAC API is searched with pystac-client (with an ``eo:cloud_cover`` query on Sentinel-2 when the
    server conforms to the Query extension); a file is read and filtered here.
    """
    collections = list(config.collections)
    if not _is_url(config.stac):
        items = read_static_items(config.stac)
        return [i for i in items if _matches(i, collections, config.bbox, config.start, config.end)]
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses

    client = Client.open(config.stac)
    found: list[dict[str, Any]] = []
    for sensor in ("s2", "s1"):
        names = [c for c in collections if sensor_of(c) == sensor]
        if not names:
            continue
        query = None
        if sensor == "s2" and client.conforms_to(ConformanceClasses.QUERY):
            query = {"eo:cloud_cover": {"lte": config.max_cloud}}
        search = client.search(
            collections=names, bbox=config.bbox, datetime=_datetime_range(config.start, config.end),
            query=query, limit=100,
        )  # fmt: skip
        found.extend(search.items_as_dicts())
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


def probe_item(item: dict[str, Any], asset_keys: Sequence[str]) -> str | None:
    """Open the header of each asset; the first error as text, or ``None`` when all open."""
    for key in asset_keys:
        href = item["assets"][key]["href"]
        try:
            with rasterio.open(href):
                pass
        except Exception as error:  # rasterio raises many types for unreadable files
            return f"{key}: {error}"
    return None


# ----------------------------------------------------------------------------------------------- load


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


def load_s2_day(items: Sequence[dict[str, Any]], tile: Tile, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One solar day of S2 on the tile grid: (band, y, x) uint16 harmonized reflectance, (y, x) SCL."""
    spec = spec_for_item(items[0])
    band_keys = [spec.asset_key(band) for band in bands]
    with_scl = all(spec.assets["SCL"] in item["assets"] for item in items)
    keys = [*band_keys, spec.assets["SCL"]] if with_scl else band_keys
    resampling = {"*": "bilinear", spec.assets["SCL"]: "nearest"}
    data = _odc_load(items, keys, tile, resampling)
    stack = np.stack([data[key].values[0] for key in band_keys]).astype(np.int32)  # (band, y, x)
    offset = spec.s2_offset(items[0])
    if offset:  # BOA_ADD_OFFSET: keep 0 as nodata, clip valid pixels to 1
        stack = np.where(stack > 0, np.clip(stack + offset, 1, None), 0)
    scl = data[spec.assets["SCL"]].values[0].astype(np.uint8) if with_scl else np.zeros(stack.shape[1:], np.uint8)
    return np.clip(stack, 0, 65535).astype(np.uint16), scl


def load_s1_day(items: Sequence[dict[str, Any]], tile: Tile) -> np.ndarray:
    """One solar day of S1 on the tile grid: (pol, y, x) float32 dB, NaN where there is no data."""
    spec: CollectionSpec = spec_for_item(items[0])
    keys = [spec.asset_key(pol) for pol in S1_POLS]
    data = _odc_load(items, keys, tile, {"*": "bilinear"}, dtype="float32")
    scale = spec.s1_value_scale(items[0])
    nodata = spec.asset_nodata(items[0], "VV")
    out = []
    for key in keys:
        values = data[key].values[0].astype(np.float64)
        values[(values == nodata) | ~np.isfinite(values)] = np.nan
        if scale != "db":
            values[values <= 0] = np.nan
            with np.errstate(invalid="ignore", divide="ignore"):
                # linear power -> 10 log10; amplitude digital numbers (GRD) -> 20 log10, uncalibrated.
                values = (20 if scale == "amplitude" else 10) * np.log10(values)
        out.append(values.astype(np.float32))
    return np.stack(out)


def _odc_load(
    items: Sequence[dict[str, Any]],
    keys: Sequence[str],
    tile: Tile,
    resampling: dict[str, str],
    dtype: str | None = None,
) -> xr.Dataset:
    # Without their links: a "self" link to an API would turn absolute local paths into API URLs.
    stac_items = [pystac.Item.from_dict({**item, "links": []}) for item in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odc-stac warns about common-name aliases
        return odc.stac.load(
            stac_items, bands=list(keys), geobox=tile.geobox, resampling=resampling, groupby="solar_day",
            chunks=None, fail_on_error=False, dtype=dtype,
        )  # fmt: skip


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


def open_tile_group(cube: str, tile: Tile, bands: Sequence[str]) -> zarr.Group:
    """The tile's Zarr group, created empty if missing and repaired after an interrupted append."""
    path = f"tiles/{tile.tile_id}"
    root = zarr.open_group(cube, mode="a", zarr_format=3)
    if path not in root:
        template, encoding = _tile_template(tile, bands)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template.to_zarr(cube, group=path, mode="a", zarr_format=3, encoding=encoding, consolidated=False)
    group = zarr.open_group(cube, path=path, mode="a", zarr_format=3)
    stored_bands = [str(b) for b in group["band"][:]]
    if stored_bands != list(bands):
        raise ValueError(f"tile {tile.tile_id} in {cube} holds bands {stored_bands}, not the requested {list(bands)}")
    _repair(group)
    return group


def _repair(group: zarr.Group) -> None:
    """Truncate data arrays left longer than their time coordinate by an interrupted append."""
    for time_dim, names in (("time", ("s2", "scl")), ("time_s1", ("s1",))):
        steps = group[time_dim].shape[0]
        for name in names:
            array = group[name]
            if array.shape[0] != steps:
                log.warning(
                    "tile %s: %s has %d steps, %s %d; truncating", group.path, name, array.shape[0], time_dim, steps
                )
                array.resize((steps, *array.shape[1:]))


def existing_days(group: zarr.Group, time_dim: str, lon: float) -> set[date]:
    """Solar days already in a tile along ``time`` or ``time_s1``."""
    seconds = group[time_dim][:]
    return {solar_day(datetime(1970, 1, 1) + timedelta(seconds=int(s)), lon) for s in seconds}


def append_steps(
    group: zarr.Group, time_dim: str, arrays: dict[str, list[np.ndarray]], times: Sequence[datetime],
    item_ids: dict[str, list[str]],
) -> None:  # fmt: skip
    """Append time steps: data arrays first, then the time coordinate, then the item-id attrs."""
    if not times:
        return
    steps = group[time_dim].shape[0]
    new = steps + len(times)
    for name, values in arrays.items():
        array = group[name]
        array.resize((new, *array.shape[1:]))
        array[steps:new] = np.stack(values)
    coord = group[time_dim]
    coord.resize((new,))
    epoch = datetime(1970, 1, 1)
    coord[steps:new] = np.array([int((t.replace(tzinfo=None) - epoch).total_seconds()) for t in times], np.int64)
    attr = "s2_items" if time_dim == "time" else "s1_items"
    recorded = dict(group.attrs.get(attr, {}))
    recorded.update(item_ids)
    group.attrs[attr] = recorded


def _store_bytes(cube: str) -> int:
    if "://" in cube:
        return 0
    root = Path(cube)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# ------------------------------------------------------------------------------------------------ run


def _intersecting(items: Iterable[dict[str, Any]], tile: Tile) -> list[dict[str, Any]]:
    footprint = box(*tile.lonlat_bounds)
    return [item for item in items if shape(item["geometry"]).intersects(footprint)]


def run_ingest(config: IngestConfig, *, on_progress: Callable[[str], None] | None = None) -> IngestReport:
    """Search, filter and load Sentinel-2/-1 items onto the tile grid of ``config.bbox`` into the cube.

    Example:
        >>> config = IngestConfig(stac=url, bbox=(11.0, 46.49, 11.02, 46.51), start=date(2024, 6, 1),
        ...                       end=date(2024, 6, 30), cube="cube.zarr")
        >>> report = run_ingest(config)
        >>> xr.open_zarr("cube.zarr", group=f"tiles/{report.tiles[0]}").s2

    Raises:
        ValueError: when the search finds no items (no store is created), or the cube holds other bands.
    """
    started = time.perf_counter()
    progress = on_progress or (lambda message: log.info(message))
    found = search_items(config)
    if not found:
        raise ValueError(
            f"no STAC items in {config.stac} for collections {list(config.collections)}, bbox {config.bbox}, "
            f"dates {config.start}..{config.end}"
        )
    s2_items = [i for i in found if sensor_of(i["collection"]) == "s2"]
    s1_items = [i for i in found if sensor_of(i["collection"]) == "s1"]
    s2_items, filtered = filter_cloudy_items(s2_items, config.max_cloud)
    progress(f"found {len(found)} items, {len(filtered)} over {config.max_cloud}% cloud")

    failed: list[str] = []
    readable: list[dict[str, Any]] = []
    for item in s2_items + s1_items:
        spec = spec_for_item(item)
        wanted = list(config.bands) if spec.sensor == "s2" else list(S1_POLS)
        try:
            keys = [spec.asset_key(band, item) for band in wanted]
        except KeyError as error:
            log.warning("skipping item %s: %s", item["id"], error)
            failed.append(item["id"])
            continue
        problem = probe_item(item, keys)
        if problem:
            log.warning("skipping item %s: cannot read %s", item["id"], problem)
            failed.append(item["id"])
        else:
            readable.append(item)

    bytes_before = _store_bytes(config.cube)
    tiles = tiles_for_bbox(config.bbox, resolution=config.resolution, tile_size=config.tile_size)
    skipped: Counter[str] = Counter()
    ingested: set[str] = set()
    written = 0
    cube_days: set[date] = set()
    for tile in tiles:
        lon = _tile_centre_lon(tile)
        tile_items = _intersecting(readable, tile)
        group = open_tile_group(config.cube, tile, config.bands)
        # Sentinel-2: skip existing days, load the new ones, drop cloudy / empty tile-dates.
        have = existing_days(group, "time", lon)
        arrays: dict[str, list[np.ndarray]] = {"s2": [], "scl": []}
        times, ids = [], {}
        for day, items in group_by_solar_day(
            [i for i in tile_items if sensor_of(i["collection"]) == "s2"], lon
        ).items():
            if day in have:
                skipped["exists"] += 1
                continue
            s2, scl = load_s2_day(items, tile, config.bands)
            cloud, nodata = s2_day_quality(s2, scl)
            if nodata > config.max_tile_nodata:
                skipped["nodata"] += 1
                progress(f"{tile.tile_id} {day}: S2 nodata {nodata:.2f} > {config.max_tile_nodata}; skipped")
                continue
            if cloud > config.max_tile_cloud:
                skipped["cloud"] += 1
                progress(f"{tile.tile_id} {day}: S2 cloud {cloud:.2f} > {config.max_tile_cloud}; skipped")
                continue
            arrays["s2"].append(s2)
            arrays["scl"].append(scl)
            times.append(min(_item_datetime(i) for i in items))
            ids[day.isoformat()] = sorted(i["id"] for i in items)
        append_steps(group, "time", arrays, times, ids)
        # Sentinel-1 onto the same grid.
        have_s1 = existing_days(group, "time_s1", lon)
        s1_arrays: dict[str, list[np.ndarray]] = {"s1": []}
        s1_times, s1_ids = [], {}
        for day, items in group_by_solar_day(
            [i for i in tile_items if sensor_of(i["collection"]) == "s1"], lon
        ).items():
            if day in have_s1:
                skipped["exists"] += 1
                continue
            s1 = load_s1_day(items, tile)
            nodata = float(np.isnan(s1).all(axis=0).mean())
            if nodata > config.max_tile_nodata:
                skipped["nodata"] += 1
                continue
            s1_arrays["s1"].append(s1)
            s1_times.append(min(_item_datetime(i) for i in items))
            s1_ids[day.isoformat()] = sorted(i["id"] for i in items)
        append_steps(group, "time_s1", s1_arrays, s1_times, s1_ids)
        for day_ids in (*ids.values(), *s1_ids.values()):
            ingested.update(day_ids)
        written += len(times) + len(s1_times)
        cube_days |= existing_days(group, "time", lon)
        progress(f"{tile.tile_id}: wrote {len(times)} S2 and {len(s1_times)} S1 dates")

    report = IngestReport(
        cube=config.cube, tiles=[t.tile_id for t in tiles], items_found=len(found), items_filtered=len(filtered),
        items_ingested=len(ingested), items_failed=failed, tile_dates_written=written,
        tile_dates_skipped=dict(skipped), bytes_written=max(0, _store_bytes(config.cube) - bytes_before),
        seconds=time.perf_counter() - started, dates=len(cube_days),
    )  # fmt: skip
    progress(f"ingest done: {report.metrics()}")
    return report
