"""Reproducing a stage: params back to a config, content digests, and a re-run compared with the original."""

from __future__ import annotations

import copy
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from data_fixtures import widened
from store_factory import write_store

from softcon.config import IngestConfig, TrainConfig
from softcon.flows.reproduce import config_from_params
from softcon.flows.tracking import flatten_params
from softcon.tasks.digest import array_digests, compare_digests, state_dict_digests, store_digest
from softcon.tasks.sample_data import write_sample_data


@pytest.mark.parametrize(
    "config",
    [
        IngestConfig(
            stac="http://127.0.0.1:7822",
            bbox=(11.0, 46.4, 11.1, 46.5),
            start=date(2024, 6, 1),
            end=date(2024, 6, 30),
            bands=["B04", "B08"],
            max_cloud=35.5,
            cube="/data/cube.zarr",
        ),
        TrainConfig(store="/data/store.zarr", weights=None, lambda_soft=0.0, steps=7, crop_size=None, seed=3),
    ],
    ids=["ingest", "train"],
)
def test_config_from_params_undoes_flatten_params(config: IngestConfig | TrainConfig) -> None:
    stage = "ingest" if isinstance(config, IngestConfig) else "train"
    assert config_from_params(stage, flatten_params(config)) == config


def test_config_from_params_refuses_a_run_that_is_not_a_stage() -> None:
    with pytest.raises(ValueError, match="cannot reproduce a 'pipeline' run; reproducible stages: ingest"):
        config_from_params("pipeline", {})


def _write_tile(path: Path, times: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    steps = pd.to_datetime(times).values
    values = {t: rng.integers(0, 10_000, (2, 4, 4), dtype=np.uint16) for t in sorted(times)}
    ds = xr.Dataset(
        {"s2": (("time", "band", "y", "x"), np.stack([values[t] for t in times]))},
        coords={"time": steps, "band": ["B04", "B08"]},
    )
    ds.to_zarr(str(path), group="tiles/t0", mode="w", zarr_format=3, consolidated=False)


def test_array_digests_key_time_steps_by_time_so_write_order_does_not_matter(tmp_path: Path) -> None:
    _write_tile(tmp_path / "a.zarr", ["2024-06-01", "2024-06-11"])
    _write_tile(tmp_path / "b.zarr", ["2024-06-11", "2024-06-01"])  # a backfill appends earlier dates last
    a, b = array_digests(tmp_path / "a.zarr"), array_digests(tmp_path / "b.zarr")
    assert len([key for key in a if key.startswith("tiles/t0/s2@")]) == 2
    assert a == b and store_digest(tmp_path / "a.zarr") == store_digest(tmp_path / "b.zarr")

    group = zarr.open_group(str(tmp_path / "b.zarr"), path="tiles/t0", mode="a")
    group["s2"][0, 0, 0, 0] = int(group["s2"][0, 0, 0, 0]) + 1  # one value of one date changes
    changed = compare_digests(array_digests(tmp_path / "b.zarr"), a)
    assert len(changed) == 1 and changed[0].startswith("tiles/t0/s2@")


def test_compare_digests_subset_allows_an_original_that_gained_dates() -> None:
    original = {"s2@1": "x", "s2@2": "y"}
    assert compare_digests({"s2@1": "x"}, original, subset=True) == []
    assert compare_digests({"s2@1": "x"}, original) == ["s2@2 (missing)"]
    assert compare_digests({"s2@1": "z"}, original, subset=True) == ["s2@1"]


def test_array_digests_names_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Zarr store at"):
        array_digests(tmp_path / "nothing.zarr")


def test_state_dict_digests_see_one_changed_weight(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    state = {"student": copy.deepcopy(model.state_dict()), "teacher": copy.deepcopy(model.state_dict())}
    torch.save(state, tmp_path / "a.pt")
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    torch.save({"student": model.state_dict(), "teacher": state["teacher"]}, tmp_path / "b.pt")
    a, b = state_dict_digests(tmp_path / "a.pt"), state_dict_digests(tmp_path / "b.pt")
    assert sorted(a) == ["student.bias", "student.weight", "teacher.bias", "teacher.weight"]
    assert compare_digests(b, a) == ["student.weight"]


@pytest.mark.slow
def test_reproduce_ingest_gives_the_same_bytes_and_notices_a_changed_cube(tmp_path: Path) -> None:
    from softcon.flows.ingest import ingest_flow
    from softcon.flows.reproduce import reproduce_run

    sample = write_sample_data(tmp_path / "sample", tiles=1, tile_size=64, dates=4)
    cube = tmp_path / "cube.zarr"
    config = IngestConfig(
        stac=str(sample.items_file), collections=["sentinel-2-l2a"], bbox=sample.bbox, start=sample.start,
        end=sample.end, tile_size=64, cube=str(cube),
    )  # fmt: skip
    original = ingest_flow(config, experiment="reproduce-test")

    reproduction = reproduce_run(original.run_id, workdir=tmp_path / "again")
    assert reproduction.identical, reproduction.differences
    assert reproduction.compared >= 3 * 2  # s2 and scl for each of the three dates
    tags = mlflow.MlflowClient().get_run(reproduction.run_id).data.tags
    assert tags["softcon.reproduction_of"] == original.run_id and tags["softcon.reproduced"] == "true"

    tile = next(iter(zarr.open_group(str(cube), mode="r")["tiles"].group_keys()))
    s2 = zarr.open_group(str(cube), path=f"tiles/{tile}", mode="a")["s2"]
    s2[0, 0, 0, 0] = int(s2[0, 0, 0, 0]) + 1
    changed = reproduce_run(original.run_id, workdir=tmp_path / "again")
    assert not changed.identical and len(changed.differences) == 1 and "/s2@" in changed.differences[0]


def test_reproducing_an_ingest_that_wrote_nothing_is_identical_and_warned(tmp_path: Path) -> None:
    """It failed with "no Zarr store at …/reproductions/…": a run that wrote nothing reproduces as nothing."""
    from softcon.flows.ingest import ingest_flow
    from softcon.flows.reproduce import reproduce_run

    sample = write_sample_data(tmp_path / "sample", tiles=1, tile_size=64, dates=4)
    wide = widened(sample.bbox, 3)  # an area many times the scenes: every tile-date mostly nodata
    config = IngestConfig(
        stac=str(sample.items_file), collections=["sentinel-2-l2a"], bbox=wide, start=sample.start,
        end=sample.end, tile_size=1056, cube=str(tmp_path / "cube.zarr"),
    )  # fmt: skip
    original = ingest_flow(config, experiment="reproduce-test")
    assert original.metrics["tile_dates_written"] == 0 and original.warning.startswith("nothing written")
    assert mlflow.MlflowClient().get_run(original.run_id).data.tags["softcon.warning"] == original.warning
    reproduction = reproduce_run(original.run_id, workdir=tmp_path / "again")
    assert reproduction.identical and reproduction.compared == 1, reproduction


@pytest.mark.slow
def test_reproduce_cpu_training_gives_identical_weights(tmp_path: Path) -> None:
    from softcon.flows.reproduce import reproduce_run
    from softcon.flows.train import train_flow

    store = write_store(tmp_path / "store.zarr")
    config = TrainConfig(
        store=str(store.path), out=str(tmp_path / "checkpoints"), backbone="resnet18", steps=4, batch_size=8,
        warmup_steps=1, checkpoint_every=2, mask_patch=4, embed_dim=16, device="cpu",
    )  # fmt: skip
    original = train_flow(config, experiment="reproduce-test")
    reproduction = reproduce_run(original.run_id, workdir=tmp_path / "again")
    assert reproduction.stage == "train"
    assert reproduction.identical, reproduction.differences[:5]
    assert reproduction.compared > 100  # every tensor of the student and the teacher ResNet-18
    assert Path(reproduction.output).parent == tmp_path / "again" / "checkpoints"
