"""The demo end to end, as a newcomer runs it: every stage a Prefect flow run and a nested MLflow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
import zarr
from mlflow.tracking import MlflowClient

STAGES = ["ingest", "labels", "preprocess", "train", "evaluate"]


def run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SOFTCON_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "SOFTCON_TRAIN__BATCH_SIZE": "16",
        "SOFTCON_EVALUATE__PROBE_EPOCHS": "30",
    }
    command = [sys.executable, "-m", "softcon", "demo", "--tiles", "2", "--tile-size", "128", "--dates", "3"]
    return subprocess.run([*command, "--steps", "20"], env=env, capture_output=True, text=True, timeout=1200)


def stage_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, object]:
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in children}


def cube_times(cube: Path) -> dict[str, list]:
    tiles = zarr.open_group(str(cube), mode="r")["tiles"]
    return {
        tile: xr.open_zarr(str(cube), group=f"tiles/{tile}").time.values.tolist() for tile in sorted(tiles.group_keys())
    }


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_data_on_a_second_run(tmp_path: Path) -> None:
    home = tmp_path / ".softcon"
    first = run_demo(home)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "linear-probe mAP micro" in first.stdout
    assert "image-statistics" in first.stdout and "bigearthnet" in first.stdout  # the structured world's comparison
    assert "mlflow ui --backend-store-uri" in first.stdout

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("softcon-demo")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`softcon.stage` = 'pipeline'")
    assert len(parents) == 1
    children = stage_runs(client, experiment.experiment_id, parents[0].info.run_id)
    assert sorted(children) == sorted(STAGES)
    flow_run_ids = {run.data.tags["prefect.flow_run_id"] for run in children.values()}
    assert len(flow_run_ids) == 5 and "" not in flow_run_ids
    assert all(run.info.status == "FINISHED" for run in children.values())
    evaluation = children["evaluate"].data.metrics
    for name in ["linear_map_micro", "linear_map_macro", "knn_map_micro", "knn_map_macro"]:
        assert 0.0 <= evaluation[name] <= 1.0
    assert children["train"].data.params["lambda_soft"] == "1.0"
    # each stage run names what it read and wrote (the MLflow UI's Dataset column)
    datasets = {
        stage: {(i.dataset.name.split(":")[0], {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in run.inputs.dataset_inputs}
        for stage, run in children.items()
    }  # fmt: skip
    assert datasets["ingest"] == {("stac", "input"), ("cube", "output")}
    assert datasets["labels"] == {("labels", "input"), ("cube", "output")}  # the Dynamic-World-like label file
    assert datasets["preprocess"] == {("cube", "input"), ("store", "output")}
    assert ("store", "input") in datasets["train"]
    assert {("store", "input"), ("bigearthnet", "input")} <= datasets["evaluate"]
    assert children["labels"].data.params["scheme"] == "dynamic-world"
    assert "bigearthnet/baselines/image-statistics/linear_map_micro" in evaluation
    store_digest = {i.dataset.digest for i in children["preprocess"].inputs.dataset_inputs if "store" in i.dataset.name}
    assert store_digest == {i.dataset.digest for i in children["train"].inputs.dataset_inputs}
    cube = home / "data" / "demo-structured-cube.zarr"
    times_before = cube_times(cube)
    assert len(times_before) == 2 and all(times_before.values())

    second = run_demo(home)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`softcon.stage` = 'pipeline'", order_by=["start_time DESC"]
    )
    assert len(parents) == 2
    rerun = stage_runs(client, experiment.experiment_id, parents[0].info.run_id)
    assert rerun["ingest"].data.metrics["tile_dates_written"] == 0
    assert cube_times(cube) == times_before
