"""Vector land cover: polygons with a class attribute, burnt onto a tile's pixel grid.

Rules (the same for every format: GeoPackage, GeoJSON, Shapefile, FlatGeobuf, GeoParquet):

- **Pixel coverage**: a pixel takes a polygon's class when the polygon contains the pixel *centre*
  (``rasterio.features.rasterize`` with ``all_touched=False``, GDAL's default). Centre sampling keeps class
  areas unbiased: a polygon covers about its own area in pixels, so class fractions stay honest.
  ``all_touched=True`` (``LabelsConfig.all_touched``) instead labels every pixel a polygon touches, which keeps
  thin features (rivers, roads) but inflates every polygon by up to a pixel along its outline.
- **Overlaps**: polygons are burnt in file order and the **last** one wins (GDAL's rule), or, with
  ``overlap="smallest"``, the smallest polygon wins (burnt largest first), for maps that draw a lake as a
  polygon on top of the forest around it instead of cutting a hole.
- Pixels no polygon covers are nodata (0). Polygons whose class is outside the scheme are burnt too (so they
  still win overlaps) and counted per value, then written as nodata: reported, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio.features
from pyproj import CRS
from shapely.geometry import box

from softcon.tasks.grid import Tile
from softcon.tasks.schemes import ClassScheme

OverlapRule = Literal["last", "smallest"]
PARQUET_SUFFIXES = (".parquet", ".geoparquet")


@dataclass(frozen=True)
class VectorInfo:
    """What a vector file holds, read from its metadata only (no features)."""

    path: str
    crs: CRS
    columns: tuple[str, ...]
    bounds: tuple[float, float, float, float] | None
    """(minx, miny, maxx, maxy) in ``crs`` where the format records it."""
    features: int | None


def read_vector_info(path: str | Path, class_field: str | None) -> VectorInfo:
    """Check a vector source before any work: it exists, has a CRS and the class attribute.

    Raises:
        ValueError: no file, no class field given, no CRS, or a class field that is not a column (the
            message lists the columns there are).
    """
    path = str(path)
    if not Path(path).exists():
        raise ValueError(f"vector source {path} does not exist")
    if Path(path).suffix.lower() in PARQUET_SUFFIXES:
        crs, columns, bounds, features = _geoparquet_info(path)
    else:
        import pyogrio

        info = pyogrio.read_info(path)
        crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
        columns = tuple(str(c) for c in info["fields"])
        total = info.get("total_bounds")
        bounds = tuple(float(v) for v in total) if total is not None else None
        features = int(info["features"]) if info.get("features", -1) >= 0 else None
    if crs is None:
        raise ValueError(
            f"vector source {path} has no CRS: land-cover polygons cannot be placed on the tile grid. "
            "Set one, e.g. `ogr2ogr -a_srs EPSG:4326 fixed.gpkg in.shp` or GeoDataFrame.set_crs(...).to_file(...)"
        )
    if class_field is None:
        raise ValueError(f"vector source {path} needs a class attribute: set --class-field to one of {list(columns)}")
    if class_field not in columns:
        raise ValueError(
            f"vector source {path} has no class attribute {class_field!r}; its columns are {list(columns)}"
        )
    return VectorInfo(path=path, crs=crs, columns=columns, bounds=bounds, features=features)  # type: ignore[arg-type]


def _geoparquet_info(path: str) -> tuple[CRS | None, tuple[str, ...], tuple[float, ...] | None, int | None]:
    """CRS, columns and bbox from GeoParquet metadata; a missing ``crs`` key means OGC:CRS84 (GeoParquet spec)."""
    import json

    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path)
    geo = json.loads((metadata.metadata or {}).get(b"geo", b"{}"))
    if not geo:
        raise ValueError(
            f"{path} is a Parquet file without GeoParquet 'geo' metadata; write it with GeoDataFrame.to_parquet"
        )
    column = geo["columns"][geo["primary_column"]]
    if "crs" not in column:
        crs: CRS | None = CRS.from_user_input("OGC:CRS84")
    else:
        crs = CRS.from_user_input(column["crs"]) if column["crs"] is not None else None
    names = tuple(n for n in metadata.schema.to_arrow_schema().names if n != geo["primary_column"])
    bbox = column.get("bbox")
    return crs, names, (tuple(float(v) for v in bbox) if bbox else None), metadata.num_rows


def read_polygons(
    info: VectorInfo, class_field: str, lonlat_bounds: tuple[float, float, float, float]
) -> gpd.GeoDataFrame:
    """The polygons of a vector source over a lon/lat box (the union of the tiles), with their class values."""
    area = gpd.GeoSeries([box(*lonlat_bounds)], crs="EPSG:4326").to_crs(info.crs)
    if Path(info.path).suffix.lower() in PARQUET_SUFFIXES:
        columns = [class_field, _geometry_column(info.path)]
        try:
            frame = gpd.read_parquet(info.path, columns=columns, bbox=tuple(area.total_bounds))
        except ValueError:
            # GeoParquet 1.0 without a bbox covering column: read it all, keep what meets the area.
            frame = gpd.read_parquet(info.path, columns=columns)
            frame = frame.iloc[np.sort(frame.sindex.query(area.iloc[0], predicate="intersects"))]
    else:
        frame = gpd.read_file(info.path, columns=[class_field], bbox=tuple(area.total_bounds), engine="pyogrio")
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    polygonal = frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        kinds = sorted(set(frame.geometry.geom_type[~polygonal]))
        raise ValueError(f"vector source {info.path} holds {kinds} geometries; land cover needs polygons")
    return frame


def read_class_values(info: VectorInfo, class_field: str, name_field: str | None = None) -> dict[object, object]:
    """Every distinct value of the class attribute -> its name (from ``name_field``, else the value itself).

    Raises:
        ValueError: ``name_field`` is not a column (the message lists the columns).
    """
    if name_field is not None and name_field not in info.columns:
        raise ValueError(f"vector source {info.path} has no name attribute {name_field!r}; its columns are "
                         f"{list(info.columns)}")  # fmt: skip
    columns = [class_field] + ([name_field] if name_field and name_field != class_field else [])
    if Path(info.path).suffix.lower() in PARQUET_SUFFIXES:
        table = pd.read_parquet(info.path, columns=columns)
    else:
        import pyogrio

        table = pyogrio.read_dataframe(info.path, columns=columns, read_geometry=False)
    names = table[name_field] if name_field else table[class_field]
    return {value: name for value, name in zip(table[class_field], names, strict=True) if not pd.isna(value)}


def _geometry_column(path: str) -> str:
    import json

    import pyarrow.parquet as pq

    return str(json.loads(pq.read_metadata(path).metadata[b"geo"])["primary_column"])


@dataclass(frozen=True)
class ClassValues:
    """Class codes of each polygon, and what fell outside the scheme."""

    codes: np.ndarray
    """Per polygon: the class code, 0 for nodata/excluded, or 256 + k for the k-th unknown value."""
    unknown_values: tuple[str, ...]
    """The distinct values outside the scheme, in order of ``k``."""


def polygon_class_codes(values: pd.Series, scheme: ClassScheme) -> ClassValues:
    """Map each polygon's class attribute (codes or names) through the scheme."""
    distinct = pd.unique(values)
    mapping: dict[object, int] = {}
    unknown: list[str] = []
    for value in distinct:
        code = None if pd.isna(value) else scheme.code_of_value(value)
        if code is None:
            mapping[value] = 256 + len(unknown)
            unknown.append(str(value))
        else:
            mapping[value] = code
    codes = values.map(mapping).to_numpy(dtype=np.int64)
    return ClassValues(codes=codes, unknown_values=tuple(unknown))


@dataclass(frozen=True)
class RasterizedTile:
    land_cover: np.ndarray
    """uint8 class codes on the tile grid, 0 = no polygon / nodata."""
    unknown: dict[str, int]
    """Class value outside the scheme -> pixels it won on this tile."""


def rasterize_polygons(
    geometries: gpd.GeoSeries,
    codes: np.ndarray,
    tile: Tile,
    *,
    unknown_values: tuple[str, ...] = (),
    all_touched: bool = False,
    overlap: OverlapRule = "last",
) -> RasterizedTile:
    """Burn polygons (already in the tile's CRS) with their class codes onto the tile grid.

    Args:
        geometries: polygons in ``EPSG:<tile.epsg>``.
        codes: per polygon class code (1..255), 0 for nodata, 256 + k for the k-th unknown value.
        tile: the pixel grid.
        unknown_values: names of the unknown values, for the report.
        all_touched: coverage rule, see the module docstring (default: pixel centre).
        overlap: ``"last"`` (file order, last wins) or ``"smallest"`` (smallest polygon wins).
    """
    if overlap not in ("last", "smallest"):
        raise ValueError(f"overlap must be 'last' or 'smallest', got {overlap!r}")
    if len(geometries) != len(codes):
        raise ValueError(f"{len(geometries)} geometries but {len(codes)} class codes")
    shape = (tile.size, tile.size)
    if len(geometries) == 0:
        return RasterizedTile(np.zeros(shape, dtype=np.uint8), {})
    order = np.argsort(-geometries.area.to_numpy(), kind="stable") if overlap == "smallest" else None
    geoms = geometries.to_numpy()
    if order is not None:
        geoms, codes = geoms[order], codes[order]
    # uint8 is enough unless some polygon carries an unknown value (256 + k): then burn uint16 and count.
    dtype = np.uint16 if unknown_values else np.uint8
    burnt = rasterio.features.rasterize(
        zip(geoms, codes.tolist(), strict=True), out_shape=shape, transform=tile.transform, fill=0,
        all_touched=all_touched, dtype=dtype,
    )  # fmt: skip
    if not unknown_values:
        return RasterizedTile(burnt, {})
    counts = np.bincount(burnt.ravel(), minlength=256 + len(unknown_values))
    unknown = {value: int(counts[256 + k]) for k, value in enumerate(unknown_values) if counts[256 + k]}
    land_cover = np.where(burnt >= 256, 0, burnt).astype(np.uint8)
    return RasterizedTile(land_cover, unknown)


def rasterize_tiles(
    frame: gpd.GeoDataFrame,
    class_field: str,
    scheme: ClassScheme,
    tiles: list[Tile],
    *,
    all_touched: bool = False,
    overlap: OverlapRule = "last",
) -> dict[str, RasterizedTile]:
    """Rasterize one vector frame onto several tiles (reprojected once per tile CRS, queried by bbox)."""
    values = polygon_class_codes(frame[class_field], scheme)
    out: dict[str, RasterizedTile] = {}
    by_epsg: dict[int, gpd.GeoSeries] = {}
    for tile in tiles:
        if tile.epsg not in by_epsg:
            by_epsg[tile.epsg] = frame.geometry.to_crs(epsg=tile.epsg).reset_index(drop=True)
        geometries = by_epsg[tile.epsg]
        # Only the polygons whose bbox meets the tile, in file order (sindex returns them unordered).
        hits = np.sort(geometries.sindex.query(box(*tile.bounds), predicate="intersects"))
        out[tile.tile_id] = rasterize_polygons(
            geometries.iloc[hits], values.codes[hits], tile, unknown_values=values.unknown_values,
            all_touched=all_touched, overlap=overlap,
        )  # fmt: skip
    return out
