"""A cached result never stands in for missing output: each stage, run as a Prefect flow, then its output
deleted or damaged, then run again; and an untouched second run still served from the cache."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import mlflow
import pytest
import zarr
from cube_factory import write_cube
from data_fixtures import sample_ingest_config
from store_factory import write_store

from softcon.config import EvaluateConfig, LabelsConfig, PreprocessConfig, TrainConfig
from softcon.flows.outputs import output_state
from softcon.flows.result import StageResult
from softcon.tasks.digest import array_digests, state_dict_digests
from softcon.tasks.sample_data import SampleData, write_sample_data

pytestmark = pytest.mark.slow


def task_states(result: StageResult, name_prefix: str) -> list[str]:
    """The Prefect state names of the flow run's tasks named ``name_prefix…`` (``Cached``, ``Completed``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = mlflow.MlflowClient().get_run(result.run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return [run.state.name for run in runs if run.name.startswith(name_prefix)]


class TaskRunLog(logging.Handler):
    """Prefect's task-run log lines (where the cache says why it runs again), which do not reach the root."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def stale_log() -> Iterator[TaskRunLog]:
    from prefect.logging.configuration import setup_logging

    handler = TaskRunLog()
    setup_logging()  # Prefect's first set-up replaces the handlers of its loggers: do it before adding ours
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def running_again(log: TaskRunLog) -> list[str]:
    return [message for message in log.messages if message.endswith("running again")]


def first_chunk_file(store: Path, array: str) -> Path:
    return next(path for path in sorted((store / array).rglob("*")) if path.is_file() and path.name != "zarr.json")


@dataclass(frozen=True)
class Sample:
    data: SampleData
    root: Path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    root = tmp_path_factory.mktemp("sample")
    return Sample(write_sample_data(root / "scenes", tiles=1, tile_size=64, dates=3), root)


def test_ingest_deleted_cube_is_ingested_again_and_a_second_untouched_run_is_cached(
    sample: Sample, tmp_path: Path, stale_log: TaskRunLog
) -> None:
    from softcon.flows.ingest import ingest_flow

    config = sample_ingest_config(sample.data, str(sample.data.items_file), tmp_path / "cube.zarr")
    first = ingest_flow(config)
    digests = array_digests(config.cube)
    assert task_states(first, "ingest-items") == ["Completed"]
    assert task_states(ingest_flow(config), "ingest-items") == ["Cached"]  # the cache still saves the work

    shutil.rmtree(config.cube)
    again = ingest_flow(config)
    assert task_states(again, "ingest-items") == ["Completed"]
    assert array_digests(config.cube) == digests
    assert again.metrics["tile_dates_written"] == first.metrics["tile_dates_written"] > 0
    assert running_again(stale_log) == [f"output {config.cube} is missing: running again"]


def test_ingest_lost_chunk_is_written_again_and_lost_item_ids_stop_the_run_with_the_fix(
    sample: Sample, tmp_path: Path, stale_log: TaskRunLog
) -> None:
    from softcon.flows.ingest import ingest_flow

    config = sample_ingest_config(sample.data, str(sample.data.items_file), tmp_path / "cube.zarr")
    ingest_flow(config)
    digests = array_digests(config.cube)
    cube = Path(config.cube)
    s2 = next(cube.glob("tiles/*/s2"))
    first_chunk_file(cube, str(s2.relative_to(cube))).unlink()
    repaired = ingest_flow(config)
    assert task_states(repaired, "ingest-items") == ["Completed"]
    assert repaired.metrics["tile_dates_repaired"] == 1
    assert array_digests(config.cube) == digests
    changed = f"output {config.cube} changed since the cached run ({s2.relative_to(cube)}: "
    assert changed in running_again(stale_log)[-1]
    assert task_states(ingest_flow(config), "ingest-items") == ["Cached"]

    tile = zarr.open_group(str(s2.parent), mode="a")
    items = dict(tile.attrs["s2_items"])
    items.pop(sorted(items)[0])
    tile.attrs["s2_items"] = items  # the record of which items a day holds: nothing can rebuild it
    with pytest.raises(ValueError, match=r"s2_items names \d+ days but time has \d+ steps") as raised:
        ingest_flow(config)
    assert "nothing written" in str(raised.value)
    assert "metadata changed" in running_again(stale_log)[-1]


def test_labels_lost_landcover_chunk_or_changed_attribute_is_rewritten(
    sample: Sample, tmp_path: Path, stale_log: TaskRunLog
) -> None:
    from softcon.flows.ingest import ingest_flow
    from softcon.flows.labels import labels_flow

    cube = tmp_path / "cube.zarr"
    ingest_flow(sample_ingest_config(sample.data, str(sample.data.items_file), cube))
    config = LabelsConfig(cube=str(cube), source=str(sample.data.worldcover))
    labels_flow(config)
    digests = array_digests(cube)
    assert task_states(labels_flow(config), "rasterize-labels") == ["Cached"]

    landcover = next(cube.glob("tiles/*/landcover"))
    first_chunk_file(cube, str(landcover.relative_to(cube))).unlink()
    again = labels_flow(config)
    assert task_states(again, "rasterize-labels") == ["Completed"]
    assert array_digests(cube) == digests
    assert "landcover: 0 chunk files, was 1" in running_again(stale_log)[-1]

    array = zarr.open_array(str(landcover), mode="a")
    array.attrs["class_names"] = ["tampered"]
    assert task_states(labels_flow(config), "rasterize-labels") == ["Completed"]
    assert zarr.open_array(str(landcover), mode="r").attrs["class_names"] != ["tampered"]
    assert array_digests(cube) == digests
    assert "landcover: metadata changed" in running_again(stale_log)[-1]


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr").path


def preprocess_config(cube: str, out: Path) -> PreprocessConfig:
    return PreprocessConfig(
        cube=cube, out=str(out), patch_size=16, split_block=32, val_fraction=0.2, test_fraction=0.2,
        max_nodata_fraction=0.5, n_workers=1,
    )  # fmt: skip


def test_preprocess_deleted_store_is_written_again_equal(cube: str, tmp_path: Path, stale_log: TaskRunLog) -> None:
    from softcon.flows.preprocess import preprocess_flow

    config = preprocess_config(cube, tmp_path / "train.zarr")
    preprocess_flow(config)
    digests = array_digests(config.out)
    assert task_states(preprocess_flow(config), "write-training-store") == ["Cached"]

    shutil.rmtree(config.out)  # the user's report: exit 0, "Cached", and no store
    again = preprocess_flow(config)
    assert task_states(again, "write-training-store") == ["Completed"]
    assert array_digests(config.out) == digests
    assert running_again(stale_log) == [f"output {config.out} is missing: running again"]
    assert task_states(preprocess_flow(config), "write-training-store") == ["Cached"]


def test_preprocess_lost_shard_or_edited_attribute_is_repaired_equal(
    cube: str, tmp_path: Path, stale_log: TaskRunLog
) -> None:
    from softcon.flows.preprocess import preprocess_flow

    config = preprocess_config(cube, tmp_path / "train.zarr")
    preprocess_flow(config)
    digests = array_digests(config.out)
    first_chunk_file(Path(config.out), "s2").unlink()
    assert task_states(preprocess_flow(config), "write-training-store") == ["Completed"]
    assert array_digests(config.out) == digests
    assert "s2: " in running_again(stale_log)[-1]

    store = zarr.open_group(config.out, mode="a")
    store.attrs["class_names"] = ["tampered"] * len(store.attrs["class_names"])
    assert task_states(preprocess_flow(config), "write-training-store") == ["Completed"]
    assert array_digests(config.out) == digests
    assert zarr.open_group(config.out, mode="r").attrs["class_names"] != store.attrs["class_names"]
    assert "root: metadata changed" in running_again(stale_log)[-1]
    assert task_states(preprocess_flow(config), "write-training-store") == ["Cached"]


def test_two_working_folders_sharing_one_home_each_get_their_own_output(
    cube: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths name different data in each folder: a result cached for one is not the other's."""
    from softcon.flows.preprocess import preprocess_flow

    for name in ("a", "b"):
        folder = tmp_path / name
        shutil.copytree(cube, folder / "cube.zarr")
    config = preprocess_config("cube.zarr", Path("train.zarr"))
    monkeypatch.chdir(tmp_path / "a")
    preprocess_flow(config)
    monkeypatch.chdir(tmp_path / "b")
    in_b = preprocess_flow(config)
    assert task_states(in_b, "write-training-store") == ["Completed"]
    assert (tmp_path / "b" / "train.zarr" / "zarr.json").is_file()
    assert array_digests(tmp_path / "b" / "train.zarr") == array_digests(tmp_path / "a" / "train.zarr")
    monkeypatch.chdir(tmp_path / "a")
    assert task_states(preprocess_flow(config), "write-training-store") == ["Cached"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "store.zarr").path


def train_config(store: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        store=str(store), out=str(out), backbone="resnet18", steps=2, batch_size=8, warmup_steps=1,
        checkpoint_every=2, mask_patch=4, embed_dim=16, device="cpu", log_system_metrics=False,
    )  # fmt: skip


def test_train_deleted_or_changed_checkpoint_or_deleted_run_trains_again(
    store: Path, tmp_path: Path, stale_log: TaskRunLog
) -> None:
    from softcon.flows.train import train_flow

    config = train_config(store, tmp_path / "checkpoints")
    first = train_flow(config)
    checkpoint = Path(first.output)
    weights = state_dict_digests(checkpoint)
    assert task_states(train_flow(config), "soft-contrastive-training") == ["Cached"]

    checkpoint.unlink()  # gone with the pod that trained it: the run's logged checkpoint comes back
    restored = train_flow(config)
    assert task_states(restored, "soft-contrastive-training") == ["Cached"]
    assert state_dict_digests(checkpoint) == weights
    assert running_again(stale_log) == []

    checkpoint.unlink()
    shutil.rmtree(Path(os.environ["SOFTCON_HOME"]) / "mlartifacts")  # and no logged copy either
    again = train_flow(config)
    assert task_states(again, "soft-contrastive-training") == ["Completed"]
    assert state_dict_digests(again.output) == weights  # CPU training is deterministic
    assert running_again(stale_log)[-1] == f"output {checkpoint} is missing: running again"

    with checkpoint.open("r+b") as file:  # damaged in place: same size, other bytes
        file.seek(100)
        file.write(b"\0" * 8)
    assert task_states(train_flow(config), "soft-contrastive-training") == ["Completed"]
    assert state_dict_digests(checkpoint) == weights
    assert f"output {checkpoint} changed since the cached run" in running_again(stale_log)[-1]

    cached = train_flow(config)
    assert task_states(cached, "soft-contrastive-training") == ["Cached"]
    # The run that trained the cached result is the one whose step metrics and checkpoint artifact it stands
    # for: deleted in the MLflow UI, it no longer counts.
    producer = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get("prefect.flow_run_id") and r.data.metrics.get("loss") is not None]  # fmt: skip
    for run in producer:
        mlflow.MlflowClient().delete_run(run.info.run_id)
    assert task_states(train_flow(config), "soft-contrastive-training") == ["Completed"]
    assert "that recorded the cached result was deleted" in running_again(stale_log)[-1]


def test_evaluate_deleted_features_are_computed_again(store: Path, tmp_path: Path, stale_log: TaskRunLog) -> None:
    from softcon.flows.evaluate import evaluate_flow
    from softcon.flows.train import train_flow

    checkpoint = train_flow(train_config(store, tmp_path / "checkpoints")).output
    config = EvaluateConfig(
        model=checkpoint, store=str(store), probe_epochs=5, knn_k=3, baselines=[], plots=False,
        out=str(tmp_path / "eval"),
    )  # fmt: skip
    first = evaluate_flow(config)
    assert task_states(evaluate_flow(config), "probe-frozen-encoder") == ["Cached"]

    features = sorted(path for path in (tmp_path / "eval").rglob("*.npz"))
    assert features
    for path in features:
        path.unlink()
    again = evaluate_flow(config)
    assert task_states(again, "probe-frozen-encoder") == ["Completed"]
    assert again.metrics == first.metrics
    assert all(path.is_file() for path in features)
    assert "is missing: running again" in running_again(stale_log)[-1]


def test_output_state_sees_a_lost_chunk_file_and_an_edited_attribute(cube: str, tmp_path: Path) -> None:
    copy = tmp_path / "cube.zarr"
    shutil.copytree(cube, copy)
    before = output_state(copy)
    s2 = f"{next(copy.glob('tiles/*/s2')).relative_to(copy)}"
    assert before.exists and s2 in before.parts
    assert output_state(copy) == before  # read twice, nothing changed

    first_chunk_file(copy, s2).unlink()
    assert output_state(copy).parts[s2].files == before.parts[s2].files - 1
    zarr.open_group(str(copy), mode="a").attrs["edited"] = True
    assert output_state(copy).parts[""].metadata != before.parts[""].metadata
    assert not output_state(tmp_path / "absent.zarr").exists
