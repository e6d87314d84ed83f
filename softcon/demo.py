"""The demo: the whole pipeline on generated sample scenes served by a local STAC API.

Sized to finish in a few minutes on 2 CPU cores: a handful of 256 px tiles, a few dates, 32 px patches
and a ResNet-18 trained for a few hundred steps. The records land in the project folder (``.softcon/``).

On the structured world (the default, docs/sample_world.md) the labels stage reads the world's coarse, noisy
Dynamic-World-like map, and evaluate probes the encoder, a random-init one and per-band image statistics on the
held-out split of the store and on the world's BigEarthNet-format set (CORINE labels: a transfer task). On the
painted world, as before, labels come from the WorldCover collection of the STAC API and the store is evaluated.
"""

from __future__ import annotations

from typing import Any

from softcon.config import PipelineConfig, load_config
from softcon.settings import Settings
from softcon.tasks.sample_data import SampleData

DEMO_EXPERIMENT = "softcon-demo"


def demo_config(
    stac_url: str,
    sample: SampleData,
    settings: Settings,
    *,
    steps: int = 300,
    tile_size: int = 256,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """The demo's pipeline configuration over the sample area; ``SOFTCON_*`` variables still override it."""
    data = settings.data_dir
    if sample.dynamic_world is not None:
        labels = {"source": str(sample.dynamic_world), "scheme": "dynamic-world"}
        evaluate: dict[str, Any] = {"bigearthnet": str(sample.bigearthnet), "baselines": ["random", "image-stats"]}
    else:
        labels = {"source": stac_url, "collection": "esa-worldcover", "scheme": "worldcover"}
        evaluate = {}
    demo: dict[str, Any] = {
        "name": DEMO_EXPERIMENT,
        "ingest": {
            "stac": stac_url,
            "collections": ["sentinel-2-l2a", "sentinel-1-rtc"],
            "bbox": list(sample.bbox),
            "start": str(sample.start),
            "end": str(sample.end),
            "tile_size": tile_size,
            "cube": str(data / f"demo-{sample.world}-cube.zarr"),
        },
        "labels": labels,
        "preprocess": {
            "out": str(data / f"demo-{sample.world}-store.zarr"),
            "patch_size": 32,
            "split_block": 64,
            "val_fraction": 0.15,
            "test_fraction": 0.25,
        },
        "train": {
            "backbone": "resnet18",
            "steps": steps,
            "batch_size": 64,
            "warmup_steps": 20,
            "checkpoint_every": 100,
            "out": str(data / f"demo-{sample.world}-checkpoints"),
        },
        "evaluate": {"probe_epochs": 100, **evaluate},
    }
    return load_config(PipelineConfig, base=demo, overrides=overrides)
