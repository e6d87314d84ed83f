"""`torchrun ... -m softcon train`: every process trains, only rank 0 runs the Prefect flow and records to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from store_factory import write_store

ROOT = Path(__file__).resolve().parents[1]


def _torchrun_two_ranks(tmp_path: Path, args: list[str], **env_vars: str) -> mlflow.entities.Run:
    """``torchrun --nproc-per-node 2 -m softcon ARGS`` with its own home; checks it printed one MLflow run id (rank 0
    only) and returns the one MLflow run it made."""
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SOFTCON_", "PREFECT_API"))}
    env.update(SOFTCON_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", OMP_NUM_THREADS="1", **env_vars)  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "softcon", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("MLflow run id:") == 1, done.stdout  # rank 0 only
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and "prefect.flow_run_id" in run.data.tags
    return run


@pytest.mark.slow
def test_torchrun_two_processes_make_one_flow_run_and_one_mlflow_run(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store.zarr")
    run = _torchrun_two_ranks(
        tmp_path, ["train", "--store", str(store.path), "--backbone", "resnet18", "--steps", "4", "--batch-size", "8"],
        SOFTCON_TRAIN__OUT=str(tmp_path / "ckpt"), SOFTCON_TRAIN__DEVICE="cpu", SOFTCON_TRAIN__WARMUP_STEPS="1",
        SOFTCON_TRAIN__MASK_PATCH="4", SOFTCON_TRAIN__EMBED_DIM="16", SOFTCON_TRAIN__LOG_EVERY="2",
        SOFTCON_TRAIN__CHECKPOINT_EVERY="4",
    )  # fmt: skip
    assert run.info.run_name == "train" and run.data.metrics["final_loss"] > 0
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*.pt")) == ["step_000004.pt"]


@pytest.mark.slow
def test_torchrun_finetune_trains_on_two_ranks_and_records_once(tmp_path: Path) -> None:
    """`torchrun ... -m softcon finetune`: both ranks train their shard (DDP on gloo), rank 0 alone runs the flow,
    evaluates, writes the model and makes the one MLflow run."""
    from cube_factory import write_cube, write_masked_store

    store = write_masked_store(write_cube(tmp_path / "cube.zarr"), tmp_path / "masked.zarr")
    out = tmp_path / "finetuned"
    run = _torchrun_two_ranks(
        tmp_path, ["finetune", "random", "--task", "segmentation", "--store", store, "--backbone", "test_resnet",
                   "--epochs", "2", "--batch-size", "8", "--crop-size", "12", "--device", "cpu", "--out", str(out)],
    )  # fmt: skip
    assert run.info.run_name == "finetune"
    assert 0 <= run.data.metrics["test/miou"] <= 1 and run.data.metrics["epochs_run"] == 2
    assert (out / "finetuned.pt").is_file()
