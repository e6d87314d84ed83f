"""Raster land cover: mode vs nearest, nodata, Dynamic World / IO LULC / WorldCover years from STAC, YAML
schemes, bad input, and the real WorldCover 2021 tile over São Tomé against a direct numpy computation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.warp
import zarr
from affine import Affine
from labels_helpers import REAL_WORLDCOVER, TILE_A, TILE_B, make_cube, read_land_cover, write_raster
from pyproj import Transformer
from rasterio.windows import from_bounds

from softcon.config import LabelsConfig
from softcon.tasks import patches
from softcon.tasks.grid import Tile
from softcon.tasks.labels import run_labels, source_window
from softcon.tasks.schemes import WORLDCOVER

RNG_SEED = 4


@pytest.fixture
def cube(tmp_path: Path) -> Path:
    return make_cube(tmp_path / "cube.zarr", [TILE_A])


def tile_pattern(seed: int = RNG_SEED, codes: tuple[int, ...] = (10, 40, 50, 80)) -> np.ndarray:
    """64 x 64 class codes in 8 x 8 blocks."""
    blocks = np.random.default_rng(seed).choice(codes, size=(8, 8)).astype(np.uint8)
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def test_finer_product_is_resampled_by_mode(cube: Path, tmp_path: Path) -> None:
    truth = tile_pattern()
    fine = np.kron(truth, np.ones((2, 2), dtype=np.uint8))  # 5 m pixels, 4 per tile pixel
    fine[::2, ::2] = 30  # one of the four is grassland: the majority (3 of 4) must win
    path = write_raster(tmp_path / "fine.tif", fine, Affine(5, 0, TILE_A.x0, 0, -5, TILE_A.y0), "EPSG:32632", nodata=0)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    assert report.resampling == {TILE_A.tile_id: "mode"}
    np.testing.assert_array_equal(read_land_cover(cube, TILE_A), truth)


def test_coarser_product_is_resampled_by_nearest(cube: Path, tmp_path: Path) -> None:
    coarse = np.random.default_rng(RNG_SEED).choice([10, 20, 30, 40], size=(22, 22)).astype(np.uint8)  # 30 m
    path = write_raster(
        tmp_path / "coarse.tif", coarse, Affine(30, 0, TILE_A.x0, 0, -30, TILE_A.y0), "EPSG:32632", nodata=0
    )
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    assert report.resampling == {TILE_A.tile_id: "nearest"}
    centres = (np.arange(64) * 10 + 5) // 30  # the coarse pixel holding each tile pixel centre
    np.testing.assert_array_equal(read_land_cover(cube, TILE_A), coarse[np.ix_(centres, centres)])


def test_nodata_and_pixels_outside_the_product_stay_nodata(cube: Path, tmp_path: Path) -> None:
    truth = tile_pattern()
    product = truth[:, :48].copy()  # the product stops 16 pixels short of the tile's east edge
    product[:16, :16] = 255  # and has a nodata hole
    path = write_raster(tmp_path / "part.tif", product, TILE_A.transform, "EPSG:32632", nodata=255)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    land_cover = read_land_cover(cube, TILE_A)
    assert (land_cover[:16, :16] == 0).all() and (land_cover[:, 48:] == 0).all()
    np.testing.assert_array_equal(land_cover[16:, :48], truth[16:, :48])
    assert report.nodata_pixels == 16 * 16 + 64 * 16 and report.unknown_codes == {}  # nodata is not "unknown"
    assert report.metrics()["labelled_fraction"] == pytest.approx(1 - (16 * 16 + 64 * 16) / 64**2)


def test_dynamic_world_labels_become_1_to_9_so_water_is_not_nodata(cube: Path, tmp_path: Path) -> None:
    label = np.random.default_rng(RNG_SEED).integers(0, 9, size=(8, 8)).astype(np.uint8)
    label = np.kron(label, np.ones((8, 8), dtype=np.uint8))
    label[:8, :8] = 0  # water, Dynamic World's code 0
    label[-8:, -8:] = 255  # the export's nodata
    path = write_raster(tmp_path / "dw_label.tif", label, TILE_A.transform, "EPSG:32632", nodata=255)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path), scheme="dynamic-world"))
    land_cover = read_land_cover(cube, TILE_A)
    expected = np.where(label == 255, 0, label + 1)
    np.testing.assert_array_equal(land_cover, expected)
    assert report.class_pixels["water"] == int((label == 0).sum()) >= 64
    attrs = zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}/landcover"].attrs
    assert attrs["class_codes"] == list(range(1, 10)) and attrs["class_scheme"] == "dynamic-world"
    # What preprocess computes from it: water is a class, the nodata corner is unlabelled.
    fractions, labelled = patches.class_fractions(land_cover[:16, :16], attrs["class_codes"])
    assert fractions[0] == pytest.approx(0.25) and labelled == 1.0


def test_yaml_scheme_maps_excludes_and_reports(cube: Path, tmp_path: Path) -> None:
    scheme = tmp_path / "forest_water.yaml"
    scheme.write_text(
        "name: forest-water\nnodata: [0]\nexclude: {50: Built-up}\n"
        "classes:\n  - {name: Forest, source_codes: [10, 95]}\n  - {name: Water, source_codes: [80]}\n"
    )
    truth = tile_pattern(codes=(10, 95, 80, 50, 40))
    path = write_raster(tmp_path / "wc.tif", truth, TILE_A.transform, "EPSG:32632", nodata=0)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path), scheme=str(scheme)))
    land_cover = read_land_cover(cube, TILE_A)
    np.testing.assert_array_equal(land_cover, np.select([np.isin(truth, [10, 95]), truth == 80], [1, 2], 0))
    assert report.class_codes == {"Forest": 1, "Water": 2}
    assert report.excluded_codes == {"50": int((truth == 50).sum())}
    assert report.unknown_codes == {"40": int((truth == 40).sum())}


def test_raster_without_crs_is_an_error_before_any_work(cube: Path, tmp_path: Path) -> None:
    path = write_raster(tmp_path / "no_crs.tif", tile_pattern(), TILE_A.transform, None, nodata=0)
    with pytest.raises(ValueError, match=r"no_crs\.tif has no CRS"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    assert "landcover" not in zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]


def test_raster_not_overlapping_names_tile_and_extent(tmp_path: Path) -> None:
    cube = make_cube(tmp_path / "cube.zarr", [TILE_A, TILE_B])
    path = write_raster(tmp_path / "a_only.tif", tile_pattern(), TILE_A.transform, "EPSG:32632", nodata=0)
    with pytest.raises(ValueError, match=rf"a_only.tif \(extent \[.*\]\) does not overlap tile {TILE_B.tile_id}"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    assert "landcover" not in zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]  # nothing written


# --- STAC -----------------------------------------------------------------------------------------------------


def stac_item(collection: str, item_id: str, path: Path, asset: str, year: int, **properties: Any) -> dict[str, Any]:
    """An Item in the layout of the Planetary Computer's land-cover collections, for a local raster."""
    with rasterio.open(path) as src:
        west, south, east, north = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        transform, shape, epsg = list(src.transform)[:6], [src.height, src.width], src.crs.to_epsg()
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection, "links": [],
        "bbox": [west, south, east, north], "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"datetime": None, "start_datetime": f"{year}-01-01T00:00:00Z",
                       "end_datetime": f"{year + 1}-01-01T00:00:00Z", "proj:epsg": epsg, **properties},
        "assets": {asset: {"href": str(path), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                           "roles": ["data"], "proj:transform": transform, "proj:shape": shape,
                           "raster:bands": [{"nodata": 0, "data_type": "uint8"}]}},
    }  # fmt: skip


def write_items(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return path


def test_worldcover_2020_v100_and_2021_v200_from_stac_pick_the_year(cube: Path, tmp_path: Path) -> None:
    maps = {2020: tile_pattern(1), 2021: tile_pattern(2)}
    items = [
        stac_item("esa-worldcover", f"ESA_WorldCover_10m_{year}_{version}_N46E010", write_raster(
            tmp_path / f"wc{year}.tif", maps[year], TILE_A.transform, "EPSG:32632", nodata=0), "map", year,
            **{"esa_worldcover:product_version": "1.0.0" if year == 2020 else "2.0.0"})
        for year, version in ((2020, "v100"), (2021, "v200"))
    ]  # fmt: skip
    source = str(write_items(tmp_path / "worldcover.json", items))
    report = run_labels(LabelsConfig(cube=str(cube), source=source))  # default: the latest year
    np.testing.assert_array_equal(read_land_cover(cube, TILE_A), maps[2021])
    assert report.scheme == "worldcover" and report.resampling[TILE_A.tile_id] == "nearest"  # same 10 m grid
    run_labels(LabelsConfig(cube=str(cube), source=source, year=2020))
    np.testing.assert_array_equal(read_land_cover(cube, TILE_A), maps[2020])
    attrs = zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}/landcover"].attrs
    assert attrs["year"] == "2020" and attrs["product"] == "esa-worldcover"
    with pytest.raises(ValueError, match=r"no land-cover item for year 2019 .* years there: \[2020, 2021\]"):
        run_labels(LabelsConfig(cube=str(cube), source=source, year=2019))


def test_io_lulc_from_stac_mosaics_granules_and_excludes_clouds(cube: Path, tmp_path: Path) -> None:
    truth = tile_pattern(codes=(1, 2, 5, 7, 11))
    truth[:8, :8] = 10  # clouds
    west, east = truth[:, :32], truth[:, 32:]
    east_transform = Affine(10, 0, TILE_A.x0 + 320, 0, -10, TILE_A.y0)
    items = [
        stac_item("io-lulc-annual-v02", "32T-2022-w", write_raster(tmp_path / "w.tif", west, TILE_A.transform,
                  "EPSG:32632", nodata=0), "data", 2022),
        stac_item("io-lulc-annual-v02", "32T-2022-e", write_raster(tmp_path / "e.tif", east, east_transform,
                  "EPSG:32632", nodata=0), "data", 2022),
    ]  # fmt: skip
    source = str(write_items(tmp_path / "io.json", items))
    report = run_labels(LabelsConfig(cube=str(cube), source=source, collection="io-lulc-annual-v02"))
    assert report.scheme == "io-lulc"  # the collection's scheme when none is given
    np.testing.assert_array_equal(read_land_cover(cube, TILE_A), np.where(truth == 10, 0, truth))
    assert report.excluded_codes == {"10": 64} and report.unknown_codes == {}


def test_stac_without_items_over_a_tile_names_tile_and_extent(tmp_path: Path) -> None:
    cube = make_cube(tmp_path / "cube.zarr", [TILE_A, TILE_B])
    item = stac_item("esa-worldcover", "wc", write_raster(tmp_path / "wc.tif", tile_pattern(), TILE_A.transform,
                     "EPSG:32632", nodata=0), "map", 2021)  # fmt: skip
    source = str(write_items(tmp_path / "wc.json", [item]))
    with pytest.raises(ValueError, match=rf"collection esa-worldcover \(extent \[.*\]\) does not overlap tile "
                       rf"{TILE_B.tile_id}"):  # fmt: skip
        run_labels(LabelsConfig(cube=str(cube), source=source))


# --- the real WorldCover 2021 tile --------------------------------------------------------------------------

# 5.12 km of UTM 32N over the city of São Tomé (north-east coast): forest, built-up, sea, grassland, cropland.
SAO_TOME = Tile(epsg=32632, x0=243200.0, y0=40960.0, resolution=10.0, size=512)


def direct_fractions(tile: Tile, y0: float, x0: float, side: float) -> dict[int, float]:
    """Class fractions of the real product pixels whose centres fall in a square of the tile's CRS, by numpy."""
    with rasterio.open(REAL_WORLDCOVER) as src:
        bounds = rasterio.warp.transform_bounds(f"EPSG:{tile.epsg}", src.crs, x0, y0 - side, x0 + side, y0)
        window = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
        codes = src.read(1, window=window)
        transform = src.window_transform(window)
    rows, cols = np.indices(codes.shape)
    lon, lat = transform.c + (cols + 0.5) * transform.a, transform.f + (rows + 0.5) * transform.e
    x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{tile.epsg}", always_xy=True).transform(lon, lat)
    inside = codes[(x >= x0) & (x < x0 + side) & (y > y0 - side) & (y <= y0)]
    inside = inside[inside != 0]
    values, counts = np.unique(inside, return_counts=True)
    return dict(zip(values.tolist(), (counts / counts.sum()).tolist(), strict=True))


def test_real_worldcover_window_on_a_utm_grid_matches_numpy(tmp_path: Path) -> None:
    with rasterio.open(REAL_WORLDCOVER) as src:
        assert (src.width, src.height) == (36000, 36000)
        window = source_window(src, SAO_TOME)
    assert window is not None and window.width * window.height < 600 * 600  # a window, not the 36000² array
    cube = make_cube(tmp_path / "cube.zarr", [SAO_TOME])
    report = run_labels(LabelsConfig(cube=str(cube), source=str(REAL_WORLDCOVER)))
    assert report.resampling == {SAO_TOME.tile_id: "mode"}  # 1/12000° ≈ 9.2 m is finer than 10 m
    land_cover = read_land_cover(cube, SAO_TOME)
    tile_fractions, labelled = patches.class_fractions(land_cover, WORLDCOVER.codes)
    truth = direct_fractions(SAO_TOME, SAO_TOME.y0, SAO_TOME.x0, SAO_TOME.side)
    assert labelled == 1.0 and set(truth) <= set(WORLDCOVER.codes) and report.unknown_codes == {}
    assert {10, 50, 80} <= {c for c, f in truth.items() if f > 0.1}  # forest, city and sea
    for code, fraction in zip(WORLDCOVER.codes, tile_fractions, strict=True):
        assert fraction == pytest.approx(truth.get(code, 0.0), abs=0.005), code
    # Per 256-px patch, as preprocess computes it.
    for row, col in patches.patch_windows(land_cover.shape, 256):
        patch = land_cover[row : row + 256, col : col + 256]
        fractions, _ = patches.class_fractions(patch, WORLDCOVER.codes)
        truth = direct_fractions(SAO_TOME, SAO_TOME.y0 - row * 10, SAO_TOME.x0 + col * 10, 2560.0)
        assert fractions.sum() == pytest.approx(1.0)
        for code, fraction in zip(WORLDCOVER.codes, fractions, strict=True):
            assert fraction == pytest.approx(truth.get(code, 0.0), abs=0.01), (row, col, code)
