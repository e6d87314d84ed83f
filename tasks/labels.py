"""Labels: bring a land-cover product onto every tile of the cube as ``landcover (y, x)`` uint8.

Sources: a STAC API URL or a STAC file (the ``map`` asset of ``config.collection``, loaded with odc-stac,
mode resampling since WorldCover's 1/12000° pixels are finer than 10 m), or a local raster (GeoTIFF/COG,
warped through a rasterio WarpedVRT with mode resampling, reading only the window a tile needs).
Vector sources are a later issue. The array is rewritten whole on every run, so re-runs give the same bytes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import odc.stac
import pystac
import rasterio
import zarr
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from shapely.geometry import box, shape

from softcon.config import LabelsConfig
from tasks.grid import Tile
from tasks.ingest import read_static_items
from tasks.schemes import ClassScheme, get_scheme

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".shp", ".parquet", ".geoparquet", ".fgb")


@dataclass(frozen=True)
class LabelsReport:
    """What one labels run wrote."""

    cube: str
    tiles: list[str]
    class_pixels: dict[str, int]
    """Class name -> pixels over all tiles."""
    unknown_codes: dict[int, int]
    """Product codes outside the scheme (not nodata) -> pixels."""
    seconds: float

    def metrics(self) -> dict[str, float]:
        total = sum(self.class_pixels.values()) or 1
        metrics = {"tiles": float(len(self.tiles)), "seconds": self.seconds,
                   "unknown_pixels": float(sum(self.unknown_codes.values()))}  # fmt: skip
        metrics.update({f"fraction_{name.split(' ')[0].lower()}": n / total for name, n in self.class_pixels.items()})
        return metrics


def read_cube_tiles(cube: str) -> list[Tile]:
    """The tiles of a cube, rebuilt from each group's coordinates and CRS."""
    root = zarr.open_group(cube, mode="r")
    if "tiles" not in root:
        raise ValueError(f"{cube} has no tiles/ group; run ingest first")
    tiles = []
    for tile_id in sorted(root["tiles"].group_keys()):
        group = root["tiles"][tile_id]
        xs, ys = group["x"][:], group["y"][:]
        resolution = float(xs[1] - xs[0])
        epsg = int(tile_id.split("_")[0])
        tiles.append(Tile(epsg, float(xs[0] - resolution / 2), float(ys[0] + resolution / 2), resolution, len(xs)))
    return tiles


def _source_kind(source: str) -> str:
    if source.startswith(("http://", "https://")):
        return "stac"
    suffix = Path(source).suffix.lower()
    if suffix == ".json":
        return "stac"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in VECTOR_SUFFIXES:
        return "vector"
    raise ValueError(f"source {source!r}: expected a STAC URL/JSON, a raster {RASTER_SUFFIXES} or a vector file")


def search_land_cover(source: str, collection: str, tile: Tile) -> list[dict[str, Any]]:
    """Land-cover items of ``collection`` over the tile's lon/lat bounds."""
    bounds = tile.lonlat_bounds
    if source.startswith(("http://", "https://")):
        from pystac_client import Client

        search = Client.open(source).search(collections=[collection], bbox=bounds, limit=100)
        return list(search.items_as_dicts())
    footprint = box(*bounds)
    return [
        item for item in read_static_items(source)
        if item.get("collection") == collection and shape(item["geometry"]).intersects(footprint)
    ]  # fmt: skip


def load_land_cover_stac(items: list[dict[str, Any]], tile: Tile) -> np.ndarray:
    """The ``map`` asset on the tile grid (mode resampling), the latest product when there are several."""
    stac_items = [pystac.Item.from_dict({**item, "links": []}) for item in items]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = odc.stac.load(stac_items, bands=["map"], geobox=tile.geobox, resampling="mode",
                             groupby="solar_day", chunks=None, dtype="uint8")  # fmt: skip
    return data["map"].isel(time=-1).values.astype(np.uint8)


def reproject_raster(path: str | Path, tile: Tile) -> np.ndarray:
    """Band 1 of a local raster warped onto the tile grid with mode resampling (nodata -> 0)."""
    with rasterio.open(path) as src:
        vrt_options = {"crs": f"EPSG:{tile.epsg}", "transform": tile.transform, "width": tile.size,
                       "height": tile.size, "resampling": Resampling.mode, "nodata": 0}  # fmt: skip
        with WarpedVRT(src, **vrt_options) as vrt:
            return vrt.read(1).astype(np.uint8)


def write_land_cover(cube: str, tile: Tile, land_cover: np.ndarray, attrs: dict[str, Any]) -> None:
    """(Re)write ``tiles/<id>/landcover`` whole: same input, same bytes."""
    group = zarr.open_group(cube, path=f"tiles/{tile.tile_id}", mode="a", zarr_format=3)
    array = group.create_array(
        "landcover", shape=land_cover.shape, dtype="uint8", chunks=land_cover.shape, fill_value=0,
        dimension_names=("y", "x"), overwrite=True,
        attributes={**attrs, "grid_mapping": "spatial_ref", "coordinates": "spatial_ref", "nodata": 0},
    )  # fmt: skip
    array[...] = land_cover


def class_counts(land_cover: np.ndarray, scheme: ClassScheme) -> tuple[Counter[str], Counter[int]]:
    """Pixels per scheme class name, and per code outside the scheme (nodata excluded)."""
    codes, counts = np.unique(land_cover, return_counts=True)
    known: Counter[str] = Counter()
    unknown: Counter[int] = Counter()
    for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
        if scheme.nodata is not None and code == scheme.nodata:
            continue
        if code in scheme.codes:
            known[scheme.name_of(code)] += count
        else:
            unknown[code] += count
    return known, unknown


def run_labels(config: LabelsConfig) -> LabelsReport:
    """Write ``landcover`` into every tile of ``config.cube`` from ``config.source``.

    Example:
        >>> report = run_labels(LabelsConfig(cube="cube.zarr", source=stac_url))
        >>> report.class_pixels["Tree cover"]

    Raises:
        NotImplementedError: vector sources (a later issue).
        ValueError: a product that does not overlap a tile (naming both extents), an unknown scheme.
    """
    started = time.perf_counter()
    scheme = get_scheme(config.scheme)
    kind = _source_kind(config.source)
    if kind == "vector":
        raise NotImplementedError(f"vector land-cover sources ({config.source}) are not supported yet; use a raster")
    tiles = read_cube_tiles(config.cube)
    total: Counter[str] = Counter()
    unknown: Counter[int] = Counter()
    for tile in tiles:
        if kind == "stac":
            items = search_land_cover(config.source, config.collection, tile)
            if not items:
                raise ValueError(f"no {config.collection} item in {config.source} overlaps tile {tile.tile_id} "
                                 f"(lon/lat {tile.lonlat_bounds})")  # fmt: skip
            land_cover = load_land_cover_stac(items, tile)
            product_extent = [item.get("bbox") for item in items]
            start = items[-1]["properties"].get("start_datetime") or items[-1]["properties"].get("datetime") or ""
            year = start[:4]
            product = config.collection
        else:
            land_cover = reproject_raster(config.source, tile)
            with rasterio.open(config.source) as src:
                product_extent = [list(src.bounds), str(src.crs)]
            year, product = "", Path(config.source).name
        if scheme.nodata is not None and not (land_cover != scheme.nodata).any():
            raise ValueError(f"land cover {config.source} (extent {product_extent}) does not overlap tile "
                             f"{tile.tile_id} (lon/lat {tile.lonlat_bounds})")  # fmt: skip
        attrs = {"product": product, "year": year, "class_scheme": scheme.name, "class_codes": list(scheme.codes),
                 "class_names": list(scheme.class_names), "long_name": "land cover class code"}  # fmt: skip
        write_land_cover(config.cube, tile, land_cover, attrs)
        known, other = class_counts(land_cover, scheme)
        total.update(known)
        unknown.update(other)
        log.info("%s: land cover %s", tile.tile_id, dict(known))
    if unknown:
        log.warning("codes outside scheme %s: %s", scheme.name, dict(unknown))
    return LabelsReport(cube=config.cube, tiles=[t.tile_id for t in tiles], class_pixels=dict(total),
                        unknown_codes=dict(unknown), seconds=time.perf_counter() - started)  # fmt: skip
