from __future__ import annotations

import pytest

from softcon.tasks.grid import tile_from_id, tiles_for_bbox, utm_epsg


def test_utm_zone_north_and_south() -> None:
    assert utm_epsg(11.0, 46.5) == 32632
    assert utm_epsg(-62.0, -60.4) == 32720


def test_tile_ids_are_stable_across_overlapping_bboxes() -> None:
    small = tiles_for_bbox((11.0, 46.5, 11.001, 46.501), resolution=10, tile_size=256)
    large = tiles_for_bbox((10.98, 46.48, 11.02, 46.52), resolution=10, tile_size=256)
    assert {t.tile_id for t in small} <= {t.tile_id for t in large}


def test_tiles_are_aligned_to_their_side() -> None:
    for tile in tiles_for_bbox((10.98, 46.48, 11.02, 46.52), resolution=10, tile_size=256):
        assert tile.x0 % 2560 == 0 and tile.y0 % 2560 == 0
        assert tile.epsg == 32632
        assert tile.tile_id == f"32632_{int(tile.x0):07d}_{int(tile.y0):07d}"
        assert tile.geobox.shape == (256, 256)
        assert tile.geobox.resolution.x == 10 and tile.geobox.resolution.y == -10
        assert tile.geobox.crs.epsg == 32632


def test_tile_from_id_round_trips() -> None:
    tile = tiles_for_bbox((11.0, 46.5, 11.001, 46.501), resolution=10, tile_size=64)[0]
    assert tile_from_id(tile.tile_id, resolution=10, size=64) == tile


def test_bad_bbox_is_refused() -> None:
    with pytest.raises(ValueError, match="west < east"):
        tiles_for_bbox((11.0, 46.5, 10.0, 46.6), resolution=10, tile_size=64)
