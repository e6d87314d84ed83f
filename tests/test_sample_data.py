from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from data_fixtures import SAMPLE_TILE_SIZE

from softcon.tasks.grid import tiles_for_bbox
from softcon.tasks.sample_data import SampleData, write_sample_data


def _read(path: str | Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_same_seed_gives_same_bytes(tmp_path: Path) -> None:
    first = write_sample_data(tmp_path / "a", tiles=1, tile_size=32, dates=2, seed=3)
    second = write_sample_data(tmp_path / "b", tiles=1, tile_size=32, dates=2, seed=3)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*.tif"))
    assert files
    for rel in files:
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes(), rel


def test_rerun_reuses_files(tmp_path: Path) -> None:
    sample = write_sample_data(tmp_path, tiles=1, tile_size=32, dates=1)
    mtime = sample.items_file.stat().st_mtime_ns
    assert write_sample_data(tmp_path, tiles=1, tile_size=32, dates=1) == sample
    assert sample.items_file.stat().st_mtime_ns == mtime


def test_bbox_maps_to_exactly_the_sample_tiles(data_sample: SampleData) -> None:
    tiles = tiles_for_bbox(data_sample.bbox, resolution=10, tile_size=SAMPLE_TILE_SIZE)
    assert [t.tile_id for t in tiles] == data_sample.tile_ids
    assert data_sample.epsg == 32632


def test_items_look_like_earth_search_and_planetary_computer(data_sample: SampleData) -> None:
    items = json.loads(data_sample.items_file.read_text())["features"]
    s2 = next(i for i in items if i["collection"] == "sentinel-2-l2a")
    assert {"coastal", "blue", "red", "nir", "nir08", "swir22", "scl"} <= set(s2["assets"])
    assert s2["assets"]["red"]["eo:bands"][0]["name"] == "B04"
    assert s2["assets"]["rededge1"]["proj:shape"] == [SAMPLE_TILE_SIZE // 2, 2 * SAMPLE_TILE_SIZE // 2]
    s1 = next(i for i in items if i["collection"] == "sentinel-1-rtc")
    assert set(s1["assets"]) == {"vv", "vh"} and s1["properties"]["sar:polarizations"] == ["VV", "VH"]
    assert any(i["collection"] == "esa-worldcover" and "map" in i["assets"] for i in items)


def test_spectra_are_plausible(data_sample: SampleData) -> None:
    from softcon.tasks.sample_data import read_truth_classes  # the generator's own class map

    tile = tiles_for_bbox(data_sample.bbox, resolution=10, tile_size=SAMPLE_TILE_SIZE)[0]
    item_dir = data_sample.root / "s2" / f"S2B_32TPS_{data_sample.s2_dates[0]:%Y%m%d}_0_L2A"
    scl = np.repeat(np.repeat(_read(item_dir / "SCL.tif"), 2, 0), 2, 1)
    red = _read(item_dir / "B04.tif").astype(float) - 1000  # baseline 05.11 offset
    nir = _read(item_dir / "B08.tif").astype(float) - 1000
    classes = np.concatenate(
        [read_truth_classes(data_sample, t) for t in tiles_for_bbox(data_sample.bbox, resolution=10, tile_size=64)],
        axis=1,
    )
    assert classes.shape == red.shape and tile.size == 64
    clear = np.isin(scl[: red.shape[0], : red.shape[1]], (4, 5, 6, 11))
    ndvi = (nir - red) / (nir + red)
    tree, water = clear & (classes == 10), clear & (classes == 80)
    assert tree.any() and water.any()
    assert ndvi[tree].mean() > 0.6 > ndvi[water].mean()
    assert np.median(nir[water]) < 500


def test_cloud_amount_varies_by_date(data_sample: SampleData) -> None:
    assert data_sample.cloud_fractions[0] < 0.1
    assert data_sample.cloud_fractions[1] > 0.6
