"""One typed configuration for every stage.

Each stage has a frozen pydantic model; the same models are the Prefect flow parameters, so the Prefect
UI shows them as typed forms and refuses bad values before a run starts. Values come, from lowest to
highest precedence, from the field defaults, a YAML file (one section per stage), ``SOFTCON_<STAGE>__<FIELD>``
environment variables (for example ``SOFTCON_TRAIN__STEPS=500``) and CLI options.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import EnvSettingsSource

from softcon.settings import get_settings

S2Band = Literal["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
S2_L2A_BANDS: tuple[S2Band, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)  # fmt: skip
"""Sentinel-2 L2A bands in the order the cube and the training store keep them (no B10 in L2A); ingest's default."""
S2_L1C_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
"""Sentinel-2 L1C bands in SSL4EO-S12's order (its ``s2c`` modality, and SoftCon's 13-band checkpoints)."""
S1_POLARIZATIONS: tuple[str, ...] = ("VV", "VH")
CollectionName = Literal["sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-2-l1c", "sentinel-1-rtc", "sentinel-1-grd"]
"""STAC collections the ingest stage knows how to read (see ``tasks/collections.py``)."""
LabelScheme = Literal["worldcover", "dynamic-world", "io-lulc", "corine-bigearthnet19"]


def _default_path(name: str) -> str:
    return str(get_settings().data_dir / name)


def _plain_descriptions(schema: dict[str, Any]) -> None:
    """Docstrings write ``code`` and descriptions `code`; forms (the Prefect UI) show text as it is: no backticks."""
    for node in (schema, *schema.get("properties", {}).values()):
        if isinstance(node.get("description"), str):
            node["description"] = node["description"].replace("`", "")


class StageConfig(BaseModel):
    """Common behaviour: frozen, unknown keys refused (a typo in YAML is an error, not a silent default)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_plain_descriptions)


class DaskStageConfig(StageConfig):
    """A stage whose work runs on a Dask cluster: an existing scheduler, or a LocalCluster it starts."""

    dask_address: str | None = Field(
        default_factory=lambda: get_settings().dask_address,
        description="Existing scheduler (default $SOFTCON_DASK_ADDRESS); none: a LocalCluster per run.",
    )
    n_workers: int = Field(default=2, gt=0, description="LocalCluster worker processes.")


def require_training_split(val_fraction: float, test_fraction: float) -> None:
    """Refuse held-out fractions that leave no training split."""
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training split")


def _bbox_from_text(value: Any) -> Any:
    """A bbox may be written "W,S,E,N" (the CLI's and a form field's spelling) as well as four numbers."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        try:
            return tuple(float(part) for part in parts)
        except ValueError:
            raise ValueError(f"bbox {value!r} is not four numbers W,S,E,N (lon/lat degrees)") from None
    return value


BBox = Annotated[
    tuple[float, float, float, float],
    BeforeValidator(_bbox_from_text),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*-?[\d.]+\s*(,\s*-?[\d.]+\s*){3}$", "title": "W,S,E,N"},
                {"type": "array", "prefixItems": [{"type": "number"}] * 4, "minItems": 4, "maxItems": 4},
            ]
        }
    ),
]
"""Lon/lat west, south, east, north: four numbers, or one "W,S,E,N" string."""


# How ingest and labels reach a STAC source and its assets (tasks/stac_access.py): one definition for both configs.
StacSigning = Annotated[
    Literal["auto", "planetary-computer", "none"],
    Field(
        description="Asset URL signing: planetary-computer (SAS tokens), none, or auto (Planetary Computer "
        "when the STAC URL is on planetarycomputer.microsoft.com)."
    ),
]
StacHeaders = Annotated[
    dict[str, str],
    Field(
        description="HTTP header name -> NAME of the environment variable holding its value (never the secret "
        "itself), sent to the STAC API and on asset reads, e.g. {Authorization: MY_STAC_TOKEN}."
    ),
]
Retries = Annotated[int, Field(ge=0, description="Retries of a transient HTTP/read failure.")]
RetryDelay = Annotated[float, Field(ge=0, description="First retry delay, seconds (doubles each retry).")]


class IngestConfig(DaskStageConfig):
    """Search a STAC source and load Sentinel-2/-1 onto a fixed UTM tile grid in a Zarr cube."""

    stac: str = Field(description="STAC API URL, static catalog, or ItemCollection file.")
    collections: list[CollectionName] = Field(
        default=["sentinel-2-l2a", "sentinel-1-rtc"], min_length=1, description="STAC collections to search."
    )
    bbox: BBox | None = Field(
        default=None, description="Area as lon/lat west,south,east,north, e.g. 11.0,46.4,11.1,46.5 (or give `area`)."
    )
    area: str | None = Field(
        default=None,
        description="GeoJSON/GeoPackage (any vector file) whose geometries are the area; only tiles that touch "
        "them are ingested. With `bbox` too, the area is clipped to the bbox.",
    )
    start: date = Field(description="First acquisition day (inclusive).")
    end: date = Field(description="Last acquisition day (inclusive).")
    bands: list[S2Band] = Field(
        default=list(S2_L2A_BANDS), min_length=1, description="Sentinel-2 bands (B10, cirrus: sentinel-2-l1c only)."
    )
    resolution: float = Field(default=10.0, gt=0, description="Pixel size in metres.")
    tile_size: int = Field(
        default=1056, gt=0, description="Tile side in pixels (1056 = 4 x 264 px SSL4EO-S12 patches, 10.56 km at 10 m)."
    )
    epsg: int | None = Field(
        default=None,
        ge=32601,
        le=32760,
        description="UTM EPSG code of the grid; default the zone of the area's centre (set it near zone edges).",
    )
    max_cloud: float = Field(default=80.0, ge=0, le=100, description="Max item eo:cloud_cover, percent.")
    max_tile_cloud: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Skip a tile-date whose SCL cloud/shadow fraction over the area's pixels is above this.",
    )
    max_tile_nodata: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Skip a tile-date whose nodata fraction over the area's pixels is above this (a small area on a "
        "large tile keeps its dates).",
    )
    sign: StacSigning = "auto"
    headers: StacHeaders = Field(default_factory=dict)
    retries: Retries = 3
    retry_delay: RetryDelay = 1.0
    read_threads: int | None = Field(
        default=None,
        ge=1,
        description="Asset reads run at once within one tile's load (odc-stac pool); default 4 for assets read "
        "over the network (latency-bound), 1 for local files (measured slower with threads on 2 cores).",
    )
    cube: str = Field(default_factory=lambda: _default_path("cube.zarr"), description="Cube path or URL.")

    @field_validator("bbox")
    @classmethod
    def _check_bbox(cls, bbox: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if bbox is None:
            return None
        west, south, east, north = bbox
        if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90):
            raise ValueError(f"bbox {bbox} is outside lon [-180, 180] / lat [-90, 90]; give W,S,E,N in degrees")
        if west >= east or south >= north:
            across = " (an area across the antimeridian: split it into two runs)" if west > east else ""
            raise ValueError(f"bbox {bbox} needs west < east and south < north (order: W,S,E,N){across}")
        return bbox

    @model_validator(mode="after")
    def _check_dates(self) -> Self:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        if self.bbox is None and self.area is None:
            raise ValueError("give the area to ingest: bbox (W,S,E,N) or area (a GeoJSON/GeoPackage file)")
        return self


class LabelsConfig(StageConfig):
    """Bring a land-cover product onto every tile of a cube as its ``landcover`` array."""

    cube: str = Field(default_factory=lambda: _default_path("cube.zarr"), description="Cube path or URL.")
    source: str = Field(description="STAC API URL or file, a local raster (or raster URL), or a vector file.")
    collection: str = Field(
        default="esa-worldcover", description="Collection to search when source is STAC (or io-lulc-annual-v02)."
    )
    year: int | None = Field(default=None, description="Product year of a STAC collection; default the latest.")
    scheme: LabelScheme | Literal["field"] | str | None = Field(
        default=None,
        description="Class scheme name, or a path to a YAML code-to-class mapping, or `field` (vector sources: "
        "one class per value of the class attribute, named from `name_field`); default from the collection "
        "(esa-worldcover: worldcover, io-lulc-*: io-lulc), worldcover for files.",
    )
    class_field: str | None = Field(default=None, description="Class attribute of vector sources.")
    name_field: str | None = Field(
        default=None, description="With scheme `field`: the attribute holding each class's name (default the value)."
    )
    all_touched: bool = Field(
        default=False,
        description="Vector pixel coverage: False = a pixel takes the polygon holding its centre (unbiased "
        "areas); True = every pixel a polygon touches.",
    )
    overlap: Literal["last", "smallest"] = Field(
        default="last", description="Overlapping polygons: the last in file order wins, or the smallest."
    )
    unknown_codes: Literal["auto", "report", "error"] = Field(
        default="auto",
        description="Codes outside the scheme: auto stops when they cover most labelled pixels (the scheme does "
        "not fit the product) and otherwise writes them as nodata; report always writes them as nodata; error "
        "stops on any.",
    )
    # How a STAC source and its assets are reached, as for ingest (both stages go through tasks/stac_access.py).
    sign: StacSigning = "auto"
    headers: StacHeaders = Field(default_factory=dict)
    retries: Retries = 3
    retry_delay: RetryDelay = 1.0


class PreprocessConfig(DaskStageConfig):
    """Cut tiles into patches with Dask and write the training store."""

    cube: str = Field(default_factory=lambda: _default_path("cube.zarr"), description="Cube path or URL.")
    out: str = Field(default_factory=lambda: _default_path("store.zarr"), description="Training store.")
    patch_size: int = Field(default=264, gt=0, description="Patch side in pixels (SSL4EO-S12: 264).")
    stride: int | None = Field(default=None, gt=0, description="Patch stride in pixels; default patch_size.")
    max_cloud_fraction: float = Field(default=0.1, ge=0, le=1, description="Drop patches cloudier than this.")
    max_nodata_fraction: float = Field(default=0.05, ge=0, le=1, description="Drop patches with more nodata.")
    label_threshold: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="A class is present (multi-hot 1) when it covers more than this fraction of a patch's labelled "
        "pixels. 0.05 sits above the few per cent of boundary and speckle pixels that mode resampling and the "
        "products' own errors leave in any patch (so noise does not switch a class on), and below a small real "
        "class (a village or a river in a 2.6 km patch covers 5-10 %).",
    )
    min_labelled_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Patches with less labelled area are flagged as unlabelled."
    )
    masks: bool = Field(
        default=False,
        description="Also write each patch's per-pixel land cover as class indices (`masks`, 255 = no class), the "
        "targets of segmentation fine-tuning.",
    )
    split_block: int | None = Field(
        default=None, gt=0, description="Side in pixels of the spatial split blocks; default one tile."
    )
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of split blocks held out for validation."
    )
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="Fraction of split blocks held out for testing.")
    seed: int = Field(default=0, description="Seed of the split.")
    s1_max_gap_days: float = Field(
        default=3, ge=0, description="An S1 date pairs with an S2 date at most this many days away (nearest wins)."
    )
    samples_per_block: int = Field(
        default=64, gt=0, description="Samples per write block = per Zarr shard: one shard read is one batch."
    )

    @model_validator(mode="after")
    def _check_split(self) -> Self:
        require_training_split(self.val_fraction, self.test_fraction)
        if self.stride is not None and self.stride > self.patch_size:
            raise ValueError(f"stride {self.stride} is larger than patch_size {self.patch_size}")
        return self


class TrainConfig(StageConfig):
    """SoftCon pretraining of an encoder on a training store."""

    store: str = Field(default_factory=lambda: _default_path("store.zarr"), description="Training store.")
    sensor: Literal["s2", "s1"] = Field(default="s2", description="Which modality the encoder sees.")
    backbone: str = Field(default="resnet18", description="timm model name (resnet18, resnet50, vit_small…).")
    weights: str | None = Field(default=None, description="Local pretrained weights file.")
    lambda_soft: float = Field(default=1.0, ge=0, description="Weight of the soft term; 0 = hard contrastive.")
    label_similarity: Literal["cosine", "jaccard", "fractions"] = Field(
        default="cosine",
        description="Label similarity of the soft term: cosine or jaccard of multi-hot labels, or cosine of fractions.",
    )
    soft_loss: Literal["sigmoid", "mse", "soft_ce"] = Field(
        default="sigmoid",
        description="Form of the soft term (ablation; the paper's loss code is unpublished): sigmoid = BCE between "
        "the scaled and biased embedding similarity and the label similarity (the project's reading of the paper); "
        "mse = squared error between embedding and label similarity; soft_ce = cross-entropy between each row's "
        "label similarities normalised to sum 1 and the softmax of its embedding similarities / temperature.",
    )
    teacher: Literal["ema", "stop_gradient"] = Field(
        default="ema",
        description="Target branch (ablation): ema = an EMA copy of the student (ema_momentum), the evaluated "
        "encoder; stop_gradient = the student itself on the unmasked view without gradient (SimSiam), no copy, "
        "so the evaluated encoder is the student.",
    )
    temperature: float = Field(default=0.1, gt=0, description="InfoNCE temperature.")
    mask_ratio: float = Field(default=0.3, ge=0, lt=1, description="Siamese masking ratio of the student view.")
    mask_patch: int = Field(default=8, gt=0, description="Side in pixels of the masked squares.")
    ema_momentum: float = Field(default=0.99, gt=0, le=1, description="Teacher EMA momentum at step 0.")
    embed_dim: int = Field(default=128, gt=0, description="Projection head output size.")
    crop_size: int | None = Field(default=None, gt=0, description="Random crop at training time.")
    batch_size: int = Field(default=64, gt=1, description="Samples per optimizer step, over all ranks.")
    steps: int = Field(default=300, gt=0, description="Optimizer steps.")
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate (AdamW, cosine decay after warm-up).")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=20, ge=0, description="Linear learning-rate warm-up steps.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clip.")
    checkpoint_every: int = Field(default=100, gt=0, description="Steps between checkpoints.")
    resume: bool = Field(default=False, description="Continue from the last checkpoint in out.")
    out: str = Field(default_factory=lambda: _default_path("checkpoints"), description="Checkpoint folder.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes.")
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads decoding (and augmenting) each batch, in the main process or each worker. Default: "
        "1 on CPU, where the model needs the cores; on CUDA one per core but one, up to 8, without workers, else 1.",
    )
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    augment_on_device: bool | None = Field(
        default=None,
        description="Crop, flip, turn and normalise batches on the training device (GpuAugment) instead of in the "
        "loader; the loader then only decodes. Default: on for CUDA, off for CPU. Same values either way.",
    )
    seed: int = Field(default=0, description="Seed of initialisation, augmentation and sampling.")
    objective: Literal["softcon", "supervised"] = Field(
        default="softcon", description="softcon, or the supervised multi-label head reference."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Autocast dtype on CUDA (fp16 uses a gradient scaler); CPU runs in fp32."
    )
    compile: bool = Field(default=False, description="torch.compile the student's forward.")
    log_every: int = Field(default=10, gt=0, description="Steps per logged metrics window.")
    registered_model_name: str | None = Field(
        default="softcon-encoder", description="MLflow model registry name of the encoder (None: log only)."
    )
    log_system_metrics: bool = Field(default=True, description="MLflow system metrics (CPU, memory, GPU).")


class EvaluateConfig(StageConfig):
    """Frozen-encoder linear probing and kNN on multi-label targets."""

    model: str | None = Field(
        default=None,
        description="The encoder: an MLflow train run id, a checkpoint file, or a registered model version "
        "(models:/NAME/VERSION, models:/NAME@ALIAS).",
    )
    weights: str | None = Field(
        default=None,
        description="Instead of model: a local weights file evaluated alone (e.g. a published SoftCon checkpoint), "
        "built as backbone for the store's bands and normalised with the store's statistics.",
    )
    backbone: str | None = Field(
        default=None, description="timm backbone of weights (resnet50, vit_small_patch14_dinov2 …)."
    )
    sensor: Literal["s2", "s1"] = Field(default="s2", description="Which modality weights take (with weights).")
    store: str | None = Field(default=None, description="Training store whose held-out split is evaluated.")
    bigearthnet: str | None = Field(default=None, description="BigEarthNet-format folder.")
    eurosat: str | None = Field(
        default=None, description="EuroSAT MS folder (class folders of 13-band GeoTIFFs): single-label, top-1."
    )
    input_contract: Literal["model", "ssl4eo"] = Field(
        default="model",
        description="How inputs are normalised: model = z-scores with the model's (checkpoint's or store's) "
        "statistics; ssl4eo = SoftCon's: SSL4EO-S12 statistics, mean +- 2 std scaled to [0, 1], BigEarthNet "
        "resized to 256 and centre-cropped to 224.",
    )
    protocol: Literal["project", "ssl4eo"] = Field(
        default="project",
        description="project = cached features, probe lr chosen on val, report on the evaluated split; ssl4eo adds "
        "SSL4EO-S12's linear evaluation (a head trained on the fly with their SGD schedule and augmentation, "
        "reported on val as ssl4eo_* metrics).",
    )
    protocol_epochs: int | None = Field(
        default=None, gt=0, description="Epochs of the ssl4eo protocol; default theirs (50)."
    )
    vit_features: Literal["cls", "dinov2"] = Field(
        default="cls",
        description="ViT features: the class token, or DINOv2's linear-evaluation features (class tokens of the "
        "last 4 blocks and the mean patch token).",
    )
    split: Literal["val", "test"] = Field(default="test", description="Held-out split of the store that is evaluated.")
    knn_k: int = Field(default=10, gt=0, description="kNN neighbours (cosine similarity, weighted label votes).")
    probe_epochs: int = Field(default=100, gt=0, description="Linear probe training epochs.")
    probe_lrs: list[float] = Field(
        default=[1e-3, 1e-2, 1e-1], min_length=1, description="Probe learning rates; the best on val is used."
    )
    probe_weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of the linear probe.")
    batch_size: int = Field(default=256, gt=0, description="Batch size of feature extraction.")
    baselines: list[str] = Field(
        default=[],
        description="Encoders evaluated under the same protocol: random, image-stats, a checkpoint file or "
        "MLflow train run id (e.g. the lambda=0 run), weights:FILE; NAME=SPEC names the row.",
    )
    weights_backbone: str | None = Field(
        default=None, description="timm backbone for weights:FILE baselines; default the model's."
    )
    train_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Fraction of the train split, drawn without replacement (0.1 = 10%)."
    )
    bigearthnet_size: int | None = Field(
        default=None, gt=0, description="Resize BigEarthNet's 120 px patches to this side; default keep 120."
    )
    collapse_threshold: float = Field(
        default=0.01, ge=0, description="Flag an encoder whose unit-normalised feature spread is below this."
    )
    plots: bool = Field(default=True, description="Write the comparison plots (per-class AP, PR curves, map).")
    out: str = Field(
        default_factory=lambda: _default_path("evaluation"), description="Feature cache and report folder."
    )
    seed: int = Field(default=0, description="Seed of the train subset and the probes.")
    best_metric: str = Field(
        default="linear_map_micro",
        description="Metric that moves a registered model's 'best' alias to the evaluated version when higher "
        "(the model's own value; a dataset's, e.g. bigearthnet/linear_map_micro, when the store is not evaluated).",
    )

    @model_validator(mode="after")
    def _check_dataset(self) -> Self:
        if self.store is None and self.bigearthnet is None and self.eurosat is None:
            raise ValueError(
                "give a dataset to evaluate on: store (a training store), bigearthnet or eurosat (a folder)"
            )
        if self.weights is not None:
            if self.model is not None:
                raise ValueError("give model (a project checkpoint or run) or weights (a weights file), not both")
            if self.backbone is None:
                raise ValueError("weights needs backbone: the timm model the file is for, e.g. resnet50")
            if self.store is None and self.input_contract != "ssl4eo":
                raise ValueError(
                    "weights needs a store (its bands and normalisation statistics are the encoder's input contract) "
                    "or input_contract ssl4eo (the file's own bands with SSL4EO-S12's statistics)"
                )
        return self


FINETUNE_RANDOM = "random"
"""``FinetuneConfig.model`` of the from-scratch baseline: the backbone with random initialisation."""
FINETUNE_WEIGHTS = "weights:"
"""Prefix of ``FinetuneConfig.model`` naming a local weights file (as evaluate's ``weights:FILE`` baselines)."""


class FinetuneConfig(StageConfig):
    """Fine-tune a pretrained encoder with a head on the user's labels: per-pixel land cover or multi-label."""

    model: str = Field(
        description="The encoder: an MLflow train run id, a checkpoint file, models:/NAME/VERSION, models:/NAME@ALIAS, "
        "weights:FILE (a local weights file, with backbone) or random (backbone from scratch, the baseline)."
    )
    backbone: str | None = Field(
        default=None, description="timm backbone of weights:FILE and random (resnet50, vit_small_patch14_dinov2 …)."
    )
    sensor: Literal["s2", "s1"] = Field(default="s2", description="Which modality weights:FILE and random take.")
    task: Literal["segmentation", "multilabel"] = Field(
        default="segmentation",
        description="segmentation = per-pixel classes (a store written with masks) through an FPN decoder over the "
        "encoder's multi-scale features; multilabel = class presence through a linear head on pooled features.",
    )
    store: str | None = Field(
        default=None, description="Training store: its train split trains, val stops early, test reports."
    )
    bigearthnet: str | None = Field(
        default=None, description="BigEarthNet-format folder (multilabel only), instead of a store."
    )
    freeze: Literal["frozen", "partial", "full"] = Field(
        default="full",
        description="Encoder parameters trained: frozen = none (the head alone), partial = the last quarter of "
        "its stages/blocks (ResNet: layer4; ViT-B/S: the last 3 blocks), full = all.",
    )
    layer_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay of the trained encoder: the head gets lr, the encoder's last "
        "block lr x decay, the one before lr x decay^2 … down to the stem (1 = the same lr everywhere).",
    )
    lr: float = Field(default=1e-3, gt=0, description="Learning rate of the head (AdamW, cosine decay over epochs).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (not on biases and norms).")
    epochs: int = Field(default=20, gt=0, description="Training epochs at most.")
    batch_size: int = Field(default=16, gt=0, description="Samples per step.")
    patience: int | None = Field(
        default=5, gt=0, description="Stop after this many epochs without a better val metric; none: run every epoch."
    )
    train_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Label budget: a fraction of the train split, drawn without replacement."
    )
    crop_size: int | None = Field(default=None, gt=0, description="Random training crop (with flips and turns).")
    seed: int = Field(default=0, description="Seed of the label subset, the head, the order and the augmentation.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    precision: Literal["bf16", "fp32"] = Field(
        default="bf16", description="Autocast dtype of the forward passes on CUDA; CPU runs in fp32."
    )
    out: str = Field(
        default_factory=lambda: _default_path("finetune"), description="Folder of the fine-tuned model and examples."
    )

    @model_validator(mode="after")
    def _check_inputs(self) -> Self:
        if (self.store is None) == (self.bigearthnet is None):
            given = "both" if self.store is not None else "neither"
            raise ValueError(
                f"give exactly one dataset: store (a training store) or bigearthnet (a folder); {given} given"
            )
        if self.task == "segmentation" and self.store is None:
            raise ValueError("task segmentation needs a store written with masks (softcon preprocess --masks)")
        if (self.model == FINETUNE_RANDOM or self.model.startswith(FINETUNE_WEIGHTS)) and self.backbone is None:
            raise ValueError(f"model {self.model!r} needs backbone: the timm model to build, e.g. resnet50")
        return self

    @property
    def weights_file(self) -> str | None:
        """The local weights file of ``weights:FILE`` (the cache keys on its bytes); None otherwise."""
        return self.model.removeprefix(FINETUNE_WEIGHTS) if self.model.startswith(FINETUNE_WEIGHTS) else None


class FinetuneBudgetsConfig(StageConfig):
    """Did pretraining help: ``finetune`` of the model, of a random init of its backbone and (multilabel) of image
    statistics, at each label budget and seed (``softcon compare --finetune-task``)."""

    finetune: FinetuneConfig = Field(
        description="The fine-tuning of every row; its model is the pretrained one, train_fraction and seed are set "
        "per budget and seed."
    )
    budgets: list[float] = Field(
        default=[0.01, 0.1, 1.0], min_length=1, description="Label budgets: fractions of the train split, in (0, 1]."
    )
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1, description="Seeds: label subset, head, order, init.")
    out: str = Field(
        default_factory=lambda: _default_path("finetune-budgets"),
        description="Folder of the runs and the report (one subfolder per MLflow run).",
    )

    @model_validator(mode="after")
    def _check_budgets(self) -> Self:
        bad = [budget for budget in self.budgets if not 0 < budget <= 1]
        if bad:
            raise ValueError(f"label budgets must be in (0, 1]; got {bad}")
        return self


class PredictConfig(StageConfig):
    """A fine-tuned segmentation model run over whole cube tiles: one class map (Cloud-Optimized GeoTIFF) per tile and
    date."""

    model: str = Field(
        description="The fine-tuned model: an MLflow finetune run id or its finetuned.pt file (softcon finetune)."
    )
    cube: str = Field(default_factory=lambda: _default_path("cube.zarr"), description="Cube path or URL.")
    tiles: list[str] | None = Field(default=None, description="Only these tile ids; none: every tile of the cube.")
    time: str = Field(
        default="latest",
        pattern=r"^(latest|all|\d{4}-\d{2}-\d{2})$",
        description="Which S2 date of each tile: latest, all, or a day YYYY-MM-DD (tiles without it are skipped).",
    )
    overlap: int | None = Field(
        default=None,
        ge=0,
        description="Pixels shared by neighbouring windows, whose logits are blended; default a quarter of the "
        "window (the model's trained size). 0: windows side by side.",
    )
    batch_size: int = Field(default=16, gt=0, description="Windows per forward pass.")
    device: str = Field(default="auto", description="auto, cpu or cuda[:N].")
    out: str = Field(default_factory=lambda: _default_path("predictions"), description="Folder of the GeoTIFFs.")


class EmbedConfig(DaskStageConfig):
    """Embeddings with a trained encoder, as GeoParquet: a training store's patches, or windows tiled over a cube."""

    model: str = Field(
        description="The encoder: an MLflow train run id, a checkpoint file, models:/NAME/VERSION, models:/NAME@ALIAS."
    )
    store: str | None = Field(default=None, description="Training store whose patches are embedded (or give cube).")
    cube: str | None = Field(
        default=None,
        description="Cube whose tiles are embedded window by window, per time step, with windows of the encoder's "
        "image size (or give store).",
    )
    out: str = Field(
        default_factory=lambda: _default_path("embeddings.parquet"), description="GeoParquet file to write."
    )

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        if (self.store is None) == (self.cube is None):
            given = "both" if self.store is not None else "neither"
            raise ValueError(f"give exactly one of store (a training store) or cube (a cube) to embed; {given} given")
        return self


class ImportSSL4EOConfig(DaskStageConfig):
    """Turn an extracted SSL4EO-S12 tree (and SSL4EO-S12-ML labels) into a training store."""

    root: str = Field(description="SSL4EO-S12 folder holding s2c/, s2a/ and/or s1/ (one folder per location).")
    out: str = Field(default_factory=lambda: _default_path("ssl4eo_store.zarr"), description="Training store.")
    s2: Literal["s2c", "s2a"] = Field(
        default="s2c", description="Sentinel-2 modality: s2c (L1C, 13 bands, as SoftCon pretrained) or s2a (L2A, 12)."
    )
    with_s1: bool = Field(default=True, description="Import s1 (VV, VH dB) beside S2 where the tree has it.")
    labels: str | None = Field(
        default=None, description="SSL4EO-S12-ML multi-label file (JSON or CSV); none: every sample unlabelled."
    )
    locations: list[str] | None = Field(
        default=None, description="Only these location folders (e.g. 0000042); none: every location of the tree."
    )
    patch_size: int = Field(default=264, gt=0, description="Side in pixels every band is resized to (SSL4EO-S12: 264).")
    s1_max_gap_days: float = Field(
        default=60, ge=0, description="An S1 season pairs with the nearest S2 season of its location within this gap."
    )
    val_fraction: float = Field(default=0.02, ge=0, lt=1, description="Fraction of locations held out for validation.")
    test_fraction: float = Field(default=0.02, ge=0, lt=1, description="Fraction of locations held out for testing.")
    seed: int = Field(default=0, description="Seed of the location split.")
    samples_per_block: int = Field(
        default=64, gt=0, description="Samples per write block = per Zarr shard: one shard read is one batch."
    )

    @model_validator(mode="after")
    def _check_split(self) -> Self:
        require_training_split(self.val_fraction, self.test_fraction)
        return self


class ExportConfig(StageConfig):
    """A trained encoder as files another project loads: a timm folder, ONNX or TorchScript, with a model card."""

    model: str = Field(
        description="The model: an MLflow train run id, a checkpoint file, models:/NAME/VERSION, models:/NAME@ALIAS "
        "(a pretrained encoder), or an MLflow finetune run id or finetuned.pt file (a fine-tuned model)."
    )
    format: Literal["timm", "onnx", "torchscript"] = Field(
        default="timm",
        description="timm = config.json + model.safetensors for timm.create_model('local-dir:OUT', pretrained=True); "
        "onnx = model.onnx with a dynamic batch axis; torchscript = a traced module for torch.jit.load.",
    )
    out: str = Field(description="Folder to write; files of the same names in it are replaced.")


class PipelineConfig(StageConfig):
    """All stages in order under one MLflow parent run; the stages share the cube and the store."""

    name: str = Field(default="softcon", description="MLflow experiment of this pipeline.")
    ingest: IngestConfig
    labels: LabelsConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=lambda: EvaluateConfig(store=_default_path("store.zarr")))

    @model_validator(mode="before")
    @classmethod
    def _link_stages(cls, data: Any) -> Any:
        """Each stage reads what the one before it wrote: the ingest cube and the preprocess store."""
        if not isinstance(data, dict):
            return data

        def section(name: str) -> dict[str, Any]:
            value = data.get(name) or {}
            return value.model_dump() if isinstance(value, BaseModel) else dict(value)

        linked = dict(data)
        ingest, preprocess = section("ingest"), section("preprocess")
        cube = ingest.get("cube") or _default_path("cube.zarr")
        store = preprocess.get("out") or _default_path("store.zarr")
        if ingest:
            linked["ingest"] = ingest | {"cube": cube}
        linked["labels"] = section("labels") | {"cube": cube}
        linked["preprocess"] = preprocess | {"cube": cube, "out": store}
        linked["train"] = section("train") | {"store": store}
        linked["evaluate"] = section("evaluate") | {"store": store}
        return linked


Config = TypeVar("Config", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each bad field and what is allowed."""


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file, refusing anything that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of stage sections, got {type(data).__name__}")
    return data


def _env_values(model: type[BaseModel], section: str | None) -> dict[str, Any]:
    if section is None:  # the pipeline: one env source per stage section
        values: dict[str, Any] = {}
        for name, field in model.model_fields.items():
            annotation = field.annotation
            stage = next((t for t in getattr(annotation, "__args__", (annotation,)) if isinstance(t, type)), None)
            if stage is not None and issubclass(stage, StageConfig):
                found = _env_values(stage, name)
                if found:
                    values[name] = found
        return values
    source = EnvSettingsSource(
        model,  # type: ignore[arg-type]
        env_prefix=f"SOFTCON_{section.upper()}__",
        env_nested_delimiter="__",
        case_sensitive=False,
    )
    return source()


def format_validation_error(error: ValidationError, section: str | None = None) -> str:
    """One line per bad field: where it is, what was given, what is allowed."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in ((section,) if section else ()) + tuple(item["loc"]))
        given = item.get("input")
        shown = "" if isinstance(given, dict) or item["type"] == "missing" else f" (given: {given!r})"
        lines.append(f"  {location or '<config>'}: {item['msg']}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(
    model: type[Config],
    *,
    section: str | None = None,
    config_file: str | Path | None = None,
    base: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build a stage (or pipeline) config from defaults < base < YAML section < environment < overrides.

    Args:
        model: the config class, e.g. ``TrainConfig``.
        section: the YAML section and env prefix of a stage (``"train"``); ``None`` for the pipeline.
        config_file: optional YAML file.
        base: preset values below the YAML file (the demo's sizes, for instance).
        overrides: values given on the command line; ``None`` values are ignored.

    Raises:
        ConfigError: naming every invalid field and the allowed values.
    """
    data: dict[str, Any] = dict(base or {})
    if config_file is not None:
        from_file = read_yaml(config_file)
        if section is not None:
            from_file = from_file.get(section) or {}
        data = _deep_merge(data, from_file)
    data = _deep_merge(data, _env_values(model, section))
    data = _deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, section)) from error
