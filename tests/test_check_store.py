"""``check_store`` / ``softcon check-store``: clean stores pass; deliberately damaged copies fail, naming the fix."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr
from cube_factory import write_cube
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import IngestConfig, PreprocessConfig
from softcon.tasks.check_store import INGEST_AGAIN, PREPROCESS_AGAIN, StoreCheck, check_store
from softcon.tasks.ingest import run_ingest
from softcon.tasks.sample_data import SampleData, write_sample_data

TILE_SIZE = 64


@dataclass(frozen=True)
class Cube:
    path: Path
    config: IngestConfig
    tile_id: str
    """A tile with at least two S2 steps."""


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("sample"), tiles=2, tile_size=TILE_SIZE, dates=3)


@pytest.fixture(scope="module")
def clean_cube(sample: SampleData, tmp_path_factory: pytest.TempPathFactory) -> Cube:
    path = tmp_path_factory.mktemp("cube") / "cube.zarr"
    config = IngestConfig(
        stac=str(sample.items_file), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=TILE_SIZE,
        cube=str(path), max_cloud=100.0, max_tile_cloud=0.5, retry_delay=0.0,
    )  # fmt: skip
    report = run_ingest(config)
    tiles = zarr.open_group(str(path), mode="r")["tiles"]
    tile_id = next(t for t in report.tiles if tiles[t]["time"].shape[0] >= 2)
    return Cube(path, config, tile_id)


@pytest.fixture
def cube(clean_cube: Cube, tmp_path: Path) -> Cube:
    """A copy of the clean cube to damage."""
    path = tmp_path / "cube.zarr"
    shutil.copytree(clean_cube.path, path)
    return Cube(path, clean_cube.config.model_copy(update={"cube": str(path)}), clean_cube.tile_id)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distributed import Client

    from softcon.tasks.preprocess import run_preprocess

    folder = tmp_path_factory.mktemp("store")
    synthetic = write_cube(folder / "cube.zarr")
    config = PreprocessConfig(
        cube=synthetic.path, out=str(folder / "store.zarr"), patch_size=16, split_block=32, val_fraction=0.2,
        test_fraction=0.2, max_nodata_fraction=0.5,
    )  # fmt: skip
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client:
        run_preprocess(config, client=client, samples_per_block=8)
    return Path(config.out)


@pytest.fixture
def store(clean_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store.zarr"
    shutil.copytree(clean_store, path)
    return path


def _problems(result: StoreCheck) -> list[str]:
    return [f"{p.path}: {p.what} -> {p.fix}" for p in result.problems]


def test_clean_cube_passes_with_a_row_per_tile(clean_cube: Cube) -> None:
    result = check_store(str(clean_cube.path))
    assert result.kind == "cube" and result.ok, _problems(result)
    rows = {row["tile"]: row for row in result.summary}
    assert int(rows[clean_cube.tile_id]["S2 steps"]) >= 2 and rows[clean_cube.tile_id]["S1 steps"] == "3"


def test_truncated_time_coordinate_is_reported_and_a_rerun_of_ingest_fixes_it(cube: Cube) -> None:
    tile = zarr.open_group(str(cube.path), path=f"tiles/{cube.tile_id}", mode="r+")
    steps = tile["time"].shape[0]
    tile["time"].resize((steps - 1,))
    result = check_store(str(cube.path))
    assert not result.ok
    where = {p.path: p for p in result.problems}
    prefix = f"tiles/{cube.tile_id}"
    assert f"{steps} steps but time has {steps - 1}" in where[f"{prefix}/s2"].what
    assert where[f"{prefix}/s2"].fix == INGEST_AGAIN
    attrs = [p.what for p in result.problems if p.path == f"{prefix} attrs"]
    assert f"s2_items names {steps} days but time has {steps - 1} steps" in attrs

    run_ingest(cube.config)  # what the fix says: truncates the hidden step, then ingests its day again
    assert check_store(str(cube.path)).ok


def test_deleted_chunk_is_reported(cube: Cube) -> None:
    chunk = cube.path / "tiles" / cube.tile_id / "s2" / "c" / "1" / "0" / "0" / "0"
    chunk.unlink()
    (problem,) = check_store(str(cube.path)).problems
    assert problem.path == f"tiles/{cube.tile_id}/s2"
    assert "1 chunk file(s) missing (c/1/0/0/0)" in problem.what
    assert f"delete the tile group tiles/{cube.tile_id}" in problem.fix


def test_duplicate_time_step_is_reported(cube: Cube) -> None:
    tile = zarr.open_group(str(cube.path), path=f"tiles/{cube.tile_id}", mode="r+")
    steps = tile["time"].shape[0]
    for name in ("s2", "scl", "time"):  # the first step appended again, as a double append would
        array = tile[name]
        first = array[0]
        array.resize((steps + 1, *array.shape[1:]))
        array[steps] = first
    problems = check_store(str(cube.path)).problems
    duplicate = [p for p in problems if p.path == f"tiles/{cube.tile_id}/time"]
    assert duplicate and "stored more than once" in duplicate[0].what


def test_corrupt_chunk_is_unreadable(cube: Cube) -> None:
    chunk = cube.path / "tiles" / cube.tile_id / "scl" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    (problem,) = check_store(str(cube.path)).problems
    assert problem.path == f"tiles/{cube.tile_id}/scl" and problem.what.startswith("unreadable chunk (steps 0..0")


def test_clean_training_store_passes(clean_store: Path) -> None:
    result = check_store(str(clean_store))
    assert result.kind == "training store" and result.ok, _problems(result)
    (row,) = result.summary
    assert row["complete"] == "true" and row["blocks done"].split("/")[0] == row["blocks done"].split("/")[1]
    assert int(row["train"]) + int(row["val"]) + int(row["test"]) == int(row["samples"])


def test_interrupted_store_says_to_resume(store: Path) -> None:
    group = zarr.open_group(str(store), mode="r+")
    group.attrs.update({"complete": False, "blocks_done": [0, 1]})
    (problem,) = check_store(str(store)).problems
    assert "not complete (2 of" in problem.what and problem.fix == PREPROCESS_AGAIN


@pytest.mark.parametrize(
    ("damage", "where", "what"),
    [
        ("labels", "labels", "values [2] (multi-hot is 0 or 1)"),
        ("split", "split", "values [7] name no split"),
        ("shard", "s2", "image shard(s) of done block(s) [1] missing"),
        ("short", "fractions", "samples, s2 has"),
        ("schema", "", "schema_version 0; this code reads 1"),
    ],
    ids=["labels-not-multi-hot", "unknown-split", "deleted-shard", "short-array", "old-schema"],
)
def test_damaged_training_store_is_reported(store: Path, damage: str, where: str, what: str) -> None:
    group = zarr.open_group(str(store), mode="r+")
    if damage == "labels":
        labels = group["labels"][:]
        labels[3, 0] = 2
        group["labels"][:] = labels
    elif damage == "split":
        group["split"][5] = 7
    elif damage == "shard":
        shutil.rmtree(store / "s2" / "c" / "1")
    elif damage == "short":
        group["fractions"].resize((group["fractions"].shape[0] - 1, group["fractions"].shape[1]))
    else:
        group.attrs["schema_version"] = 0
    problems = check_store(str(store)).problems
    assert any(p.path == where and what in p.what for p in problems), problems


def test_not_a_store(tmp_path: Path) -> None:
    (problem,) = check_store(str(tmp_path / "nothing.zarr")).problems
    assert "no Zarr group" in problem.what
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    assert check_store(str(tmp_path / "empty.zarr")).kind == "unknown"


def test_cli_exit_codes_and_messages(clean_cube: Cube, cube: Cube) -> None:
    runner = CliRunner()
    clean = runner.invoke(app, ["check-store", str(clean_cube.path)])
    assert clean.exit_code == 0, clean.output
    assert "follows the contract" in clean.output and clean_cube.tile_id in clean.output
    (cube.path / "tiles" / cube.tile_id / "s2" / "c" / "0" / "0" / "0" / "0").unlink()
    damaged = runner.invoke(app, ["check-store", str(cube.path)])
    assert damaged.exit_code == 1
    text = " ".join(damaged.output.split())
    assert "1 problem(s)" in text and "chunk file(s) missing" in text and "re-run `softcon ingest`" in text
