"""Labels: bring a land-cover product onto every tile of the cube as ``landcover (y, x)`` uint8 class codes.

Sources (``LabelsConfig.source``):

- a STAC API URL or a STAC file: the items of ``config.collection`` (Planetary Computer ``esa-worldcover``,
  ``io-lulc-annual-v02``, or the same layout elsewhere) over each tile, one product year (``config.year``,
  default the latest), mosaicked and loaded with odc-stac. The API and the assets are reached as ingest
  reaches them (``tasks/stac_access.py``): ``config.headers`` from environment variables, Planetary Computer
  signing (``config.sign``), and retries of transient failures (``config.retries``, ``config.retry_delay``);
- a local raster or a URL to one (GeoTIFF/COG/VRT): WorldCover, Dynamic World-style ``label`` exports, IO LULC
  or any class raster. Only the window a tile needs is read (the real WorldCover tile is 36000 x 36000);
- a vector file (GeoPackage, GeoJSON, Shapefile, FlatGeobuf, GeoParquet) with a class attribute, rasterized
  by ``tasks/rasterize.py`` (pixel-centre coverage, last polygon wins; see there).

Rasters are warped onto the tile grid with **mode** resampling when the product's pixels are finer than the
tile's (the majority class of the product pixels under a tile pixel) and **nearest** otherwise (a coarser
pixel simply spans several tile pixels; mode over one source pixel would be the same class at more cost).
Nodata stays nodata: the product's nodata value or mask, and anything outside the product, become 0.

Codes then go through the class scheme (``tasks/schemes.py``) to the uint8 class codes that
``tasks/patches.py: class_fractions`` counts (the ``class_codes`` attribute lists them; 0 is never a class).
Codes outside the scheme are counted per code in the report, logged, and written as nodata, unless they cover
more pixels than the scheme's classes (``config.unknown_codes = "auto"``, the default: the scheme does not fit
the product), or any pixel with ``"error"``: then the run stops before writing, listing the codes with their
pixel counts and a YAML scheme skeleton for them. ``--scheme field`` takes a vector source's class attribute's own
values as the classes.

Everything that can be checked before reading pixels is checked first: the source kind, the raster's or
vector's CRS, the class attribute (the error lists the columns), the scheme, and that the product's extent
meets every tile (the error names the tile and the product's extent). The array is rewritten whole on every
run, so re-runs give the same bytes.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import odc.stac
import pystac
import rasterio
import rasterio.warp
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.windows import Window
from shapely.geometry import box, shape

from softcon.config import LabelsConfig
from softcon.tasks import rasterize
from softcon.tasks.cube_store import read_cube_tiles, write_land_cover
from softcon.tasks.grid import Tile
from softcon.tasks.schemes import (
    FIELD_SCHEME,
    ClassScheme,
    MappedCodes,
    get_scheme,
    scheme_from_values,
    scheme_skeleton,
)
from softcon.tasks.stac_access import StacAccess, is_http_url
from softcon.tasks.stac_search import read_static_items

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json.gz", ".shp", ".parquet", ".geoparquet", ".fgb")
SourceKind = Literal["stac", "raster", "vector"]
STAC_ASSETS: dict[str, str] = {"esa-worldcover": "map", "io-lulc-annual-v02": "data", "io-lulc-9-class": "data",
                               "io-lulc": "data"}  # fmt: skip
"""The class-raster asset of known collections; others use the first asset with the ``data`` role."""


@dataclass(frozen=True)
class LabelsReport:
    """What one labels run wrote."""

    cube: str
    tiles: list[str]
    scheme: str
    class_codes: dict[str, int]
    """Class name -> its code in the ``landcover`` array, in class order."""
    class_pixels: dict[str, int]
    """Class name -> pixels over all tiles (every class of the scheme, 0 when absent)."""
    unknown_codes: dict[str, int]
    """Product code (or vector class value) outside the scheme -> pixels; written as nodata."""
    excluded_codes: dict[str, int] = field(default_factory=dict)
    """Product code the scheme knows but keeps no class for -> pixels; written as nodata."""
    nodata_pixels: int = 0
    total_pixels: int = 0
    resampling: dict[str, str] = field(default_factory=dict)
    """Tile id -> resampling used (mode, nearest, or rasterize)."""
    product: str = ""
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        labelled = sum(self.class_pixels.values())
        metrics = {
            "tiles": float(len(self.tiles)), "seconds": self.seconds,
            "labelled_fraction": labelled / self.total_pixels if self.total_pixels else 0.0,
            "unknown_pixels": float(sum(self.unknown_codes.values())),
            "excluded_pixels": float(sum(self.excluded_codes.values())),
        }  # fmt: skip
        metrics.update({f"fraction_{_metric_name(name)}": n / (labelled or 1) for name, n in self.class_pixels.items()})
        return metrics


def _metric_name(class_name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in class_name.lower()).strip("_")[:40]


def source_kind(source: str) -> SourceKind:
    """stac, raster or vector, from the source's form (a URL to a raster file is a raster)."""
    lower = source.lower().split("?")[0]
    if lower.endswith(RASTER_SUFFIXES):
        return "raster"
    if lower.endswith(VECTOR_SUFFIXES):
        return "vector"
    if is_http_url(lower) or lower.endswith(".json"):
        return "stac"
    raise ValueError(
        f"source {source!r}: expected a STAC API URL or JSON file, a raster {RASTER_SUFFIXES} or a vector "
        f"file {VECTOR_SUFFIXES}"
    )


# --- rasters ---------------------------------------------------------------------------------------------


def _rasterio_path(source: str) -> str:
    return f"/vsicurl/{source}" if is_http_url(source) else source


def check_raster(source: str) -> tuple[tuple[float, float, float, float], str]:
    """Open a raster source's header: its lon/lat extent and CRS; raises before any pixel is read.

    Raises:
        ValueError: an unreadable file, or a raster without a CRS.
    """
    try:
        src = rasterio.open(_rasterio_path(source))
    except rasterio.errors.RasterioIOError as error:
        raise ValueError(f"land-cover raster {source} cannot be opened: {error}") from error
    with src:
        if src.crs is None:
            raise ValueError(
                f"land-cover raster {source} has no CRS, so it cannot be placed on the tile grid; assign one "
                "(e.g. `gdal_edit.py -a_srs EPSG:4326 file.tif`)"
            )
        extent = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        return extent, src.crs.to_string()


def source_pixel_size(crs: Any, transform: Any, tile: Tile) -> float:
    """Side in metres of the equal-area square of one source pixel, measured at the tile centre in its CRS."""
    left, bottom, right, top = tile.bounds
    to_source = Transformer.from_crs(f"EPSG:{tile.epsg}", crs, always_xy=True)
    to_tile = Transformer.from_crs(crs, f"EPSG:{tile.epsg}", always_xy=True)
    x, y = to_source.transform((left + right) / 2, (bottom + top) / 2)
    xs, ys = to_tile.transform([x, x + transform.a, x + transform.b], [y, y + transform.d, y + transform.e])
    # Area of the pixel parallelogram spanned by its two edge vectors in the tile CRS.
    area = abs((xs[1] - xs[0]) * (ys[2] - ys[0]) - (ys[1] - ys[0]) * (xs[2] - xs[0]))
    return math.sqrt(area)


def choose_resampling(source_pixel_m: float, tile_resolution: float) -> Resampling:
    """Mode when the product is finer than the tile (several product pixels per tile pixel), else nearest."""
    return Resampling.mode if source_pixel_m < 0.99 * tile_resolution else Resampling.nearest


def source_window(src: rasterio.DatasetReader, tile: Tile, *, pad: int = 2) -> Window | None:
    """The source window that covers a tile (padded a few pixels for the resampling kernel), or None."""
    bounds = rasterio.warp.transform_bounds(f"EPSG:{tile.epsg}", src.crs, *tile.bounds, densify_pts=21)
    window = src.window(*bounds)
    col0, row0 = math.floor(window.col_off) - pad, math.floor(window.row_off) - pad
    col1 = math.ceil(window.col_off + window.width) + pad
    row1 = math.ceil(window.row_off + window.height) + pad
    window = Window(col0, row0, col1 - col0, row1 - row0)
    full = Window(0, 0, src.width, src.height)
    try:
        window = window.intersection(full)
    except rasterio.errors.WindowError:
        return None
    return window if window.width > 0 and window.height > 0 else None


@dataclass(frozen=True)
class WarpedProduct:
    """Product codes on a tile grid, and which pixels are nodata."""

    codes: np.ndarray
    nodata: np.ndarray
    """bool, True where the product has no data (its nodata value or mask, or outside it)."""
    resampling: str


def _fill_value(dtype: np.dtype, nodata: float | None, scheme: ClassScheme) -> int:
    """The value that marks nodata through the warp: the product's, else one no class uses."""
    if nodata is not None and float(nodata).is_integer():
        return int(nodata)
    if scheme.nodata_codes:
        return scheme.nodata_codes[0]
    info = np.iinfo(dtype)
    for candidate in (info.max, info.min, info.max - 1):
        if candidate not in scheme.source_codes and candidate not in scheme.excluded_codes:
            return int(candidate)
    raise ValueError(f"no free {dtype} value to mark nodata for scheme {scheme.name}")


def read_raster_tile(source: str, tile: Tile, scheme: ClassScheme) -> WarpedProduct | None:
    """Read the window of a class raster that covers a tile and warp it onto the tile grid.

    Mode resampling when the raster is finer than the tile, nearest otherwise; nodata (value or mask) and
    pixels outside the raster come back flagged in ``nodata``. Returns None when the raster misses the tile.
    """
    with rasterio.open(_rasterio_path(source)) as src:
        window = source_window(src, tile)
        if window is None:
            return None
        dtype = np.dtype(src.dtypes[0])
        if dtype.kind not in "iu":
            raise ValueError(f"land-cover raster {source} holds {dtype} values; class rasters hold integer codes")
        fill = _fill_value(dtype, src.nodata, scheme)
        data = src.read(1, window=window, masked=True)
        window_transform = src.window_transform(window)
        resampling = choose_resampling(source_pixel_size(src.crs, src.transform, tile), tile.resolution)
        codes = np.full((tile.size, tile.size), fill, dtype=dtype)
        rasterio.warp.reproject(
            np.ma.filled(data, fill), codes, src_transform=window_transform, src_crs=src.crs, src_nodata=fill,
            dst_transform=tile.transform, dst_crs=f"EPSG:{tile.epsg}", dst_nodata=fill, resampling=resampling,
        )  # fmt: skip
    return WarpedProduct(codes=codes, nodata=codes == fill, resampling=resampling.name)


# --- STAC --------------------------------------------------------------------------------------------------


def search_land_cover(access: StacAccess, collection: str, tile: Tile) -> list[dict[str, Any]]:
    """Land-cover items of ``collection`` over the tile's lon/lat bounds, from the STAC API or file
    ``access.source`` (an API with the access's headers and retries)."""
    bounds = tile.lonlat_bounds
    if is_http_url(access.source):
        search = access.open_api().search(collections=[collection], bbox=bounds, limit=100)
        return access.fetch_items(search, f"searching {access.source} for {collection}")
    footprint = box(*bounds)
    return [
        item for item in read_static_items(access.source)
        if item.get("collection") == collection and shape(item["geometry"]).intersects(footprint)
    ]  # fmt: skip


def stac_product_extent(access: StacAccess, collection: str) -> list[float] | None:
    """Lon/lat bbox of a collection (its Collection extent, else the union of its items); for error messages."""
    try:
        if is_http_url(access.source):
            found = access.open_api().get_collection(collection)
            if found is None:
                return None
            return list(found.extent.spatial.bboxes[0])
        boxes = [item["bbox"] for item in read_static_items(access.source) if item.get("collection") == collection]
    except Exception:
        return None
    if not boxes:
        return None
    array = np.array(boxes, dtype=float)
    return [float(array[:, 0].min()), float(array[:, 1].min()), float(array[:, 2].max()), float(array[:, 3].max())]


def item_year(item: dict[str, Any]) -> int | None:
    props = item.get("properties", {})
    text = props.get("start_datetime") or props.get("datetime")
    return int(text[:4]) if text else None


def select_year(items: list[dict[str, Any]], year: int | None, tile: Tile) -> tuple[list[dict[str, Any]], int | None]:
    """The items of one product year: ``year``, else the latest.

    Raises:
        ValueError: no item of the requested year (naming the years there are).
    """
    years = sorted({y for y in (item_year(i) for i in items) if y is not None})
    chosen = year if year is not None else (years[-1] if years else None)
    selected = [i for i in items if item_year(i) == chosen] if chosen is not None else items
    if not selected:
        raise ValueError(f"no land-cover item for year {year} over tile {tile.tile_id}; years there: {years}")
    return selected, chosen


def asset_key(collection: str, item: dict[str, Any]) -> str:
    """The class-raster asset of an item."""
    if collection in STAC_ASSETS and STAC_ASSETS[collection] in item["assets"]:
        return STAC_ASSETS[collection]
    for key, asset in item["assets"].items():
        if "data" in asset.get("roles", []) and "tiff" in asset.get("type", "image/tiff"):
            return key
    raise ValueError(f"item {item['id']} has no data asset; assets: {sorted(item['assets'])}")


def stac_pixel_size(item: dict[str, Any], key: str, tile: Tile) -> float | None:
    """Product pixel size in metres from the asset's ``proj:transform`` and CRS, when the item records them."""
    asset = item["assets"][key]
    transform = asset.get("proj:transform") or item["properties"].get("proj:transform")
    code = asset.get("proj:code") or item["properties"].get("proj:code")
    epsg = asset.get("proj:epsg") or item["properties"].get("proj:epsg")
    crs = code or (f"EPSG:{epsg}" if epsg else None)
    if not transform or not crs:
        return None
    from affine import Affine

    return source_pixel_size(crs, Affine(*transform[:6]), tile)


def load_stac_tile(items: Sequence[dict[str, Any]], key: str, tile: Tile, access: StacAccess) -> WarpedProduct:
    """The class asset of one product year, mosaicked onto the tile grid (mode if finer, else nearest).

    Assets are read with the access's GDAL settings (headers, HTTP retries) and URL signing; the load is
    retried on transient errors.
    """
    pixel = stac_pixel_size(items[0], key, tile)
    # Land-cover products are 10 m: without projection metadata assume finer-or-equal, i.e. mode.
    resampling = Resampling.mode if pixel is None else choose_resampling(pixel, tile.resolution)
    stac_items = [pystac.Item.from_dict({**item, "links": []}) for item in items]
    with warnings.catch_warnings(), rasterio.Env(**access.gdal_options()):
        warnings.simplefilter("ignore")
        data = access.retrying(
            lambda: odc.stac.load(
                stac_items, bands=[key], geobox=tile.geobox, resampling=resampling.name,
                groupby=lambda *_: 0,  # one product year: all its granules form one mosaic
                chunks=None, patch_url=access.patch_url,
            )[key],
            what=f"loading {key} of {[item['id'] for item in items]} onto tile {tile.tile_id}",
        )  # fmt: skip
    codes = data.isel(time=0).values
    nodata_value = data.attrs.get("nodata")
    nodata = codes == nodata_value if nodata_value is not None else np.zeros(codes.shape, dtype=bool)
    return WarpedProduct(codes=codes, nodata=nodata, resampling=resampling.name)


# --- scheme, writing ---------------------------------------------------------------------------------------


def map_product(product: WarpedProduct, scheme: ClassScheme) -> MappedCodes:
    """Product codes -> class codes; product nodata stays 0 and is never reported as an unknown code."""
    valid = ~product.nodata
    mapped = scheme.map_codes(product.codes[valid])
    land_cover = np.zeros(product.codes.shape, dtype=np.uint8)
    land_cover[valid] = mapped.land_cover
    nodata = mapped.nodata_pixels + int(product.nodata.sum())
    return MappedCodes(land_cover=land_cover, nodata_pixels=nodata, excluded=mapped.excluded, unknown=mapped.unknown)


def check_unknown_codes(
    config: LabelsConfig, scheme: ClassScheme, unknown: Mapping[str, int], labelled: int, *, vector: bool = False
) -> None:
    """Stop before writing when codes outside the scheme say the scheme does not fit the product; else log them.

    With ``unknown_codes="auto"`` the run stops when unknown codes cover more pixels than the scheme's classes
    (a land-use map read with the WorldCover scheme would otherwise be written as all nodata and exit 0); with
    ``"error"`` it stops on any unknown code; with ``"report"`` it writes them as nodata.

    Raises:
        ValueError: listing the codes found with their pixel counts, a YAML scheme skeleton for them, and the
            ways on.
    """
    if not unknown:
        return
    total = sum(unknown.values())
    found = ", ".join(f"{code}: {pixels}" for code, pixels in sorted(unknown.items(), key=lambda kv: -kv[1]))
    message = (f"{total} pixels of {config.source} carry codes outside scheme {scheme.name} (code: pixels) {found}; "
               f"{labelled} pixels carry the scheme's classes")  # fmt: skip
    if config.unknown_codes == "report" or (config.unknown_codes == "auto" and total <= labelled):
        log.warning("%s; the unknown ones are written as nodata", message)
        return
    ways = [
        "name the classes in this scheme skeleton, save it as scheme.yaml and pass --scheme scheme.yaml:\n"
        + scheme_skeleton(unknown)
    ]
    if vector:
        ways.append(f"or take the classes from the attribute itself: --scheme {FIELD_SCHEME} (names from another "
                    "attribute with --name-field)")  # fmt: skip
    ways.append("or write them as nodata on purpose: --unknown-codes report")
    raise ValueError(f"{message}: the scheme does not fit this product. " + "\n".join(ways))


def _overlaps(extent: Sequence[float], bounds: Sequence[float]) -> bool:
    return box(*extent).intersects(box(*bounds))


def _no_overlap(source: str, extent: object, tile: Tile) -> ValueError:
    return ValueError(
        f"land cover {source} (extent {extent}) does not overlap tile {tile.tile_id} (lon/lat "
        f"{tuple(round(v, 5) for v in tile.lonlat_bounds)}); give a product that covers the cube's area"
    )


@dataclass
class _Totals:
    class_pixels: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)
    excluded: Counter[str] = field(default_factory=Counter)
    nodata: int = 0
    total: int = 0
    resampling: dict[str, str] = field(default_factory=dict)

    def add(self, tile: Tile, land_cover: np.ndarray, scheme: ClassScheme, unknown: dict, excluded: dict) -> None:
        known = scheme.class_pixels(land_cover)
        self.class_pixels.update(known)
        self.unknown.update({str(k): v for k, v in unknown.items()})
        self.excluded.update({str(k): v for k, v in excluded.items()})
        self.nodata += int(land_cover.size - sum(known.values()))
        self.total += int(land_cover.size)


def run_labels(config: LabelsConfig) -> LabelsReport:
    """Write ``landcover`` into every tile of ``config.cube`` from ``config.source``.

    Example:
        >>> report = run_labels(LabelsConfig(cube="cube.zarr", source=stac_url))
        >>> report.class_pixels["Tree cover"]

    Raises:
        ValueError: before any pixel is read: an unknown source form or scheme, a raster or vector without a
            CRS, a vector without the class attribute (listing its columns), a product that does not overlap
            a tile (naming the tile and the product's extent), a header's environment variable unset (STAC
            sources, before any request); after reading, before writing: codes outside the scheme that cover
            most labelled pixels (``unknown_codes="auto"``) or any pixel (``"error"``).
    """
    started = time.perf_counter()
    kind = source_kind(config.source)
    info = rasterize.read_vector_info(config.source, config.class_field) if kind == "vector" else None
    if config.scheme == FIELD_SCHEME:
        if info is None:
            raise ValueError(f"scheme {FIELD_SCHEME!r} takes its classes from a vector source's class attribute; "
                             f"{config.source} is a {kind} source: give a scheme name or a YAML file")  # fmt: skip
        values = rasterize.read_class_values(info, config.class_field or "", config.name_field)
        scheme = scheme_from_values(f"{FIELD_SCHEME}:{config.class_field}", values, values)
    else:
        scheme = get_scheme(config.scheme, collection=config.collection if kind == "stac" else None)
    tiles = read_cube_tiles(config.cube)

    # 1. Checks and lookups that read no pixels, for every tile, before anything is written.
    plan: dict[str, Any] = {}
    product = Path(config.source).name if kind != "stac" else config.collection
    year: int | None = config.year
    if kind == "raster":
        extent, _ = check_raster(config.source)
        for tile in tiles:
            if not _overlaps(extent, tile.lonlat_bounds):
                raise _no_overlap(config.source, [round(v, 5) for v in extent], tile)
    elif info is not None:
        vector_extent = _vector_extent(info)
        for tile in tiles:
            if vector_extent is not None and not _overlaps(vector_extent, tile.lonlat_bounds):
                raise _no_overlap(config.source, [round(v, 5) for v in vector_extent], tile)
    else:
        access = StacAccess.from_config(config)  # before any request: an unset header variable stops here
        for tile in tiles:
            items = search_land_cover(access, config.collection, tile)
            if not items:
                raise _no_overlap(f"{config.source} collection {config.collection}",
                                  stac_product_extent(access, config.collection), tile)  # fmt: skip
            selected, year = select_year(items, config.year, tile)
            plan[tile.tile_id] = (selected, asset_key(config.collection, selected[0]))

    # 2. Land cover per tile, through the scheme.
    results: dict[str, MappedCodes] = {}
    totals = _Totals()
    if info is not None:
        union = _union_lonlat(tiles)
        frame = rasterize.read_polygons(info, config.class_field or "", union)
        burnt = rasterize.rasterize_tiles(frame, config.class_field or "", scheme, tiles,
                                          all_touched=config.all_touched, overlap=config.overlap)  # fmt: skip
        for tile in tiles:
            tile_result = burnt[tile.tile_id]
            if not tile_result.land_cover.any() and not tile_result.unknown:
                raise _no_overlap(
                    config.source, [round(v, 5) for v in vector_extent] if vector_extent else "unknown", tile
                )
            results[tile.tile_id] = MappedCodes(tile_result.land_cover, 0, {}, tile_result.unknown)  # type: ignore[arg-type]
            totals.resampling[tile.tile_id] = "rasterize-all-touched" if config.all_touched else "rasterize-centre"
    else:
        for tile in tiles:
            if kind == "raster":
                warped = read_raster_tile(config.source, tile, scheme)
                if warped is None or warped.nodata.all():
                    raise _no_overlap(config.source, [round(v, 5) for v in extent], tile)
            else:
                selected, key = plan[tile.tile_id]
                warped = load_stac_tile(selected, key, tile, access)
                if warped.nodata.all():
                    raise _no_overlap(f"{config.source} collection {config.collection}",
                                      [i.get("bbox") for i in selected], tile)  # fmt: skip
            results[tile.tile_id] = map_product(warped, scheme)
            totals.resampling[tile.tile_id] = warped.resampling

    # 3. Codes outside the scheme: reported always, fatal when asked or when they are most of what is labelled.
    unknown_all: Counter[str] = Counter()
    labelled = 0
    for mapped in results.values():
        unknown_all.update({str(k): v for k, v in mapped.unknown.items()})
        labelled += int(np.count_nonzero(mapped.land_cover))
    check_unknown_codes(config, scheme, unknown_all, labelled, vector=kind == "vector")

    # 4. Write.
    for tile in tiles:
        mapped = results[tile.tile_id]
        attrs = {
            "product": product, "year": str(year or ""), "source": config.source, "class_scheme": scheme.name,
            "class_codes": list(scheme.class_codes), "class_names": list(scheme.class_names),
            "resampling": totals.resampling[tile.tile_id], "long_name": "land cover class code (0 = nodata)",
            "unknown_codes": {str(k): v for k, v in mapped.unknown.items()},
            "excluded_codes": {str(k): v for k, v in mapped.excluded.items()},
        }  # fmt: skip
        write_land_cover(config.cube, tile.tile_id, mapped.land_cover, attrs)
        totals.add(tile, mapped.land_cover, scheme, mapped.unknown, mapped.excluded)
        log.info(
            "%s: land cover %s", tile.tile_id, {k: v for k, v in scheme.class_pixels(mapped.land_cover).items() if v}
        )
    return LabelsReport(
        cube=config.cube, tiles=[t.tile_id for t in tiles], scheme=scheme.name,
        class_codes=dict(zip(scheme.class_names, scheme.class_codes, strict=True)),
        class_pixels=dict(totals.class_pixels), unknown_codes=dict(totals.unknown),
        excluded_codes=dict(totals.excluded), nodata_pixels=totals.nodata, total_pixels=totals.total,
        resampling=totals.resampling, product=product, seconds=time.perf_counter() - started,
    )  # fmt: skip


def _union_lonlat(tiles: Sequence[Tile]) -> tuple[float, float, float, float]:
    boxes = np.array([t.lonlat_bounds for t in tiles])
    return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def _vector_extent(info: rasterize.VectorInfo) -> tuple[float, float, float, float] | None:
    if info.bounds is None or not all(math.isfinite(v) for v in info.bounds):
        return None
    return Transformer.from_crs(info.crs, "EPSG:4326", always_xy=True).transform_bounds(*info.bounds, densify_pts=21)
