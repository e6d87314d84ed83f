"""Export stage: each format reloads with its own library (timm, onnxruntime, torch.jit) and gives the pipeline
encoder's features, at the sizes the card states for each backbone family; the model card; the STAC Item against the
MLM JSON schema, with the training area as its geometry; the flow's MLflow record; the CLI's errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import timm
import torch
import zarr
from pyproj import Transformer
from store_factory import SyntheticStore, write_store
from typer.testing import CliRunner

from softcon.cli import app
from softcon.config import S2_L2A_BANDS, ExportConfig, TrainConfig
from softcon.models.encoder import build_encoder
from softcon.tasks.export import check_sizes, run_export
from softcon.tasks.model_card import (
    Evaluation,
    Lineage,
    TrainRecord,
    data_licences,
    read_lineage,
    require,
    training_area,
)
from softcon.tasks.train import load_encoder, run_training

torch.set_num_threads(2)
SIZE = 32  # two ViT patches of 16 a side
MLM_SCHEMAS = Path(__file__).parent / "data" / "stac_mlm"
SCHEMA_FILES = {
    "https://stac-extensions.github.io/mlm/v1.5.2/schema.json": "mlm-v1.5.2.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json": "raster-v1.1.0.json",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json": "processing-v1.1.0.json",
    "https://stac-extensions.github.io/classification/v1.1.0/schema.json": "classification-v1.1.0.json",
}
"""The MLM schema and the three it refers to, by the URL it names them with (read offline from tests/data)."""


BBOX = (11.0, 46.49, 11.02, 46.51)
"""The area of the pipeline's ingest run (W, S, E, N), as the flow reads it from the run's ``bbox`` param."""
RECORD = TrainRecord(
    run_id="0123abcd", code_version="cafe42",
    sources={"ingest": {"stac": "https://stac.example/api", "bbox": json.dumps(list(BBOX))}},
    evaluations=(Evaluation("e1", {"linear_map_micro": 0.625}),),
)  # fmt: skip
"""What the flow would read from MLflow, for the card of the ONNX and TorchScript exports (the timm one has none)."""


@dataclass(frozen=True)
class Exported:
    """A checkpoint's export in each format (one folder per format) and its encoder's features of ``images(n)``."""

    backbone: str
    checkpoint: Path
    folders: dict[str, Path]
    features: dict[int, np.ndarray]
    """Batch size -> the features the pipeline's encoder gives of ``images(batch)``."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("export") / "store.zarr", n_locations=16, size=SIZE)


@pytest.fixture(scope="module")
def checkpoints(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-step checkpoints of a CNN and of a ViT: an export must reproduce either."""

    def train(backbone: str) -> Path:
        config = TrainConfig(
            store=str(store.path), out=str(tmp_path_factory.mktemp("ckpt")), backbone=backbone, steps=1,
            batch_size=8, warmup_steps=1, mask_patch=4, embed_dim=16, device="cpu",
        )  # fmt: skip
        return run_training(config).checkpoint

    return {backbone: train(backbone) for backbone in ("resnet18", "vit_tiny_patch16_224")}


@pytest.fixture(scope="module", params=["resnet18", "vit_tiny_patch16_224"])
def exported(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Exported:
    checkpoint = checkpoints[request.param]
    folders = {}
    for fmt in ("timm", "onnx", "torchscript"):
        folders[fmt] = tmp_path_factory.mktemp(fmt)
        record = None if fmt == "timm" else RECORD
        run_export(ExportConfig(model=str(checkpoint), format=fmt, out=str(folders[fmt])), checkpoint, record)
    encoder, _ = load_encoder(checkpoint)
    with torch.no_grad():
        features = {batch: encoder(images(batch)).numpy() for batch in (1, 2, 3)}
    return Exported(request.param, checkpoint, folders, features)


def images(batch: int) -> torch.Tensor:
    """``batch`` seeded images of the trained size, as the pipeline feeds them (z-scores)."""
    return torch.randn(batch, len(S2_L2A_BANDS), SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def test_timm_folder_loads_with_timm_and_gives_the_encoders_features(
    exported: Exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local folder: nothing may be fetched
    out = exported.folders["timm"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["model_args"]["in_chans"] == len(S2_L2A_BANDS)

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    batch = images(2)
    with torch.no_grad():
        got = model(batch).numpy()
    np.testing.assert_allclose(got, exported.features[2], atol=1e-5)
    assert got.shape == (2, config["num_features"])
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (len(S2_L2A_BANDS), SIZE, SIZE) and len(cfg["mean"]) == len(cfg["std"]) == 12
    assert cfg["notes"][0] == f"bands: {','.join(S2_L2A_BANDS)}" and "z-score" in cfg["notes"][1]


def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch(exported: Exported) -> None:
    import onnxruntime

    model = exported.folders["onnx"] / "model.onnx"
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = images(batch)
        (got,) = session.run(None, {"images": inputs.numpy()})
        np.testing.assert_allclose(got, exported.features[batch], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # torch 2.9+, still works
def test_torchscript_reloads_with_torch_jit_load(exported: Exported) -> None:
    module = torch.jit.load(str(exported.folders["torchscript"] / "model.torchscript.pt"))
    for batch in (1, 3):
        inputs = images(batch)
        with torch.no_grad():
            got = module(inputs).numpy()
        np.testing.assert_allclose(got, exported.features[batch], atol=1e-5)


def _mlm_validator() -> Any:
    import jsonschema
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (url, Resource.from_contents(json.loads((MLM_SCHEMAS / name).read_text())))
        for url, name in SCHEMA_FILES.items()
    )  # an unlisted URL is unresolvable: the validation never reaches the network
    schema = json.loads((MLM_SCHEMAS / "mlm-v1.5.2.json").read_text())
    return jsonschema.Draft7Validator(schema, registry=registry)


@pytest.mark.parametrize("fmt", ["timm", "onnx", "torchscript"])
def test_stac_item_is_valid_against_the_mlm_and_stac_item_schemas(exported: Exported, fmt: str) -> None:
    from pystac import STACObjectType
    from pystac.validation import JsonSchemaSTACValidator

    item = json.loads((exported.folders[fmt] / "model.stac.json").read_text())
    validator = _mlm_validator()
    assert [error.message for error in validator.iter_errors(item)] == []
    JsonSchemaSTACValidator().validate_core(item, STACObjectType.ITEM, "1.1.0")  # pystac's bundled core schemas

    (model_input,) = item["properties"]["mlm:input"]
    assert model_input["bands"] == list(S2_L2A_BANDS) and model_input["input"]["shape"] == [-1, 12, SIZE, SIZE]
    assert [scaling["type"] for scaling in model_input["value_scaling"]] == ["z-score"] * 12
    model_file = {"timm": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.torchscript.pt"}[fmt]
    assert item["assets"]["model"]["href"] == f"./{model_file}"
    del item["properties"]["mlm:input"]
    assert not validator.is_valid(item)  # the schema is really applied


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_cnn_export_takes_other_sizes_and_a_vit_graph_only_the_trained_one(exported: Exported) -> None:
    """What the card says each format takes, per backbone family, is what the files do."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    encoder, _ = load_encoder(exported.checkpoint)
    inputs = torch.randn(2, len(S2_L2A_BANDS), SIZE + 32, SIZE + 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = encoder(inputs).numpy()
    session = onnxruntime.InferenceSession(str(exported.folders["onnx"] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    module = torch.jit.load(str(exported.folders["torchscript"] / "model.torchscript.pt"))
    timm_model = timm.create_model(f"local-dir:{exported.folders['timm']}", pretrained=True).eval()
    with torch.no_grad():
        np.testing.assert_allclose(timm_model(inputs).numpy(), expected, atol=1e-5)  # multiples of the ViT patch
    cards = {fmt: (folder / "README.md").read_text() for fmt, folder in exported.folders.items()}
    if exported.backbone == "resnet18":
        (got,) = session.run(None, {"images": inputs.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(module(inputs).numpy(), expected, atol=1e-5)
        assert all("image size: any height and width, also non-square" in card for card in cards.values())
        return
    with pytest.raises(InvalidArgument, match="invalid dimensions for input: images"):
        session.run(None, {"images": inputs.numpy()})
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match the size"):
        module(inputs)
    for fmt in ("onnx", "torchscript"):
        assert f"image size: {SIZE} x {SIZE} px only (the ViT's {fmt} graph is traced at that size)" in cards[fmt]
    assert "image size: any height and width in multiples of the ViT patch, 16 px" in cards["timm"]


@pytest.mark.parametrize(
    ("backbone", "fmt", "sizes"),
    [
        ("resnet18", "onnx", [(SIZE, SIZE), (SIZE + 32, SIZE + 16)]),
        ("resnet18", "torchscript", [(SIZE, SIZE), (SIZE + 32, SIZE + 16)]),
        ("vit_tiny_patch16_224", "timm", [(SIZE, SIZE), (SIZE + 16, SIZE + 32)]),
        ("vit_tiny_patch16_224", "onnx", [(SIZE, SIZE)]),
        ("vit_tiny_patch16_224", "torchscript", [(SIZE, SIZE)]),
    ],
)
def test_the_export_check_runs_at_every_size_the_card_claims(
    backbone: str, fmt: str, sizes: list[tuple[int, int]]
) -> None:
    encoder = build_encoder(backbone, len(S2_L2A_BANDS), img_size=SIZE)
    assert check_sizes(fmt, encoder, {"img_size": SIZE}) == sizes


def test_stac_item_geometry_is_the_training_bbox(exported: Exported) -> None:
    item = json.loads((exported.folders["onnx"] / "model.stac.json").read_text())
    assert item["bbox"] == list(BBOX)
    assert shapely.geometry.shape(item["geometry"]).equals(shapely.box(*BBOX))
    card = (exported.folders["onnx"] / "README.md").read_text()
    assert "training area (EPSG:4326, west, south, east, north): 11.000000, 46.490000, 11.020000, 46.510000 (the " \
        "ingest bbox of the pipeline run)" in card  # fmt: skip
    bare = json.loads((exported.folders["timm"] / "model.stac.json").read_text())
    assert bare["geometry"] is None and bare.get("bbox") is None  # no MLflow record, a store without a grid


def test_without_a_recorded_bbox_the_area_is_the_extent_of_the_stores_patches(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store.zarr", n_locations=4, size=8)  # 8 px patches at row 0, col 0..3 px
    tile = "32632_500000_5000000"
    zarr.open_group(str(store.path), mode="r+").attrs.update(
        {"tiles": [tile], "resolution_m": 10.0, "params": {"patch_size": 8}}
    )
    lineage = read_lineage({"store": str(store.path)})
    area = training_area(lineage, None)
    assert area is not None and area.origin == "the extent of the training store's patches on the tile grid"
    to_lonlat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    west, north = to_lonlat.transform(500_000, 5_000_000)
    east, south = to_lonlat.transform(500_000 + (3 + 8) * 10, 5_000_000 - 8 * 10)  # 11 x 8 px of 10 m
    assert area.bbox == pytest.approx((west, south, east, north), abs=1e-7)
    assert shapely.geometry.shape(area.geometry).is_valid
    recorded = training_area(lineage, RECORD)
    assert recorded is not None and recorded.bbox == BBOX  # the ingest bbox, when the pipeline recorded it


def test_model_card_names_the_bands_the_contract_the_run_and_its_evaluation(exported: Exported) -> None:
    card = (exported.folders["onnx"] / "README.md").read_text()
    assert f"bands, in this order (12): {', '.join(S2_L2A_BANDS)}" in card
    assert "| 0 | B01 |" in card and "| 11 | B12 |" in card
    assert "z-score per band" in card and "nodata (Sentinel-2 value 0" in card
    assert "MLflow train run: `0123abcd`" in card and "`cafe42`" in card
    assert "STAC source: `https://stac.example/api`" in card and "evaluate run `e1`: linear_map_micro 0.625" in card
    assert "Contains modified Copernicus Sentinel data" in card

    bare = (exported.folders["timm"] / "README.md").read_text()
    assert "none recorded (exported from a checkpoint file)" in bare and "## Evaluation\n\nNone recorded." in bare


def test_lineage_comes_from_the_store_and_its_cube(tmp_path: Path) -> None:
    """A preprocess store records its fingerprint, cube and tiles; the cube's land-cover array its product."""
    store = write_store(tmp_path / "store.zarr", n_locations=4, size=8)
    cube = tmp_path / "cube.zarr"
    land_cover = zarr.open_group(str(cube), mode="w").create_group("tiles/32TPS_0_0")
    land_cover.create_array("landcover", shape=(4, 4), dtype="uint8").attrs.update(
        {"class_scheme": "worldcover", "product": "esa-worldcover", "source": "https://pc.example/stac"}
    )
    zarr.open_group(str(store.path), mode="r+").attrs.update(
        {"fingerprint": "f00d", "cube": str(cube), "tiles": ["32TPS_0_0"], "params": {"patch_size": 8}}
    )
    lineage = read_lineage({"store": str(store.path)})
    assert (lineage.fingerprint, lineage.source, lineage.tiles) == ("f00d", str(cube), ("32TPS_0_0",))
    assert (lineage.label_scheme, lineage.label_product) == ("worldcover", "esa-worldcover")
    assert lineage.build_params == {"patch_size": 8} and lineage.time_range == ("2024-01-01", "2024-03-01")
    assert any("ESA WorldCover" in line and "CC-BY 4.0" in line for line in data_licences(lineage))


@pytest.mark.parametrize(("scheme", "licence"), [("dynamic-world", "Dynamic World"), (None, "not recorded")])
def test_each_label_product_gets_its_licence_line(scheme: str | None, licence: str) -> None:
    lineage = Lineage(
        store=None, fingerprint=None, source=None, tiles=(), build_params={}, label_scheme=scheme,
        label_product=None, label_source=None, time_range=None,
    )  # fmt: skip
    lines = data_licences(lineage)
    assert lines[0].startswith("Contains modified Copernicus Sentinel data") and licence in lines[-1]


def test_a_missing_export_library_says_how_to_install_it() -> None:
    with pytest.raises(ValueError, match=r"an onnx export needs the no_such_runtime package: pip install "):
        require("no_such_runtime", "an onnx export")


@pytest.fixture(scope="module")
def train_run(checkpoints: dict[str, Path]) -> str:
    """An MLflow train run under a pipeline run with an ingest run beside it, and an evaluate run of it."""
    import mlflow

    from softcon.flows.tracking import use_experiment
    from softcon.flows.train import CHECKPOINT_ARTIFACT

    checkpoint = checkpoints["vit_tiny_patch16_224"]  # the smaller file to log and download
    experiment = use_experiment("export-test")
    with mlflow.start_run(experiment_id=experiment, tags={"softcon.stage": "pipeline"}) as parent:
        with mlflow.start_run(experiment_id=experiment, nested=True, tags={"softcon.stage": "ingest"}):
            mlflow.log_params({"stac": "https://stac.example/api", "collections": '["sentinel-2-l2a"]'})
        with mlflow.start_run(
            experiment_id=experiment, nested=True, tags={"softcon.stage": "train", "softcon.code_version": "cafe42"}
        ) as run:
            mlflow.log_artifact(str(checkpoint), artifact_path=CHECKPOINT_ARTIFACT)
    with mlflow.start_run(
        experiment_id=experiment, parent_run_id=parent.info.run_id, tags={"softcon.stage": "evaluate"}
    ):
        mlflow.log_param("model", run.info.run_id)
        mlflow.log_metrics({"linear_map_micro": 0.75, "baselines/random-init/linear_map_micro": 0.5})
    return run.info.run_id


def test_flow_exports_a_train_run_and_logs_the_folder_on_its_own_run(train_run: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from softcon.flows.export import export_flow

    out = tmp_path / "export"
    result = export_flow(ExportConfig(model=train_run, format="onnx", out=str(out)), experiment="export-test")
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["softcon.stage"] == "export" and run.data.tags["softcon.train_run_id"] == train_run
    logged = {artifact.path for artifact in client.list_artifacts(result.run_id, "export")}
    assert logged == {"export/model.onnx", "export/README.md", "export/model.stac.json"}
    assert result.output == str(out) and result.metrics["max_abs_diff"] < 1e-4
    card = (out / "README.md").read_text()
    assert f"MLflow train run: `{train_run}`" in card and "`cafe42`" in card
    assert "STAC source: `https://stac.example/api`" in card
    assert "linear_map_micro 0.75" in card and "baselines" not in card
    item = json.loads((out / "model.stac.json").read_text())
    assert item["properties"]["softcon:train_run_id"] == train_run


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["step.pt", "--format", "tflite"], 2, "export.format: Input should be 'timm', 'onnx' or 'torchscript'"),
        (["step.pt"], 2, "export.out: Field required"),
        (["/nowhere/step.pt", "--out", "x"], 1, "error: model '/nowhere/step.pt' is neither a checkpoint file nor"),
    ],
    ids=["format", "no-out", "model"],
)
def test_cli_refuses_a_bad_format_or_model_in_one_line(args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.stderr.split())  # rich wraps long lines at the terminal's width
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    result = runner.invoke(app, ["export", str(notes), "--format", "onnx", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    error = " ".join(result.stderr[result.stderr.index("error: ") :].split())
    assert error.startswith(f"error: checkpoint {notes} is refused") and "or is not a torch file" in error
    assert "Traceback" not in result.stderr
