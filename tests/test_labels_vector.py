"""Vector land cover: formats, the pixel-centre and overlap rules, class attributes and bad input."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import zarr
from labels_helpers import TILE_A, TILE_B, make_cube, read_land_cover
from shapely.geometry import box

from softcon.config import LabelsConfig
from softcon.tasks.labels import run_labels
from softcon.tasks.rasterize import polygon_class_codes, rasterize_polygons
from softcon.tasks.schemes import WORLDCOVER

X0, Y0 = TILE_A.x0, TILE_A.y0  # upper-left corner of tile A, UTM 32N metres


def pixel_box(row0: int, col0: int, row1: int, col1: int, *, inset: float = 0.0) -> box:
    """The polygon of pixels rows [row0, row1) x cols [col0, col1) of tile A, shrunk by ``inset`` metres."""
    return box(X0 + 10 * col0 + inset, Y0 - 10 * row1 + inset, X0 + 10 * col1 - inset, Y0 - 10 * row0 - inset)


@pytest.fixture
def cube(tmp_path: Path) -> Path:
    return make_cube(tmp_path / "cube.zarr", [TILE_A, TILE_B])


def two_tile_polygons() -> gpd.GeoDataFrame:
    """Tile A: west half tree cover (10), east half cropland (40); tile B: all water (80)."""
    geometries = [pixel_box(0, 0, 64, 32), pixel_box(0, 32, 64, 64), box(TILE_B.x0, Y0 - 640, TILE_B.x0 + 640, Y0)]
    return gpd.GeoDataFrame({"code": [10, 40, 80], "name": ["a", "b", "c"]}, geometry=geometries, crs="EPSG:32632")


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".shp", ".parquet", ".fgb"], ids=lambda s: s[1:])
def test_every_format_gives_the_same_land_cover(cube: Path, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"polygons{suffix}"
    frame = two_tile_polygons()
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_file(path)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="code"))
    land_cover = read_land_cover(cube, TILE_A)
    assert land_cover.dtype == np.uint8 and land_cover.shape == (64, 64)
    assert (land_cover[:, :32] == 10).all() and (land_cover[:, 32:] == 40).all()
    assert (read_land_cover(cube, TILE_B) == 80).all()
    assert report.class_pixels["Tree cover"] == 64 * 32 and report.class_pixels["Permanent water bodies"] == 64 * 64
    assert report.unknown_codes == {} and report.resampling[TILE_A.tile_id] == "rasterize-centre"


def test_a_pixel_takes_the_polygon_holding_its_centre_unless_all_touched() -> None:
    # Edges 2 m inside pixel columns/rows 1 and 5: they touch 5 x 5 pixels but hold only 3 x 3 pixel centres.
    polygon = gpd.GeoSeries([box(X0 + 18, Y0 - 52, X0 + 52, Y0 - 18)], crs="EPSG:32632")
    centre = rasterize_polygons(polygon, np.array([10]), TILE_A).land_cover
    touched = rasterize_polygons(polygon, np.array([10]), TILE_A, all_touched=True).land_cover
    assert np.argwhere(centre == 10).tolist() == [[r, c] for r in range(2, 5) for c in range(2, 5)]
    assert np.argwhere(touched == 10).tolist() == [[r, c] for r in range(1, 6) for c in range(1, 6)]


def test_overlapping_polygons_last_wins_or_smallest_wins() -> None:
    small, large = pixel_box(8, 8, 16, 16), pixel_box(0, 0, 32, 32)
    geometries = gpd.GeoSeries([small, large], crs="EPSG:32632")
    codes = np.array([80, 10])  # the lake first, the forest around it last
    last = rasterize_polygons(geometries, codes, TILE_A).land_cover
    smallest = rasterize_polygons(geometries, codes, TILE_A, overlap="smallest").land_cover
    assert (last[:32, :32] == 10).all()  # file order: the forest, burnt last, covers the lake
    assert (smallest[8:16, 8:16] == 80).all() and (smallest[:32, :32] == 10).sum() == 32 * 32 - 64
    reversed_order = rasterize_polygons(geometries[::-1].reset_index(drop=True), codes[::-1], TILE_A).land_cover
    assert (reversed_order[8:16, 8:16] == 80).all()


def test_class_names_map_through_the_scheme_and_unknown_values_are_reported(cube: Path, tmp_path: Path) -> None:
    frame = two_tile_polygons()
    frame["name"] = ["Tree cover", "Rice paddies", "permanent water bodies"]
    path = tmp_path / "named.gpkg"
    frame.to_file(path)
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="name"))
    land_cover = read_land_cover(cube, TILE_A)
    assert (land_cover[:, :32] == 10).all() and (land_cover[:, 32:] == 0).all()  # unknown -> nodata
    assert (read_land_cover(cube, TILE_B) == 80).all()  # names match case- and space-insensitively
    assert report.unknown_codes == {"Rice paddies": 64 * 32}
    attrs = zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}/landcover"].attrs
    assert attrs["unknown_codes"] == {"Rice paddies": 64 * 32} and attrs["class_codes"] == list(WORLDCOVER.codes)
    with pytest.raises(ValueError, match=r"outside scheme worldcover .*Rice paddies"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="name", unknown_codes="error"))


def test_polygon_class_codes_keeps_unknown_values_apart() -> None:
    values = polygon_class_codes(gpd.pd.Series([10, 0, 77, 10, 77, 5]), WORLDCOVER)
    assert values.codes.tolist() == [10, 0, 256, 10, 256, 257] and values.unknown_values == ("77", "5")


def test_missing_class_attribute_lists_the_columns_before_any_work(cube: Path, tmp_path: Path) -> None:
    path = tmp_path / "polygons.gpkg"
    two_tile_polygons().to_file(path)
    with pytest.raises(ValueError, match=r"no class attribute 'landcover'; its columns are \['code', 'name'\]"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="landcover"))
    with pytest.raises(ValueError, match=r"--class-field to one of \['code', 'name'\]"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path)))
    assert "landcover" not in zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]


def test_missing_crs_is_an_error_before_any_work(cube: Path, tmp_path: Path) -> None:
    path = tmp_path / "no_crs.shp"
    two_tile_polygons().to_file(path)
    path.with_suffix(".prj").unlink()
    with pytest.raises(ValueError, match=r"no_crs\.shp has no CRS"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="code"))
    assert "landcover" not in zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]


def test_polygons_that_miss_a_tile_name_the_tile_and_their_extent(cube: Path, tmp_path: Path) -> None:
    path = tmp_path / "only_a.gpkg"
    gpd.GeoDataFrame({"code": [10]}, geometry=[pixel_box(0, 0, 64, 64)], crs="EPSG:32632").to_file(path)
    with pytest.raises(ValueError, match=rf"extent \[.*\]\) does not overlap tile {TILE_B.tile_id}"):
        run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="code"))
    assert "landcover" not in zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]


def land_use_polygons() -> gpd.GeoDataFrame:
    """A land-use map whose codes (1..3, like Slovenia's LULC_ID) are no WorldCover code."""
    geometries = [pixel_box(0, 0, 64, 32), pixel_box(0, 32, 64, 64), box(TILE_B.x0, Y0 - 640, TILE_B.x0 + 640, Y0)]
    names = ["Urban", "Agriculture", "Water"]
    return gpd.GeoDataFrame({"LULC_ID": [1, 2, 3], "LULC_NAME": names}, geometry=geometries, crs="EPSG:32632")


def test_codes_that_fit_no_class_stop_the_run_with_their_counts_and_a_scheme_skeleton(
    cube: Path, tmp_path: Path
) -> None:
    """It wrote every pixel as nodata and exited 0: now, before writing, it names the codes and the ways on."""
    path = tmp_path / "lulc.gpkg"
    land_use_polygons().to_file(path)
    with pytest.raises(ValueError) as raised:
        run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="LULC_ID"))
    message = str(raised.value)
    assert "outside scheme worldcover (code: pixels) 3: 4096, 1: 2048, 2: 2048; 0 pixels carry" in message
    assert "  - name: class 3    # 4096 pixels\n    source_codes: [3]" in message  # a YAML skeleton to fill in
    assert "--scheme field" in message and "--unknown-codes report" in message
    tile = zarr.open_group(cube, mode="r")[f"tiles/{TILE_A.tile_id}"]
    assert "landcover" not in tile  # nothing written
    report = run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="LULC_ID", unknown_codes="report"))
    assert report.unknown_codes == {"1": 2048, "2": 2048, "3": 4096} and not report.class_pixels.get("Tree cover")
    assert (read_land_cover(cube, TILE_A) == 0).all()  # today's behaviour, asked for


def test_the_field_scheme_takes_the_attribute_values_as_classes_and_names_from_another(
    cube: Path, tmp_path: Path
) -> None:
    path = tmp_path / "lulc.gpkg"
    land_use_polygons().to_file(path)
    config = LabelsConfig(
        cube=str(cube), source=str(path), class_field="LULC_ID", scheme="field", name_field="LULC_NAME"
    )
    report = run_labels(config)
    assert report.scheme == "field:LULC_ID" and report.class_codes == {"Urban": 1, "Agriculture": 2, "Water": 3}
    land_cover = read_land_cover(cube, TILE_A)
    assert (land_cover[:, :32] == 1).all() and (land_cover[:, 32:] == 2).all()
    assert (read_land_cover(cube, TILE_B) == 3).all() and report.unknown_codes == {}
    with pytest.raises(ValueError, match=r"no name attribute 'NAME'.*LULC_NAME"):
        run_labels(config.model_copy(update={"name_field": "NAME"}))
