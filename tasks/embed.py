"""Embeddings of a training store's patches as GeoParquet: one row per patch, its footprint in EPSG:4326.

Columns: ``geometry`` (the patch's footprint, WKB, EPSG:4326; null for a store without a tile grid, e.g. an
imported SSL4EO-S12 corpus), ``sample`` (index in the store), ``tile``, ``row``, ``col``, ``location``, ``time``,
``split``, ``labelled``, one ``label_<class>`` column per class (0/1), and ``embedding``, a fixed-size list of
float32 (the frozen encoder's features, the vector a linear probe reads).

The footprint of a patch is its pixel window on its tile of the project grid (``tasks/grid.py``: the tile id holds
the EPSG code and the upper-left corner; ``resolution_m`` is a store attribute), projected to lon/lat with its
edges densified. The file is valid GeoParquet 1.1 (the ``geo`` key of the Parquet metadata).

Work is split by the store's write blocks (one shard each): Dask tasks embed blocks, the driver appends each
block's rows to the file as it arrives (a row group per block), so memory stays at about one block per worker
plus one on the driver whatever the store's size.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import torch
from pyproj import CRS, Transformer

from softcon import progress as stage_progress
from softcon.config import EmbedConfig
from softcon.models import training_store
from softcon.models.encoder import fit_to_encoder
from softcon.tasks.grid import tile_from_id
from softcon.tasks.train import load_encoder

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

GEOPARQUET_VERSION = "1.1.0"
EDGE_POINTS = 11
"""Points per footprint edge: UTM edges bend in lon/lat."""


@functools.lru_cache(maxsize=2)
def _encoder(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's encoder, loaded once per worker process."""
    return load_encoder(checkpoint)


def _model_inputs(images: np.ndarray, store_bands: Sequence[str], meta: dict[str, Any], sensor: str) -> torch.Tensor:
    """(N, C, H, W) store values -> the encoder's normalised inputs: its bands by name (a band the store lacks at
    its mean, 0), z-scores with its statistics, nodata as 0 (the training loader's rule)."""
    bands = list(meta.get("bands") or store_bands)
    mean = torch.tensor(meta["norm_stats"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta["norm_stats"]["std"], dtype=torch.float32).clamp_min(1e-6).view(1, -1, 1, 1)
    x = torch.from_numpy(images.astype(np.float32))
    nodata = ~torch.isfinite(x) if sensor == "s1" else x == 0
    out = torch.zeros((x.shape[0], len(bands), *x.shape[2:]), dtype=torch.float32)
    for position, band in enumerate(bands):
        if band in store_bands:
            index = list(store_bands).index(band)
            value = (x[:, index] - mean[:, position]) / std[:, position]
            out[:, position] = value.masked_fill(nodata[:, index], 0.0)
    return out


def embed_block(store: str, checkpoint: str, start: int, stop: int, batch_size: int = 64) -> np.ndarray:
    """(stop - start, D) float32 embeddings of store samples [start, stop)."""
    encoder, meta = _encoder(checkpoint)
    sensor = str(meta.get("sensor", "s2"))
    group = training_store.open_store(store)
    attrs: dict[str, Any] = dict(group.attrs)
    store_bands = list(attrs["bands"] if sensor == "s2" else attrs["pols"])
    images = np.asarray(group[sensor][start:stop])  # type: ignore[index]
    features = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            x = _model_inputs(images[first : first + batch_size], store_bands, meta, sensor)
            features.append(encoder(fit_to_encoder(encoder, x)).float().numpy())
    return np.concatenate(features) if features else np.zeros((0, int(getattr(encoder, "num_features", 0))))


def footprints(tiles: Sequence[str], tile: np.ndarray, row: np.ndarray, col: np.ndarray, size: int,
               resolution: float | None) -> list[bytes | None]:  # fmt: skip
    """WKB polygons (EPSG:4326) of patch windows on the project grid; None where the tile id is no grid tile."""
    out: list[bytes | None] = [None] * len(tile)
    if resolution is None:
        return out
    for tile_index in np.unique(tile):
        try:
            grid_tile = tile_from_id(tiles[int(tile_index)], resolution=resolution, size=size)
        except ValueError:
            continue  # not a grid tile (an imported corpus)
        to_lonlat = Transformer.from_crs(f"EPSG:{grid_tile.epsg}", "EPSG:4326", always_xy=True)
        members = np.flatnonzero(tile == tile_index)
        side = size * resolution
        steps = np.linspace(0.0, 1.0, EDGE_POINTS)
        for member in members:
            left = grid_tile.x0 + col[member] * resolution
            top = grid_tile.y0 - row[member] * resolution
            ring_x = np.concatenate([left + side * steps, np.full(EDGE_POINTS, left + side),
                                     left + side * steps[::-1], np.full(EDGE_POINTS, left)])  # fmt: skip
            ring_y = np.concatenate([np.full(EDGE_POINTS, top), top - side * steps,
                                     np.full(EDGE_POINTS, top - side), top - side * steps[::-1]])  # fmt: skip
            lon, lat = to_lonlat.transform(ring_x, ring_y)
            out[member] = shapely.to_wkb(shapely.Polygon(np.column_stack([lon, lat])))
    return out


@dataclass(frozen=True)
class EmbedReport:
    """What an embedding run wrote."""

    out: str
    rows: int
    dimension: int
    with_footprint: int

    def metrics(self) -> dict[str, float]:
        return {
            "rows": float(self.rows),
            "dimension": float(self.dimension),
            "with_footprint": float(self.with_footprint),
        }


def _schema(class_names: Sequence[str], dimension: int) -> pa.Schema:
    fields = [
        pa.field("geometry", pa.binary()),
        pa.field("sample", pa.int64()),
        pa.field("tile", pa.string()),
        pa.field("row", pa.int32()),
        pa.field("col", pa.int32()),
        pa.field("location", pa.int64()),
        pa.field("time", pa.timestamp("ns")),
        pa.field("split", pa.string()),
        pa.field("labelled", pa.bool_()),
        *[pa.field(f"label_{name}", pa.uint8()) for name in class_names],
        pa.field("embedding", pa.list_(pa.float32(), dimension)),
    ]
    geo = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS.from_epsg(4326).to_json_dict()}
        },
    }
    return pa.schema(fields, metadata={b"geo": json.dumps(geo).encode()})


def _block_table(
    schema: pa.Schema,
    attrs: dict[str, Any],
    plan: training_store.SamplePlan,
    patch_size: int,
    start: int,
    embeddings: np.ndarray,
) -> pa.Table:
    stop = start + len(embeddings)
    part = plan.select(start, stop)
    tiles = list(attrs["tiles"])
    split_names = list(attrs.get("split_names", ["train", "val", "test"]))
    columns: dict[str, Any] = {
        "geometry": footprints(tiles, part.tile, part.row, part.col, patch_size, attrs.get("resolution_m")),
        "sample": np.arange(start, stop, dtype=np.int64),
        "tile": [tiles[int(i)] for i in part.tile],
        "row": part.row,
        "col": part.col,
        "location": part.location,
        "time": part.time.astype("datetime64[ns]"),
        "split": [split_names[int(code)] for code in part.split],
        "labelled": part.labelled,
    }
    for k, name in enumerate(attrs.get("class_names", [])):
        columns[f"label_{name}"] = part.labels[:, k]
    dimension = embeddings.shape[1]
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).ravel()), dimension)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def run_embed(config: EmbedConfig, checkpoint: str, *, client: Client | None = None) -> EmbedReport:
    """Embed every patch of ``config.store`` with the checkpoint's encoder into the GeoParquet file ``config.out``.

    Written to ``out`` + ``.partial`` and renamed when complete, so an interrupted run leaves no file that looks
    finished; a re-run writes it again. Progress: step "blocks".

    Raises:
        FileNotFoundError: the store or the checkpoint does not exist.
        ValueError: the store is not a complete training store, or lacks the encoder's sensor.
    """
    from softcon.tasks.preprocess import open_dask_client

    store, out = config.store, config.out
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    group = training_store.open_store(store)
    attrs: dict[str, Any] = dict(group.attrs)
    if not attrs.get("complete"):
        raise ValueError(f"training store {store} is not complete; finish it (preprocess or import again) first")
    _, meta = load_encoder(checkpoint)
    sensor = str(meta.get("sensor", "s2"))
    if sensor not in group:
        raise ValueError(f"training store {store} has no {sensor!r} array for this {sensor} encoder")
    plan = training_store.read_plan(store)
    patch_size = int(group[sensor].shape[-1])  # type: ignore[union-attr]
    bounds = training_store.block_bounds(len(plan), int(attrs.get("samples_per_block", 64)))
    partial = Path(f"{out}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows = with_footprint = dimension = 0
    with open_dask_client(config, client) as dask_client:
        from distributed import as_completed

        futures = {dask_client.submit(embed_block, store, checkpoint, a, b, pure=False): a for a, b in bounds}
        writer: pq.ParquetWriter | None = None
        pending: dict[int, np.ndarray] = {}
        next_start = 0
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                pending[futures[future]] = future.result()
                while next_start in pending:  # rows in store order: blocks are appended as their turn comes
                    embeddings = pending.pop(next_start)
                    dimension = embeddings.shape[1]
                    if writer is None:
                        writer = pq.ParquetWriter(partial, _schema(attrs.get("class_names", []), dimension))
                    table = _block_table(writer.schema, attrs, plan, patch_size, next_start, embeddings)
                    writer.write_table(table)
                    rows += table.num_rows
                    with_footprint += table.num_rows - table.column("geometry").null_count
                    next_start += len(embeddings)
                stage_progress.report("blocks", done, len(bounds))
        finally:
            if writer is not None:
                writer.close()
    partial.replace(out)
    logger.info("wrote %s: %d rows of %d-d embeddings (%d with footprints)", out, rows, dimension, with_footprint)
    return EmbedReport(out, rows, dimension, with_footprint)
