"""The aligned-read driver gives odc-stac's own (warped) values, and is what ingest uses for coarser bands."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import odc.stac
import pystac
import pytest
import rasterio
import rasterio.warp
from affine import Affine
from odc.geo.geobox import GeoBox
from shapely.geometry import mapping

from softcon.tasks.aligned_reads import ALIGNED_DRIVER, integer_upscale
from softcon.tasks.sample_data import write_sample_data
from softcon.tasks.scene_load import REMOTE_READ_THREADS, read_pool
from softcon.tasks.stac_search import read_static_items

EPSG = 32632


def _assert_same(actual: np.ndarray, expected: np.ndarray, k: int, what: str) -> None:
    """Equal for k = 2. For k = 6 GDAL's resampled read and its warp sum the weights in another order: an
    integer may round the other way (at most 1, a reflectance of 0.0001, on at most 2 % of the pixels) and a
    float may differ in its last bit; nodata is in the same places."""
    if k == 2:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    elif actual.dtype.kind == "f":
        np.testing.assert_allclose(actual, expected, rtol=1e-6, err_msg=what)  # NaN where NaN
    else:
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.02, f"{what}: max {diff.max()}, {(diff > 0).mean():.3%}"
        np.testing.assert_array_equal(actual == 0, expected == 0, err_msg=f"{what} nodata")


def _load(items: list[pystac.Item], bands: list[str], geobox: GeoBox, resampling: dict, driver=None):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return odc.stac.load(
            items, bands=bands, geobox=geobox, resampling=resampling, chunks=None, fail_on_error=True, driver=driver
        )


def _cog(path: Path, values: np.ndarray, transform: Affine, nodata: float | None) -> Path:
    profile = dict(driver="GTiff", width=values.shape[1], height=values.shape[0], count=1, dtype=values.dtype.name,
                   crs=f"EPSG:{EPSG}", transform=transform, nodata=nodata, tiled=True, blockxsize=64,
                   blockysize=64)  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values[None])
    return path


def _dtype(path: Path) -> str:
    with rasterio.open(path) as src:
        return src.dtypes[0]


def _item(name: str, hrefs: dict[str, Path], shape: tuple[int, int], transform: Affine) -> pystac.Item:
    """An item with the projection and raster extension fields that Earth Search and Planetary Computer give."""
    footprint = GeoBox(shape, transform, f"EPSG:{EPSG}").extent.to_crs("EPSG:4326").geom
    item = pystac.Item(name, geometry=mapping(footprint), bbox=list(footprint.bounds),
                       datetime=datetime(2024, 6, 1, tzinfo=UTC), properties={"proj:code": f"EPSG:{EPSG}"})  # fmt: skip
    for key, href in hrefs.items():
        item.add_asset(key, pystac.Asset(str(href), media_type=pystac.MediaType.COG, roles=["data"],
                                         extra_fields={"proj:shape": list(shape), "proj:transform": list(transform)[:6],
                                                       "raster:bands": [{"data_type": _dtype(href)}]}))  # fmt: skip
    return item


def test_sample_scenes_load_identically_with_and_without_the_driver(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    sample = write_sample_data(tmp_path / "sample", tiles=1, tile_size=96, dates=2)
    items = [pystac.Item.from_dict({**i, "links": []}) for i in read_static_items(sample.items_file)]
    s2 = [i for i in items if i.collection_id == "sentinel-2-l2a"]
    bands = ["coastal", "blue", "rededge1", "swir16", "nir09", "scl"]  # 60, 10, 20, 20, 60 m and 20 m SCL
    reference_item = s2[0].assets["blue"].href
    with rasterio.open(reference_item) as src:
        left, top = src.transform.c, src.transform.f
    geobox = GeoBox((96, 96), Affine(10, 0, left, 0, -10, top), f"EPSG:{EPSG}")
    resampling = {"*": "bilinear", "scl": "nearest"}
    reference = _load(s2, bands, geobox, resampling)
    with monkeypatch.context() as patched:  # the coarser bands are read, not warped (10 m ones are pasted)
        patched.setattr(rasterio.warp, "reproject", lambda *a, **kw: pytest.fail("the driver warped"))
        aligned = _load(s2, bands, geobox, resampling, ALIGNED_DRIVER)
    for band, k in zip(bands, (6, 1, 2, 2, 6, 2), strict=True):
        _assert_same(aligned[band].values, reference[band].values, k, band)
        assert aligned[band].dtype == reference[band].dtype


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("holes", [False, True])
def test_offset_partial_overlap_and_nodata_match_the_warp(tmp_path: Path, k: int, holes: bool) -> None:
    """A coarse source shifted by an odd number of tile pixels (fractional source window) covering part of the
    tile, uint16 and float32: equal to odc-stac's warp. Read without a warp; with nodata holes, bilinear goes
    to the warp (nearest never does)."""
    rng = np.random.default_rng(k)
    n_src = 40
    values = rng.integers(1, 10_000, (n_src, n_src), dtype=np.uint16)
    if holes:
        values[5:9, 10:20] = 0
        values[:, -3:] = 0
    transform = Affine(10 * k, 0, 600_030, 0, -10 * k, 5_000_000 - 30)  # odd multiple of 10 m off the tile grid
    uint = _cog(tmp_path / "u16.tif", values, transform, nodata=0)
    floats = _cog(tmp_path / "f32.tif", np.where(values == 0, np.nan, values / 7).astype(np.float32), transform, np.nan)
    item = _item("shifted", {"refl": uint, "db": floats}, (n_src, n_src), transform)
    size = n_src * k // 2 + 50  # the source covers about half the tile, from inside it
    geobox = GeoBox((size, size), Affine(10, 0, 600_000 + 10 * k * 4, 0, -10, 5_000_000 - 10 * k * 3), f"EPSG:{EPSG}")
    for band in ("refl", "db"):  # one load each: loaded together, odc-stac would convert both to float32
        for resampling in ("bilinear", "nearest"):
            reference = _load([item], [band], geobox, {"*": resampling})[band].values
            with _counting_warps() as warps:
                aligned = _load([item], [band], geobox, {"*": resampling}, ALIGNED_DRIVER)[band].values
            assert len(warps) == (1 if holes and resampling == "bilinear" else 0), f"{band} {resampling}"
            _assert_same(aligned, reference, k, f"{band} {resampling}")
            nodata = np.isnan(reference) if band == "db" else reference == 0
            assert (~nodata).any() and (nodata.any() or not holes)


@contextlib.contextmanager
def _counting_warps() -> Iterator[list[int]]:
    calls: list[int] = []
    original = rasterio.warp.reproject

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    rasterio.warp.reproject = counting
    try:
        yield calls
    finally:
        rasterio.warp.reproject = original


def test_unaligned_or_other_crs_sources_are_warped_as_before(tmp_path: Path) -> None:
    geobox = GeoBox((64, 64), Affine(10, 0, 600_000, 0, -10, 5_000_000), f"EPSG:{EPSG}")
    assert integer_upscale(GeoBox((32, 32), Affine(20, 0, 600_000, 0, -20, 5_000_000), f"EPSG:{EPSG}"), geobox) == 2
    assert integer_upscale(GeoBox((32, 32), Affine(20, 0, 600_005, 0, -20, 5_000_000), f"EPSG:{EPSG}"), geobox) is None
    assert integer_upscale(GeoBox((32, 32), Affine(15, 0, 600_000, 0, -15, 5_000_000), f"EPSG:{EPSG}"), geobox) is None
    assert integer_upscale(GeoBox((32, 32), Affine(20, 0, 600_000, 0, -20, 5_000_000), "EPSG:32633"), geobox) is None
    assert integer_upscale(GeoBox((64, 64), Affine(10, 0, 600_000, 0, -10, 5_000_000), f"EPSG:{EPSG}"), geobox) is None

    rng = np.random.default_rng(0)
    transform = Affine(20, 0, 600_005, 0, -20, 5_000_000)  # 5 m off the 10 m grid: must be warped
    path = _cog(tmp_path / "off.tif", rng.integers(1, 5000, (40, 40), dtype=np.uint16), transform, nodata=0)
    item = _item("off", {"refl": path}, (40, 40), transform)
    with _counting_warps() as warps:
        aligned = _load([item], ["refl"], geobox, {"*": "bilinear"}, ALIGNED_DRIVER)
    assert warps, "an unaligned source must go through odc-stac's warp"
    reference = _load([item], ["refl"], geobox, {"*": "bilinear"})
    np.testing.assert_array_equal(aligned["refl"].values, reference["refl"].values)


def test_reads_run_concurrently_for_network_assets_only(tmp_path: Path) -> None:
    transform = Affine(10, 0, 600_000, 0, -10, 5_000_000)
    local = _item("local", {"b": _cog(tmp_path / "b.tif", np.ones((4, 4), np.uint16), transform, 0)}, (4, 4), transform)
    remote = local.clone()
    remote.assets["b"].href = "https://example.org/b.tif"
    assert read_pool([local], None) is None
    assert read_pool([local, remote], None) == REMOTE_READ_THREADS
    assert read_pool([remote], 1) is None and read_pool([local], 3) == 3
