"""Real rasters through the local STAC API: the France S1 RTC raster and the BigEarthNet S1/S2 patches.

Each raster gets a STAC Item shaped like the provider's (Earth Search asset keys for S2, Planetary
Computer ``sentinel-1-rtc`` keys for S1, ``raster:bands`` nodata and unit), served by ``rustac serve``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from pyproj import Transformer
from rasterio.warp import Resampling, reproject
from real_data import REAL

from softcon.config import IngestConfig
from softcon.tasks.collections import S2_BAND_TO_EARTHSEARCH
from softcon.tasks.ingest import run_ingest
from softcon.tasks.stac_server import serve_stac

FRANCE = REAL / "sentinel1_rtc_france" / "S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
BEN_S2 = REAL / "bigearthnet" / "BigEarthNet-S2-Example"
BEN_S1 = REAL / "bigearthnet" / "BigEarthNet-S1-Example"
TEN_METRE = ("B02", "B03", "B04", "B08")
S2_CHECKED = [*TEN_METRE, "B8A"]
"""Bands the S2 test compares: native 10 m ones pixel-exact, a 20 m one against GDAL's warp."""


@dataclass(frozen=True)
class Scene:
    """One real raster (or band set) as a STAC Item."""

    item: dict
    lonlat: tuple[float, float, float, float]
    day: str


def _footprint(path: Path) -> tuple[dict, tuple[float, float, float, float]]:
    with rasterio.open(path) as src:
        bounds, crs = src.bounds, src.crs
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xs = [bounds.left, bounds.right, bounds.right, bounds.left]
    ys = [bounds.top, bounds.top, bounds.bottom, bounds.bottom]
    lons, lats = to_lonlat.transform(xs, ys)
    ring = [[lo, la] for lo, la in zip(lons, lats, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}, (min(lons), min(lats), max(lons), max(lats))


def _asset(path: Path, name: str, nodata: float | None, unit: str | None = None) -> dict:
    with rasterio.open(path) as src:
        band = {"data_type": src.dtypes[0]}
        if nodata is not None:
            band["nodata"] = nodata
        if unit:
            band["unit"] = unit
        return {
            "href": str(path), "type": "image/tiff; application=geotiff", "roles": ["data"],
            "eo:bands": [{"name": name}], "proj:shape": list(src.shape), "proj:transform": list(src.transform)[:6],
            "proj:epsg": src.crs.to_epsg(), "raster:bands": [band],
        }  # fmt: skip


def _item(item_id: str, collection: str, when: str, geometry: dict, lonlat: tuple, assets: dict, **props) -> dict:
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection, "geometry": geometry,
        "bbox": list(lonlat), "properties": {"datetime": when, **props}, "links": [], "assets": assets,
        "stac_extensions": [],
    }  # fmt: skip


def _ben_when(folder: Path) -> str:
    meta = json.loads(next(folder.glob("*_labels_metadata.json")).read_text())
    when = meta.get("acquisition_date") or meta["acquisition_time"]  # S2 and S1 JSON name it differently
    return when.replace(" ", "T") + "Z"


def _scenes() -> dict[str, Scene]:
    scenes = {}
    geometry, lonlat = _footprint(FRANCE)
    scenes["france-s1"] = Scene(
        _item("S1A_IW_20150309T173017_france", "sentinel-1-rtc", "2015-03-09T17:30:17Z", geometry, lonlat,
              {"vv": _asset(FRANCE, "VV", -99, "dB")}, **{"sar:polarizations": ["VV"]}),
        lonlat, "2015-03-09",
    )  # fmt: skip
    for folder in sorted(BEN_S2.iterdir()):
        geometry, lonlat = _footprint(next(folder.glob("*_B02.tif")))
        assets = {
            key: _asset(next(folder.glob(f"*_{band}.tif")), band, 0)
            for band, key in S2_BAND_TO_EARTHSEARCH.items() if band != "SCL"
        }  # fmt: skip
        when = _ben_when(folder)
        scenes[f"s2:{folder.name}"] = Scene(
            _item(folder.name, "sentinel-2-l2a", when, geometry, lonlat, assets, **{
                "eo:cloud_cover": 0, "s2:processing_baseline": "02.05"}),
            lonlat, when[:10],
        )  # fmt: skip
    for folder in sorted(BEN_S1.iterdir()):
        geometry, lonlat = _footprint(next(folder.glob("*_VV.tif")))
        assets = {pol.lower(): _asset(next(folder.glob(f"*_{pol}.tif")), pol, None, "dB") for pol in ("VV", "VH")}
        when = _ben_when(folder)
        scenes[f"s1:{folder.name}"] = Scene(
            _item(folder.name, "sentinel-1-rtc", when, geometry, lonlat, assets), lonlat, when[:10]
        )
    return scenes


SCENES = _scenes()


@pytest.fixture(scope="module")
def real_stac_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("real-stac") / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [s.item for s in SCENES.values()]}))
    with serve_stac([path]) as url:
        yield url


def _ingest(url: str, scene: Scene, collection: str, cube: Path, resolution: float = 10.0) -> list[xr.Dataset]:
    # The scene's own UTM zone: the 35VPK patches lie east of 30°E, in zone 36 by position.
    epsg = scene.item["assets"][next(iter(scene.item["assets"]))]["proj:epsg"]
    # Tiles of 128 px hold a 120 px patch in at most 2 x 2 tiles (fewer tiles to create and load than 64 px);
    # only the bands the checks compare are loaded.
    config = IngestConfig(
        epsg=epsg, bands=S2_CHECKED,
        stac=url, collections=[collection], bbox=scene.lonlat, start=scene.day, end=scene.day, tile_size=128,
        resolution=resolution, max_tile_nodata=1.0, max_tile_cloud=1.0, cube=str(cube), retry_delay=0,
    )  # fmt: skip
    report = run_ingest(config)
    assert report.items_failed == [] and report.items_ingested == 1
    return [xr.open_zarr(cube, group=f"tiles/{t}", consolidated=False).load() for t in report.tiles]


def _source_window(ds: xr.Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source pixels under the tile's pixels (source grid aligned with the tile's): values, row/col masks."""
    with rasterio.open(path) as src:
        source, left, top, res = src.read(1), src.transform.c, src.transform.f, src.transform.a
    cols = np.round((ds.x.values - res / 2 - left) / res).astype(int)
    rows = np.round((top - (ds.y.values + res / 2)) / res).astype(int)
    in_x, in_y = (cols >= 0) & (cols < source.shape[1]), (rows >= 0) & (rows < source.shape[0])
    return source[np.ix_(rows[in_y], cols[in_x])], in_y, in_x


S2_IDS = [name for name in SCENES if name.startswith("s2:")]
S1_IDS = [name for name in SCENES if name.startswith("s1:")]


@pytest.mark.slow
@pytest.mark.parametrize("name", S2_IDS, ids=[n[3:] for n in S2_IDS])
def test_bigearthnet_s2_patch_is_pixel_exact(name: str, real_stac_url: str, tmp_path: Path) -> None:
    scene = SCENES[name]
    folder = BEN_S2 / scene.item["id"]
    with rasterio.open(next(folder.glob("*_B02.tif"))) as src:
        epsg = src.crs.to_epsg()
    compared = 0
    for ds in _ingest(real_stac_url, scene, "sentinel-2-l2a", tmp_path / "cube.zarr"):
        assert ds.rio.crs.to_epsg() == epsg
        step = ds.isel(time=0)
        for band in TEN_METRE:  # native 10 m bands: exactly the source pixels, no half-pixel shift
            window, in_y, in_x = _source_window(ds, next(folder.glob(f"*_{band}.tif")))
            np.testing.assert_array_equal(step.s2.sel(band=band).values[np.ix_(in_y, in_x)], window)
            compared += window.size
        # Outside the patch: nodata 0 in every band loaded.
        outside = ~np.outer(in_y, in_x)
        assert (step.s2.values[:, outside] == 0).all()
        # A 20 m band: GDAL's bilinear warp of the source onto the 10 m tile grid, as an independent reference.
        with rasterio.open(next(folder.glob("*_B8A.tif"))) as src:
            expected = np.zeros(ds.rio.shape, np.float32)
            reproject(
                src.read(1).astype(np.float32), expected, src_transform=src.transform, src_crs=src.crs, src_nodata=0,
                dst_transform=ds.rio.transform(), dst_crs=src.crs, dst_nodata=0, resampling=Resampling.bilinear,
            )  # fmt: skip
        b8a = step.s2.sel(band="B8A").values.astype(np.float32)
        both = (b8a > 0) & (expected > 0)
        assert both.sum() >= 0.5 * np.outer(in_y, in_x).sum()
        np.testing.assert_allclose(b8a[both], expected[both], atol=1.0)
    assert compared >= 4 * 120 * 120


@pytest.mark.slow
@pytest.mark.parametrize("name", S1_IDS, ids=[n[3:] for n in S1_IDS])
def test_bigearthnet_s1_patch_is_pixel_exact_in_db(name: str, real_stac_url: str, tmp_path: Path) -> None:
    scene = SCENES[name]
    folder = BEN_S1 / scene.item["id"]
    compared = 0
    for ds in _ingest(real_stac_url, scene, "sentinel-1-rtc", tmp_path / "cube.zarr"):
        step = ds.isel(time_s1=0)
        for pol in ("VV", "VH"):
            window, in_y, in_x = _source_window(ds, next(folder.glob(f"*_{pol}.tif")))
            np.testing.assert_array_equal(step.s1.sel(pol=pol).values[np.ix_(in_y, in_x)], window)
            assert np.isnan(step.s1.sel(pol=pol).values[~np.outer(in_y, in_x)]).all()  # outside: NaN nodata
            compared += window.size
        assert ds.sizes["time"] == 0  # an S1-only request writes no S2 step
    assert compared == 2 * 120 * 120


@pytest.mark.slow
def test_france_s1_rtc_lands_on_the_20m_grid_with_nodata_as_nan(real_stac_url: str, tmp_path: Path) -> None:
    scene = SCENES["france-s1"]
    with rasterio.open(FRANCE) as src:
        source, transform, crs = src.read(1), src.transform, src.crs
    datasets = _ingest(real_stac_url, scene, "sentinel-1-rtc", tmp_path / "cube.zarr", resolution=20)
    valid_seen = 0
    for ds in datasets:
        assert ds.rio.crs == crs  # EPSG:32631, the scene's own UTM zone
        vv = ds.s1.isel(time_s1=0).sel(pol="VV").values
        assert np.isnan(ds.s1.isel(time_s1=0).sel(pol="VH").values).all()  # single-pol product: VH is nodata
        # The source grid is offset by (8.24, 14.70) m from the 20 m tile grid, so the expected values are
        # GDAL's bilinear warp of the source onto the tile grid, -99 excluded as nodata.
        expected = np.full(vv.shape, np.nan, np.float32)
        reproject(
            source, expected, src_transform=transform, src_crs=crs, src_nodata=-99.0,
            dst_transform=ds.rio.transform(), dst_crs=crs, dst_nodata=np.nan, resampling=Resampling.bilinear,
        )  # fmt: skip
        both = np.isfinite(vv) & np.isfinite(expected)
        assert (np.isfinite(vv) == np.isfinite(expected)).mean() > 0.99
        np.testing.assert_allclose(vv[both], expected[both], atol=0.05)
        assert not (vv == -99).any()
        valid_seen += int(both.sum())
    assert valid_seen > 0.9 * (source != -99).sum() * (20 * 20) / (20 * 20)
