"""Did pretraining help: the table's interval arithmetic on hand-made runs, the label subsets every row trains on
(drawn as finetune draws them), and ``softcon compare --finetune-task`` end to end with its nested MLflow run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from store_factory import SyntheticStore, write_store
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import FinetuneConfig, TrainConfig
from softcon.models.data import StoreDataset
from softcon.tasks import finetune, finetune_budgets
from softcon.tasks.bigearthnet import subset_without_replacement
from softcon.tasks.finetune_budgets import (
    FILES,
    BudgetRun,
    budget_metrics,
    budget_summary,
    budget_table,
    interval,
    run_budgets,
)
from softcon.tasks.train import run_training

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("budgets") / "store.zarr", n_locations=20, dates_per_location=2)


@pytest.fixture(scope="module")
def checkpoint(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A two-step pretraining checkpoint of a tiny ResNet."""
    config = TrainConfig(store=str(store.path), out=str(tmp_path_factory.mktemp("ckpt")), backbone="test_resnet",
                         steps=2, batch_size=8, warmup_steps=1, mask_patch=4, embed_dim=16, device="cpu")  # fmt: skip
    return str(run_training(config).checkpoint)


def _run(encoder: str, budget: float, seed: int, miou: float, n_train: int = 10) -> BudgetRun:
    return BudgetRun(encoder, budget, seed, {"miou": miou, "pixel_accuracy": 0.9, "n_train": n_train,
                                             "epochs_run": 1, "seconds": 1.0})  # fmt: skip


def test_table_gives_the_mean_and_95_percent_t_interval_over_seeds() -> None:
    runs = [_run("pretrained", 1.0, seed, miou) for seed, miou in enumerate([0.5, 0.6, 0.7])]
    runs += [_run("random init", 1.0, 0, 0.4), _run("random init", 0.1, 0, 0.2, n_train=1)]
    runs += [_run("random init", 0.1, 1, math.nan, n_train=1)]  # a seed whose test split showed no class

    mean, half, n = interval([0.5, 0.6, 0.7])
    assert (mean, n) == (pytest.approx(0.6), 3)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) x s / sqrt(n)
    assert math.isnan(interval([0.4])[1]) and math.isnan(interval([])[0])

    header, rows = budget_summary(runs, "segmentation")
    assert header == ["encoder", "label budget", "n train", "test mIoU", "test pixel accuracy", "n seeds"]
    assert rows == [
        ["pretrained", "100 %", "10", "60.0 ± 24.8", "90.0 ± 0.0", "3"],
        ["random init", "10 %", "1", "20.0", "90.0 ± 0.0", "2"],  # the NaN seed leaves one value: no interval
        ["random init", "100 %", "10", "40.0", "90.0", "1"],
        ["image statistics", "all", "–", "does not apply", "does not apply", "0"],
    ]
    markdown = budget_table(runs, "segmentation")
    assert "| pretrained | 100 % | 10 | 60.0 ± 24.8 | 90.0 ± 0.0 | 3 |" in markdown
    assert "Image statistics does not apply" in markdown
    metrics = budget_metrics(runs, "segmentation")
    assert metrics["pretrained/budget_1/test_miou"] == pytest.approx(0.6)
    assert metrics["pretrained/budget_1/test_miou_ci95"] == pytest.approx(half)
    assert "random-init/budget_1/test_miou_ci95" not in metrics  # one seed: no interval


@pytest.mark.slow
def test_every_row_trains_on_the_subset_finetune_draws_for_its_budget_and_seed(
    store: SyntheticStore, checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[str, float, int, list[int]]] = []
    original = finetune.finetune_data

    def recording(config: FinetuneConfig, meta: dict) -> finetune.FinetuneData:
        data = original(config, meta)
        indices = data.train.indices if isinstance(data.train, torch.utils.data.Subset) else range(len(data.train))
        drawn.append((config.model, config.train_fraction, config.seed, list(indices)))
        return data

    for module in (finetune, finetune_budgets):  # run_finetune's and the image-statistics row's
        monkeypatch.setattr(module, "finetune_data", recording)
    config = FinetuneConfig(model=checkpoint, task="multilabel", store=str(store.path), epochs=1, batch_size=8,
                            device="cpu", out=str(tmp_path / "unused"))  # fmt: skip
    runs = run_budgets(config, checkpoint, [0.25, 1.0], [0, 1], tmp_path / "runs")

    assert [(r.encoder, r.budget, r.seed) for r in runs[:3]] == [
        ("pretrained", 0.25, 0), ("random init", 0.25, 0), ("image statistics", 0.25, 0)
    ]  # fmt: skip
    assert len(runs) == 12 and all(np.isfinite(r.metrics["map_micro"]) for r in runs)
    assert {drawn_model for drawn_model, *_ in drawn} == {checkpoint, "random"}
    n_train = len(StoreDataset(str(store.path), "train", two_views=False))
    for budget in (0.25, 1.0):
        for seed in (0, 1):
            subsets = [indices for _, fraction, s, indices in drawn if (fraction, s) == (budget, seed)]
            expected = subset_without_replacement(np.arange(n_train), budget, seed=seed).tolist()
            assert len(subsets) == 3 and all(subset == expected for subset in subsets), (budget, seed)
    assert drawn[0][3] != next(d for d in drawn if d[1:3] == (0.25, 1))[3]  # another seed, another subset
    assert not list((tmp_path / "runs").rglob("finetuned.pt"))  # the models are deleted once read


@pytest.mark.slow
def test_compare_with_finetune_budgets_prints_the_table_and_logs_a_nested_run(
    store: SyntheticStore, checkpoint: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from softcon.settings import get_settings

    settings = tmp_path / "settings.yaml"
    settings.write_text(f"evaluate:\n  probe_epochs: 5\n  plots: false\n  out: {tmp_path / 'evaluate'}\n"
                        "finetune:\n  patience: 1\n")  # fmt: skip
    args = ["compare", "--model", checkpoint, "--store", str(store.path), "--finetune-task", "multilabel",
            "--budgets", "0.25,1", "--seeds", "0,1", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--config", str(settings)]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "label budgets" in result.output and "image statistics" in result.output and "25 %" in result.output

    client = MlflowClient(get_settings().tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (child,) = client.search_runs(experiments, "tags.`softcon.stage` = 'finetune-budgets'")
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["softcon.stage"] == "evaluate"
    assert child.data.params["budgets"] == "[0.25, 1.0]" and child.data.params["finetune.task"] == "multilabel"
    assert "pretrained/budget_0.25/test_map_micro_ci95" in child.data.metrics
    artifacts = [a.path for a in client.list_artifacts(child.info.run_id, "finetune_budgets")]
    assert artifacts == [f"finetune_budgets/{name}" for name in sorted(FILES)]
    report = get_settings().data_dir / "finetune-budgets" / child.info.run_id
    assert (report / "finetune_budgets.png").stat().st_size > 0
    table = (report / "finetune_budgets.md").read_text()
    assert "| image statistics | 25 % |" in table and "| 2 |" in table
