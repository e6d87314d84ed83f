"""Model card and STAC Item of an exported encoder: what it is, what it takes, where its training data came from.

Both are written beside the exported files from the same facts: the checkpoint's meta and training config
(``ExportedModel``), what the training store and its cube record of the data (``read_lineage``: the store's
fingerprint, cube, tiles and build parameters, the land-cover product in the cube), and what MLflow holds of the
train run (``TrainRecord``: the flow reads it, since tasks do not query MLflow).

- ``README.md``, the card, for people: the input contract, the output, the training config, the data lineage,
  the MLflow run and code version, evaluation results, and the licences of the data the weights were trained on.
- ``model.stac.json``, a STAC Item with the Machine Learning Model extension (``mlm``), for catalogues. Its
  ``mlm:*`` fields are built with ``stac-model``'s pydantic models, which refuse a bad value when the Item is
  written. The Item declares MLM v1.5.2: ``stac-model`` 0.7.0 writes v1.6.0, whose JSON schema is not published
  in any copy this project can test against offline; the v1.5.2 schema is vendored in ``tests/data/stac_mlm`` and
  the tests validate every written Item against it (the fields used here are the same in both versions).
  Its geometry and bbox are the training area (``training_area``): the ingest bbox of the pipeline run that trained
  the model, else the extent of the training store's patches on the tile grid; null only when neither is known (a
  bare checkpoint whose store is gone, a corpus without a grid such as SSL4EO-S12).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pystac
import shapely
import zarr

from softcon.models.training_store import read_store_attrs
from softcon.tasks.cube_store import open_cube, tile_group
from softcon.tasks.embed import grid_polygon
from softcon.tasks.label_figures import class_colour

MODEL_CARD = "README.md"
STAC_ITEM = "model.stac.json"
MLM_SCHEMA_URI = "https://stac-extensions.github.io/mlm/v1.5.2/schema.json"
"""The MLM version the Item declares (see the module docstring for why not stac-model's own)."""
NORMALISATION_RULE = (
    "z-score per band on the raw values: (x - mean) / std with the mean and std listed here; nodata (Sentinel-2 "
    "value 0, Sentinel-1 NaN or inf) is set to 0 after it, i.e. to the band mean"
)
"""How the pipeline normalises every input (``models.data.StoreDataset.normalise``); exports expect the same."""
SENTINEL_ATTRIBUTION = (
    "Contains modified Copernicus Sentinel data (Sentinel-1/-2, free, full and open access under the EU Copernicus "
    "data policy)."
)
LABEL_LICENCES: dict[str, str] = {
    "worldcover": "ESA WorldCover 10 m © ESA WorldCover project, licensed CC-BY 4.0.",
    "dynamic-world": "Dynamic World © Google, in partnership with the World Resources Institute, licensed CC-BY 4.0.",
    "io-lulc": "Impact Observatory / Esri 10 m annual land use and land cover, licensed CC-BY 4.0.",
    "corine-bigearthnet19": (
        "CORINE Land Cover © European Union, Copernicus Land Monitoring Service (free, full and open access, "
        "with attribution)."
    ),
}
"""Licence line of each label scheme's product (``tasks/schemes.py``)."""
SOURCE_LICENCES: dict[str, str] = {"ssl4eo-s12": "SSL4EO-S12 (Wang et al. 2023), licensed CC-BY 4.0."}
"""Licence line of a training store built from a published dataset instead of the pipeline's own cube."""
MLM_TASKS: dict[str, str] = {"segmentation": "semantic-segmentation", "multilabel": "classification"}
"""``mlm:tasks`` of a fine-tuned model's task: MLM 1.5 has no multi-label task, so multi-label is ``classification``
(its output's sigmoid per class, the card and the Item's description say multi-label)."""
SizeRule = Literal["any", "patch-multiples", "trained"]
"""Which image sizes an export takes (``size_rule``)."""


@dataclass(frozen=True)
class ModelFile:
    """One file of an export, as the Item lists it among its assets."""

    key: str
    """Its asset key in the Item (``model`` for the model file)."""
    name: str
    title: str
    media_type: str
    roles: tuple[str, ...]
    artifact_type: str | None = None
    """``mlm:artifact_type`` of the model file (how it was saved); None for the other files."""


@dataclass(frozen=True)
class FineTuning:
    """What a fine-tuned model adds to its encoder: its task and classes, and the fine-tuning run's results."""

    task: str
    """``segmentation`` (per-pixel logits) or ``multilabel`` (per-image logits)."""
    class_names: tuple[str, ...]
    class_codes: tuple[int, ...]
    """Each class's code in the label scheme (the cube's ``landcover`` values)."""
    encoder: str
    """The pretrained encoder, as the finetune config named it (a train run id, a checkpoint, ``random`` …)."""
    encoder_file: str
    """The file it was read from (or ``random`` / ``weights:FILE``)."""
    metrics: dict[str, float]
    """The best epoch's val and test metrics (``tasks/finetune.py``)."""
    best_epoch: int


@dataclass(frozen=True)
class ExportedModel:
    """An exported encoder: the files written and the contract of the module they hold."""

    format: str
    files: tuple[ModelFile, ...]
    """The model file first."""
    framework: str
    """``mlm:framework``: the library that runs the file (PyTorch, ONNX)."""
    framework_version: str
    backbone: str
    sensor: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    patch_size: int | None
    """A ViT's patch side in pixels; None for a CNN."""
    num_features: int
    total_parameters: int
    step: int
    """Pretraining steps of the checkpoint; 0 for a fine-tuned model."""
    checkpoint: str
    train_config: dict[str, Any]
    """The pretraining config, or the fine-tuning config of a fine-tuned model (the Item's hyperparameters)."""
    class_names: tuple[str, ...]
    """The land-cover classes of the pretraining labels (an encoder has no classifier), or the fine-tuned model's."""
    max_abs_diff: float
    """Largest difference between the exported file's outputs and the model's on the export check."""
    finetuned: FineTuning | None = None
    """None for a pretrained encoder."""


@dataclass(frozen=True)
class Evaluation:
    """An evaluate run of the exported model and the model's own metrics in it."""

    run_id: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainRecord:
    """What MLflow holds of the train run behind an export (there is none for a bare checkpoint file)."""

    run_id: str
    code_version: str | None
    """The run's ``softcon.code_version`` tag: the commit that trained the model."""
    registered: str | None = None
    """The ``models:/…`` URI the export was asked for, when it was one."""
    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    """Chosen params of the ingest and labels runs of the same pipeline run (its STAC source, its label source)."""
    evaluations: tuple[Evaluation, ...] = ()


@dataclass(frozen=True)
class TrainingArea:
    """Where the training data lies, in EPSG:4326 (lon/lat)."""

    geometry: dict[str, Any]
    """GeoJSON geometry."""
    bbox: tuple[float, float, float, float]
    """West, south, east, north."""
    origin: str
    """What it was read from."""


@dataclass(frozen=True)
class Lineage:
    """The training data as the checkpoint's config, its store and the store's cube record it; None if unrecorded."""

    store: str | None
    fingerprint: str | None
    source: str | None
    """Where the store came from: a cube path, or a published dataset (``ssl4eo-s12``)."""
    tiles: tuple[str, ...]
    build_params: dict[str, Any]
    """The preprocess (or import) parameters the store was built with."""
    label_scheme: str | None
    label_product: str | None
    label_source: str | None
    time_range: tuple[str, str] | None
    """First and last acquisition day of the store's samples."""
    extent: TrainingArea | None = None
    """The union of the store's patches on the tile grid; None for a store without a grid, or when it is gone."""


def require(module: str, purpose: str) -> Any:
    """Import a package of the ``export`` extra, with an error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ValueError(f"{purpose} needs the {module} package: pip install 'softcon-pipeline[export]'") from error


def read_lineage(train_config: dict[str, Any]) -> Lineage:
    """What the training store named in ``train_config`` (and its cube) record; empty when they are gone."""
    store: str | None = train_config.get("store")
    attrs = (read_store_attrs(store) if store else None) or {}
    cube = attrs.get("cube")
    land_cover = _land_cover_attrs(cube, attrs.get("tiles", [])) if cube else {}
    return Lineage(
        store=store,
        fingerprint=attrs.get("fingerprint"),
        source=attrs.get("source") or cube,
        tiles=tuple(attrs.get("tiles", [])),
        build_params=dict(attrs.get("params") or {}),
        label_scheme=attrs.get("label_scheme") or land_cover.get("class_scheme"),
        label_product=land_cover.get("product"),
        label_source=land_cover.get("source") or attrs.get("ssl4eo_labels"),
        time_range=_time_range(store) if store and attrs else None,
        extent=_store_extent(store, attrs) if store and attrs else None,
    )


def _land_cover_attrs(cube: str, tiles: list[str]) -> dict[str, Any]:
    """The attributes of the first of ``tiles`` with a land-cover array (product, source, scheme), else empty."""
    try:
        root = open_cube(cube)
    except (FileNotFoundError, ValueError):
        return {}
    for tile_id in tiles:
        group = tile_group(root, tile_id)
        if group is not None and "landcover" in group:
            return dict(group["landcover"].attrs)
    return {}


def _store_extent(store: str, attrs: dict[str, Any]) -> TrainingArea | None:
    """The union (EPSG:4326) of each grid tile's rectangle around its patches in the store, from the store's plan
    (``tile``, ``row``, ``col``), its ``resolution_m`` and patch size; None when the store has no grid."""
    tiles, resolution = list(attrs.get("tiles") or []), attrs.get("resolution_m")
    size = (attrs.get("params") or {}).get("patch_size")
    try:
        group = zarr.open_group(store, mode="r")
        tile, row, col = (_values(group, name) for name in ("tile", "row", "col"))
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if not tiles or resolution is None or size is None or tile is None or row is None or col is None:
        return None
    polygons = []
    for index in np.unique(tile):
        members = tile == index
        top, left = int(row[members].min()), int(col[members].min())
        height, width = int(row[members].max()) + size - top, int(col[members].max()) + size - left
        polygon = grid_polygon(tiles[int(index)], float(resolution), top, left, height, width)
        if polygon is not None:
            polygons.append(polygon)
    if not polygons:
        return None
    area = shapely.union_all(polygons)
    west, south, east, north = (float(value) for value in area.bounds)
    return TrainingArea(
        geometry=shapely.geometry.mapping(area),
        bbox=(west, south, east, north),
        origin="the extent of the training store's patches on the tile grid",
    )


def _values(group: zarr.Group, name: str) -> np.ndarray | None:
    """All values of the array ``name`` of ``group``; None when it is a group."""
    node = group[name]
    return np.asarray(node[:]) if isinstance(node, zarr.Array) else None


def training_area(lineage: Lineage, record: TrainRecord | None) -> TrainingArea | None:
    """The training area: the ``bbox`` param of the ingest run of the model's pipeline run when recorded (the area
    the user asked for), else the extent of the store's patches; None when neither is known."""
    text = record.sources.get("ingest", {}).get("bbox") if record else None
    try:
        bbox = json.loads(text) if text else None
    except json.JSONDecodeError:
        bbox = None
    if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(value, int | float) for value in bbox):
        west, south, east, north = (float(value) for value in bbox)
        return TrainingArea(
            geometry=shapely.geometry.mapping(shapely.box(west, south, east, north)),
            bbox=(west, south, east, north),
            origin="the ingest bbox of the pipeline run",
        )
    return lineage.extent


def _time_range(store: str) -> tuple[str, str] | None:
    """First and last day of the store's ``time`` array (one value per sample), or None when unreadable."""
    try:
        array = zarr.open_group(store, mode="r")["time"]
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if not isinstance(array, zarr.Array):
        return None
    times = np.asarray(array[:]).astype("datetime64[D]")
    return (str(times.min()), str(times.max())) if times.size else None


def data_licences(lineage: Lineage) -> list[str]:
    """The licence and attribution lines of the data the weights were trained on."""
    lines = [SENTINEL_ATTRIBUTION]
    if lineage.source in SOURCE_LICENCES:
        lines.append(SOURCE_LICENCES[lineage.source])
    if lineage.label_scheme in LABEL_LICENCES:
        lines.append(f"Labels: {LABEL_LICENCES[lineage.label_scheme]}")
    else:
        scheme = lineage.label_scheme or "not recorded"
        lines.append(f"Labels: scheme {scheme}; the licence of its source ({lineage.label_source or '?'}) applies.")
    return lines


def model_name(model: ExportedModel) -> str:
    """A name for the model: method, backbone and sensor (``softcon-resnet50-s2``), and a fine-tuned model's task
    (``softcon-resnet50-s2-segmentation``)."""
    task = f"-{model.finetuned.task}" if model.finetuned else ""
    return f"softcon-{model.backbone}-{model.sensor}{task}".replace("_", "-")


def output_shape(model: ExportedModel) -> list[int]:
    """The module's output shape at the trained size (-1: the batch), and its dimension names."""
    if model.finetuned is None:
        return [-1, model.num_features]
    classes = len(model.finetuned.class_names)
    if model.finetuned.task == "segmentation":
        return [-1, classes, model.img_size, model.img_size]
    return [-1, classes]


def output_dims(model: ExportedModel) -> list[str]:
    """Names of ``output_shape``'s dimensions."""
    if model.finetuned is None:
        return ["batch", "embedding"]
    return ["batch", "class", "height", "width"] if model.finetuned.task == "segmentation" else ["batch", "class"]


def _sensor_values(model: ExportedModel) -> str:
    """What the raw input values are, by sensor and band set."""
    if model.sensor == "s1":
        return "Sentinel-1 backscatter in dB (float32; NaN = nodata)"
    level = "L1C top-of-atmosphere" if "B10" in model.bands else "L2A surface"
    return f"Sentinel-2 {level} reflectance x 10000 (uint16 as stored; 0 = nodata)"


def _loading(model: ExportedModel) -> str:
    """A snippet that loads the export with its own library and embeds one batch."""
    shape = f"(batch, {len(model.bands)}, {model.img_size}, {model.img_size})"
    output = "logits" if model.finetuned else "features"
    if model.format == "timm" and model.finetuned and model.finetuned.task == "segmentation":
        return (
            "from softcon.tasks.export import timm_segmentation_model  # pip install softcon-pipeline\n\n"
            'model = timm_segmentation_model("PATH/TO/THIS/FOLDER")  # timm encoder + decoder.safetensors\n'
            f"logits = model(images)  # images: normalised float32 {shape}\n\n"
            "# the encoder alone, without this project: its multi-scale feature maps\n"
            'encoder = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, features_only=True)'
        )
    if model.format == "timm":
        return (
            "import timm\n\n"
            'encoder = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()\n'
            f"{output} = encoder(images)  # images: normalised float32 {shape}"
        )
    if model.format == "onnx":
        return (
            "import onnxruntime\n\n"
            'session = onnxruntime.InferenceSession("model.onnx")\n'
            f'({output},) = session.run(None, {{"images": images}})  # images: normalised float32 numpy {shape}'
        )
    return (
        "import torch\n\n"
        f'encoder = torch.jit.load("{model.files[0].name}")\n'
        f"{output} = encoder(images)  # images: normalised float32 {shape}"
    )


def size_rule(fmt: str, patch_size: int | None) -> SizeRule:
    """Which image sizes an export takes (``tasks.export.check_export`` checks it at a second size):

    - ``any``: a CNN (global average pooling) in every format: any height and width, also non-square; the ONNX
      graph has dynamic height and width axes, and the TorchScript trace holds no image size;
    - ``patch-multiples``: a ViT's timm folder (``dynamic_img_size``): any height and width in whole patches;
    - ``trained``: a ViT's ONNX and TorchScript graphs: only the trained size, since the trace fixes the position
      embedding's grid.
    """
    if patch_size is None:
        return "any"
    return "patch-multiples" if fmt == "timm" else "trained"


def size_text(model: ExportedModel) -> str:
    """Which image sizes the export takes, in words."""
    trained = f"trained at {model.img_size} x {model.img_size} px"
    rule = size_rule(model.format, model.patch_size)
    if rule == "any":
        return f"any height and width, also non-square ({trained}; a CNN, in every format)"
    if rule == "patch-multiples":
        return (
            f"any height and width in multiples of the ViT patch, {model.patch_size} px ({trained}; the pipeline "
            f"centre-crops larger images that are not whole patches to {model.img_size})"
        )
    return f"{model.img_size} x {model.img_size} px only (the ViT's {model.format} graph is traced at that size)"


def _fenced(language: str, text: str) -> str:
    return f"```{language}\n{text}\n```"


def _input_section(model: ExportedModel) -> str:
    rows = "\n".join(
        f"| {index} | {band} | {mean:.6g} | {std:.6g} |"
        for index, (band, mean, std) in enumerate(zip(model.bands, model.mean, model.std, strict=True))
    )
    return (
        "## Input contract\n\n"
        f"- bands, in this order ({len(model.bands)}): {', '.join(model.bands)}; raw values: {_sensor_values(model)}\n"
        f"- normalisation: {NORMALISATION_RULE}\n"
        f"- image size: {size_text(model)}\n"
        "- dtype float32, layout (batch, band, height, width)\n\n"
        f"| index | band | mean | std |\n|---|---|---|---|\n{rows}"
    )


def _training_section(model: ExportedModel) -> str:
    config = model.train_config
    return (
        "## Training\n\n"
        f"- backbone `{model.backbone}`, objective {config.get('objective')}, {model.step} steps, batch size "
        f"{config.get('batch_size')}, lr {config.get('lr')}, lambda_soft {config.get('lambda_soft')}, teacher "
        f"{config.get('teacher')}; the exported weights are the evaluation encoder (the EMA teacher, or the student "
        "itself with teacher stop_gradient)\n"
        f"- initial weights: {config.get('weights') or 'random initialisation'}\n"
        f"- checkpoint: `{model.checkpoint}`\n"
        f"- pretraining label classes ({len(model.class_names)}): {', '.join(model.class_names) or 'none'}\n\n"
        "Full training config:\n\n" + _fenced("json", json.dumps(config, indent=2, sort_keys=True))
    )


def _finetuning_section(model: ExportedModel, finetuned: FineTuning) -> str:
    rows = "\n".join(
        f"| {index} | {name} | {code} |"
        for index, (name, code) in enumerate(zip(finetuned.class_names, finetuned.class_codes, strict=True))
    )
    config = model.train_config
    metrics = "\n".join(f"- {name}: {value:.4g}" for name, value in sorted(finetuned.metrics.items()))
    return (
        "## Fine-tuning\n\n"
        f"- task: {finetuned.task}; backbone `{model.backbone}`, encoder {config.get('freeze')} "
        f"(frozen = the head alone, partial = the last quarter of the encoder too, full = all), {config.get('epochs')} "
        f"epochs at most, best epoch {finetuned.best_epoch}, lr {config.get('lr')}, layer decay "
        f"{config.get('layer_decay')}, label budget {config.get('train_fraction')} of the train split\n"
        f"- pretrained encoder: `{finetuned.encoder}` (read from `{finetuned.encoder_file}`)\n"
        f"- fine-tuned model file: `{model.checkpoint}`\n"
        f"- labels: `{config.get('store') or config.get('bigearthnet')}`\n\n"
        f"Classes ({len(finetuned.class_names)}), in output order:\n\n| index | class | code |\n|---|---|---|\n{rows}"
        "\n\nMetrics of the best epoch (val and test splits of the labels):\n\n"
        f"{metrics}\n\nFull fine-tuning config:\n\n" + _fenced("json", json.dumps(config, indent=2, sort_keys=True))
    )


def _lineage_section(lineage: Lineage, record: TrainRecord | None) -> str:
    stac = record.sources.get("ingest", {}).get("stac") if record else None
    area = training_area(lineage, record)
    where = f"{', '.join(f'{value:.6f}' for value in area.bbox)} ({area.origin})" if area else "not recorded"
    tiles = f" (tiles: {', '.join(lineage.tiles)})" if lineage.tiles else ""
    days = f"{lineage.time_range[0]} to {lineage.time_range[1]}" if lineage.time_range else "not recorded"
    return (
        "## Training data lineage\n\n"
        f"- training store: `{lineage.store or 'not recorded'}`\n"
        f"- store fingerprint: `{lineage.fingerprint or 'not recorded'}`\n"
        f"- built from: `{lineage.source or 'not recorded'}`{tiles}\n"
        f"- STAC source: {f'`{stac}`' if stac else 'not recorded'}\n"
        f"- land-cover labels: scheme {lineage.label_scheme or 'not recorded'}, product "
        f"{lineage.label_product or 'not recorded'}, source `{lineage.label_source or 'not recorded'}`\n"
        f"- acquisition days: {days}\n"
        f"- training area (EPSG:4326, west, south, east, north): {where}\n\n"
        "Store build parameters:\n\n" + _fenced("json", json.dumps(lineage.build_params, indent=2, sort_keys=True))
    )


def _provenance_section(record: TrainRecord | None, stage: str) -> str:
    if record is None:
        return f"## Provenance\n\n- MLflow {stage} run: none recorded (exported from a checkpoint file)"
    asked = f" (asked for as `{record.registered}`)" if record.registered else ""
    return (
        "## Provenance\n\n"
        f"- MLflow {stage} run: `{record.run_id}`{asked}\n"
        f"- code version (tag `softcon.code_version` of the run): `{record.code_version or 'not recorded'}`"
    )


def _evaluation_section(record: TrainRecord | None) -> str:
    if record is None or not record.evaluations:
        return "## Evaluation\n\nNone recorded."
    lines = [
        f"- evaluate run `{evaluation.run_id}`: "
        + ", ".join(f"{name} {value:.4g}" for name, value in sorted(evaluation.metrics.items()))
        for evaluation in record.evaluations
    ]
    return "## Evaluation\n\n" + "\n".join(lines)


def _finetuned_output(finetuned: FineTuning, max_abs_diff: float) -> str:
    classes = len(finetuned.class_names)
    if finetuned.task == "segmentation":
        what = (f"(batch, {classes}, H, W) float32 class logits per pixel, at the input's size: the argmax over dim 1 "
                "is the class index (the table under Fine-tuning)")  # fmt: skip
    else:
        what = (f"(batch, {classes}) float32 class logits per image: sigmoid > 0.5 marks a class present (multi-label, "
                "classes in the table under Fine-tuning)")  # fmt: skip
    return (f"## Output\n\n{what}. Reloaded with its library, the export reproduced the fine-tuned model to a largest "
            f"difference of {max_abs_diff:.2g}.")  # fmt: skip


def _finetuned_evaluation(finetuned: FineTuning) -> str:
    names = [name for name in sorted(finetuned.metrics) if name.startswith(("val/", "test/")) and name.count("/") == 1]
    return "## Evaluation\n\n" + "\n".join(f"- {name}: {finetuned.metrics[name]:.4g}" for name in names)


def model_card(model: ExportedModel, lineage: Lineage, record: TrainRecord | None) -> str:
    """The card's Markdown text."""
    files = "\n".join(f"| `{file.name}` | {file.title} |" for file in model.files)
    licences = "\n".join(f"- {line}" for line in data_licences(lineage))
    finetuned = model.finetuned
    if finetuned is None:
        title = f"# {model_name(model)}: SoftCon-pretrained {model.backbone} encoder for {', '.join(model.bands)}"
        intro = (
            "A frozen feature extractor pretrained with SoftCon (label-guided soft contrastive learning) by the "
            f"softcon-pipeline project, exported as **{model.format}**. It maps normalised images (batch, "
            f"{len(model.bands)}, H, W) to embeddings (batch, {model.num_features}) and has no classifier: train a "
            "head (a linear probe, kNN) on the embeddings for a downstream task."
        )
        output = (
            f"## Output\n\n(batch, {model.num_features}) float32 embeddings: the backbone's pooled features (global "
            "average pooling for a CNN, the class token after the final norm for a ViT). Reloaded with its library, "
            f"the export reproduced the pipeline's encoder to a largest difference of {model.max_abs_diff:.2g}."
        )
        training, evaluation = _training_section(model), _evaluation_section(record)
    else:
        kind = "semantic segmentation" if finetuned.task == "segmentation" else "multi-label classification"
        title = f"# {model_name(model)}: {model.backbone} fine-tuned for {kind} of {', '.join(model.bands)}"
        intro = (
            f"The encoder `{finetuned.encoder}` fine-tuned with a {finetuned.task} head on "
            f"{len(finetuned.class_names)} land-cover classes by the softcon-pipeline project, exported as "
            f"**{model.format}**."
        )
        output = _finetuned_output(finetuned, model.max_abs_diff)
        training, evaluation = _finetuning_section(model, finetuned), _finetuned_evaluation(finetuned)
    sections = [
        title,
        intro,
        f"| file | what |\n|---|---|\n{files}",
        "## Loading\n\n" + _fenced("python", _loading(model)),
        _input_section(model),
        output,
        training,
        _lineage_section(lineage, record),
        _provenance_section(record, "finetune" if finetuned else "train"),
        evaluation,
        "## Licences\n\n- The code that trained and exported the model: Apache-2.0 (softcon-pipeline).\n" + licences,
    ]
    return "\n\n".join(sections) + "\n"


def stac_item(
    model: ExportedModel, lineage: Lineage, record: TrainRecord | None, *, written: datetime
) -> dict[str, Any]:
    """The STAC Item (MLM extension) describing the export, as a JSON-able dict.

    Args:
        written: when the checkpoint was written: the Item's ``datetime`` when the store's days are not known.

    Raises:
        pydantic.ValidationError: a field ``stac-model`` refuses (a band count that does not match the shape …).
    """
    require("stac_model", "the STAC Item of an export")  # a clear error when the extra is not installed
    from stac_model.base import ModelHyperParameters, ProcessingExpression
    from stac_model.input import InputStructure, ModelInput, ValueScalingZScore
    from stac_model.output import MLMClassification, ModelOutput, ModelResult
    from stac_model.schema import MLModelProperties

    channels = len(model.bands)
    finetuned = model.finetuned
    task = MLM_TASKS[finetuned.task] if finetuned else "similarity-search"
    classes = (
        [MLMClassification(value=index, name=name, description=f"{name} (class code {code})",
                           color_hint=class_colour(code).lstrip("#").upper())
         for index, (name, code) in enumerate(zip(finetuned.class_names, finetuned.class_codes, strict=True))]
        if finetuned else None
    )  # fmt: skip
    source = (
        f"the encoder {finetuned.encoder}, fine-tuned on {lineage.store or '(not recorded)'}"
        if finetuned
        else f"SoftCon pretraining on the training store {lineage.store or '(not recorded)'}"
    )
    properties = MLModelProperties(
        name=model_name(model),
        architecture=model.backbone,
        tasks={task},
        framework=model.framework,
        framework_version=model.framework_version,
        total_parameters=model.total_parameters,
        pretrained=True,
        pretrained_source=source,
        input=[
            ModelInput(
                name=f"{model.sensor} {channels} bands",
                bands=list(model.bands),
                input=InputStructure(
                    shape=[-1, channels, model.img_size, model.img_size],
                    dim_order=["batch", "bands", "height", "width"],
                    data_type="float32",
                ),
                value_scaling=[
                    ValueScalingZScore(mean=mean, stddev=std) for mean, std in zip(model.mean, model.std, strict=True)
                ],
                pre_processing_function=ProcessingExpression(
                    format="python", expression="softcon.models.data.StoreDataset.normalise"
                ),
            )
        ],
        output=[
            ModelOutput(
                name="class logits" if finetuned else "embedding",
                tasks={task},
                result=ModelResult(shape=output_shape(model), dim_order=output_dims(model), data_type="float32"),
                classes=classes,
            )
        ],
        hyperparameters=ModelHyperParameters(**model.train_config),
    )
    mlm = json.loads(properties.model_dump_json(by_alias=True))
    bands = [{"name": band} for band in model.bands]
    start_end = (
        {"start_datetime": f"{lineage.time_range[0]}T00:00:00Z", "end_datetime": f"{lineage.time_range[1]}T23:59:59Z"}
        if lineage.time_range
        else {}
    )
    area = training_area(lineage, record)
    item = pystac.Item(
        id=f"{model_name(model)}-{record.run_id if record else Path(model.checkpoint).stem}",
        geometry=area.geometry if area else None,
        bbox=list(area.bbox) if area else None,
        datetime=None if start_end else written,
        properties={
            "title": f"{model_name(model)} ({model.format})",
            "description": f"{_what(model)}; image size: {size_text(model)}. The geometry is the training area "
            f"({area.origin if area else 'not recorded'}). See {MODEL_CARD}.",
            "bands": bands,
            **start_end,
            **mlm,
        },
        stac_extensions=[MLM_SCHEMA_URI],
    )
    for file in model.files:
        # STAC 1.1's core schema allows ``bands`` in the properties (where MLM 1.5.2 looks for them) only when an
        # asset has them too: the model file's.
        extra = {"mlm:artifact_type": file.artifact_type, "bands": bands} if file.artifact_type else {}
        item.add_asset(
            file.key,
            pystac.Asset(href=f"./{file.name}", title=file.title, media_type=file.media_type, roles=list(file.roles),
                         extra_fields=extra),
        )  # fmt: skip
    item.add_asset(
        "model_card",
        pystac.Asset(href=f"./{MODEL_CARD}", title="Model card", media_type="text/markdown", roles=["metadata"]),
    )
    if record:
        item.properties[f"softcon:{'finetune' if finetuned else 'train'}_run_id"] = record.run_id
        item.properties["softcon:code_version"] = record.code_version
    return item.to_dict(include_self_link=False)


def _what(model: ExportedModel) -> str:
    """What the exported model is, in a few words."""
    if model.finetuned is None:
        return f"SoftCon-pretrained {model.backbone} encoder"
    kind = "semantic segmentation" if model.finetuned.task == "segmentation" else "multi-label classification"
    return f"{model.backbone} fine-tuned for {kind} ({len(model.finetuned.class_names)} classes)"


def write_model_card(out: Path, model: ExportedModel, lineage: Lineage, record: TrainRecord | None) -> Path:
    """Write ``README.md`` into ``out``."""
    path = out / MODEL_CARD
    path.write_text(model_card(model, lineage, record))
    return path


def write_stac_item(out: Path, model: ExportedModel, lineage: Lineage, record: TrainRecord | None) -> Path:
    """Write ``model.stac.json`` into ``out``; its ``datetime`` (without a known time range) is the checkpoint's
    modification time, so a re-export of the same checkpoint writes the same Item."""
    written = datetime.fromtimestamp(os.stat(model.checkpoint).st_mtime, UTC)
    path = out / STAC_ITEM
    path.write_text(json.dumps(stac_item(model, lineage, record, written=written), indent=2) + "\n")
    return path
