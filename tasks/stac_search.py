"""STAC search for ingest: the items of the requested collections over an area and a date range, and the
client-side cloud filter.

A STAC API is searched with pystac-client (through ``tasks/stac_access.py``: headers, retries); a static
ItemCollection, Item or catalog file is read and filtered here. The area is one lon/lat geometry: the bbox,
or the geometries of an area file clipped to it (``read_area``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pystac
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from softcon.config import IngestConfig
from softcon.tasks.collections import sensor_of
from softcon.tasks.stac_access import StacAccess, is_http_url

__all__ = ["filter_cloudy_items", "item_datetime", "read_area", "read_static_items", "search_items"]

log = logging.getLogger(__name__)


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
        if not isinstance(catalog, pystac.Catalog):  # a Collection is a Catalog
            raise ValueError(f"{path} has type {kind!r} but pystac reads it as a {type(catalog).__name__}")
        return [item.to_dict() for item in catalog.get_items(recursive=True)]
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


def item_datetime(item: dict[str, Any]) -> datetime:
    """The item's acquisition time: ``datetime``, else ``start_datetime``."""
    props = item["properties"]
    text = props.get("datetime") or props.get("start_datetime")
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _matches(item: dict[str, Any], collections: Sequence[str], area: BaseGeometry, start: date, end: date) -> bool:
    if item.get("collection") not in collections:
        return False
    if not shape(item["geometry"]).intersects(area):
        return False
    return start <= item_datetime(item).date() <= end


def search_items(
    config: IngestConfig, area: BaseGeometry | None = None, *, access: StacAccess | None = None
) -> list[dict[str, Any]]:
    """Items of ``config.collections`` over the area and the date range, as STAC dicts.

    A STAC API is searched with pystac-client (``intersects`` the area, an ``eo:cloud_cover`` query on
    Sentinel-2 when the server conforms to the Query extension, HTTP retries with backoff, the configured
    headers); a file is read and filtered here.

    Args:
        config: the ingest request.
        area: the area to search; default ``read_area(config)``.
        access: headers and retries for the API; default ``StacAccess.from_config(config)``.
    """
    area = area if area is not None else read_area(config)
    collections = list(config.collections)
    if not is_http_url(config.stac):
        items = read_static_items(config.stac)
        return [i for i in items if _matches(i, collections, area, config.start, config.end)]
    from pystac_client.conformance import ConformanceClasses

    access = access or StacAccess.from_config(config)
    client = access.open_api()
    found: list[dict[str, Any]] = []
    for sensor in ("s2", "s1"):
        names: list[str] = [c for c in collections if sensor_of(c) == sensor]
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
            item for item in access.fetch_items(search, f"searching {config.stac}")
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
