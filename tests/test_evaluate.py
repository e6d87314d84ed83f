"""Evaluation stage: metrics, feature cache, baselines, collapse flag, BigEarthNet, the report and the flow."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from published_layouts import eurosat_tree
from real_data import REAL
from store_factory import SyntheticStore, write_store

import softcon.tasks.evaluate as evaluate_module
from softcon.config import S2_L2A_BANDS, EvaluateConfig, TrainConfig
from softcon.models.encoder import build_encoder
from softcon.tasks.compare import comparison_table, write_report
from softcon.tasks.evaluate import parse_baseline, run_evaluation
from softcon.tasks.train import run_training

torch.set_num_threads(2)
REAL_BEN = REAL / "bigearthnet"


@dataclass(frozen=True)
class Checkpoints:
    softcon: Path
    hard: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("evaluate") / "store.zarr")


@pytest.fixture(scope="module")
def checkpoints(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    def train(lambda_soft: float) -> Path:
        config = TrainConfig(
            store=str(store.path), out=str(tmp_path_factory.mktemp("ckpt")), steps=2, batch_size=8,
            warmup_steps=1, mask_patch=4, embed_dim=16, device="cpu", lambda_soft=lambda_soft,
        )  # fmt: skip
        return run_training(config).checkpoint

    return Checkpoints(softcon=train(1.0), hard=train(0.0))


@pytest.fixture(scope="module")
def checkpoint(checkpoints: Checkpoints) -> Path:
    return checkpoints.softcon


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6 real S2/S1 example patches, linked into a folder with official-style split lists."""
    if not REAL_BEN.is_dir():
        pytest.skip("real BigEarthNet samples not present")
    root = tmp_path_factory.mktemp("ben")
    for patch in sorted(REAL_BEN.glob("*/*")):
        (root / patch.name).symlink_to(patch, target_is_directory=True)
    s2 = sorted(p.name for p in REAL_BEN.glob("BigEarthNet-S2-Example/*"))
    (root / "train.csv").write_text("\n".join(s2[:4]) + "\n")
    (root / "test.csv").write_text("\n".join(s2[4:]) + "\n")
    return root


def config_for(store: SyntheticStore, tmp_path: Path, **fields: object) -> EvaluateConfig:
    defaults: dict[str, object] = {"store": str(store.path), "probe_epochs": 20, "knn_k": 5}
    defaults["out"] = str(tmp_path / "eval")
    return EvaluateConfig(**(defaults | fields))


def test_evaluation_metrics_are_in_range(store: SyntheticStore, checkpoint: Path, tmp_path: Path) -> None:
    config = config_for(store, tmp_path)
    result = run_evaluation(config, checkpoint)
    for name in ("linear_map_micro", "linear_map_macro", "knn_map_micro", "knn_map_macro", "linear_f1", "knn_f1"):
        assert 0.0 <= result.metrics[name] <= 1.0, name
    assert result.metrics["feature_nan_fraction"] == 0.0 and result.metrics["feature_std"] > 0
    assert result.metrics["collapsed"] == 0.0 and result.metrics["feature_spread"] > config.collapse_threshold
    assert result.probe_lr in config.probe_lrs
    assert result.n_train > 0 and result.n_eval > 0
    assert set(result.per_class_ap) <= set(store.class_names)
    assert all(0 <= ap <= 1 + 1e-9 for ap in result.per_class_ap.values())
    # band means carry the labels in the synthetic store, so even a barely trained encoder beats chance
    assert result.metrics["linear_map_micro"] > 0.6 and not math.isnan(result.metrics["knn_map_micro"])
    assert result.results[0].encoder == "SoftCon (λ=1)"


def test_val_split_can_be_evaluated(store: SyntheticStore, checkpoint: Path, tmp_path: Path) -> None:
    result = run_evaluation(config_for(store, tmp_path, split="val", probe_epochs=5), checkpoint)
    assert 0.0 <= result.metrics["linear_map_micro"] <= 1.0


def test_features_are_extracted_once_and_cached(
    store: SyntheticStore, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(store, tmp_path, probe_epochs=5)
    first = run_evaluation(config, checkpoint)
    files = first.results[0].feature_files
    assert len(files) == 3 and all(path.suffix == ".npz" and path.is_file() for path in files)
    assert {path.name.split("-")[1] for path in files} == {"train", "test", "val"}

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("features were extracted again instead of read from the cache")

    monkeypatch.setattr(evaluate_module, "extract_features", no_extraction)
    second = run_evaluation(config, checkpoint)
    assert second.metrics == first.metrics


@pytest.mark.slow
def test_baselines_under_the_same_protocol(store: SyntheticStore, checkpoints: Checkpoints, tmp_path: Path) -> None:
    weights = tmp_path / "published.pt"
    torch.manual_seed(5)
    torch.save(build_encoder("resnet18", len(S2_L2A_BANDS)).state_dict(), weights)
    baselines = ["random", "image-stats", str(checkpoints.hard), f"published=weights:{weights}"]
    result = run_evaluation(config_for(store, tmp_path, baselines=baselines), checkpoints.softcon)
    names = [r.encoder for r in result.results]
    assert names == ["SoftCon (λ=1)", "random init", "image statistics", "hard contrastive (λ=0)", "published"]
    n_eval = {r.metrics["n_eval"] for r in result.results}
    assert len(n_eval) == 1  # every encoder on the same samples
    for slug in ("random-init", "image-statistics", "hard-contrastive-lambda-0", "published"):
        assert 0 <= result.metrics[f"baselines/{slug}/linear_map_micro"] <= 1, slug
    # the image-statistics features are 2 x 12 bands; its probe learns the band-mean signal of the store
    stats = next(r for r in result.results if r.kind == "image-stats")
    assert np.load(stats.scores_file)["x"].shape[1] == 2 * len(S2_L2A_BANDS)
    assert stats.metrics["linear_map_micro"] > 0.8


@pytest.mark.slow
def test_collapsed_encoder_is_flagged(store: SyntheticStore, checkpoint: Path, tmp_path: Path) -> None:
    collapsed = tmp_path / "collapsed.pt"
    state = build_encoder("resnet18", len(S2_L2A_BANDS)).state_dict()
    torch.save({key: torch.zeros_like(value) for key, value in state.items()}, collapsed)
    result = run_evaluation(config_for(store, tmp_path, baselines=[f"dead=weights:{collapsed}"]), checkpoint)
    dead = result.results[1]
    assert dead.collapsed and result.metrics["baselines/dead/collapsed"] == 1.0
    assert dead.metrics["feature_spread"] < 1e-6 and dead.metrics["feature_dead_fraction"] == 1.0
    assert not result.results[0].collapsed
    table = comparison_table(result.results)
    assert "| store | dead |" in table and "**COLLAPSED**" in table.split("| store | dead |")[1].splitlines()[0]


def test_bad_baseline_spec_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        parse_baseline(str(tmp_path / "missing.pt"))
    assert parse_baseline("random").kind == "random"
    assert parse_baseline("mine=image-stats").name == "mine"


@pytest.mark.slow
def test_bigearthnet_metrics_are_prefixed(bigearthnet: Path, checkpoint: Path, tmp_path: Path) -> None:
    config = EvaluateConfig(
        bigearthnet=str(bigearthnet), probe_epochs=5, knn_k=3, out=str(tmp_path / "eval"), bigearthnet_size=32
    )
    result = run_evaluation(config, checkpoint)
    assert "linear_map_micro" not in result.metrics
    assert 0 <= result.metrics["bigearthnet/linear_map_micro"] <= 1
    assert result.metrics["bigearthnet/n_train"] == 4 and result.metrics["bigearthnet/n_eval"] == 2
    assert result.class_names["bigearthnet"][0] == "Urban fabric" and len(result.class_names["bigearthnet"]) == 19
    # the two test patches: coniferous/mixed forest, woodland, peatbog, lake; arable land and forest
    test_classes = {"Coniferous forest", "Mixed forest", "Arable land", "Transitional woodland, shrub",
                    "Inland wetlands", "Inland waters"}  # fmt: skip
    assert set(result.per_class_ap) == test_classes
    half = run_evaluation(config.model_copy(update={"train_fraction": 0.5}), checkpoint)
    assert half.metrics["bigearthnet/n_train"] == 2


def test_each_bigearthnet_patch_is_read_once_per_evaluation(
    bigearthnet: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softcon.tasks import bigearthnet as reader

    reads: list[str] = []
    read_patch = reader.read_patch
    monkeypatch.setattr(reader, "read_patch", lambda patch: reads.append(patch.name) or read_patch(patch))
    config = EvaluateConfig(bigearthnet=str(bigearthnet), probe_epochs=2, knn_k=1, out=str(tmp_path / "eval"),
                            bigearthnet_size=32, baselines=["random", "image-stats"], plots=False)  # fmt: skip
    result = run_evaluation(config, checkpoint)
    assert len(result.results) == 3  # three encoders, the patches read by the first
    assert sorted(reads) == sorted({patch.name for patch in reader.find_patches(bigearthnet, "s2")})


def test_cached_features_follow_a_folder_s_split_lists(bigearthnet: Path, checkpoint: Path, tmp_path: Path) -> None:
    """Features are cached per split; a changed split list must not serve the old split's features (it did: the
    key named the folder and the split, not what the split held)."""
    folder = tmp_path / "ben"
    folder.mkdir()
    for entry in bigearthnet.iterdir():
        if entry.is_dir():
            (folder / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    s2 = sorted(p.name for p in folder.iterdir() if p.name.startswith("S2"))
    config = EvaluateConfig(bigearthnet=str(folder), probe_epochs=2, knn_k=1, out=str(tmp_path / "eval"),
                            bigearthnet_size=32, plots=False)  # fmt: skip
    for n_test in (2, 1):
        (folder / "train.csv").write_text("\n".join(s2[: 6 - n_test]) + "\n")
        (folder / "test.csv").write_text("\n".join(s2[6 - n_test :]) + "\n")
        result = run_evaluation(config, checkpoint)
        assert result.metrics["bigearthnet/n_eval"] == n_test


@pytest.mark.slow
def test_report_has_table_and_plots(store: SyntheticStore, bigearthnet: Path, checkpoint: Path, tmp_path: Path) -> None:
    config = config_for(
        store, tmp_path, bigearthnet=str(bigearthnet), bigearthnet_size=32, baselines=["random"], probe_epochs=5
    )
    result = run_evaluation(config, checkpoint)
    files = write_report(result, tmp_path / "report")
    names = {path.name for path in files}
    for dataset in ("store", "bigearthnet"):
        assert {f"per_class_ap-{dataset}.png", f"pr_curves-{dataset}.png", f"embedding-{dataset}.png"} <= names
    assert all(path.stat().st_size > 1000 for path in files if path.suffix == ".png")
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert table.count("| store |") == 2 and table.count("| bigearthnet |") == 2
    assert "random init" in table and "SoftCon (λ=1)" in table


@pytest.mark.slow
def test_flow_logs_metrics_features_and_report(store: SyntheticStore, checkpoint: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from softcon.flows.evaluate import evaluate_flow
    from softcon.settings import get_settings

    config = config_for(store, tmp_path, model=str(checkpoint), baselines=["random"], probe_epochs=5)
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):  # a busy machine starts slowly
        result = evaluate_flow(config, experiment="evaluate-test")
    client = MlflowClient(get_settings().tracking_uri)
    run = client.get_run(result.run_id)
    assert {"linear_map_micro", "knn_map_macro", "baselines/random-init/linear_map_micro"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/comparison.md", "report/pr_curves-store.png", "report/embedding-store.png"} <= artifacts
    features = [a.path for a in client.list_artifacts(result.run_id, "features")]
    assert len(features) == 6 and all(path.endswith(".npz") for path in features)


def test_a_registered_model_version_or_alias_resolves_to_its_train_run_s_checkpoint(checkpoint: Path) -> None:
    """`--model models:/name/version` and `models:/name@alias` evaluate the train run the registry points at."""
    import mlflow

    from softcon.flows.evaluate import registry_run_id, resolve_checkpoint
    from softcon.flows.tracking import use_experiment
    from softcon.flows.train import CHECKPOINT_ARTIFACT

    experiment = use_experiment("registry-test")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(checkpoint), artifact_path=CHECKPOINT_ARTIFACT)
    client = mlflow.MlflowClient()
    client.create_registered_model("registry-test-encoder")
    version = client.create_model_version(
        "registry-test-encoder", source=f"runs:/{run.info.run_id}/{CHECKPOINT_ARTIFACT}", run_id=run.info.run_id
    )
    client.set_registered_model_alias("registry-test-encoder", "best", version.version)
    for uri in (f"models:/registry-test-encoder/{version.version}", "models:/registry-test-encoder@best"):
        assert registry_run_id(uri) == run.info.run_id
        resolved = resolve_checkpoint(uri)
        assert resolved.name == checkpoint.name and resolved.read_bytes() == checkpoint.read_bytes()
    with pytest.raises(ValueError, match="has no 'models:/registry-test-encoder@worst'"):
        resolve_checkpoint("models:/registry-test-encoder@worst")
    with pytest.raises(ValueError, match="is not models:/NAME/VERSION or models:/NAME@ALIAS"):
        resolve_checkpoint("models:/no-version")


def test_a_weights_file_is_evaluated_alone_without_a_project_checkpoint(store: SyntheticStore, tmp_path: Path) -> None:
    """`softcon evaluate --weights FILE --backbone NAME --store STORE`: the store gives bands and statistics."""
    torch.manual_seed(1)
    weights = tmp_path / "published.pth"
    torch.save(build_encoder("resnet18", 12).state_dict(), weights)
    config = config_for(store, tmp_path, weights=str(weights), backbone="resnet18", probe_epochs=5)
    result = run_evaluation(config, None)
    (row,) = result.results
    assert row.encoder == "weights published.pth" and 0 <= result.metrics["linear_map_micro"] <= 1
    with pytest.raises(ValueError, match="weights needs backbone"):
        config_for(store, tmp_path, weights=str(weights))
    with pytest.raises(ValueError, match=r"model .* or weights .*, not both"):
        config_for(store, tmp_path, weights=str(weights), backbone="resnet18", model="run")


def test_eurosat_is_a_single_label_dataset_scored_by_top1(checkpoint: Path, tmp_path: Path) -> None:
    """EuroSAT MS (13 bands, B8A last) mapped by band name onto the encoder's 12, a softmax probe, top-1 accuracy."""
    root = eurosat_tree(tmp_path / "eurosat")
    config = EvaluateConfig(eurosat=str(root), out=str(tmp_path / "eval"), probe_epochs=30, knn_k=5)
    result = run_evaluation(config, checkpoint)
    metrics = result.metrics
    assert {"eurosat/linear_top1", "eurosat/knn_top1", "eurosat/linear_map_micro"} <= set(metrics)
    assert metrics["eurosat/linear_top1"] > 0.8  # three classes with distinct spectra: well above chance (1/3)
    assert result.class_names["eurosat"][:3] == ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    n = metrics["eurosat/n_train"] + metrics["eurosat/n_eval"]
    assert 0 < metrics["eurosat/n_eval"] < n <= 72


def test_softcon_s_input_contract_maps_mean_plus_minus_2_std_to_0_1() -> None:
    """(x - (m - 2s)) / 4s, clipped to [0, 1]: SSL4EO-S12's normalize, from its statistics (L1C when B10 is in)."""
    from softcon.tasks.ssl4eo import S1, S2A, S2C, ContractInputs, ssl4eo_norm_stats

    stats = ssl4eo_norm_stats(["B04", "B10"])
    (m4, s4), (m10, s10) = S2C["B04"], S2C["B10"]
    assert stats == {"mean": [m4, m10], "std": [4 * s4, 4 * s10]}
    assert ssl4eo_norm_stats(["B04"])["mean"] == [S2A["B04"][0]] and ssl4eo_norm_stats(["VV"])["mean"] == [S1["VV"][0]]
    raw = torch.tensor([[[m4 - 2 * s4, m4, m4 + s4, m4 + 3 * s4]]])  # (1, 1, 4): one band
    zscores = (raw - stats["mean"][0]) / stats["std"][0]

    class One(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": zscores, "labels": torch.zeros(1)}

    image = ContractInputs(One())[0]["image"]
    assert torch.allclose(image, torch.tensor([[[0.0, 0.5, 0.75, 1.0]]]))
    with pytest.raises(ValueError, match="no statistics for bands"):
        ssl4eo_norm_stats(["B13"])


def test_bigearthnet_under_the_ssl4eo_contract_and_dinov2_features(
    checkpoint: Path, bigearthnet: Path, tmp_path
) -> None:
    """BigEarthNet resized to 256 and centre-cropped to 224, inputs in [0, 1]; a ViT gives DINOv2's features."""
    from softcon.models.encoder import Dinov2LinearFeatures
    from softcon.tasks.evaluate import EvaluationData

    config = EvaluateConfig(bigearthnet=str(bigearthnet), out=str(tmp_path), input_contract="ssl4eo")
    data = EvaluationData(config, "s2")
    item = data.split("bigearthnet", "train", {"bands": list(S2_L2A_BANDS), "norm_stats": None})[0]
    assert item["image"].shape == (12, 224, 224) and item["image"].min() >= 0 and item["image"].max() <= 1
    result = run_evaluation(config.model_copy(update={"probe_epochs": 5}), checkpoint)
    assert 0 <= result.metrics["bigearthnet/linear_map_micro"] <= 1

    vit = build_encoder("vit_small_patch14_dinov2", 12, img_size=56).eval()
    with torch.no_grad():
        images = torch.rand(2, 12, 56, 56)
        features = Dinov2LinearFeatures(vit)(images)
        assert features.shape == (2, 5 * 384)
        assert torch.allclose(features[:, 3 * 384 : 4 * 384], vit.forward_features(images)[:, 0], atol=1e-5)


def test_the_ssl4eo_linear_protocol_trains_a_head_on_the_fly_and_reports_on_val(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL4EO-S12's protocol beside the project's: a head trained with their SGD step schedule on random resized
    crops, the backbone frozen but in train mode (on a copy: the encoder itself is untouched)."""
    import softcon.tasks.ssl4eo_linear as protocol_module
    from softcon.tasks.ssl4eo_linear import LinearProtocol, random_resized_crop, run_linear_protocol

    crops = random_resized_crop(torch.rand(3, 12, 120, 120), 224, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 12, 224, 224)

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 4)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    labels = torch.eye(2)[torch.arange(32) % 2]  # (32, 2) one-hot, two classes
    images = torch.rand(32, 4, 64, 64) + labels[:, 1, None, None, None] * 2  # class 1 is brighter

    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": images[i], "labels": labels[i], "labelled": torch.tensor(True)}

    protocol = LinearProtocol(lr=0.1, epochs=4, milestones=(2,), batch_size=8)
    metrics = run_linear_protocol(encoder, Pairs(), Pairs(), protocol, single_label=True, device=torch.device("cpu"))
    assert metrics["ssl4eo_top1"] > 0.9 and metrics["ssl4eo_epochs"] == 4
    assert {"ssl4eo_map_micro_batched", "ssl4eo_map_micro", "ssl4eo_map_macro"} <= set(metrics)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # BN statistics included

    root = eurosat_tree(tmp_path / "eurosat")
    monkeypatch.setitem(protocol_module.PROTOCOLS, "eurosat", LinearProtocol(0.1, 2, (1,), 4))
    config = EvaluateConfig(eurosat=str(root), out=str(tmp_path / "eval"), probe_epochs=5, protocol="ssl4eo")
    result = run_evaluation(config, checkpoint)
    assert 0 <= result.metrics["eurosat/ssl4eo_top1"] <= 1 and "eurosat/linear_top1" in result.metrics
