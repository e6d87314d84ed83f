"""Train flow: what the MLflow train run records (params, step metrics, system metrics, registered model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from store_factory import write_store

from softcon.config import TrainConfig


@pytest.mark.slow
def test_train_run_records_params_metrics_system_metrics_and_a_registered_encoder(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from softcon.flows.train import train_flow
    from softcon.settings import get_settings

    store = write_store(tmp_path / "store.zarr")
    config = TrainConfig(
        store=str(store.path), out=str(tmp_path / "ckpt"), backbone="resnet18", steps=4, batch_size=8,
        warmup_steps=1, checkpoint_every=4, log_every=1, mask_patch=4, embed_dim=16, device="cpu",
        registered_model_name="softcon-encoder-test",
    )  # fmt: skip
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):  # a busy machine starts slowly
        result = train_flow(config, experiment="train-flow-test")
    client = MlflowClient(get_settings().tracking_uri)  # the SQLite backend set by conftest
    run = client.get_run(result.run_id)

    assert run.data.params["lambda_soft"] == "1.0"
    assert run.data.params["registered_model_name"] == "softcon-encoder-test"
    for name in ("loss", "instance", "soft", "lr", "samples_per_second", "embedding_std", "collapse_warning"):
        history = client.get_metric_history(result.run_id, name)
        assert {1, 2, 3, 4} <= {m.step for m in history}, name  # every step (log_every=1)
        assert all(np.isfinite(m.value) for m in history), name
    lrs = [m.value for m in client.get_metric_history(result.run_id, "lr")]
    assert lrs[0] == pytest.approx(config.lr) and lrs[-1] < lrs[1]  # warmup, then cosine decay
    assert any(name.startswith("system/cpu_utilization_percentage") for name in run.data.metrics)
    assert any(name.startswith("system/system_memory_usage_megabytes") for name in run.data.metrics)

    versions = client.search_model_versions("name = 'softcon-encoder-test'")
    assert len(versions) == 1 and versions[0].run_id == result.run_id
    model = mlflow.models.get_model_info(f"models:/softcon-encoder-test/{versions[0].version}")
    assert list(model.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 12, 16, 16]
