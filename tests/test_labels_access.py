"""Labels access options: a STAC source reached with the same headers, retries and signing as ingest's.

Everything is offline: the STAC API is a local server behind a loopback proxy that wants a header, and a
flaky proxy in front of both (and of the land-cover COG) that fails a seeded share of requests with 503.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import odc.stac
import pytest
import rasterio
import zarr
from fault_proxy import flaky_proxy
from header_proxy import serve_header_proxy

from softcon.config import LabelsConfig
from softcon.tasks.ingest import IngestReport
from softcon.tasks.labels import run_labels
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_access import StacAccess
from softcon.tasks.stac_server import serve_stac

TOKEN = "Bearer s3cret-token"


def _land_cover(cube: Path) -> dict[str, np.ndarray]:
    tiles = zarr.open_group(str(cube), path="tiles", mode="r")
    return {tile_id: tiles[tile_id]["landcover"][:] for tile_id in sorted(tiles.group_keys())}


@pytest.fixture
def labels_cube(data_cube: tuple[Path, IngestReport], tmp_path: Path) -> Path:
    cube = tmp_path / "cube.zarr"
    shutil.copytree(data_cube[0], cube)
    return cube


def test_labels_stac_requests_carry_the_configured_header_and_are_retried(
    labels_cube: Path, data_sample: SampleData, data_stac_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference.zarr"
    shutil.copytree(labels_cube, reference)
    run_labels(LabelsConfig(cube=str(reference), source=data_stac_url))

    monkeypatch.setenv("SOFTCON_TEST_STAC_TOKEN", TOKEN)
    gdal_headers: list[str | None] = []
    real_load = odc.stac.load

    def loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        gdal_headers.append(rasterio.env.getenv().get("GDAL_HTTP_HEADERS"))  # what GDAL sends on HTTP reads
        return real_load(*args, **kwargs)

    monkeypatch.setattr(odc.stac, "load", loading)
    with flaky_proxy(data_sample.root, failure_rate=0.5, seed=0) as proxy:
        # The same Items with the land-cover COG served over HTTP by the flaky proxy: GDAL's reads go through it.
        items = tmp_path / "items.json"
        items.write_text(data_sample.items_file.read_text().replace(str(data_sample.root), proxy.files_url))
        with serve_stac([*data_sample.collection_files, items]) as api, serve_header_proxy(api) as guard:
            guard.expected = TOKEN
            proxy.upstream = guard.root
            report = run_labels(
                LabelsConfig(cube=str(labels_cube), source=proxy.url, retry_delay=0.05,
                             headers={"Authorization": "SOFTCON_TEST_STAC_TOKEN"})
            )  # fmt: skip

    assert report.tiles == data_sample.tile_ids
    assert proxy.stats.failed["api"] >= 1 and proxy.stats.failed["files"] >= 1, proxy.stats
    assert any("/search" in path for _, path, _ in guard.seen)
    assert {header for _, _, header in guard.seen} == {TOKEN}
    assert gdal_headers and set(gdal_headers) == {f"Authorization: {TOKEN}"}
    got, want = _land_cover(labels_cube), _land_cover(reference)
    assert got.keys() == want.keys()
    for tile_id, land_cover in want.items():
        np.testing.assert_array_equal(got[tile_id], land_cover, err_msg=tile_id)


def test_labels_unset_header_variable_fails_before_any_request(
    labels_cube: Path, data_stac_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOFTCON_TEST_UNSET_TOKEN", raising=False)
    with serve_header_proxy(data_stac_url) as guard:
        headers = {"X-Api-Key": "SOFTCON_TEST_UNSET_TOKEN"}
        config = LabelsConfig(cube=str(labels_cube), source=guard.root, headers=headers)
        with pytest.raises(ValueError, match=r"X-Api-Key \(from \$SOFTCON_TEST_UNSET_TOKEN\).*export"):
            run_labels(config)
    assert guard.seen == []


def test_labels_sign_option_selects_planetary_computer_signing(tmp_path: Path) -> None:
    def access(source: str, sign: str) -> StacAccess:
        return StacAccess.from_config(LabelsConfig(cube=str(tmp_path / "c.zarr"), source=source, sign=sign))

    pc = "https://planetarycomputer.microsoft.com/api/stac/v1"
    assert access(pc, "auto").patch_url is not None
    assert access(pc, "none").patch_url is None
    assert access("https://earth-search.aws.element84.com/v1", "auto").patch_url is None
    assert access(str(tmp_path / "items.json"), "planetary-computer").patch_url is not None
