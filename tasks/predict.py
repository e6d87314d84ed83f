"""Predict stage: a fine-tuned segmentation model over whole cube tiles, one class map per tile and date.

For each chosen tile (``PredictConfig.tiles``, default all) and S2 date (``time``: the latest, all, or one day):

1. The whole tile is read by preprocess's own reader (``tasks.preprocess.read_block_images``, through the cube
   windows of ``tasks.embed``: S2 band order; for an S1 model the nearest S1 date within the training store's
   ``s1_max_gap_days``, in dB) and normalised as a store patch is (``tasks.embed.model_inputs``: the model's bands,
   z-scores with its statistics, nodata at the band mean), so a window sees what the model saw in fine-tuning.
2. The model runs on square windows of its trained size (``meta["img_size"]``: the store's patch side) that overlap
   by ``overlap`` pixels (default a quarter of the window), from the tile's top-left corner, the last row and column
   of windows flush with the tile's edge (``window_starts``). Each window's logits are weighted by a tent that is 1
   at its centre and falls linearly to ``1 / (window / 2)`` at its edge (``blend_weight``), and each pixel's logits
   are the weighted mean over the windows covering it (``predict_logits``): a pixel is decided mostly by the windows
   it lies central in, where the model has context on every side, and the map has no seams at window edges.
3. The class map is the argmax (uint8 class indices into the model's ``class_names``), ``NODATA`` (255) where the
   input is nodata or cloud by preprocess's masks (``tasks.patches``: an S2 band at 0, or SCL cloud, shadow or
   cirrus; for an S1 model a polarisation that is not finite).
4. It is written as a Cloud-Optimized GeoTIFF ``<out>/<tile id>_<YYYY-MM-DD>.tif`` (GDAL's COG driver: 256 px
   tiles, deflate, mode-resampled overviews down to ``MIN_OVERVIEW`` px) in the tile's CRS and transform (the cube
   tile's own x/y coordinates), nodata 255, a colour table (the scheme's legend colours as the labels stage draws
   them), and the class scheme as GDAL tags: ``CLASS_NAMES`` and ``CLASS_CODES`` (JSON lists, index order: the
   codes are the cube's ``landcover`` values), ``CLASS_<index>`` (``name (code N)``), ``NODATA_VALUE``, ``TILE``,
   ``TIME``, ``MODEL``.

A multi-label model has no per-pixel output: it is refused (``ValueError``); ``softcon embed`` or a probe is the
way to map class presence per window.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from torch import nn

from softcon import progress as stage_progress
from softcon.config import S1_POLARIZATIONS, PredictConfig
from softcon.models.finetune import FinetuneModel
from softcon.tasks import patches
from softcon.tasks.cube_store import open_cube, open_tile_dataset, read_cube_tiles
from softcon.tasks.cube_store import tile_ids as cube_tile_ids
from softcon.tasks.embed import NO_S1, CubeBlock, model_inputs, quality_rule, window_plan
from softcon.tasks.evaluate import slug
from softcon.tasks.finetune import finetuned_model, read_finetuned
from softcon.tasks.grid import Tile
from softcon.tasks.label_figures import class_colour
from softcon.tasks.preprocess import read_block_images
from softcon.tasks.train import resolve_device

logger = logging.getLogger(__name__)

NODATA = 255
"""Class-map value of a pixel without a prediction (nodata or cloud in the input)."""
MIN_OVERVIEW = 32
"""Overviews halve the map until its side would fall below this many pixels (at least one level)."""
COG_OPTIONS: dict[str, Any] = {"BLOCKSIZE": 256, "COMPRESS": "DEFLATE", "OVERVIEW_RESAMPLING": "MODE"}
"""GDAL COG driver options: mode keeps overviews to classes that exist, unlike an average of indices."""


@dataclass(frozen=True)
class PredictReport:
    """What a prediction run wrote."""

    files: list[Path]
    """One COG per tile and date, in tile then date order."""
    class_names: list[str]
    class_pixels: np.ndarray
    """(K,) pixels of each class over every written map."""
    nodata_pixels: int

    def metrics(self) -> dict[str, float]:
        """``files``, ``pixels`` (with a class), ``nodata_fraction`` and ``fraction/<class>`` of the predicted
        pixels."""
        predicted = int(self.class_pixels.sum())
        total = predicted + self.nodata_pixels
        metrics = {"files": float(len(self.files)), "pixels": float(predicted),
                   "nodata_fraction": self.nodata_pixels / total if total else 0.0}  # fmt: skip
        for name, pixels in zip(self.class_names, self.class_pixels, strict=True):
            metrics[f"fraction/{slug(name)}"] = float(pixels) / predicted if predicted else 0.0
        return metrics


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """First pixel of each window along an axis of ``length`` px: every ``window - overlap`` px from 0, the last
    window flush with the end.

    Raises:
        ValueError: the axis is shorter than a window, or the overlap is not smaller than the window.
    """
    if length < window:
        raise ValueError(f"a tile side of {length} px is smaller than the model's {window} px window")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be at least 0 and less than the {window} px window")
    starts = list(range(0, length - window + 1, window - overlap))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def blend_weight(window: int) -> torch.Tensor:
    """(window, window) weights of a window's logits: a tent, 1 at the centre, ``1 / ceil(window / 2)`` at the edge."""
    position = torch.arange(window)
    ramp = torch.minimum(position + 1, window - position).float()
    ramp = ramp / ramp.max()
    return ramp[:, None] * ramp[None, :]


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, window: int, overlap: int, *, batch_size: int = 16,
                   device: torch.device | None = None) -> torch.Tensor:  # fmt: skip
    """(K, H, W) logits of a normalised (C, H, W) image: the tent-weighted mean of the logits of overlapping windows
    (module doc, 2). ``model`` maps (B, C, w, w) to (B, K, w, w)."""
    device = device or torch.device("cpu")
    height, width = image.shape[-2:]
    corners = [(top, left) for top in window_starts(height, window, overlap)
               for left in window_starts(width, window, overlap)]  # fmt: skip
    weight = blend_weight(window).to(device)
    total: torch.Tensor | None = None
    weights = torch.zeros(height, width, device=device)
    for first in range(0, len(corners), batch_size):
        chosen = corners[first : first + batch_size]
        batch = torch.stack([image[:, top : top + window, left : left + window] for top, left in chosen])
        logits = model(batch.to(device)).float()  # (b, K, window, window)
        if total is None:
            total = torch.zeros(logits.shape[1], height, width, device=device)
        for (top, left), window_logits in zip(chosen, logits, strict=True):
            total[:, top : top + window, left : left + window] += window_logits * weight
            weights[top : top + window, left : left + window] += weight
    assert total is not None  # window_starts gives at least one window
    return (total / weights).cpu()


def chosen_times(times: np.ndarray, choice: str) -> list[np.datetime64]:
    """The S2 time steps ``choice`` picks (``latest``, ``all``, or a day ``YYYY-MM-DD``) of a tile's sorted ones."""
    if choice == "all":
        return list(times)
    if choice == "latest":
        return list(times[-1:])
    day = np.datetime64(choice, "D")
    return [time for time in times if time.astype("datetime64[D]") == day]


def class_map(logits: torch.Tensor, invalid: np.ndarray) -> np.ndarray:
    """(H, W) uint8 argmax of (K, H, W) logits, ``NODATA`` where ``invalid``."""
    classes = logits.argmax(0).numpy().astype(np.uint8)
    classes[invalid] = NODATA
    return classes


def overview_count(side: int) -> int:
    """Overview levels of a map of ``side`` px: halvings while the side stays at least ``MIN_OVERVIEW`` (>= 1)."""
    count = 0
    while side >> (count + 1) >= MIN_OVERVIEW:
        count += 1
    return max(1, count)


def write_cog(path: Path, classes: np.ndarray, tile: Tile, tags: dict[str, str],
              colours: dict[int, tuple[int, int, int, int]]) -> None:  # fmt: skip
    """A uint8 class map as a Cloud-Optimized GeoTIFF on ``tile``'s grid (module doc, 4)."""
    height, width = classes.shape
    profile = {
        "driver": "COG", "width": width, "height": height, "count": 1, "dtype": "uint8", "nodata": NODATA,
        "crs": f"EPSG:{tile.epsg}", "transform": tile.transform,
        "OVERVIEW_COUNT": overview_count(max(height, width)), **COG_OPTIONS,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    with rasterio.open(partial, "w", **profile) as dataset:
        dataset.write(classes, 1)
        dataset.write_colormap(1, colours)
        dataset.update_tags(**tags)
        dataset.set_band_description(1, "class index into CLASS_NAMES; 255 = nodata or cloud")
    partial.replace(path)


def class_tags(class_names: Sequence[str], class_codes: Sequence[int]) -> dict[str, str]:
    """The class scheme as GDAL tags (module doc, 4)."""
    tags = {"CLASS_NAMES": json.dumps(list(class_names)), "CLASS_CODES": json.dumps([int(c) for c in class_codes]),
            "NODATA_VALUE": str(NODATA)}  # fmt: skip
    for index, (name, code) in enumerate(zip(class_names, class_codes, strict=True)):
        tags[f"CLASS_{index}"] = f"{name} (code {int(code)})"
    return tags


def colour_table(class_codes: Sequence[int]) -> dict[int, tuple[int, int, int, int]]:
    """Class index -> RGBA of its code's legend colour; ``NODATA`` transparent."""
    table: dict[int, tuple[int, int, int, int]] = {}
    for index, code in enumerate(class_codes):
        hex_colour = class_colour(int(code)).lstrip("#")
        red, green, blue = (int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))
        table[index] = (red, green, blue, 255)
    table[NODATA] = (0, 0, 0, 0)
    return table


def _invalid(s2: np.ndarray, s1: np.ndarray, scl: np.ndarray, sensor: str) -> np.ndarray:
    """Where the model's input is nodata or cloud (module doc, 3)."""
    if sensor == "s1":
        return ~np.isfinite(s1).all(axis=0)
    return patches.s2_nodata_mask(s2) | patches.cloud_mask(scl)


def run_predict(config: PredictConfig, checkpoint: str | Path) -> PredictReport:
    """Predict every chosen tile and date of ``config.cube`` with the fine-tuned model ``checkpoint`` into COGs in
    ``config.out`` (module doc). Progress: step "maps".

    Raises:
        FileNotFoundError: no model file.
        ValueError: a multi-label model; no cube, an unknown tile, a tile smaller than the window, or no date chosen.
    """
    state = read_finetuned(checkpoint)
    if state["task"] != "segmentation":
        raise ValueError(
            f"{checkpoint} is a {state['task']} model: it predicts class presence per image, not a class per pixel; "
            "predict needs a segmentation model (softcon finetune --task segmentation)"
        )
    model, meta = finetuned_model(state)
    device = resolve_device(config.device)
    model.to(device)
    window, sensor = int(meta["img_size"]), str(meta["sensor"])
    overlap = window // 4 if config.overlap is None else config.overlap
    class_names, class_codes = list(meta["class_names"]), list(meta["class_codes"])
    gap = quality_rule(dict(state["config"])).s1_max_gap if sensor == "s1" else NO_S1
    del state
    grids = read_cube_tiles(config.cube)  # each tile's grid from its own coordinates, in the order of its group
    tile_ids = tuple(cube_tile_ids(open_cube(config.cube)))
    tiles = dict(zip(tile_ids, grids, strict=True))
    unknown = sorted(set(config.tiles or ()) - set(tiles))
    if unknown:
        raise ValueError(f"cube {config.cube!r} has no tiles {unknown}; it has {list(tile_ids)}")
    jobs = []
    for tile_id in config.tiles or tile_ids:
        dataset = open_tile_dataset(config.cube, tile_id, chunks=None)
        times = np.sort(dataset["time"].values.astype("datetime64[ns]"))
        if sensor == "s1":
            has_s1 = "time_s1" in dataset.coords
            s1_times = dataset["time_s1"].values.astype("datetime64[ns]") if has_s1 else np.array([], "M8[ns]")
            times = times[patches.match_s1_dates(times, s1_times, gap) >= 0]
        jobs += [(tile_id, time) for time in chosen_times(times, config.time)]
    if not jobs:
        with_s1 = " with S1 within the training store's s1_max_gap_days" if sensor == "s1" else ""
        raise ValueError(f"no S2 date of the chosen tiles of {config.cube!r} matches time {config.time!r}{with_s1}")
    colours, scheme_tags = colour_table(class_codes), class_tags(class_names, class_codes)
    files: list[Path] = []
    class_pixels = np.zeros(len(class_names), np.int64)
    nodata_pixels = 0
    for done, (tile_id, time) in enumerate(jobs, start=1):
        tile = tiles[tile_id]
        s2_bands, classes = _predict_tile(model, meta, config, tile_ids, tile_id, time, window, overlap, gap, device)
        day = str(time.astype("datetime64[D]"))
        path = Path(config.out) / f"{tile_id}_{day}.tif"
        tags = {**scheme_tags, "TILE": tile_id, "TIME": str(time.astype("datetime64[s]")), "MODEL": str(checkpoint),
                "BANDS": ",".join(s2_bands if sensor == "s2" else S1_POLARIZATIONS)}  # fmt: skip
        write_cog(path, classes, tile, tags, colours)
        files.append(path)
        valid = classes[classes != NODATA]
        class_pixels += np.bincount(valid, minlength=len(class_names))[: len(class_names)]
        nodata_pixels += int((classes == NODATA).sum())
        stage_progress.report("maps", done, len(jobs))
    logger.info("wrote %d class maps to %s", len(files), config.out)
    return PredictReport(files, class_names, class_pixels, nodata_pixels)


def _predict_tile(
    model: FinetuneModel, meta: dict[str, Any], config: PredictConfig, tile_ids: tuple[str, ...], tile_id: str,
    time: np.datetime64, window: int, overlap: int, gap: np.timedelta64, device: torch.device,
) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """The cube's S2 band names and the (H, W) class map of one tile and date (module doc, 1-3)."""
    dataset = open_tile_dataset(config.cube, tile_id, chunks=None)
    height, width = dataset.sizes["y"], dataset.sizes["x"]
    if height != width:
        raise ValueError(f"tile {tile_id!r} is {height} x {width} px; cube tiles are square")
    bands = [str(band) for band in dataset["s2"]["band"].values]
    block = CubeBlock(tile_ids.index(tile_id), time, np.zeros((1, 2), np.int32))
    s2, s1 = read_block_images(config.cube, tile_ids, window_plan(block), height, gap, n_bands=len(bands))
    time_index = int(np.flatnonzero(dataset["time"].values.astype("datetime64[ns]") == time)[0])
    scl = dataset["scl"].isel(time=time_index).values
    sensor = str(meta["sensor"])
    images, image_bands = (s2, bands) if sensor == "s2" else (s1, list(S1_POLARIZATIONS))
    image = model_inputs(images, image_bands, meta, sensor)[0]  # (C, H, W)
    logits = predict_logits(model, image, window, overlap, batch_size=config.batch_size, device=device)
    return bands, class_map(logits, _invalid(s2[0], s1[0], scl, sensor))
