"""The demo: the whole pipeline on generated sample scenes served by a local STAC API.

Sized to finish in a few minutes on 2 CPU cores: a handful of 256 px tiles, a few dates, 32 px patches
and a ResNet-18 trained for a few hundred steps. The records land in the project folder (``.softcon/``).
"""

from __future__ import annotations

from typing import Any

from softcon.config import PipelineConfig, load_config
from softcon.settings import Settings

DEMO_EXPERIMENT = "softcon-demo"


def demo_config(
    stac_url: str,
    bbox: tuple[float, float, float, float],
    start: str,
    end: str,
    settings: Settings,
    *,
    steps: int = 300,
    tile_size: int = 256,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """The demo's pipeline configuration over the sample area; ``SOFTCON_*`` variables still override it."""
    data = settings.data_dir
    demo: dict[str, Any] = {
        "name": DEMO_EXPERIMENT,
        "ingest": {
            "stac": stac_url,
            "collections": ["sentinel-2-l2a", "sentinel-1-rtc"],
            "bbox": list(bbox),
            "start": start,
            "end": end,
            "tile_size": tile_size,
            "cube": str(data / "demo-cube.zarr"),
        },
        "labels": {"source": stac_url, "collection": "esa-worldcover", "scheme": "worldcover"},
        "preprocess": {
            "out": str(data / "demo-store.zarr"),
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
            "out": str(data / "demo-checkpoints"),
        },
        "evaluate": {"probe_epochs": 100},
    }
    return load_config(PipelineConfig, base=demo, overrides=overrides)
