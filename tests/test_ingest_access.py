"""Ingest access options: Planetary Computer URL signing, headers from environment variables, area files.

Everything is offline: the SAS token service is faked at the ``requests`` session that ``planetary-computer``
uses, and header checks go through a loopback proxy in front of the local STAC API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import geopandas
import planetary_computer
import pytest
import rasterio
import xarray as xr
import zarr
from data_fixtures import SAMPLE_TILE_SIZE, sample_ingest_config
from header_proxy import HeaderProxy, serve_header_proxy
from shapely.geometry import box, mapping

import softcon.tasks.ingest as ingest
import softcon.tasks.scene_load as scene_load
from softcon.config import IngestConfig
from softcon.tasks.grid import tile_from_id
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_access import url_signer

BLOB = {  # Planetary Computer storage account and container of each collection's assets
    "sentinel-2-l2a": "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2",
    "sentinel-1-rtc": "https://sentinel1euwestrtc.blob.core.windows.net/sentinel1-grd-rtc",
}
FAKE_SAS = "st=2024-06-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rl&sv=2021-06-08&sr=c&sig=FAKE%2Bsig"


def _open(cube: Path, tile_id: str) -> xr.Dataset:
    return xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False)


def _tile_groups(cube: Path) -> list[str]:
    return sorted(zarr.open_group(str(cube), mode="r")["tiles"].group_keys())


# ------------------------------------------------------------------------------------------ signing


class _FakeSasResponse:
    def raise_for_status(self) -> None:
        pass

    def json(self) -> dict[str, Any]:
        expiry = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        return {"msft:expiry": expiry, "token": FAKE_SAS}


@pytest.fixture
def sas_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The token URLs ``planetary-computer`` asks for; answered here, never on the network."""
    asked: list[str] = []

    class Session:
        def mount(self, *_args: object) -> None:
            pass

        def get(self, url: str, headers: object = None) -> _FakeSasResponse:
            asked.append(url)
            return _FakeSasResponse()

    monkeypatch.setattr(planetary_computer.sas.requests, "Session", Session)
    monkeypatch.setattr(planetary_computer.sas, "TOKEN_CACHE", {})
    return asked


def test_sign_option_selects_planetary_computer_signing(tmp_path: Path) -> None:
    def config(stac: str, sign: str) -> IngestConfig:
        return IngestConfig(stac=stac, bbox=(11.0, 46.0, 11.1, 46.1), start="2024-06-01", end="2024-06-02",
                            sign=sign, cube=str(tmp_path / "c.zarr"))  # fmt: skip

    pc = "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert url_signer(config(pc, "auto")) is not None
    assert url_signer(config(pc, "none")) is None
    assert url_signer(config("https://earth-search.aws.element84.com/v1", "auto")) is None
    signer = url_signer(config(str(tmp_path / "items.json"), "planetary-computer"))
    assert signer is not None
    assert signer("/data/B04.tif") == "/data/B04.tif"  # local paths are never sent to the token service


def test_planetary_computer_asset_urls_reach_the_loader_signed(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path, sas_requests: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    reference, first = data_cube
    # The sample Items as Planetary Computer serves them: asset hrefs in Azure blob storage.
    items = json.loads(data_sample.items_file.read_text())
    for item in items["features"]:
        for asset in item["assets"].values():
            if item["collection"] in BLOB:
                asset["href"] = BLOB[item["collection"]] + asset["href"]
    path = tmp_path / "pc-items.json"
    path.write_text(json.dumps(items))

    seen: list[str] = []
    real_load = scene_load.odc.stac.load

    def loading(stac_items, *args, patch_url=None, **kwargs):  # type: ignore[no-untyped-def]
        """odc-stac as it runs, with reads of the signed blob URLs served from the local copies."""
        assert patch_url is not None, "the loader got no URL signer"

        def to_local(href: str) -> str:
            signed = patch_url(href)
            seen.append(signed)
            url = urlparse(signed)
            return "/" + url.path.split("/", 2)[2]  # drop the container: the local absolute path

        return real_load(stac_items, *args, patch_url=to_local, **kwargs)

    monkeypatch.setattr(scene_load.odc.stac, "load", loading)
    cube = tmp_path / "cube.zarr"
    report = run_ingest(sample_ingest_config(data_sample, str(path), cube, sign="planetary-computer"))

    assert seen and report.items_failed == []
    for href in seen:
        url = urlparse(href)
        assert url.netloc.endswith(".blob.core.windows.net") and url.query == FAKE_SAS, href
    # One token per storage container, fetched once and reused from the cache for every later asset.
    settings = planetary_computer.settings.Settings.get()
    assert sorted(sas_requests) == sorted(
        f"{settings.sas_url}/{urlparse(b).netloc.split('.')[0]}/{urlparse(b).path.strip('/')}" for b in BLOB.values()
    )
    assert report.tile_dates_written == first.tile_dates_written
    for tile_id in report.tiles:
        got, want = _open(cube, tile_id).load(), _open(reference, tile_id).load()
        xr.testing.assert_identical(got, want)


# ------------------------------------------------------------------------------------------ headers


@pytest.fixture
def header_proxy(data_stac_url: str) -> Iterator[type[HeaderProxy]]:
    with serve_header_proxy(data_stac_url) as handler:
        yield handler


def test_header_from_environment_reaches_the_stac_api_and_asset_reads(
    data_sample: SampleData, header_proxy: type[HeaderProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header_proxy.expected = "Bearer s3cret-token"
    monkeypatch.setenv("SOFTCON_TEST_STAC_TOKEN", "Bearer s3cret-token")
    gdal_headers: list[str | None] = []
    real_load = scene_load.odc.stac.load

    def loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        gdal_headers.append(rasterio.env.getenv().get("GDAL_HTTP_HEADERS"))  # what GDAL sends on HTTP reads
        return real_load(*args, **kwargs)

    monkeypatch.setattr(scene_load.odc.stac, "load", loading)
    config = sample_ingest_config(
        data_sample, header_proxy.root, tmp_path / "cube.zarr", headers={"Authorization": "SOFTCON_TEST_STAC_TOKEN"}
    )
    report = run_ingest(config)

    assert report.tile_dates_written > 0 and report.items_failed == []
    assert any("/search" in path for _, path, _ in header_proxy.seen)
    assert {header for _, _, header in header_proxy.seen} == {"Bearer s3cret-token"}
    assert gdal_headers and set(gdal_headers) == {"Authorization: Bearer s3cret-token"}


def test_without_the_header_the_api_refuses(
    data_sample: SampleData, header_proxy: type[HeaderProxy], tmp_path: Path
) -> None:
    header_proxy.expected = "Bearer s3cret-token"
    with pytest.raises(Exception, match=r"401|Unauthorized"):
        run_ingest(sample_ingest_config(data_sample, header_proxy.root, tmp_path / "cube.zarr", retries=0))
    assert header_proxy.seen and all(header is None for _, _, header in header_proxy.seen)


def test_unset_header_variable_fails_before_any_request(
    data_sample: SampleData, header_proxy: type[HeaderProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOFTCON_TEST_UNSET_TOKEN", raising=False)
    cube = tmp_path / "cube.zarr"
    config = sample_ingest_config(
        data_sample, header_proxy.root, cube, headers={"X-Api-Key": "SOFTCON_TEST_UNSET_TOKEN"}
    )
    with pytest.raises(ValueError, match=r"X-Api-Key \(from \$SOFTCON_TEST_UNSET_TOKEN\).*export"):
        run_ingest(config)
    assert header_proxy.seen == [] and not cube.exists()


# --------------------------------------------------------------------------------------------- area


def _centre_box(sample: SampleData, tile_id: str, fraction: float = 0.2) -> tuple[float, float, float, float]:
    """A small lon/lat box around the middle of a tile, touching no other tile."""
    west, south, east, north = tile_from_id(tile_id, resolution=10, size=SAMPLE_TILE_SIZE).lonlat_bounds
    dx, dy = (east - west) * fraction / 2, (north - south) * fraction / 2
    lon, lat = (west + east) / 2, (south + north) / 2
    return (lon - dx, lat - dy, lon + dx, lat + dy)


def test_area_geojson_ingests_only_the_tiles_it_touches(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    whole, _ = data_cube
    assert len(data_sample.tile_ids) >= 2
    target = data_sample.tile_ids[-1]
    centre = _centre_box(data_sample, target)
    area = tmp_path / "area.geojson"
    feature = {"type": "Feature", "properties": {}, "geometry": mapping(box(*centre))}
    area.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    cube = tmp_path / "cube.zarr"
    report = run_ingest(sample_ingest_config(data_sample, str(data_sample.items_file), cube, bbox=None, area=str(area)))
    assert report.tiles == [target]
    assert _tile_groups(cube) == [target]
    # The same area as a bbox gives the same cube: cloud and nodata are judged over the area's pixels on the tile,
    # so its dates can differ from the whole tile's (the sample's cloud blob sits elsewhere on some dates)...
    as_bbox = tmp_path / "bbox.zarr"
    run_ingest(sample_ingest_config(data_sample, str(data_sample.items_file), as_bbox, bbox=centre))
    xr.testing.assert_identical(_open(cube, target).load(), _open(as_bbox, target).load())
    # ... while a date kept by both holds the same pixels as the whole-tile ingest.
    mine, reference = _open(cube, target).load(), _open(whole, target).load()
    common = sorted(set(mine.time.values) & set(reference.time.values))
    xr.testing.assert_identical(mine.s2.sel(time=common), reference.s2.sel(time=common))


def test_area_geopackage_in_utm_is_reprojected_and_clipped_to_the_bbox(data_sample: SampleData, tmp_path: Path) -> None:
    first, last = data_sample.tile_ids[0], data_sample.tile_ids[-1]
    # Two polygons, one in each end tile, stored in the scenes' UTM CRS.
    frame = geopandas.GeoDataFrame(
        {"name": ["a", "b"]}, geometry=[box(*_centre_box(data_sample, t)) for t in (first, last)], crs="EPSG:4326"
    ).to_crs(f"EPSG:{data_sample.epsg}")
    area = tmp_path / "area.gpkg"
    frame.to_file(area, driver="GPKG")
    cube = tmp_path / "cube.zarr"
    both = run_ingest(sample_ingest_config(data_sample, str(data_sample.items_file), cube, bbox=None, area=str(area)))
    assert both.tiles == sorted({first, last}, key=data_sample.tile_ids.index)
    # With a bbox as well, the area is clipped to it: only the polygon inside the bbox counts.
    bbox = _centre_box(data_sample, first, fraction=0.6)
    clipped = sample_ingest_config(data_sample, str(data_sample.items_file), tmp_path / "c2.zarr", bbox=bbox,
                                   area=str(area))  # fmt: skip
    assert ingest.tiles_for_area(ingest.read_area(clipped), resolution=10, tile_size=SAMPLE_TILE_SIZE) == [
        tile_from_id(first, resolution=10, size=SAMPLE_TILE_SIZE)
    ]


def test_area_errors_are_clear_before_any_work(data_sample: SampleData, tmp_path: Path) -> None:
    items = str(data_sample.items_file)
    with pytest.raises(FileNotFoundError, match=r"area file .*missing\.geojson does not exist"):
        run_ingest(sample_ingest_config(data_sample, items, tmp_path / "a.zarr", bbox=None,
                                        area=str(tmp_path / "missing.geojson")))  # fmt: skip
    far = tmp_path / "far.geojson"
    feature = {"type": "Feature", "properties": {}, "geometry": mapping(box(-70.0, -10.0, -69.9, -9.9))}
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(ValueError, match="does not meet bbox"):
        run_ingest(sample_ingest_config(data_sample, items, tmp_path / "b.zarr", area=str(far)))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
