from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from data_fixtures import SAMPLE_TILE_SIZE, sample_ingest_config, widened
from pyproj import Transformer
from real_data import REAL

from softcon.config import IngestConfig
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_server import serve_stac

VIRGINIA = REAL / "sentinel2_l1c_virginia"


def _open(cube: Path, tile_id: str) -> xr.Dataset:
    return xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False)


def test_cube_follows_the_contract(data_cube: tuple[Path, IngestReport], data_sample: SampleData) -> None:
    cube, report = data_cube
    assert report.tiles == data_sample.tile_ids
    ds = _open(cube, report.tiles[0])
    assert ds.s2.dims == ("time", "band", "y", "x") and ds.s2.dtype == np.uint16
    assert ds.scl.dims == ("time", "y", "x") and ds.scl.dtype == np.uint8
    assert ds.s1.dims == ("time_s1", "pol", "y", "x") and ds.s1.dtype == np.float32
    assert [str(b) for b in ds.band.values] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                                                 "B09", "B11", "B12"]  # fmt: skip
    assert [str(p) for p in ds.pol.values] == ["VV", "VH"]
    assert ds.rio.crs.to_epsg() == 32632
    x0, y0 = (int(v) for v in report.tiles[0].split("_")[1:])
    assert ds.rio.transform() == rasterio.Affine(10, 0, x0, 0, -10, y0)
    assert ds.s2.encoding["chunks"] == (1, 12, SAMPLE_TILE_SIZE, SAMPLE_TILE_SIZE)
    assert ds.sizes["time_s1"] == len(data_sample.s1_dates)
    assert set(ds.attrs["s2_items"]) == {str(np.datetime64(t, "D")) for t in ds.time.values}
    assert -30 < float(ds.s1.mean()) < 0  # dB, not linear


def test_offset_is_removed_and_values_plausible(data_cube: tuple[Path, IngestReport]) -> None:
    cube, report = data_cube
    ds = _open(cube, report.tiles[0]).isel(time=0)
    clear = ds.scl.isin([4, 5, 6]).values
    nir = ds.s2.sel(band="B08").values.astype(float)
    assert 0 < np.median(nir[clear]) < 4000


def test_cloudy_tile_date_is_skipped(data_cube: tuple[Path, IngestReport], data_sample: SampleData) -> None:
    cube, report = data_cube
    assert report.tile_dates_skipped.get("cloud", 0) >= len(report.tiles)  # the ~85 % cloudy date, every tile
    for tile_id in report.tiles:
        days = set(_open(cube, tile_id).attrs["s2_items"])
        assert data_sample.s2_dates[1].isoformat() not in days


def test_rerun_writes_nothing(
    data_cube: tuple[Path, IngestReport],
    data_sample: SampleData,
    data_stac_url: str,
) -> None:
    cube, first = data_cube
    files = {p: p.stat().st_mtime_ns for p in cube.rglob("*") if p.is_file()}
    config = sample_ingest_config(data_sample, data_stac_url, cube)
    again = run_ingest(config)
    assert again.tile_dates_written == 0
    assert again.tile_dates_skipped["exists"] == first.tile_dates_written
    assert {p: p.stat().st_mtime_ns for p in cube.rglob("*") if p.is_file()} == files
    assert again.warning(config) is None  # nothing new since the last run is no warning


def test_a_run_that_writes_nothing_says_what_was_skipped_and_what_to_change(
    data_sample: SampleData, data_stac_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An area several times the size of the scenes: every tile-date is mostly nodata over it."""
    wide = widened(data_sample.bbox, 2)
    config = sample_ingest_config(data_sample, data_stac_url, tmp_path / "cube.zarr", bbox=wide, tile_size=1056)
    with caplog.at_level("WARNING", logger="softcon.tasks.ingest"):
        report = run_ingest(config)
    assert report.tile_dates_written == 0 and report.tile_dates_skipped["nodata"] > 0
    warning = report.warning(config)
    assert warning is not None and warning in caplog.text
    assert warning.startswith(f"nothing written to {config.cube}: ")
    assert f"{report.tile_dates_skipped['nodata']} for nodata" in warning
    assert "of its pixels in the area have no data" in warning and "--max-tile-nodata" in warning


def test_a_small_area_on_a_large_tile_keeps_its_dates(
    data_sample: SampleData, data_stac_url: str, tmp_path: Path
) -> None:
    """Nodata and cloud are measured over the area on the tile: the default 1,056 px tile over the sample scenes
    (64 px tiles) is mostly empty, yet every date the area has is written (it was all skipped as nodata)."""
    small = sample_ingest_config(data_sample, data_stac_url, tmp_path / "small.zarr")
    large = sample_ingest_config(data_sample, data_stac_url, tmp_path / "large.zarr", tile_size=1056)
    assert IngestConfig.model_fields["tile_size"].default == 1056
    written_small, written_large = run_ingest(small), run_ingest(large)
    assert written_large.tile_dates_written > 0 and written_large.warning(large) is None
    assert written_large.dates == written_small.dates


def test_extending_the_dates_appends_only_new_ones(
    data_sample: SampleData,
    data_stac_url: str,
    tmp_path: Path,
) -> None:
    cube = tmp_path / "cube.zarr"
    first_end = data_sample.s2_dates[0] + timedelta(days=1)
    first = run_ingest(sample_ingest_config(data_sample, data_stac_url, cube, end=first_end))
    tile = first.tiles[0]
    before = _open(cube, tile).load()
    assert before.sizes["time"] == 1 and before.sizes["time_s1"] == 1
    second = run_ingest(sample_ingest_config(data_sample, data_stac_url, cube))
    after = _open(cube, tile).load()
    assert second.tile_dates_skipped["exists"] == first.tile_dates_written
    assert after.sizes["time"] > 1
    xr.testing.assert_identical(after.isel(time=[0], time_s1=[0]).drop_attrs(), before.drop_attrs())
    assert (np.diff(after.time.values) > np.timedelta64(0)).all()


def test_no_items_raises_and_creates_no_store(data_sample: SampleData, data_stac_url: str, tmp_path: Path) -> None:
    cube = tmp_path / "none.zarr"
    config = sample_ingest_config(data_sample, data_stac_url, cube, start="2020-01-01", end="2020-01-31")
    with pytest.raises(ValueError, match=r"no STAC items .*2020-01-01"):
        run_ingest(config)
    assert not cube.exists()


def test_unreadable_item_is_skipped_and_reported(data_sample: SampleData, tmp_path: Path) -> None:
    items = json.loads(data_sample.items_file.read_text())
    broken = next(i for i in items["features"] if i["collection"] == "sentinel-2-l2a")
    broken["assets"]["red"]["href"] = str(tmp_path / "missing.tif")
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    report = run_ingest(sample_ingest_config(data_sample, str(path), tmp_path / "cube.zarr"))
    assert report.items_failed == [broken["id"]]
    assert report.tile_dates_written > 0


def _virginia_items(folder: Path, collection: str = "sentinel-2-l2a", baseline: str = "02.08") -> dict:
    """A static ItemCollection of the real Virginia L1C crop, in Earth Search's asset naming for ``collection``."""
    from softcon.tasks.collections import S2_BAND_TO_EARTHSEARCH, S2_L1C_BAND_TO_EARTHSEARCH

    keys = S2_L1C_BAND_TO_EARTHSEARCH if collection == "sentinel-2-l1c" else S2_BAND_TO_EARTHSEARCH
    assets = {}
    for band, key in keys.items():
        path = VIRGINIA / f"s2_{band}_crop.tif"
        if not path.exists():
            continue
        with rasterio.open(path) as src:
            bounds, crs, shape, transform = src.bounds, src.crs, src.shape, list(src.transform)[:6]
        assets[key] = {
            "href": str(path), "type": "image/tiff; application=geotiff",
            "eo:bands": [{"name": band}], "proj:shape": list(shape), "proj:transform": transform,
            "raster:bands": [{"nodata": 0, "data_type": "uint16"}], "roles": ["data"],
        }  # fmt: skip
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lons, lats = to_lonlat.transform(
        [bounds.left, bounds.right, bounds.right, bounds.left], [bounds.top, bounds.top, bounds.bottom, bounds.bottom]
    )
    ring = [[lo, la] for lo, la in zip(lons, lats, strict=True)]
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "S2A_18SUH_20200101_0_L1C-crop",
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {"datetime": "2020-01-01T15:50:00Z", "eo:cloud_cover": 0, "proj:epsg": crs.to_epsg(),
                       "s2:processing_baseline": baseline},
        "links": [], "assets": assets, "stac_extensions": [],
    }  # fmt: skip
    path = folder / "virginia.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return {"file": path, "lonlat": (min(lons), min(lats), max(lons), max(lats))}


def test_real_virginia_scene_is_pixel_exact(tmp_path: Path) -> None:
    catalog = _virginia_items(tmp_path)
    west, south, east, north = catalog["lonlat"]
    inner = (
        west + 0.3 * (east - west),
        south + 0.3 * (north - south),
        east - 0.3 * (east - west),
        north - 0.3 * (north - south),
    )
    cube = tmp_path / "cube.zarr"
    with serve_stac([catalog["file"]]) as url:
        config = IngestConfig(stac=url, collections=["sentinel-2-l2a"], bbox=inner, start="2020-01-01",
                              end="2020-01-01", tile_size=64, max_tile_nodata=1.0, cube=str(cube))  # fmt: skip
        report = run_ingest(config)
    assert report.tile_dates_written == len(report.tiles) >= 1
    compared = 0
    for tile_id in report.tiles:
        ds = _open(cube, tile_id).isel(time=0)
        assert ds.rio.crs.to_epsg() == 32618
        for band in ("B02", "B03", "B04", "B08"):
            with rasterio.open(VIRGINIA / f"s2_{band}_crop.tif") as src:
                source = src.read(1)
                left, top = src.transform.c, src.transform.f
            cube_band = ds.s2.sel(band=band).values
            x = ds.x.values - 5  # pixel left edges
            y = ds.y.values + 5
            cols = np.round((x - left) / 10).astype(int)
            rows = np.round((top - y) / 10).astype(int)
            in_x, in_y = (cols >= 0) & (cols < source.shape[1]), (rows >= 0) & (rows < source.shape[0])
            window = source[np.ix_(rows[in_y], cols[in_x])]
            np.testing.assert_array_equal(cube_band[np.ix_(in_y, in_x)], window)
            compared += window.size
    assert compared > 0
    shutil.rmtree(cube)


def test_tile_created_with_zarr_matches_what_xarray_writes(tmp_path: Path) -> None:
    """``create_tile`` writes the same files (metadata and coordinate chunks) as the xarray template's to_zarr."""
    import warnings

    from softcon.tasks.cube_store import create_tile, tile_template
    from softcon.tasks.grid import tiles_for_bbox

    tile = tiles_for_bbox((11.0, 46.49, 11.02, 46.51), resolution=10, tile_size=64)[0]
    bands = ["B02", "B8A", "B12"]
    template, encoding = tile_template(tile, bands)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template.to_zarr(tmp_path / "xr.zarr", group=f"tiles/{tile.tile_id}", mode="a", zarr_format=3,
                         encoding=encoding, consolidated=False)  # fmt: skip
    create_tile(str(tmp_path / "direct.zarr"), tile, bands)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    expected, got = files(tmp_path / "xr.zarr"), files(tmp_path / "direct.zarr")
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        if name.endswith(".json"):
            assert json.loads(got[name]) == json.loads(content), name
        else:
            assert got[name] == content, name
    ds = _open(tmp_path / "direct.zarr", tile.tile_id)
    assert ds.rio.crs.to_epsg() == tile.epsg
    assert list(ds.band.values) == bands and list(ds.pol.values) == ["VV", "VH"]
    assert ds.x.values[0] == tile.x0 + 5 and ds.y.values[0] == tile.y0 - 5
    assert ds.s1.encoding["_FillValue"] != ds.s1.encoding["_FillValue"]  # NaN


def test_reading_a_cube_says_nothing_about_its_lock_folder(data_cube: tuple[Path, IngestReport]) -> None:
    """`softcon reproduce` printed zarr's "Object at .ingest-locks is not recognized" twice per run."""
    import warnings

    from softcon.tasks.digest import array_digests

    cube, _ = data_cube
    assert (cube / ".ingest-locks").is_dir()
    with warnings.catch_warnings(record=True) as shown:  # the filters in force, registries reset
        assert array_digests(str(cube))
    assert not [w for w in shown if ".ingest-locks" in str(w.message)]


@pytest.mark.parametrize(("baseline", "offset"), [("02.08", 0), ("05.11", 1000)])
def test_l1c_ingests_all_13_bands_with_its_offset_rule(tmp_path: Path, baseline: str, offset: int) -> None:
    """sentinel-2-l1c (Earth Search naming: cirrus = B10, no SCL) with every band; from baseline 04.00 the
    RADIO_ADD_OFFSET of 1000 is removed as L2A's BOA offset is; SCL is written as 0 (no scene classification)."""
    from softcon.config import S2_L1C_BANDS

    catalog = _virginia_items(tmp_path, "sentinel-2-l1c", baseline)
    west, south, east, north = catalog["lonlat"]
    inner = (west + 0.3 * (east - west), south + 0.3 * (north - south), east - 0.3 * (east - west),
             north - 0.3 * (north - south))  # fmt: skip
    cube = tmp_path / "cube.zarr"
    with serve_stac([catalog["file"]]) as url:
        config = IngestConfig(
            stac=url, collections=["sentinel-2-l1c"], bands=list(S2_L1C_BANDS), bbox=inner, start="2020-01-01",
            end="2020-01-01", tile_size=64, max_tile_nodata=1.0, cube=str(cube),
        )  # fmt: skip
        report = run_ingest(config)
    assert report.tile_dates_written == len(report.tiles) >= 1
    ds = _open(cube, report.tiles[0]).isel(time=0)
    assert list(ds.band.values) == list(S2_L1C_BANDS) and not ds.scl.values.any()
    with rasterio.open(VIRGINIA / "s2_B04_crop.tif") as src:
        source, left, top = src.read(1).astype(np.int64), src.transform.c, src.transform.f
    cols = np.round((ds.x.values - 5 - left) / 10).astype(int)
    rows = np.round((top - (ds.y.values + 5)) / 10).astype(int)
    in_x, in_y = (cols >= 0) & (cols < source.shape[1]), (rows >= 0) & (rows < source.shape[0])
    expected = np.clip(source[np.ix_(rows[in_y], cols[in_x])] - offset, 1, None)
    np.testing.assert_array_equal(ds.s2.sel(band="B04").values[np.ix_(in_y, in_x)], expected)
    cirrus = ds.s2.sel(band="B10").values
    assert cirrus.any() and cirrus.dtype == np.uint16  # the 60 m cirrus band, read onto the 10 m grid
