"""The project's tile grid: fixed square UTM tiles whose ids are stable across runs.

A lon/lat bbox is mapped to the UTM zone of its centre (EPSG 326xx north, 327xx south). Tiles are
``tile_size * resolution`` metres square and aligned to multiples of that side in UTM coordinates, so the
same area always yields the same tiles and the same ids, whatever bbox asked for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import Transformer

BBox = tuple[float, float, float, float]


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone holding (lon, lat): 326xx north of the equator, 327xx south."""
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise ValueError(f"({lon}, {lat}) is not a lon/lat position")
    zone = min(int((lon + 180) // 6) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class Tile:
    """One square tile of the grid."""

    epsg: int
    """UTM CRS of the tile."""
    x0: float
    """Upper-left corner easting, metres."""
    y0: float
    """Upper-left corner northing, metres."""
    resolution: float
    """Pixel side, metres."""
    size: int
    """Tile side, pixels."""

    @property
    def tile_id(self) -> str:
        """Stable id from CRS and origin, e.g. ``32632_0640000_5150000``."""
        return f"{self.epsg}_{round(self.x0):07d}_{round(self.y0):07d}"

    @property
    def side(self) -> float:
        """Tile side in metres."""
        return self.size * self.resolution

    @property
    def bounds(self) -> BBox:
        """(left, bottom, right, top) in the tile's CRS."""
        return (self.x0, self.y0 - self.side, self.x0 + self.side, self.y0)

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y0)

    @cached_property
    def geobox(self) -> GeoBox:
        """The tile's pixel grid (north-up, square pixels)."""
        return GeoBox((self.size, self.size), self.transform, f"EPSG:{self.epsg}")

    @property
    def lonlat_bounds(self) -> BBox:
        """Lon/lat (W, S, E, N) box enclosing the tile."""
        west, south, east, north = self.geobox.extent.to_crs("EPSG:4326").boundingbox
        return (west, south, east, north)


def _project_bbox(bbox: BBox, epsg: int, densify: int = 21) -> BBox:
    """Bounds in ``epsg`` of a lon/lat bbox, with its edges densified (UTM bends lon/lat lines)."""
    transformer = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    return transformer.transform_bounds(*bbox, densify_pts=densify)


def tiles_for_bbox(bbox: BBox, *, resolution: float, tile_size: int, epsg: int | None = None) -> list[Tile]:
    """The grid tiles that a lon/lat bbox touches, row-major from the north-west.

    Args:
        bbox: lon/lat (west, south, east, north).
        resolution: pixel side in metres.
        tile_size: tile side in pixels.
        epsg: projected CRS of the grid; default the UTM zone of the bbox centre. Give the scenes' own zone
            near a zone edge (Sentinel-2 granules overlap their neighbours' zones) to keep pixels unresampled.

    Raises:
        ValueError: for a bbox that is not W < E, S < N in degrees, or a non-positive size.
    """
    west, south, east, north = bbox
    if not (west < east and south < north and west >= -180 and east <= 180 and south >= -90 and north <= 90):
        raise ValueError(f"bbox {bbox} must be lon/lat west,south,east,north with west < east, south < north")
    if resolution <= 0 or tile_size <= 0:
        raise ValueError(f"resolution ({resolution}) and tile_size ({tile_size}) must be positive")
    epsg = epsg or utm_epsg((west + east) / 2, (south + north) / 2)
    left, bottom, right, top = _project_bbox(bbox, epsg)
    side = tile_size * resolution
    # A tiny tolerance so that a bbox built exactly on tile edges does not pull in a neighbour.
    eps = 1e-6 * side
    col0, col1 = math.floor((left + eps) / side), math.ceil((right - eps) / side)
    row0, row1 = math.floor((bottom + eps) / side), math.ceil((top - eps) / side)
    return [
        Tile(epsg=epsg, x0=col * side, y0=(row + 1) * side, resolution=resolution, size=tile_size)
        for row in range(row1 - 1, row0 - 1, -1)
        for col in range(col0, col1)
    ]


def tile_from_id(tile_id: str, *, resolution: float, size: int) -> Tile:
    """Rebuild a Tile from its id and pixel grid parameters."""
    try:
        epsg, x0, y0 = (int(part) for part in tile_id.split("_"))
    except ValueError as error:
        raise ValueError(f"tile id {tile_id!r} is not EPSG_XXXXXXX_YYYYYYY") from error
    return Tile(epsg=epsg, x0=float(x0), y0=float(y0), resolution=resolution, size=size)
