"""Fine-tuning: the metrics on hand-made predictions, what each freeze mode trains, layer-wise lr decay, early
stopping, segmentation and multi-label runs on tiny data, the flow through the CLI with its MLflow record, its Prefect
cache (and --refresh) and its reproduction from the MLflow record."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cube_factory import SyntheticCube, write_cube, write_masked_store
from real_data import REAL
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import FinetuneConfig, TrainConfig
from softcon.models import finetune
from softcon.models.data import StoreDataset
from softcon.models.encoder import build_encoder
from softcon.models.finetune import (
    Evaluation,
    FinetuneModel,
    confusion_matrix,
    fit,
    parameter_groups,
    segmentation_metrics,
    set_trainable,
)
from softcon.tasks.finetune import load_finetuned, run_finetune
from softcon.tasks.train import run_training

torch.set_num_threads(2)
PATCH = 16


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCube:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


@pytest.fixture(scope="module")
def store(cube: SyntheticCube, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with masks: two 64 px tiles cut into 16 px patches, four class stripes and a nodata corner."""
    out = str(tmp_path_factory.mktemp("store") / "store.zarr")
    write_masked_store(cube, out, patch_size=PATCH)
    return out


@pytest.fixture(scope="module")
def checkpoint(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pretraining checkpoint of two steps: what a train run leaves."""
    config = TrainConfig(store=store, out=str(tmp_path_factory.mktemp("ckpt")), steps=2, batch_size=8, warmup_steps=1,
                         mask_patch=4, embed_dim=16, device="cpu")  # fmt: skip
    return str(run_training(config).checkpoint)


def _config(store: str, out: Path, **changes: object) -> FinetuneConfig:
    values = dict(model="random", backbone="test_resnet", store=store, epochs=2, batch_size=8, crop_size=12,
                  device="cpu", out=str(out))  # fmt: skip
    return FinetuneConfig(**(values | changes))


def test_miou_per_class_iou_and_pixel_accuracy_of_a_hand_made_prediction() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the 255 pixel's prediction does not count
    confusion = confusion_matrix(prediction, target, n_classes=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    metrics, iou = segmentation_metrics(confusion.numpy())
    np.testing.assert_allclose(iou[:3], [1 / 2, 2 / 3, 1])  # tp / (tp + fp + fn)
    assert np.isnan(iou[3])  # in neither truth nor prediction: left out of the mean
    assert metrics["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 5)


@pytest.mark.parametrize(
    ("backbone", "partial"),
    [("resnet18", ("layer4.",)), ("vit_tiny_patch16_224", ("blocks.9.", "blocks.10.", "blocks.11.", "norm."))],
)
def test_freeze_modes_train_exactly_the_expected_parameters(backbone: str, partial: tuple[str, ...]) -> None:
    model = FinetuneModel(build_encoder(backbone, 12, img_size=32), "segmentation", n_classes=4)
    encoder_names = [name for name, _ in model.encoder.named_parameters()]
    expected = {
        "frozen": set(),
        "partial": {name for name in encoder_names if name.startswith(partial)},
        "full": set(encoder_names) - {"mask_token"},  # Siamese masking's token: nothing is masked in fine-tuning
    }
    for freeze, trained in expected.items():
        set_trainable(model, freeze)  # type: ignore[arg-type]
        assert {name for name, p in model.encoder.named_parameters() if p.requires_grad} == trained, freeze
        assert all(p.requires_grad for p in model.head.parameters())
    assert expected["partial"] and len(expected["partial"]) < len(encoder_names)


def test_layer_decay_gives_lower_learning_rates_towards_the_stem() -> None:
    model = FinetuneModel(build_encoder("resnet18", 12), "segmentation", n_classes=4)
    set_trainable(model, "full")
    groups = parameter_groups(model, lr=1e-2, layer_decay=0.5, weight_decay=0.05)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    for group in groups:
        assert group["lr"] == pytest.approx(1e-2 * 0.5 ** group["layer"])
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim > 1 else 0.0)
    by_layer = {group["layer"]: group["lr"] for group in groups}
    lrs = [by_layer[layer] for layer in sorted(by_layer)]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs) == 10  # head, 8 blocks, stem
    head = {id(p) for p in model.head.parameters()}
    stem = {id(model.encoder.conv1.weight)}
    assert all(group["layer"] == 0 for group in groups if head & {id(p) for p in group["params"]})
    assert [group["lr"] for group in groups if stem & {id(p) for p in group["params"]}] == [min(lrs)]


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9])  # best at epoch 2, then three epochs without a better one
    monkeypatch.setattr(
        finetune, "evaluate", lambda *args: Evaluation({"map_micro": next(scores)}, np.zeros(2), np.zeros((2, 2, 2)))
    )
    model = FinetuneModel(build_encoder("test_resnet", 3), "multilabel", n_classes=2)
    set_trainable(model, "full")
    batch = {"image": torch.randn(4, 3, 16, 16), "labels": torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]]),
             "labelled": torch.ones(4, dtype=torch.bool)}  # fmt: skip
    states: dict[int, dict] = {}
    result = fit(
        model, [batch], [batch], n_classes=2, epochs=10, lr=1e-3, patience=3, device=torch.device("cpu"),
        on_epoch=lambda epoch, record: states.__setitem__(epoch, copy.deepcopy(model.state_dict())),
    )  # fmt: skip
    assert (result.epochs_run, result.best_epoch, result.best_metric) == (5, 2, 0.7)
    assert [record["val_map_micro"] for record in result.history] == [0.5, 0.7, 0.6, 0.65, 0.69]
    assert all(torch.equal(value, states[2][key]) for key, value in model.state_dict().items())  # epoch 2 restored
    assert not torch.equal(states[2]["head.fc.weight"], states[5]["head.fc.weight"])


def test_segmentation_from_random_init_learns_and_reports_the_test_miou_of_its_model(
    store: str, tmp_path: Path
) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    config = _config(store, tmp_path, epochs=3, patience=None, lr=3e-3)
    report = run_finetune(config, None, on_epoch=lambda epoch, metrics: logged.append((epoch, metrics)))
    assert [epoch for epoch, _ in logged] == [1, 2, 3] and report.epochs_run == 3
    assert {"train_loss", "lr", "val_miou", "val_pixel_accuracy"} <= set(logged[0][1])
    assert logged[-1][1]["train_loss"] < logged[0][1]["train_loss"]
    for split in ("val", "test"):
        assert 0 <= report.metrics[f"{split}/miou"] <= 1 and 0 <= report.metrics[f"{split}/pixel_accuracy"] <= 1
    assert {f"test/iou/{name}" for name in ("tree_cover", "shrubland", "grassland", "water")} <= set(report.metrics)
    assert report.confusion.shape == (4, 4) and report.examples is not None and report.examples.is_file()

    # the reported test mIoU is the one of the saved model's predictions, counted here pixel by pixel
    model, meta = load_finetuned(report.checkpoint)
    assert meta["task"] == "segmentation" and meta["class_names"][0] == "tree_cover" and meta["source"] == "random"
    test = StoreDataset(store, "test", two_views=False, augment=False, norm_stats=meta["norm_stats"], masks=True)
    items = [test[i] for i in range(len(test))]
    with torch.no_grad():
        predicted = model(torch.stack([item["image"] for item in items])).argmax(1).numpy()
    truth = torch.stack([item["mask"] for item in items]).numpy()
    iou = []
    for k in range(4):
        valid = truth != 255
        union = ((truth == k) | (predicted == k)) & valid
        if union.any():
            iou.append(((truth == k) & (predicted == k)).sum() / union.sum())
    assert report.metrics["test/miou"] == pytest.approx(np.mean(iou))
    np.testing.assert_array_equal(report.confusion.sum(), (truth != 255).sum())


def test_multilabel_from_a_pretraining_checkpoint_with_a_label_budget(
    store: str, checkpoint: str, tmp_path: Path
) -> None:
    config = _config(store, tmp_path, model=checkpoint, backbone=None, task="multilabel", freeze="partial",
                     layer_decay=0.7, train_fraction=0.5, crop_size=None)  # fmt: skip
    report = run_finetune(config, checkpoint)
    n_train = len(StoreDataset(store, "train", two_views=False))
    assert report.metrics["n_train"] == round(n_train / 2) and report.epochs_run == 2
    assert {"val/map_micro", "val/map_macro", "test/map_micro", "test/map_macro"} <= set(report.metrics)
    assert report.confusion.shape == (4, 2, 2) and report.examples is None
    model, meta = load_finetuned(report.checkpoint)
    assert meta["task"] == "multilabel" and meta["source"] == checkpoint and meta["bands"][0] == "B01"
    assert model(torch.zeros(2, 12, PATCH, PATCH)).shape == (2, 4)


def test_multilabel_on_a_bigearthnet_folder(tmp_path: Path) -> None:
    source = REAL / "bigearthnet" / "BigEarthNet-S2-Example"
    if not source.is_dir():
        pytest.skip("real BigEarthNet samples not present")
    root = tmp_path / "bigearthnet"
    root.mkdir()
    (root / "S2").symlink_to(source)
    names = sorted(path.name for path in source.iterdir() if path.is_dir())
    for split, chosen in (("train", names[:4]), ("val", names[4:5]), ("test", names[5:])):
        (root / f"{split}.csv").write_text("\n".join(chosen) + "\n")
    config = FinetuneConfig(model="random", backbone="resnet18", task="multilabel", bigearthnet=str(root), epochs=1,
                            batch_size=2, freeze="frozen", device="cpu", out=str(tmp_path / "out"))  # fmt: skip
    report = run_finetune(config, None)
    assert report.metrics["n_train"] == 4 and len(report.class_names) == 19
    assert np.isfinite(report.metrics["test/map_micro"])
    with pytest.raises(ValueError, match="leaves 1 training sample of the train split's 4"):
        run_finetune(config.model_copy(update={"train_fraction": 0.25}), None)


def test_segmentation_needs_a_store_with_masks(tmp_path: Path) -> None:
    from store_factory import write_store

    plain = write_store(tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match="softcon preprocess --masks"):
        run_finetune(_config(str(plain.path), tmp_path / "out"), None)
    with pytest.raises(ValueError, match="needs backbone"):
        FinetuneConfig(model="random", store="s.zarr")
    with pytest.raises(ValueError, match="segmentation needs a store"):
        FinetuneConfig(model="m.pt", bigearthnet="folder")


@pytest.mark.slow
def test_cli_finetunes_through_the_flow_and_records_a_nested_mlflow_run(
    store: str, checkpoint: str, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from softcon.flows.finetune import finetune_flow
    from softcon.settings import get_settings

    args = ["finetune", checkpoint, "--task", "segmentation", "--store", store, "--epochs", "1", "--batch-size", "8",
            "--freeze", "partial", "--device", "cpu", "--out", str(tmp_path / "cli"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["output"] == str(tmp_path / "cli" / "finetuned.pt") and "test/miou" in outcome["metrics"]
    client = MlflowClient(get_settings().tracking_uri)
    run = client.get_run(outcome["run_id"])
    assert run.data.params["task"] == "segmentation" and run.data.params["freeze"] == "partial"
    assert run.data.tags["softcon.stage"] == "finetune" and "test/miou" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"finetuned", "confusion_matrix.png", "predictions.png", "finetune.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "finetuned")] == ["finetuned/finetuned.pt"]

    # under a pipeline's parent run, the finetune run is its child
    experiment = mlflow.get_experiment(run.info.experiment_id)
    parent = client.create_run(experiment.experiment_id, run_name="pipeline")
    config = _config(store, tmp_path / "nested", model=checkpoint, backbone=None, task="multilabel", epochs=1)
    nested = finetune_flow(config, parent_run_id=parent.info.run_id, experiment=experiment.name)
    child = client.get_run(nested.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and "test/map_micro" in child.data.metrics


def test_flow_rerun_is_served_from_the_cache_until_refresh_and_reproduce_gives_the_same_weights(
    store: str, tmp_path: Path
) -> None:
    from softcon.flows.finetune import finetune_flow
    from softcon.flows.reproduce import reproduce_run

    config = _config(store, tmp_path / "out", epochs=1)
    first = finetune_flow(config, experiment="finetune-cache-test")
    model = Path(first.output)
    written = model.stat().st_mtime_ns

    cached = finetune_flow(config, experiment="finetune-cache-test")
    assert cached.run_id != first.run_id and cached.metrics["test/miou"] == first.metrics["test/miou"]
    assert model.stat().st_mtime_ns == written  # nothing was trained or written

    forced = finetune_flow(config, experiment="finetune-cache-test", refresh=True)
    assert model.stat().st_mtime_ns != written
    assert forced.metrics["test/miou"] == first.metrics["test/miou"]  # CPU fine-tuning is deterministic

    reproduction = reproduce_run(first.run_id, workdir=tmp_path / "again")
    assert reproduction.stage == "finetune" and reproduction.identical, reproduction.differences[:5]
    saved = torch.load(model, weights_only=True)
    assert reproduction.compared == len(saved["encoder"]) + len(saved["head"])  # every tensor of both
    assert Path(reproduction.output) == tmp_path / "again" / "finetune" / "finetuned.pt"
