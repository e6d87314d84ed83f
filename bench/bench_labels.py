"""Rasterization throughput of the labels stage against ``rasterio.features.rasterize`` called directly.

Same polygons (a Voronoi land-cover map with WorldCover codes), same 10 m tile grid, same process; runs
alternate between the two and the median of each is kept, so a busy machine slows both alike.

    python bench/bench_labels.py [--tile 2048] [--polygons 5000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import geopandas as gpd
import numpy as np
import rasterio.features
from shapely import MultiPoint
from shapely.geometry import box
from shapely.ops import voronoi_diagram

from softcon.tasks.grid import Tile
from softcon.tasks.rasterize import polygon_class_codes, rasterize_polygons, rasterize_tiles
from softcon.tasks.schemes import WORLDCOVER


def voronoi_map(tile: Tile, polygons: int, seed: int = 0) -> gpd.GeoDataFrame:
    """``polygons`` Voronoi cells clipped to the tile, each with a WorldCover code."""
    rng = np.random.default_rng(seed)
    left, bottom, right, top = tile.bounds
    points = np.column_stack([rng.uniform(left, right, polygons), rng.uniform(bottom, top, polygons)])
    cells = voronoi_diagram(MultiPoint(points), envelope=box(*tile.bounds))
    geometries = gpd.GeoSeries(list(cells.geoms), crs=f"EPSG:{tile.epsg}").clip(box(*tile.bounds))
    codes = rng.choice(WORLDCOVER.codes, size=len(geometries))
    return gpd.GeoDataFrame({"code": codes}, geometry=geometries.reset_index(drop=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=2048, help="tile side in pixels")
    parser.add_argument("--polygons", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tile = Tile(epsg=32632, x0=640000.0, y0=5160000.0, resolution=10.0, size=args.tile)
    frame = voronoi_map(tile, args.polygons)
    geometries, codes = frame.geometry, frame["code"].to_numpy()
    pixels = tile.size * tile.size

    def direct() -> np.ndarray:
        return rasterio.features.rasterize(
            zip(geometries.to_numpy(), codes.tolist(), strict=True), out_shape=(tile.size, tile.size),
            transform=tile.transform, fill=0, dtype=np.uint8,
        )  # fmt: skip

    def stage_core() -> np.ndarray:  # the stage's burn: codes already mapped
        return rasterize_polygons(geometries, polygon_class_codes(frame["code"], WORLDCOVER).codes, tile).land_cover

    def stage_tile() -> np.ndarray:  # + scheme mapping, reprojection check and the per-tile spatial query
        return rasterize_tiles(frame, "code", WORLDCOVER, [tile])[tile.tile_id].land_cover

    expected = direct()
    assert np.array_equal(stage_core(), expected) and np.array_equal(stage_tile(), expected), "outputs differ"
    timings: dict[str, list[float]] = {"direct": [], "stage_core": [], "stage_tile": []}
    functions = {"direct": direct, "stage_core": stage_core, "stage_tile": stage_tile}
    for _ in range(args.repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print(f"{len(frame)} polygons on a {tile.size} x {tile.size} tile ({pixels / 1e6:.1f} Mpx), "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'path':<12} {'seconds':>9} {'Mpx/s':>9} {'vs direct':>10}")
    for name, seconds in medians.items():
        print(f"{name:<12} {seconds:>9.4f} {pixels / seconds / 1e6:>9.1f} {medians['direct'] / seconds:>9.2f}x")


if __name__ == "__main__":
    main()
