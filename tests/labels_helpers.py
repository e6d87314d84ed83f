"""Helpers shared by the labels tests: a bare cube of tile grids, class rasters, polygons (a helper module, not
a test module, so test modules import it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import zarr
from affine import Affine
from real_data import REAL

from softcon.tasks.grid import Tile

REAL_WORLDCOVER = (
    REAL / "worldcover" / "ESA_WorldCover_10m_2021_v200_N00E006" / "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif"
)
BIGEARTHNET = REAL / "bigearthnet"

# Two 64 x 64 tiles at 10 m, side by side, in UTM 32N (northern Italy), as the tile grid makes them.
TILE_A = Tile(epsg=32632, x0=640000.0, y0=5150080.0, resolution=10.0, size=64)
TILE_B = Tile(epsg=32632, x0=640640.0, y0=5150080.0, resolution=10.0, size=64)


def make_cube(path: Path, tiles: list[Tile]) -> Path:
    """A cube holding only each tile's x/y coordinates: what the labels stage reads from it."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    for tile in tiles:
        group = root.create_group(f"tiles/{tile.tile_id}")
        centres = (np.arange(tile.size) + 0.5) * tile.resolution
        group.create_array("x", data=tile.x0 + centres, dimension_names=("x",))
        group.create_array("y", data=tile.y0 - centres, dimension_names=("y",))
    return path


def read_land_cover(cube: Path, tile: Tile) -> np.ndarray:
    return zarr.open_group(cube, mode="r")[f"tiles/{tile.tile_id}/landcover"][...]


def write_raster(
    path: Path, codes: np.ndarray, transform: Affine, crs: str | None, *, nodata: float | None = None
) -> Path:
    """A single-band GeoTIFF of class codes."""
    profile = {"driver": "GTiff", "height": codes.shape[0], "width": codes.shape[1], "count": 1,
               "dtype": codes.dtype.name, "transform": transform, "nodata": nodata}  # fmt: skip
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes, 1)
    return path
