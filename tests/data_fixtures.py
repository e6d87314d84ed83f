"""Session fixtures for the ingest/labels tests: sample data, a local STAC API, an ingested cube.

Registered as a plugin in conftest.py (``pytest_plugins``), so each session fixture has one instance; test
modules request the fixtures by argument name and import only the helpers (``from data_fixtures import
sample_ingest_config``; pytest puts tests/ on sys.path). The fixtures are lazy: a suite that does not ask for
them starts no server and writes no sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from softcon.config import IngestConfig
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData, write_sample_data
from softcon.tasks.stac_server import serve_stac

SAMPLE_TILES, SAMPLE_TILE_SIZE, SAMPLE_DATES = 2, 64, 3


@pytest.fixture(scope="session")
def data_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(
        tmp_path_factory.mktemp("sample"), tiles=SAMPLE_TILES, tile_size=SAMPLE_TILE_SIZE, dates=SAMPLE_DATES
    )


@pytest.fixture(scope="session")
def data_stac_url(data_sample: SampleData) -> Iterator[str]:
    with serve_stac([*data_sample.collection_files, data_sample.items_file]) as url:
        yield url


def widened(bbox: tuple[float, float, float, float], factor: float) -> tuple[float, float, float, float]:
    """The bbox grown by ``factor`` times its width and height on every side (an area the scenes cover little of)."""
    west, south, east, north = bbox
    width, height = east - west, north - south
    return (west - factor * width, south - factor * height, east + factor * width, north + factor * height)


def sample_ingest_config(sample: SampleData, stac: str, cube: Path, **overrides: object) -> IngestConfig:
    """The sample's ingest request; ``n_workers`` 1 (every tile in this process, where a test's patches apply)
    unless overridden."""
    values: dict[str, object] = {
        "stac": stac, "bbox": sample.bbox, "start": sample.start, "end": sample.end,
        "tile_size": SAMPLE_TILE_SIZE, "cube": str(cube), "max_cloud": 100.0, "max_tile_cloud": 0.5, "n_workers": 1,
    }  # fmt: skip
    values.update(overrides)
    return IngestConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def data_cube(
    data_sample: SampleData, data_stac_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, IngestReport]:
    cube = tmp_path_factory.mktemp("cube") / "cube.zarr"
    # The default fan-out (a LocalCluster of 2 workers): the tests that ingest in process compare with this cube.
    report = run_ingest(sample_ingest_config(data_sample, data_stac_url, cube, n_workers=2))
    return cube, report
