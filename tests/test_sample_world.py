"""The structured sample world: its generative model (tasks/sample_world.py) and what sample_data writes from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from real_data import REAL

from softcon.tasks.bigearthnet import S2_BANDS, assign_splits, find_patches, read_patch
from softcon.tasks.grid import tiles_for_bbox
from softcon.tasks.labels import map_product, read_raster_tile
from softcon.tasks.sample_data import SampleData, read_truth_classes, write_sample_data
from softcon.tasks.sample_world import (
    BANDS,
    CLASSES,
    MATERIALS,
    Landscape,
    WorldParams,
    draw_atmosphere,
    draw_landscape,
    material_cover,
    render_reflectance,
)
from softcon.tasks.schemes import DYNAMIC_WORLD

REAL_PATCH = REAL / "bigearthnet" / "BigEarthNet-S2-Example" / "S2A_MSIL2A_20170613T101031_87_48"
SMALL_WORLD = WorldParams(eval_blocks=4)
"""The calibrated world with 4 evaluation blocks (64 patches) instead of 48, so that tests stay fast."""
SMALL = {"tiles": 2, "tile_size": 64, "dates": 2, "seed": 1, "world": "structured", "world_params": SMALL_WORLD}


@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("structured"), **SMALL)  # type: ignore[arg-type]


def test_same_seed_gives_same_bytes(structured: SampleData, tmp_path: Path) -> None:
    again = write_sample_data(tmp_path, **SMALL)  # type: ignore[arg-type]
    assert again.dynamic_world is not None and again.bigearthnet is not None
    patch = sorted(p.name for p in again.bigearthnet.iterdir() if p.is_dir())[5]
    files = [
        next((again.root / "s2").iterdir()) / "B04.tif",
        next((again.root / "s1").iterdir()) / "vh.tif",
        again.worldcover,
        again.dynamic_world,
        again.bigearthnet / patch / f"{patch}_B8A.tif",
        again.bigearthnet / patch / f"{patch}_labels_metadata.json",
        again.bigearthnet / "test.csv",
    ]
    for path in files:
        assert path.read_bytes() == (structured.root / path.relative_to(again.root)).read_bytes(), path


def test_dynamic_world_map_is_coarse_and_the_labels_stage_reads_it(structured: SampleData) -> None:
    assert structured.dynamic_world is not None
    with rasterio.open(structured.dynamic_world) as src:
        assert src.crs.to_epsg() == structured.epsg and src.res == (30.0, 30.0)
        assert src.dtypes == ("uint8",) and src.nodata == 255
        labels = src.read(1)
    assert set(np.unique(labels)) <= set(range(9)) and len(np.unique(labels)) >= 4
    for tile in tiles_for_bbox(structured.bbox, resolution=10, tile_size=64):
        warped = read_raster_tile(str(structured.dynamic_world), tile, DYNAMIC_WORLD)
        assert warped is not None and warped.resampling == "nearest" and not warped.nodata.any()
        mapped = map_product(warped, DYNAMIC_WORLD)
        assert not mapped.unknown and set(np.unique(mapped.land_cover)) <= set(range(1, 10))


@dataclass(frozen=True)
class RealLayout:
    """What a real BigEarthNet S2 patch folder holds."""

    suffixes: set[str]
    shapes: dict[str, tuple[int, int]]
    metadata_keys: set[str]


@pytest.fixture(scope="module")
def real_layout() -> RealLayout:
    name = REAL_PATCH.name
    shapes = {}
    for band in S2_BANDS:
        with rasterio.open(REAL_PATCH / f"{name}_{band}.tif") as src:
            shapes[band] = src.shape
    metadata = json.loads((REAL_PATCH / f"{name}_labels_metadata.json").read_text())
    return RealLayout({p.name.removeprefix(name) for p in REAL_PATCH.iterdir()}, shapes, set(metadata))


def test_evaluation_folder_has_the_real_bigearthnet_layout(structured: SampleData, real_layout: RealLayout) -> None:
    assert structured.bigearthnet is not None
    folder = sorted(p for p in structured.bigearthnet.iterdir() if p.is_dir())[0]
    assert {p.name.removeprefix(folder.name) for p in folder.iterdir()} == real_layout.suffixes
    for band in S2_BANDS:
        with rasterio.open(folder / f"{folder.name}_{band}.tif") as src:
            assert src.shape == real_layout.shapes[band] and src.dtypes == ("uint16",)
            assert src.crs.to_epsg() == structured.epsg and src.res[0] in (10, 20, 60)
    metadata = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
    assert set(metadata) == real_layout.metadata_keys
    assert metadata["coordinates"]["lrx"] - metadata["coordinates"]["ulx"] == 1200
    assert "UTM zone 32N" in metadata["projection"]


def test_the_project_reader_takes_the_evaluation_folder(structured: SampleData) -> None:
    assert structured.bigearthnet is not None
    patches = find_patches(structured.bigearthnet, "s2")  # raises on a CORINE name it does not know
    assert len(patches) == 4 * 16
    assert read_patch(patches[0]).shape == (12, 120, 120)
    known = {c.corine for c in CLASSES}
    assert all(set(p.corine_labels) <= known and p.labels.any() for p in patches)
    splits = assign_splits(structured.bigearthnet, [p.name for p in patches])
    assert set(splits) == {"train", "val", "test"}  # from the folder's split lists, by block


def test_evaluation_blocks_keep_their_patches_in_one_split(structured: SampleData) -> None:
    assert structured.bigearthnet is not None
    patches = find_patches(structured.bigearthnet, "s2")
    splits = assign_splits(structured.bigearthnet, [p.name for p in patches])
    block_of = {p.name: tuple(int(v) // 5 for v in p.name.split("_")[-2:]) for p in patches}  # 4 patches + 1 gap
    for block in set(block_of.values()):
        assert len({s for p, s in zip(patches, splits, strict=True) if block_of[p.name] == block}) == 1


def test_truth_classes_of_a_structured_sample_are_its_worldcover_codes(structured: SampleData) -> None:
    tile = tiles_for_bbox(structured.bbox, resolution=10, tile_size=64)[0]
    truth = read_truth_classes(structured, tile)
    assert truth.shape == (64, 64) and set(np.unique(truth)) <= {c.worldcover for c in CLASSES}


@dataclass(frozen=True)
class Observed:
    """A drawn landscape and its rendered scene."""

    landscape: Landscape
    scene: np.ndarray
    """(band, y, x) reflectance x10000 on date 1."""


@pytest.fixture(scope="module")
def observed() -> Observed:
    rng = np.random.default_rng(7)
    params = WorldParams()
    landscape = draw_landscape(rng, (480, 480), params)
    return Observed(landscape, render_reflectance(rng, landscape, 1, draw_atmosphere(rng, params), params))


def _coherence(image: np.ndarray, mask: np.ndarray) -> float:
    """Structure-tensor coherence of ``image`` gradients inside ``mask``: 0 isotropic, 1 one direction."""
    gy, gx = np.gradient(image)
    jxx, jyy, jxy = (gx[mask] ** 2).mean(), (gy[mask] ** 2).mean(), (gx[mask] * gy[mask]).mean()
    return float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy))


def _region_coherences(landscape: Landscape, class_index: int) -> list[float]:
    """Coherence of the green cover in each large region of a class, away from region boundaries."""
    green = material_cover(landscape, 1)[MATERIALS.index("leaf")]
    regions = landscape.regions
    inner = (regions == np.roll(regions, 1, 0)) & (regions == np.roll(regions, -1, 0))
    inner &= (regions == np.roll(regions, 1, 1)) & (regions == np.roll(regions, -1, 1))
    found = []
    for region in np.unique(regions[landscape.classes == class_index]):
        mask = inner & (regions == region)
        if mask.sum() > 1000:
            found.append(_coherence(green, mask))
    return found


def test_cropland_and_grassland_share_spectra_but_not_structure(observed: Observed) -> None:
    classes = observed.landscape.classes
    cropland, grassland = classes == 0, classes == 1
    assert CLASSES[0].key == "arable" and CLASSES[1].key == "pasture" and cropland.any() and grassland.any()
    crop_mean, grass_mean = observed.scene[:, cropland].mean(axis=1), observed.scene[:, grassland].mean(axis=1)
    assert np.abs(crop_mean / grass_mean - 1).max() < 0.05, dict(zip(BANDS, crop_mean / grass_mean, strict=True))
    # Rows give each parcel one gradient direction (per region: row angles differ); grassland's grain has none.
    crop_coherence, grass_coherence = (
        _region_coherences(observed.landscape, 0),
        _region_coherences(observed.landscape, 1),
    )
    assert crop_coherence and grass_coherence
    assert min(crop_coherence) > max(grass_coherence), (crop_coherence, grass_coherence)
    assert np.median(crop_coherence) > 0.5 > 0.1 > np.median(grass_coherence)


def test_painted_default_keeps_its_manifest_and_the_worlds_never_share_files(tmp_path: Path) -> None:
    painted = write_sample_data(tmp_path, tiles=1, tile_size=32, dates=1)
    params = json.loads((tmp_path / "manifest.json").read_text())["params"]
    assert params == {"version": 1, "tiles": 1, "tile_size": 32, "dates": 1, "seed": 0, "resolution": 10.0}
    assert painted.world == "painted" and painted.dynamic_world is None and painted.bigearthnet is None
    structured = write_sample_data(
        tmp_path, tiles=1, tile_size=32, dates=1, world="structured", world_params=WorldParams(eval_blocks=1)
    )
    assert structured.world == "structured" and structured.dynamic_world is not None
    assert write_sample_data(tmp_path, tiles=1, tile_size=32, dates=1) == painted
    assert not (tmp_path / "bigearthnet").exists() and not (tmp_path / "dynamic_world").exists()


def test_unknown_world_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="world must be 'painted' or 'structured'"):
        write_sample_data(tmp_path, world="drawn")  # type: ignore[arg-type]
