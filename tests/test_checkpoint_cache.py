"""A train run's checkpoint is downloaded once into <home>/checkpoints/<run id>, never into a leftover temp folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from softcon.flows.evaluate import resolve_checkpoint
from softcon.flows.train import CHECKPOINT_ARTIFACT
from softcon.settings import get_settings

CHECKPOINT = "step_000002.pt"


@pytest.fixture(scope="module")
def run_id(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow run with a small fake checkpoint as its artifact, in a tracking store of its own."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            client = MlflowClient(uri)
            experiment = client.create_experiment("checkpoint-cache", artifact_location=(root / "artifacts").as_uri())
            run = client.create_run(experiment)
            fake = root / CHECKPOINT
            fake.write_bytes(b"not a real checkpoint")
            client.log_artifact(run.info.run_id, str(fake), artifact_path=CHECKPOINT_ARTIFACT)
            client.set_terminated(run.info.run_id)
            yield run.info.run_id
        finally:
            mlflow.set_tracking_uri(saved)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh project home; yields its checkpoint cache folder (not created yet)."""
    monkeypatch.setenv("SOFTCON_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home" / "checkpoints"
    get_settings.cache_clear()


def count_downloads(monkeypatch: pytest.MonkeyPatch, after: Callable[[str], None] | None = None) -> list[str]:
    """Wrap MLflow's download, recording each destination; ``after`` runs on the downloaded folder."""
    real = mlflow.artifacts.download_artifacts
    calls: list[str] = []

    def download(**kwargs: Any) -> str:
        calls.append(kwargs.get("dst_path"))
        folder = real(**kwargs)
        if after is not None:
            after(folder)
        return folder

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    return calls


def test_downloads_once_into_the_home_cache(run_id: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_downloads(monkeypatch)
    first = resolve_checkpoint(run_id)
    assert first == cache / run_id / CHECKPOINT
    assert first.read_bytes() == b"not a real checkpoint"
    assert resolve_checkpoint(run_id) == first
    assert len(calls) == 1 and Path(calls[0]).parent == cache  # staged next to the final folder
    assert sorted(cache.iterdir()) == [cache / run_id]  # no staging folder left


def test_failed_download_leaves_nothing(run_id: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(**kwargs: Any) -> str:
        (Path(kwargs["dst_path"]) / "partial.pt").write_bytes(b"half")
        raise OSError("connection reset")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fail)
    with pytest.raises(ValueError, match=r"neither a checkpoint file nor an MLflow train run .*connection reset"):
        resolve_checkpoint(run_id)
    assert list(cache.iterdir()) == []


def test_run_without_a_checkpoint_leaves_nothing(run_id: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count_downloads(monkeypatch, after=lambda folder: (Path(folder) / CHECKPOINT).unlink())
    with pytest.raises(ValueError, match="has no checkpoint under"):
        resolve_checkpoint(run_id)
    assert list(cache.iterdir()) == []


def test_another_process_renamed_first(run_id: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def theirs(folder: str) -> None:
        (cache / run_id).mkdir()
        (cache / run_id / CHECKPOINT).write_bytes(b"theirs")

    count_downloads(monkeypatch, after=theirs)
    checkpoint = resolve_checkpoint(run_id)
    assert checkpoint == cache / run_id / CHECKPOINT and checkpoint.read_bytes() == b"theirs"
    assert sorted(cache.iterdir()) == [cache / run_id]


@pytest.mark.parametrize("model", ["../x", "a/b", "a\\b", ".", "..", "", ".hidden"])
def test_refuses_a_model_that_is_not_a_plain_name(cache: Path, monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    calls = count_downloads(monkeypatch)
    with pytest.raises(ValueError, match="neither a checkpoint file nor an MLflow train run id"):
        resolve_checkpoint(model)
    assert calls == [] and not cache.exists()


def test_a_checkpoint_file_is_returned_as_is(tmp_path: Path, cache: Path) -> None:
    checkpoint = tmp_path / CHECKPOINT
    checkpoint.write_bytes(b"local")
    assert resolve_checkpoint(str(checkpoint)) == checkpoint
    assert not cache.exists()
