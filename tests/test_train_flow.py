"""Train flow: what the MLflow train run records (params, step metrics, system metrics, registered model)."""

from __future__ import annotations

from importlib.metadata import version
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
    # the model carries its input contract, lineage and pinned requirements; "latest" is the new version
    from softcon.flows.registry import registry_version

    for latest in ("models:/softcon-encoder-test@latest", "models:/softcon-encoder-test/latest"):
        assert registry_version(latest) == ("softcon-encoder-test", str(versions[0].version))
    assert model.metadata["bands"][:3] == ["B01", "B02", "B03"] and len(model.metadata["normalisation"]["mean"]) == 12
    assert model.metadata["lineage"]["store"] == str(store.path) and model.metadata["image_size"] == 16
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/softcon-encoder-test/{versions[0].version}")
    pinned = Path(requirements).read_text()
    assert f"torch=={version('torch')}" in pinned and "timm==" in pinned  # pip's version: no MLflow mismatch warning

    # an evaluation of the registered version tags it with its results and moves "best" when it is better
    from softcon.flows.registry import record_evaluation

    uri = f"models:/softcon-encoder-test/{versions[0].version}"
    record_evaluation(
        uri, {"linear_map_micro": 0.5, "baselines/random-init/linear_map_micro": 0.9}, "r1", "linear_map_micro"
    )
    tagged = client.get_model_version("softcon-encoder-test", versions[0].version)
    assert (
        tagged.tags["eval.linear_map_micro"] == "0.5"
        and "eval.baselines/random-init/linear_map_micro" not in tagged.tags
    )
    assert str(client.get_model_version_by_alias("softcon-encoder-test", "best").version) == str(versions[0].version)
    second = client.create_model_version("softcon-encoder-test", source=versions[0].source, run_id=result.run_id)
    record_evaluation(f"models:/softcon-encoder-test/{second.version}", {"linear_map_micro": 0.4}, "r2",
                      "linear_map_micro")  # fmt: skip
    assert client.get_model_version_by_alias("softcon-encoder-test", "best").version == versions[0].version  # worse
    record_evaluation(result.run_id, {"bigearthnet/linear_map_micro": 0.7}, "r3", "linear_map_micro")  # the run id
    assert client.get_model_version_by_alias("softcon-encoder-test", "best").version in {versions[0].version,
                                                                                         second.version}  # fmt: skip
    assert client.get_model_version("softcon-encoder-test", second.version).tags["eval.run_id"] == "r3"
