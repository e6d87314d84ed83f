"""Bad inputs are refused with a message that names the problem and what to do, before work starts where the
input alone shows it; inputs that can be made right (other UTM zones, harmonized files, inf) are.

Rows of docs/reliability.md ("Bad inputs") that other test files already prove are referenced there, not
repeated here. Ingest cases run on the session sample scenes (2 tiles of 64 px) read from a static item file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
import zarr
from data_fixtures import sample_ingest_config
from rasterio.warp import Resampling, calculate_default_transform, reproject
from real_data import REAL
from safetensors.torch import save_file
from store_factory import write_store

from softcon.config import ConfigError, IngestConfig, load_config
from softcon.models.data import StoreDataset
from softcon.models.encoder import build_encoder
from softcon.tasks import norm_stats, patches
from softcon.tasks.collections import spec_for_item
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.scene_load import harmonize
from softcon.tasks.train import read_checkpoint

REAL_ITEMS = REAL / "stac_items" / "api-responses"
OTHER_ZONE = 32633
"""The UTM zone east of the sample scenes' 32632."""


def _open(cube: Path, tile_id: str) -> xr.Dataset:
    return xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False)


def _features(sample: SampleData, collection: str | None = None) -> list[dict[str, Any]]:
    features = json.loads(sample.items_file.read_text())["features"]
    return [copy.deepcopy(f) for f in features if collection is None or f["collection"] == collection]


def _write_items(path: Path, features: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return str(path)


def _rewrite_raster(source: str, target: Path, change: Callable[[np.ndarray], np.ndarray]) -> str:
    """A copy of a single-band raster with its values changed (dtype from the result)."""
    with rasterio.open(source) as src:
        values, profile = src.read(1), src.profile
    changed = change(values)
    target.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(target, "w", **(profile | {"dtype": changed.dtype.name, "driver": "GTiff"})) as dst:
        dst.write(changed, 1)
    return str(target)


def _ingest_error(config: IngestConfig) -> str:
    with pytest.raises(ValueError) as caught:
        run_ingest(config)
    return str(caught.value)


# ------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field", ["start", "end"])
def test_a_date_that_does_not_exist_is_named_before_any_work(field: str) -> None:
    values = {"stac": "items.json", "bbox": [11.0, 46.4, 11.1, 46.5], "start": "2024-06-01", "end": "2024-06-30"}
    with pytest.raises(ConfigError, match=rf"ingest\.{field}: Input should be a valid date.*given: '2024-02-30'"):
        load_config(IngestConfig, section="ingest", overrides={**values, field: "2024-02-30"})


def test_a_bbox_across_the_antimeridian_says_how_to_request_it() -> None:
    values = {"stac": "items.json", "bbox": [179.9, -16.1, -179.9, -16.0], "start": "2024-06-01", "end": "2024-06-30"}
    with pytest.raises(ConfigError, match=r"needs west < east .*across the antimeridian: split it into two runs"):
        load_config(IngestConfig, section="ingest", overrides=values)


# ---------------------------------------------------------------------------------------- area


def _area_file(path: Path, geometry: dict[str, Any]) -> str:
    feature = {"type": "Feature", "properties": {}, "geometry": geometry}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return str(path)


def test_self_intersecting_area_is_refused_before_any_work(data_sample: SampleData, tmp_path: Path) -> None:
    west, south, east, north = data_sample.bbox
    bowtie = {"type": "Polygon", "coordinates": [[[west, south], [east, north], [east, south], [west, north],
                                                   [west, south]]]}  # fmt: skip
    area = _area_file(tmp_path / "bowtie.geojson", bowtie)
    cube = tmp_path / "cube.zarr"
    message = _ingest_error(sample_ingest_config(data_sample, str(data_sample.items_file), cube, bbox=None, area=area))
    assert "holds invalid geometries" in message and "Self-intersection" in message
    assert "make_valid" in message  # what to do
    assert not cube.exists()


def test_area_of_empty_geometries_is_refused(data_sample: SampleData, tmp_path: Path) -> None:
    area = _area_file(tmp_path / "empty.geojson", {"type": "Polygon", "coordinates": []})
    cube = tmp_path / "cube.zarr"
    message = _ingest_error(sample_ingest_config(data_sample, str(data_sample.items_file), cube, bbox=None, area=area))
    assert "holds no geometries" in message and "give a bbox" in message
    assert not cube.exists()


def test_area_over_the_ocean_is_a_clear_error_and_creates_no_cube(
    data_sample: SampleData, data_stac_url: str, tmp_path: Path
) -> None:
    cube = tmp_path / "atlantic.zarr"
    config = sample_ingest_config(data_sample, data_stac_url, cube, bbox=(-30.0, 40.0, -29.95, 40.05))
    message = _ingest_error(config)
    assert message.startswith("no STAC items in http://127.0.0.1")
    assert "open sea has no Sentinel-2 granules" in message
    assert not cube.exists()


def test_items_that_are_all_too_cloudy_create_no_cube(data_sample: SampleData, tmp_path: Path) -> None:
    cube = tmp_path / "cube.zarr"
    config = sample_ingest_config(
        data_sample, str(data_sample.items_file), cube, max_cloud=0.0, collections=["sentinel-2-l2a"]
    )
    message = _ingest_error(config)
    assert "none of the 3 STAC items is usable: 3 over max_cloud 0.0% (raise it)" in message
    assert not cube.exists()


def test_a_run_whose_tile_dates_are_all_empty_leaves_no_empty_tile(data_sample: SampleData, tmp_path: Path) -> None:
    """A granule whose pixels are all nodata (sea or the edge of a swath): nothing to write, nothing created."""
    (item,) = _features(data_sample, "sentinel-2-l2a")[:1]
    for asset in item["assets"].values():
        name = Path(asset["href"]).name
        asset["href"] = _rewrite_raster(asset["href"], tmp_path / "nodata" / name, np.zeros_like)
    cube = tmp_path / "cube.zarr"
    config = sample_ingest_config(data_sample, _write_items(tmp_path / "items.json", [item]), cube)
    report = run_ingest(config)
    assert report.tile_dates_written == 0 and report.tile_dates_skipped == {"nodata": len(report.tiles)}
    assert not cube.exists()


# ------------------------------------------------------------------------------------ items


def test_an_item_missing_a_requested_band_is_skipped_and_named(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    features = _features(data_sample)
    broken = next(f for f in features if f["collection"] == "sentinel-2-l2a")
    del broken["assets"]["nir"]
    report = run_ingest(
        sample_ingest_config(data_sample, _write_items(tmp_path / "items.json", features), tmp_path / "cube.zarr")
    )
    assert report.failures == {broken["id"]: f"missing asset: item {broken['id']} of sentinel-2-l2a has no asset "
                                             "'nir' for band B08"}  # fmt: skip
    assert report.items[broken["id"]] == "failed"
    _, reference = data_cube
    assert report.tile_dates_written > 0 and report.items_ingested == reference.items_ingested - 1


def test_no_item_with_a_requested_band_is_a_clear_error_and_creates_no_cube(
    data_sample: SampleData, tmp_path: Path
) -> None:
    features = _features(data_sample, "sentinel-2-l2a")
    for feature in features:
        del feature["assets"]["nir"]
    cube = tmp_path / "cube.zarr"
    message = _ingest_error(
        sample_ingest_config(data_sample, _write_items(tmp_path / "items.json", features), cube, bands=["B04", "B08"])
    )
    assert "none of the 3 STAC items is usable" in message and "3 without a requested asset" in message
    assert "has no asset 'nir' for band B08" in message and "request other bands" in message
    assert not cube.exists()


def _to_zone(item: dict[str, Any], folder: Path, epsg: int) -> dict[str, Any]:
    """The item with every asset warped (nearest) into another UTM zone, as a granule of that zone would be."""
    item = copy.deepcopy(item)
    for asset in item["assets"].values():
        with rasterio.open(asset["href"]) as src:
            transform, width, height = calculate_default_transform(
                src.crs, f"EPSG:{epsg}", src.width, src.height, *src.bounds, resolution=src.res[0]
            )
            values = np.zeros((height, width), src.dtypes[0])
            reproject(rasterio.band(src, 1), values, dst_transform=transform, dst_crs=f"EPSG:{epsg}",
                      resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)  # fmt: skip
            profile = src.profile | {"driver": "GTiff", "crs": f"EPSG:{epsg}", "transform": transform,
                                     "width": width, "height": height}  # fmt: skip
        path = folder / item["id"] / Path(asset["href"]).name
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(values, 1)
        asset.update({"href": str(path), "proj:shape": [height, width], "proj:transform": list(transform)[:6]})
    item["properties"]["proj:epsg"] = epsg
    return item


def test_items_in_two_utm_zones_land_on_the_grid_of_one(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    """Granules of the next zone are warped onto the tile grid (its own zone), alone or mosaicked with a
    granule of the grid's zone on the same day; the pixels land where the native granule puts them."""
    native = _features(data_sample, "sentinel-2-l2a")
    other = [_to_zone(item, tmp_path / "zone33", OTHER_ZONE) for item in native]
    for item in other:
        item["id"] += "_Z33"
    mixed = [other[0], other[1], native[2], other[2]]  # day 3: one granule of each zone
    cube = tmp_path / "cube.zarr"
    items = _write_items(tmp_path / "items.json", mixed)
    report = run_ingest(sample_ingest_config(data_sample, items, cube, collections=["sentinel-2-l2a"]))
    assert report.failures == {}
    reference_cube, _ = data_cube
    mosaicked = []
    for tile_id in report.tiles:
        got, want = _open(cube, tile_id), _open(reference_cube, tile_id)
        assert got.rio.crs.to_epsg() == data_sample.epsg
        np.testing.assert_array_equal(got.time.values, want.time.values)
        mosaicked.append(got.attrs["s2_items"].get(str(data_sample.s2_dates[2])))
        a, b = got.s2.values.astype(float), want.s2.values.astype(float)  # (time, band, y, x)
        # Warped twice with nearest and back with bilinear: close, and best aligned with no shift.
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
        error = {shift: np.abs(np.roll(a, shift, axis=-1) - b)[..., 2:-2, 2:-2].mean() for shift in (-1, 0, 1)}
        assert min(error, key=error.get) == 0 and error[0] < 0.1 * b.mean()
    assert sorted([native[2]["id"], other[2]["id"]]) in mosaicked  # (day 3 is too cloudy on some tiles)


# ------------------------------------------------------------------------- S2 offsets (baseline 04.00)


def test_earth_search_files_already_harmonized_get_no_second_offset() -> None:
    item = json.loads((REAL_ITEMS / "earthsearch__sentinel-2-l2a__S2B_20EPT_20250731_0_L2A.json").read_text())
    assert item["properties"]["s2:processing_baseline"] == "05.11"
    assert item["properties"]["earthsearch:boa_offset_applied"] is True
    assert spec_for_item(item).s2_offset(item) == 0
    item["properties"]["earthsearch:boa_offset_applied"] = False
    assert spec_for_item(item).s2_offset(item) == -1000


@pytest.mark.parametrize(("when", "offset"), [("2022-01-24T10:00:00Z", 0), ("2022-01-25T10:00:00Z", -1000)])
def test_without_a_baseline_the_acquisition_date_decides_the_offset(when: str, offset: int) -> None:
    item = {"id": "x", "collection": "sentinel-2-l2a", "properties": {"datetime": when}, "assets": {"red": {}}}
    assert spec_for_item(item).s2_offset(item) == offset


def test_a_malformed_baseline_is_refused() -> None:
    item = {"id": "x", "collection": "sentinel-2-l2a", "properties": {"s2:processing_baseline": "N0511"},
            "assets": {"red": {}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"item x: s2:processing_baseline 'N0511' is not NN\.NN"):
        spec_for_item(item).s2_offset(item)


def test_harmonized_files_give_the_same_cube_as_offset_files(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    """The sample files carry the +1000 of baseline 05.11; the same files harmonized by the provider (and
    flagged so) must land as the same reflectance, not 1000 lower."""
    features = _features(data_sample, "sentinel-2-l2a")
    for item in features:
        item["properties"]["earthsearch:boa_offset_applied"] = True
        for key in ("red", "scl"):
            asset = item["assets"][key]
            harmonize = (lambda v: np.where(v > 0, np.maximum(v.astype(np.int32) - 1000, 1), 0).astype(np.uint16)) if (
                key == "red") else (lambda v: v)  # fmt: skip
            asset["href"] = _rewrite_raster(asset["href"], tmp_path / item["id"] / f"{key}.tif", harmonize)
    cube = tmp_path / "cube.zarr"
    items = _write_items(tmp_path / "items.json", features)
    report = run_ingest(sample_ingest_config(data_sample, items, cube, bands=["B04"], collections=["sentinel-2-l2a"]))
    reference_cube, _ = data_cube
    for tile_id in report.tiles:
        got = _open(cube, tile_id).s2.sel(band="B04").values
        want = _open(reference_cube, tile_id).s2.sel(band="B04").values
        np.testing.assert_array_equal(got, want)


def test_float_reflectance_nan_and_inf_become_nodata_not_saturated() -> None:
    stack = np.array([[np.nan, np.inf, -np.inf, 1500.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(harmonize(stack, -1000), [[0, 0, 0, 500, 0]])


# ------------------------------------------------------------------------------------- S1 scale


def _s1_items(sample: SampleData, folder: Path, change: Callable[[np.ndarray], np.ndarray], *, unit: str | None):
    features = _features(sample, "sentinel-1-rtc")
    for item in features:
        for key, asset in item["assets"].items():
            asset["href"] = _rewrite_raster(asset["href"], folder / item["id"] / f"{key}.tif", change)
            band = asset["raster:bands"][0]
            band.pop("unit")
            if unit is not None:
                band["unit"] = unit
    return features


def _linear(db: np.ndarray) -> np.ndarray:
    return np.where(db == -32768, db, 10 ** (db / 10)).astype(np.float32)


def _s1_config(sample: SampleData, items: str, cube: Path) -> IngestConfig:
    return sample_ingest_config(sample, items, cube, collections=["sentinel-1-rtc"])


def test_linear_power_from_the_collection_mapping_is_converted_to_db(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    """Planetary Computer sentinel-1-rtc states no unit: the collection mapping says linear power."""
    items = _write_items(tmp_path / "items.json", _s1_items(data_sample, tmp_path, _linear, unit=None))
    report = run_ingest(_s1_config(data_sample, items, tmp_path / "cube.zarr"))
    assert report.failures == {} and report.tile_dates_written > 0
    reference_cube, _ = data_cube
    for tile_id in report.tiles:
        got, want = _open(tmp_path / "cube.zarr", tile_id).s1.values, _open(reference_cube, tile_id).s1.values
        np.testing.assert_allclose(got, want, atol=1e-3)  # NaN in the same places


def test_linear_power_declared_as_db_is_refused_per_item(data_sample: SampleData, tmp_path: Path) -> None:
    items = _write_items(tmp_path / "items.json", _s1_items(data_sample, tmp_path, _linear, unit="dB"))
    report = run_ingest(_s1_config(data_sample, items, tmp_path / "cube.zarr"))
    assert report.tile_dates_written == 0 and len(report.failures) == 3
    for reason in report.failures.values():
        assert "declared dB but 100% of the values are >= 0" in reason and "look like linear power" in reason
        assert "Fix the assets' raster:bands unit" in reason


def test_db_values_in_a_linear_collection_are_refused_per_item(data_sample: SampleData, tmp_path: Path) -> None:
    items = _write_items(tmp_path / "items.json", _s1_items(data_sample, tmp_path, lambda db: db, unit=None))
    report = run_ingest(_s1_config(data_sample, items, tmp_path / "cube.zarr"))
    assert report.tile_dates_written == 0 and len(report.failures) == 3
    for reason in report.failures.values():
        assert "of the values are negative, impossible for linear backscatter" in reason
        assert "Declare raster:bands unit 'dB'" in reason


# ---------------------------------------------------------------------------------------- NaN / inf


def test_s1_nan_and_inf_in_the_files_are_nodata_in_the_cube(data_sample: SampleData, tmp_path: Path) -> None:
    def spoil(db: np.ndarray) -> np.ndarray:
        db = db.copy()
        db[:10, :10], db[20:30, :10] = np.nan, np.inf
        db[10:20, :10] = -np.inf
        return db

    items = _s1_items(data_sample, tmp_path, spoil, unit="dB")[:1]
    cube = tmp_path / "cube.zarr"
    report = run_ingest(_s1_config(data_sample, _write_items(tmp_path / "items.json", items), cube))
    assert report.tile_dates_written > 0
    s1 = np.concatenate([_open(cube, tile_id).s1.values.ravel() for tile_id in report.tiles])
    assert not np.isinf(s1).any()
    assert np.isnan(s1).sum() >= 3 * 10 * 10  # every spoiled pixel (and nothing else became inf)


def test_s1_inf_in_a_cube_never_reaches_the_store_the_stats_or_training(tmp_path: Path) -> None:
    cube_values = np.array([[[[-10.0, np.inf], [-np.inf, np.nan]]]], dtype=np.float32)  # (sample, pol, h, w)
    patched = patches.s1_to_db(cube_values, None)
    assert np.isnan(patched).sum() == 3 and patched.ravel()[0] == -10.0
    assert np.isnan(patches.s1_to_db(np.array([np.inf, 0.1], np.float32), 10.0)[0])
    stats = norm_stats.s1_partial_stats(np.where(np.isnan(cube_values), 1.0, cube_values))  # inf left in
    assert np.isfinite(stats.moments.mean).all() and stats.moments.count.sum() == 2

    store = write_store(tmp_path / "store.zarr", n_locations=8, size=16)
    group = zarr.open_group(str(store.path), mode="r+")
    s1 = group["s1"][0]
    s1[0, :4, :4], s1[1, :4, :4] = np.inf, -np.inf
    group["s1"][0] = s1
    dataset = StoreDataset(store.path, sensor="s1", two_views=False, augment=False)
    position = int(np.nonzero(dataset.indices == 0)[0][0])
    image = dataset[position]["image"]  # (pol, h, w)
    assert torch.isfinite(image).all() and (image[:, :4, :4] == 0).all()
    batch = dataset.__getitems__([position])
    assert torch.isfinite(batch.batch["image"]).all()


# ------------------------------------------------------------------------------------ weights files


def _resnet18_state() -> dict[str, torch.Tensor]:
    return build_encoder("resnet18", 3).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_weights_file_says_so(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    state = _resnet18_state()
    torch.save(state, whole) if suffix == ".pth" else save_file(state, str(whole))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"weights file .*cut{suffix} \(\d+ bytes\) cannot be read: it is truncated"):
        build_encoder("resnet18", 12, cut)


def test_an_empty_or_non_torch_weights_file_says_so_without_suggesting_unsafe_loading(tmp_path: Path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth \(0 bytes\) cannot be read: it is truncated or not a torch"):
        build_encoder("resnet18", 12, tmp_path / "empty.pth")
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")  # a failed download saved as the file
    with pytest.raises(ValueError, match=r"page\.pth is refused \(Weights only load failed") as caught:
        build_encoder("resnet18", 12, tmp_path / "page.pth")
    assert "weights_only=False" not in str(caught.value) and "re-save it as a state dict" in str(caught.value)


def test_a_truncated_checkpoint_says_so(tmp_path: Path) -> None:
    whole = tmp_path / "step_000010.pt"
    torch.save({"format": "softcon-checkpoint", "version": 1, "student": _resnet18_state()}, whole)
    whole.write_bytes(whole.read_bytes()[:4096])
    with pytest.raises(
        ValueError, match=r"checkpoint .*step_000010\.pt \(4096 bytes\) cannot be read: it is truncated"
    ):
        read_checkpoint(whole)


# ------------------------------------------------------------------------------ training store schema


@pytest.mark.parametrize("version", [0, None], ids=["older", "unversioned"])
def test_a_store_of_an_older_schema_names_the_migration(tmp_path: Path, version: int | None) -> None:
    store = write_store(tmp_path / "store.zarr", n_locations=4, size=8)
    group = zarr.open_group(str(store.path), mode="r+")
    if version is None:
        group.attrs.pop("schema_version")
    else:
        group.attrs["schema_version"] = version
    with pytest.raises(ValueError, match=rf"schema_version {version!r}; this code reads schema_version 1") as caught:
        StoreDataset(store.path)
    assert "re-run `softcon preprocess` to rewrite it" in str(caught.value)
