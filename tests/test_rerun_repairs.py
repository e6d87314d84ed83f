"""A re-run finishes the job and never accepts damaged output: what preprocess and ingest do with what they find.

Preprocess compares a finished store with the manifest it recorded (``models/training_store.py: find_damage``):
lost or changed image shards are written again, anything else rebuilds the store. Ingest checks the tiles it
will write before it writes (``tasks/ingest.py: check_tiles``): a lost chunk of a day it holds is written again,
any other damage stops it with the problem and the fix. Each repaired output is compared with a clean one
through ``tasks/digest.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from cube_factory import write_cube
from distributed import Client
from s3_fixtures import BUCKET

from softcon.config import IngestConfig, PreprocessConfig
from softcon.models import training_store
from softcon.tasks.check_store import REPAIR_STORE, check_store
from softcon.tasks.cube_store import CubeDamageError, NewSteps, append_steps, open_tile, tile_lock
from softcon.tasks.digest import array_digests
from softcon.tasks.grid import tiles_for_bbox
from softcon.tasks.ingest import run_ingest
from softcon.tasks.preprocess import run_preprocess
from softcon.tasks.sample_data import SampleData, write_sample_data

TILE_SIZE = 64

# --------------------------------------------------------------------------------------------- preprocess


@dataclass(frozen=True)
class CleanStore:
    config: PreprocessConfig
    record: tuple[dict[str, str], dict[str, Any], dict[str, Any]]
    """What a re-run must reproduce: see ``_store_record``."""
    n_blocks: int


def _store_record(store: str) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """Per-array digests, the root attributes and every array's ``zarr.json``: all but the store's own path
    (``params.out``) and its manifest (which holds file sizes of the same bytes, and that path)."""
    attrs = training_store.read_store_attrs(store)
    assert attrs is not None, f"no store at {store}"
    attrs.pop(training_store.MANIFEST_ATTR, None)
    attrs["params"] = {key: value for key, value in attrs["params"].items() if key != "out"}
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    metadata = {name: array.metadata.to_dict() for name, array in group.arrays()}
    return array_digests(store), attrs, metadata


def _shard_files(store: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every image shard file."""
    return {
        str(path.relative_to(store)): (path.stat().st_mtime_ns, path.read_bytes())
        for name in ("s2", "s1")
        for path in (store / name / "c").rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory, client: Client) -> CleanStore:
    folder = tmp_path_factory.mktemp("clean-store")
    cube = write_cube(folder / "cube.zarr", n_tiles=2, size=TILE_SIZE, n_dates=3)
    config = PreprocessConfig(
        cube=cube.path, out=str(folder / "store.zarr"), patch_size=16, split_block=32, val_fraction=0.2,
        test_fraction=0.2, max_nodata_fraction=0.5, samples_per_block=8,
    )  # fmt: skip
    report = run_preprocess(config, client=client)
    return CleanStore(config, _store_record(config.out), report.blocks_written)


@pytest.fixture
def store(clean_store: CleanStore, tmp_path: Path) -> PreprocessConfig:
    """The configuration of a copy of the clean store, to damage."""
    shutil.copytree(clean_store.config.out, tmp_path / "store.zarr")
    return clean_store.config.model_copy(update={"out": str(tmp_path / "store.zarr")})


def test_a_finished_store_records_a_manifest_that_it_matches(clean_store: CleanStore) -> None:
    attrs = training_store.read_store_attrs(clean_store.config.out)
    assert attrs is not None and attrs["complete"] is True
    manifest = attrs[training_store.MANIFEST_ATTR]
    assert len(manifest["files"]["s2"]) == clean_store.n_blocks and all(manifest["files"]["s2"])
    assert set(manifest["metadata"]) == {"", "s2", "s1", *training_store.PLAN_DTYPES}
    assert "norm_stats" in manifest["attributes"] and training_store.MANIFEST_ATTR not in manifest["attributes"]
    assert training_store.find_damage(clean_store.config.out, attrs) == training_store.StoreDamage()


@pytest.mark.parametrize("damage", ["s2-deleted", "s1-deleted", "s2-truncated"])
def test_a_lost_or_changed_image_shard_is_written_again_and_nothing_else(
    damage: str, store: PreprocessConfig, clean_store: CleanStore, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    out = Path(store.out)
    name = damage.split("-")[0]
    # Not the first block, and one with an S1 shard (a block whose samples all lack S1 has none).
    block = next(block for block in range(1, clean_store.n_blocks) if (out / name / "c" / str(block)).is_dir())
    shard = out / name / "c" / str(block) / "0" / "0" / "0"
    if damage.endswith("deleted"):
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    others = {key: value for key, value in _shard_files(out).items() if f"/c/{block}/" not in key}

    with caplog.at_level(logging.WARNING, logger="softcon.tasks.preprocess"):
        report = run_preprocess(store, client=client)

    change = "missing" if damage.endswith("deleted") else "changed"
    assert f"{name}: the shard of block {block} is {change}" in report.damage
    assert f"the shard of block {block} is {change}" in caplog.text and f"writing blocks [{block}] again" in caplog.text
    assert not report.reused and report.blocks_written == 1
    assert {key: value for key, value in _shard_files(out).items() if key in others} == others  # not rewritten
    assert _store_record(store.out) == clean_store.record
    assert check_store(store.out).ok


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        ("norm-stats", "attribute norm_stats changed"),
        ("class-names", "attribute class_names changed"),
        ("array-metadata", "metadata labels/zarr.json changed"),
        ("plan-chunk-lost", "labels: the chunk of block 1 is missing"),
        ("no-manifest", "marked complete without a manifest"),
    ],
)
def test_changed_metadata_attributes_or_tables_rebuild_the_store(
    damage: str, found: str, store: PreprocessConfig, clean_store: CleanStore, client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    out = Path(store.out)
    group = zarr.open_group(store.out, mode="r+")
    if damage == "norm-stats":
        stats = group.attrs["norm_stats"]
        stats["s2"]["mean"][0] += 100.0
        group.attrs["norm_stats"] = stats
    elif damage == "class-names":
        group.attrs["class_names"] = list(reversed(group.attrs["class_names"]))
    elif damage == "array-metadata":
        metadata = json.loads((out / "labels" / "zarr.json").read_text())
        metadata["attributes"]["long_name"] = "edited by hand"
        (out / "labels" / "zarr.json").write_text(json.dumps(metadata))
    elif damage == "plan-chunk-lost":
        (out / "labels" / "c" / "1" / "0").unlink()
    else:
        del group.attrs[training_store.MANIFEST_ATTR]

    with caplog.at_level(logging.WARNING, logger="softcon.tasks.preprocess"):
        report = run_preprocess(store, client=client)

    assert found in report.damage and found in caplog.text and "rebuilding it from the cube" in caplog.text
    assert not report.reused and report.blocks_written == clean_store.n_blocks
    assert _store_record(store.out) == clean_store.record
    assert check_store(store.out).ok


def test_a_done_block_whose_shard_is_lost_before_the_store_is_finished_is_written_again(
    store: PreprocessConfig, clean_store: CleanStore, client: Client
) -> None:
    # A run killed after every block was done, then a shard lost: the store is not complete, there is no manifest.
    group = zarr.open_group(store.out, mode="r+")
    attrs = dict(group.attrs)
    attrs.update({"complete": False, "norm_stats": None})
    del attrs[training_store.MANIFEST_ATTR]
    group.attrs.put(attrs)
    (Path(store.out) / "s2" / "c" / "2" / "0" / "0" / "0").unlink()

    report = run_preprocess(store, client=client)

    assert report.blocks_written == 1 and "s2: the shard of block 2 is missing" in report.damage
    assert _store_record(store.out) == clean_store.record


def test_check_store_names_a_store_that_differs_from_its_manifest(store: PreprocessConfig) -> None:
    zarr.open_group(store.out, mode="r+").attrs["class_names"] = ["a", "b", "c", "d"]
    (problem,) = check_store(store.out).problems
    assert problem.what == "differs from the manifest written when it was finished: attribute class_names changed"
    assert problem.fix == REPAIR_STORE


@pytest.mark.parametrize("holding", ["other-files", "a-cube"])
def test_an_out_that_holds_something_else_is_refused_and_left_alone(
    holding: str, clean_store: CleanStore, client: Client, tmp_path: Path
) -> None:
    if holding == "other-files":
        out = tmp_path / "results"
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
        other = "['notes.txt']"
    else:  # --out given the cube's path
        out = tmp_path / "cube.zarr"
        shutil.copytree(clean_store.config.cube, out)
        other = "['tiles']"
    before = sorted(str(path) for path in out.rglob("*"))
    config = clean_store.config.model_copy(update={"out": str(out)})
    if holding == "a-cube":
        config = config.model_copy(update={"cube": str(out)})

    with pytest.raises(ValueError, match=rf"holds \{other}, which are not part of a training store"):
        run_preprocess(config, client=client)

    assert sorted(str(path) for path in out.rglob("*")) == before


@pytest.mark.slow
def test_a_store_on_object_storage_is_checked_and_repaired_the_same_way(
    s3_env: object, clean_store: CleanStore, client: Client, tmp_path: Path
) -> None:
    import s3fs

    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    config = clean_store.config.model_copy(update={"out": url})
    run_preprocess(config, client=client)
    assert run_preprocess(config, client=client).reused  # it matches its manifest
    s3fs.S3FileSystem().rm(f"{BUCKET}/{tmp_path.name}/store.zarr/s2/c/3/0/0/0")

    repaired = run_preprocess(config, client=client)
    assert repaired.blocks_written == 1 and "s2: the shard of block 3 is missing" in repaired.damage
    assert _store_record(url) == clean_store.record

    zarr.open_group(url, mode="r+").attrs["class_names"] = ["a", "b", "c", "d"]
    rebuilt = run_preprocess(config, client=client)
    assert "attribute class_names changed" in rebuilt.damage and rebuilt.blocks_written == clean_store.n_blocks
    assert _store_record(url) == clean_store.record


# ------------------------------------------------------------------------------------------------ ingest


@dataclass(frozen=True)
class CleanCube:
    config: IngestConfig
    record: tuple[dict[str, str], dict[str, Any]]
    tile_id: str
    """A tile with two S2 steps."""


def _cube_record(cube: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Per-array digests (time steps keyed by time) and each tile's attributes."""
    tiles = zarr.open_group(str(cube), path="tiles", mode="r")
    return array_digests(cube), {tile: dict(tiles[tile].attrs) for tile in sorted(tiles.group_keys())}


def _files(cube: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the cube but its locks."""
    return {
        str(path.relative_to(cube)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in cube.rglob("*")
        if path.is_file() and ".ingest-locks" not in path.parts
    }


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("sample"), tiles=2, tile_size=TILE_SIZE, dates=3)


def _ingest_config(sample: SampleData, cube: Path, **changes: Any) -> IngestConfig:
    values = dict(
        stac=str(sample.items_file), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=TILE_SIZE,
        cube=str(cube), max_cloud=100.0, max_tile_cloud=0.5, retry_delay=0.0,
    )  # fmt: skip
    return IngestConfig(**(values | changes))


@pytest.fixture(scope="module")
def clean_cube(sample: SampleData, tmp_path_factory: pytest.TempPathFactory) -> CleanCube:
    config = _ingest_config(sample, tmp_path_factory.mktemp("clean-cube") / "cube.zarr")
    report = run_ingest(config)
    tiles = zarr.open_group(config.cube, path="tiles", mode="r")
    tile_id = next(tile for tile in report.tiles if tiles[tile]["time"].shape[0] == 2)
    return CleanCube(config, _cube_record(config.cube), tile_id)


@pytest.fixture
def cube(clean_cube: CleanCube, tmp_path: Path) -> IngestConfig:
    """The configuration of a copy of the clean cube, to damage."""
    shutil.copytree(clean_cube.config.cube, tmp_path / "cube.zarr")
    return clean_cube.config.model_copy(update={"cube": str(tmp_path / "cube.zarr")})


@pytest.mark.parametrize(("array", "step"), [("s2", 1), ("scl", 0), ("s1", 2)])
def test_a_lost_chunk_file_of_a_recorded_day_is_written_again(
    array: str, step: int, cube: IngestConfig, clean_cube: CleanCube, caplog: pytest.LogCaptureFixture
) -> None:
    chunk = Path(cube.cube) / "tiles" / clean_cube.tile_id / array / "c" / str(step) / "0" / "0"
    (chunk / "0" if array != "scl" else chunk).unlink()
    (problem,) = check_store(cube.cube).problems
    assert problem.path == f"tiles/{clean_cube.tile_id}/{array}" and problem.steps == (step,)

    with caplog.at_level(logging.WARNING, logger="softcon.tasks.ingest"):
        report = run_ingest(cube)

    assert report.tile_dates_repaired == 1 and report.tile_dates_written == 0
    assert f"tile {clean_cube.tile_id}: wrote 1 lost step(s) again" in caplog.text
    assert _cube_record(cube.cube) == clean_cube.record
    assert check_store(cube.cube).ok


def test_a_lost_chunk_of_a_day_outside_the_run_stops_it_before_any_write(
    sample: SampleData, clean_cube: CleanCube, tmp_path: Path
) -> None:
    first, second, _ = sample.s2_dates
    cube = tmp_path / "cube.zarr"
    run_ingest(_ingest_config(sample, cube, end=second))
    (cube / "tiles" / clean_cube.tile_id / "s2" / "c" / "0" / "0" / "0" / "0").unlink()  # the first date's step
    before = _files(cube)
    later = _ingest_config(sample, cube, start=second + timedelta(days=1))

    with pytest.raises(CubeDamageError) as raised:
        run_ingest(later)

    message = str(raised.value)
    assert f"tiles/{clean_cube.tile_id}/s2: the chunk file(s) of step 0 ({first}) are missing" in message
    assert "nothing written" in message and f"--start {first} --end {first}" in message
    assert _files(cube) == before
    # What the message says fixes it: that day again, then the run goes through.
    assert run_ingest(_ingest_config(sample, cube, start=first, end=first)).tile_dates_repaired == 1
    assert run_ingest(later).tile_dates_written > 0
    assert _cube_record(cube) == clean_cube.record


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        ("time-chunk-lost", "/time: 1 chunk file(s) missing (c/0)"),
        ("x-chunk-lost", "/x: 1 chunk file(s) missing (c/0)"),
        ("item-ids-lost", "s2_items names 1 days but time has 2 steps"),
        ("s2-shorter-than-time", "/s2: 1 steps but time has 2"),
    ],
)
def test_damage_no_rerun_can_repair_stops_the_run_before_any_write(
    damage: str, found: str, cube: IngestConfig, clean_cube: CleanCube
) -> None:
    tile = Path(cube.cube) / "tiles" / clean_cube.tile_id
    group = zarr.open_group(str(tile), mode="r+")
    if damage == "time-chunk-lost":
        (tile / "time" / "c" / "0").unlink()
    elif damage == "x-chunk-lost":
        (tile / "x" / "c" / "0").unlink()
    elif damage == "item-ids-lost":
        group.attrs["s2_items"] = dict(list(group.attrs["s2_items"].items())[:1])
    else:
        group["s2"].resize((1, *group["s2"].shape[1:]))
    before = _files(Path(cube.cube))

    with pytest.raises(CubeDamageError) as raised:
        run_ingest(cube)

    assert found in str(raised.value) and f"delete the tile group tiles/{clean_cube.tile_id}" in str(raised.value)
    assert _files(Path(cube.cube)) == before


def test_every_committed_step_has_its_chunk_files_even_when_all_fill_values(sample: SampleData, tmp_path: Path) -> None:
    cube = str(tmp_path / "cube.zarr")
    tile = tiles_for_bbox(sample.bbox, resolution=10.0, tile_size=TILE_SIZE)[0]
    bands = _ingest_config(sample, tmp_path).bands
    shape = (TILE_SIZE, TILE_SIZE)
    s2 = np.ones((len(bands), *shape), np.uint16)
    with tile_lock(cube, tile.tile_id):
        opened = open_tile(cube, tile, bands)
        append_steps(opened, [
            NewSteps("time", {"s2": [s2], "scl": [np.zeros(shape, np.uint8)]}, [datetime(2024, 6, 1, 10)],
                     {"2024-06-01": ["s2-item"]}),
            NewSteps("time_s1", {"s1": [np.full((2, *shape), np.nan, np.float32)]}, [datetime(2024, 6, 2, 5)],
                     {"2024-06-02": ["s1-item"]}),
        ])  # fmt: skip
    folder = Path(cube) / "tiles" / tile.tile_id
    assert (folder / "scl" / "c" / "0" / "0" / "0").is_file()  # all SCL 0: a file all the same
    assert (folder / "s1" / "c" / "0" / "0" / "0" / "0").is_file()  # all NaN
    assert check_store(cube).ok
