"""What the labels stage writes is what preprocess needs: class codes that ``tasks/patches.py`` turns into
fractions over the labelled pixels (summing to 1), multi-hot targets at ``label_threshold``, and patches
with too little labelled area flagged (``labelled`` False)."""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import zarr
from shapely.geometry import box

from softcon.config import LabelsConfig, PreprocessConfig
from softcon.tasks import patches, preprocess
from softcon.tasks.cube_store import read_cube_tiles
from softcon.tasks.ingest import IngestReport
from softcon.tasks.labels import run_labels

PATCH = 16


@pytest.fixture
def half_labelled_cube(data_cube: tuple[Path, IngestReport], tmp_path: Path) -> Path:
    """The sample cube, labelled from polygons: the first tile only on its west half (forest west of its
    centre line, a 3-pixel-wide cropland strip inside it), every other tile fully (grassland)."""
    cube = tmp_path / "cube.zarr"
    shutil.copytree(data_cube[0], cube)
    tiles = read_cube_tiles(str(cube))
    first = tiles[0]
    left, bottom, _, top = first.bounds
    middle = left + first.side / 2
    strip = box(left + 5 * first.resolution, bottom, left + 8 * first.resolution, top)  # cols 5..7
    geometries = [box(left, bottom, middle, top), strip] + [box(*t.bounds) for t in tiles[1:]]
    codes = [10, 40] + [30] * (len(tiles) - 1)
    path = tmp_path / "polygons.gpkg"
    gpd.GeoDataFrame({"code": codes}, geometry=geometries, crs=f"EPSG:{first.epsg}").to_file(path)
    run_labels(LabelsConfig(cube=str(cube), source=str(path), class_field="code"))
    return cube


def test_patches_with_too_little_labelled_area_are_flagged(half_labelled_cube: Path) -> None:
    config = PreprocessConfig(cube=str(half_labelled_cube), patch_size=PATCH, max_cloud_fraction=1.0,
                              max_nodata_fraction=1.0)  # fmt: skip
    index = preprocess.read_cube_index(str(half_labelled_cube))
    summaries = [
        preprocess.summarize_tile(str(half_labelled_cube), tile_id, patch_size=PATCH, stride=None,
                                  class_codes=index.class_codes, max_cloud_fraction=1.0, max_nodata_fraction=1.0)
        for tile_id in index.tiles
    ]  # fmt: skip
    first = summaries[0]
    west = first.windows[:, 1] < 32
    assert (first.labelled_fraction[west] == 1.0).all() and (first.labelled_fraction[~west] == 0.0).all()
    assert all((s.labelled_fraction == 1.0).all() for s in summaries[1:])
    plan, _ = preprocess.build_plan(summaries, config, index.tile_shapes)
    on_first = plan.tile == 0
    east = plan.col >= 32
    assert not plan.labelled[on_first & east].any() and plan.labelled[on_first & ~east].all()
    assert plan.labelled[~on_first].all()
    # Fractions are over the labelled pixels only: they sum to 1 where something is labelled, else all 0.
    sums = plan.fractions.sum(axis=1)
    assert np.allclose(sums[plan.labelled], 1.0) and (sums[on_first & east] == 0).all()


def test_fractions_and_multi_hot_at_the_default_threshold(half_labelled_cube: Path) -> None:
    threshold = PreprocessConfig.model_fields["label_threshold"].default
    assert threshold == 0.05
    index = preprocess.read_cube_index(str(half_labelled_cube))
    land_cover = zarr.open_group(str(half_labelled_cube), mode="r")[f"tiles/{index.tiles[0]}/landcover"][...]
    forest, crops = index.class_codes.index(10), index.class_codes.index(40)
    # Patch at cols 0..15: 3 of 16 columns cropland (18.75 %), 13 forest -> both present.
    fractions, labelled = patches.class_fractions(land_cover[:PATCH, :PATCH], index.class_codes)
    assert labelled == 1.0 and fractions.sum() == pytest.approx(1.0)
    assert fractions[crops] == pytest.approx(3 / 16) and fractions[forest] == pytest.approx(13 / 16)
    assert patches.multi_hot(fractions, threshold).nonzero()[0].tolist() == sorted([forest, crops])
    # A class under the threshold (a 0.8-pixel-column sliver would be 2 % of a patch) is not "present".
    assert patches.multi_hot(np.array([0.98, 0.02]), threshold).tolist() == [1, 0]
