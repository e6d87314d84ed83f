"""Embeddings as GeoParquet: one row per patch of a training store, or per window of a cube, with its footprint in
EPSG:4326 and the frozen encoder's features (the vector a linear probe reads).

Two sources (``EmbedConfig``: exactly one of ``store`` and ``cube``), two sets of columns; both files carry
``geometry`` (the footprint, WKB, EPSG:4326), ``tile``, ``row``, ``col`` (the window's top-left pixel on its tile),
``time`` and ``embedding`` (a fixed-size list of float32), and only the columns that apply to their source:

- store: ``sample`` (index in the store), ``location``, ``split``, ``labelled`` and one ``label_<class>`` column per
  class (0/1), as the store records them. ``geometry`` is null for a store without a tile grid (an imported
  SSL4EO-S12 corpus).
- cube: windows of the encoder's image size (the checkpoint's ``img_size``: the training store's patch side, or the
  training crop when it was trained on crops) tiled over each tile from its top-left corner (whole windows only),
  one row per window and S2 time step (sorted), tiles in id order, windows row-major. The pixels are read by the
  preprocess stage's own reader (``tasks.preprocess.read_block_images``: S2 band order, S1 polarisation order and
  conversion to dB, the nearest S1 date within the training store's ``s1_max_gap_days``), so a window embeds to the
  same vector as the same patch of a store built from the cube. No window is dropped: ``cloud_fraction`` (SCL
  cloud, shadow and cirrus) and ``nodata_fraction`` (S2 pixels with a band at 0) are preprocess's quality fractions
  of the window, and ``quality`` its verdict with the training store's thresholds (``keep``, ``cloud`` or
  ``nodata``; preprocess's defaults when the store is gone): the rows a store built from the cube would hold are
  those with ``quality == "keep"``. A cube has no split and its labels are preprocess's work: no such columns. An
  S1 encoder embeds only the S2 dates with an S1 acquisition within the gap (preprocess pairs them the same way).

The footprint of a window is its pixel rectangle on its tile of the project grid (``tasks/grid.py``: the tile id
holds the EPSG code and the upper-left corner; the store's ``resolution_m`` attribute, 10 m for a cube, as
preprocess requires), projected to lon/lat with its edges densified. The file is valid GeoParquet 1.1 (the ``geo``
key of the Parquet metadata).

Work is split into blocks (a store's write blocks, one shard each; for a cube, runs of windows of one tile and date
of about ``BLOCK_PIXELS`` pixels a band): Dask tasks embed blocks, the driver appends each block's rows to the file
in block order as they arrive (a row group per block), so memory stays at about one block per worker plus one on the
driver whatever the store's or cube's size.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
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
from softcon.config import S1_POLARIZATIONS, DaskStageConfig, EmbedConfig, PreprocessConfig
from softcon.models import training_store
from softcon.models.encoder import fit_to_encoder
from softcon.tasks import patches
from softcon.tasks.cube_store import open_cube, open_tile_dataset
from softcon.tasks.cube_store import tile_ids as cube_tile_ids
from softcon.tasks.grid import tile_from_id
from softcon.tasks.preprocess import S2_RESOLUTION_M, read_block_images, s1_max_gap, tile_resolution
from softcon.tasks.train import load_encoder, read_checkpoint

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)

GEOPARQUET_VERSION = "1.1.0"
EDGE_POINTS = 11
"""Points per footprint edge: UTM edges bend in lon/lat."""
BLOCK_PIXELS = 2**22
"""Pixels a band per cube block (about 100 MB of 12-band uint16 plus its float32 inputs): 60 windows of 264 px."""
QUALITY_NAMES = {patches.KEEP: "keep", patches.DROP_CLOUD: "cloud", patches.DROP_NODATA: "nodata"}
"""The ``quality`` column's value for each of preprocess's verdicts."""
NO_S1 = np.timedelta64(-1, "ns")
"""An S1 date window no acquisition falls in: an S2 encoder's blocks read no S1."""


@functools.lru_cache(maxsize=2)
def _encoder(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's encoder, loaded once per worker process."""
    return load_encoder(checkpoint)


def model_inputs(images: np.ndarray, store_bands: Sequence[str], meta: dict[str, Any], sensor: str) -> torch.Tensor:
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


def _embed(checkpoint: str, images: np.ndarray, bands: Sequence[str], batch_size: int) -> np.ndarray:
    """(N, D) float32 features of (N, C, H, W) store-typed images of the encoder's sensor, whose bands are ``bands``."""
    encoder, meta = _encoder(checkpoint)
    sensor = str(meta.get("sensor", "s2"))
    features = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            x = model_inputs(images[first : first + batch_size], bands, meta, sensor)
            features.append(encoder(fit_to_encoder(encoder, x)).float().numpy())
    return np.concatenate(features) if features else np.zeros((0, int(getattr(encoder, "num_features", 0))))


def embed_block(store: str, checkpoint: str, start: int, stop: int, batch_size: int = 64) -> np.ndarray:
    """(stop - start, D) float32 embeddings of store samples [start, stop)."""
    _, meta = _encoder(checkpoint)
    sensor = str(meta.get("sensor", "s2"))
    group = training_store.open_store(store)
    attrs: dict[str, Any] = dict(group.attrs)
    store_bands = list(attrs["bands"] if sensor == "s2" else attrs["pols"])
    images = np.asarray(group[sensor][start:stop])  # type: ignore[index]
    return _embed(checkpoint, images, store_bands, batch_size)


@dataclass(frozen=True)
class CubeBlock:
    """Windows of one tile and S2 time step of a cube, embedded by one task."""

    tile: int
    """Index into the cube's tile ids."""
    time: np.datetime64
    windows: np.ndarray
    """(n, 2) int32 top-left (row, col) of each window, row-major."""


@dataclass(frozen=True)
class CubeRows:
    """A cube block's embeddings and preprocess's quality fractions and verdicts of its windows."""

    embeddings: np.ndarray
    cloud_fraction: np.ndarray
    nodata_fraction: np.ndarray
    quality: np.ndarray
    """uint8 verdicts (``patches.KEEP``, ``DROP_CLOUD``, ``DROP_NODATA``)."""


@dataclass(frozen=True)
class QualityRule:
    """What preprocess keeps, as the training store was built: the thresholds of its verdicts, the S1 date gap."""

    max_cloud_fraction: float
    max_nodata_fraction: float
    s1_max_gap: np.timedelta64


def window_plan(block: CubeBlock) -> training_store.SamplePlan:
    """A block's windows as the sample plan ``read_block_images`` reads (no split, no labels)."""
    n = len(block.windows)
    return training_store.SamplePlan(
        location=np.zeros(n, np.int64), tile=np.full(n, block.tile, np.int32),
        time=np.full(n, block.time, "datetime64[ns]"), row=block.windows[:, 0], col=block.windows[:, 1],
        split=np.zeros(n, np.uint8), labels=np.zeros((n, 0), np.uint8), fractions=np.zeros((n, 0), np.float32),
        labelled=np.zeros(n, bool),
    )  # fmt: skip


def embed_cube_block(
    cube: str,
    checkpoint: str,
    tiles: tuple[str, ...],
    block: CubeBlock,
    size: int,
    rule: QualityRule,
    batch_size: int = 64,
) -> CubeRows:
    """Embed one block of cube windows, read and converted as preprocess cuts a store's patches."""
    _, meta = _encoder(checkpoint)
    sensor = str(meta.get("sensor", "s2"))
    tile = open_tile_dataset(cube, tiles[block.tile], chunks=None)
    bands = [str(band) for band in tile["s2"]["band"].values]
    rows, cols = block.windows[:, 0], block.windows[:, 1]
    gap = rule.s1_max_gap if sensor == "s1" else NO_S1
    s2, s1 = read_block_images(cube, tiles, window_plan(block), size, gap, n_bands=len(bands))
    time_index = int(np.flatnonzero(tile["time"].values.astype("datetime64[ns]") == block.time)[0])
    top, left = int(rows.min()), int(cols.min())
    box = {"y": slice(top, int(rows.max()) + size), "x": slice(left, int(cols.max()) + size)}
    scl = tile["scl"].isel({"time": time_index, **box}).values
    cloud = patches.window_fractions(patches.cloud_mask(scl), block.windows - [top, left], size)
    nodata = np.array([patches.s2_nodata_mask(image).mean() for image in s2])
    quality = patches.quality_verdicts(
        cloud, nodata, max_cloud_fraction=rule.max_cloud_fraction, max_nodata_fraction=rule.max_nodata_fraction
    )
    images, image_bands = (s2, bands) if sensor == "s2" else (s1, list(S1_POLARIZATIONS))
    return CubeRows(_embed(checkpoint, images, image_bands, batch_size), cloud, nodata, quality)


def _lonlat_polygon(to_lonlat: Transformer, left: float, top: float, width: float, height: float) -> shapely.Polygon:
    """A projected rectangle (metres; top-left corner, size) as a lon/lat polygon with densified edges."""
    steps = np.linspace(0.0, 1.0, EDGE_POINTS)
    ring_x = np.concatenate([left + width * steps, np.full(EDGE_POINTS, left + width),
                             left + width * steps[::-1], np.full(EDGE_POINTS, left)])  # fmt: skip
    ring_y = np.concatenate([np.full(EDGE_POINTS, top), top - height * steps,
                             np.full(EDGE_POINTS, top - height), top - height * steps[::-1]])  # fmt: skip
    lon, lat = to_lonlat.transform(ring_x, ring_y)
    return shapely.Polygon(np.column_stack([lon, lat]))


def grid_polygon(
    tile_id: str, resolution: float, row: int, col: int, height: int, width: int
) -> shapely.Polygon | None:
    """The lon/lat polygon (EPSG:4326, edges densified) of a pixel rectangle (top-left ``row``, ``col``; ``height``
    x ``width`` px) on a tile of the project grid; None when ``tile_id`` is no grid tile (an imported corpus)."""
    try:
        grid_tile = tile_from_id(tile_id, resolution=resolution, size=max(height, width))
    except ValueError:
        return None
    to_lonlat = Transformer.from_crs(f"EPSG:{grid_tile.epsg}", "EPSG:4326", always_xy=True)
    left, top = grid_tile.x0 + col * resolution, grid_tile.y0 - row * resolution
    return _lonlat_polygon(to_lonlat, left, top, width * resolution, height * resolution)


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
        side = size * resolution
        for member in np.flatnonzero(tile == tile_index):
            left = grid_tile.x0 + col[member] * resolution
            top = grid_tile.y0 - row[member] * resolution
            out[member] = shapely.to_wkb(_lonlat_polygon(to_lonlat, left, top, side, side))
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


def _geo_schema(fields: list[pa.Field]) -> pa.Schema:
    """``fields`` with ``geometry`` first, under the GeoParquet metadata of a WKB polygon column in EPSG:4326."""
    geo = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS.from_epsg(4326).to_json_dict()}
        },
    }
    return pa.schema([pa.field("geometry", pa.binary()), *fields], metadata={b"geo": json.dumps(geo).encode()})


def _store_schema(class_names: Sequence[str], dimension: int) -> pa.Schema:
    return _geo_schema(
        [
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
    )


def _cube_schema(dimension: int) -> pa.Schema:
    return _geo_schema(
        [
            pa.field("tile", pa.string()),
            pa.field("row", pa.int32()),
            pa.field("col", pa.int32()),
            pa.field("time", pa.timestamp("ns")),
            pa.field("cloud_fraction", pa.float32()),
            pa.field("nodata_fraction", pa.float32()),
            pa.field("quality", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dimension)),
        ]
    )


def _embedding_column(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).ravel()), embeddings.shape[1])


def _store_table(
    attrs: dict[str, Any], plan: training_store.SamplePlan, patch_size: int, start: int, embeddings: np.ndarray
) -> pa.Table:
    stop = start + len(embeddings)
    part = plan.select(start, stop)
    tiles = list(attrs["tiles"])
    split_names = list(attrs.get("split_names", ["train", "val", "test"]))
    class_names = list(attrs.get("class_names", []))
    schema = _store_schema(class_names, embeddings.shape[1])
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
        "embedding": _embedding_column(embeddings),
    }
    for k, name in enumerate(class_names):
        columns[f"label_{name}"] = part.labels[:, k]
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _cube_table(tiles: tuple[str, ...], block: CubeBlock, size: int, rows: CubeRows) -> pa.Table:
    n = len(block.windows)
    row, col = block.windows[:, 0], block.windows[:, 1]
    columns: dict[str, Any] = {
        "geometry": footprints(tiles, np.full(n, block.tile), row, col, size, S2_RESOLUTION_M),
        "tile": [tiles[block.tile]] * n,
        "row": row,
        "col": col,
        "time": np.full(n, block.time, "datetime64[ns]"),
        "cloud_fraction": rows.cloud_fraction.astype(np.float32),
        "nodata_fraction": rows.nodata_fraction.astype(np.float32),
        "quality": [QUALITY_NAMES[int(code)] for code in rows.quality],
        "embedding": _embedding_column(rows.embeddings),
    }
    return pa.table(columns, schema=_cube_schema(rows.embeddings.shape[1]))


def _write_in_order(
    futures: dict[Future, int], partial: Path, table_of: Callable[[int, Any], pa.Table]
) -> tuple[int, int, int]:
    """Append each block's table (``table_of(block number, result)``) to the Parquet file ``partial`` in block
    order as the results of ``futures`` (future -> block number, 0..n-1) arrive; returns rows, rows with a
    footprint, and the embedding dimension. Progress: step "blocks"."""
    from distributed import as_completed

    rows = with_footprint = dimension = 0
    writer: pq.ParquetWriter | None = None
    pending: dict[int, Any] = {}
    next_block = 0
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            pending[futures[future]] = future.result()
            while next_block in pending:  # rows in block order: blocks are appended as their turn comes
                table = table_of(next_block, pending.pop(next_block))
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
                writer.write_table(table)
                rows += table.num_rows
                with_footprint += table.num_rows - table.column("geometry").null_count
                dimension = table.schema.field("embedding").type.list_size
                next_block += 1
            stage_progress.report("blocks", done, len(futures))
    finally:
        if writer is not None:
            writer.close()
    return rows, with_footprint, dimension


def run_embed(config: EmbedConfig, checkpoint: str, *, client: Client | None = None) -> EmbedReport:
    """Embed every patch of ``config.store``, or every window of ``config.cube``, with the checkpoint's encoder into
    the GeoParquet file ``config.out`` (columns in the module docstring).

    Written to ``out`` + ``.partial`` and renamed when complete, so an interrupted run leaves no file that looks
    finished; a re-run writes it again. Progress: step "blocks".

    Raises:
        FileNotFoundError: the store, the cube or the checkpoint does not exist.
        ValueError: the store is not a complete training store or lacks the encoder's sensor; the cube has no
            tiles, or tiles without S2 at the store's resolution; a cube gives no window (all tiles smaller than
            the window, or no S1 date for an S1 encoder).
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    partial = Path(f"{config.out}.partial")
    if config.cube is not None:
        rows, with_footprint, dimension = _embed_cube(config, config.cube, checkpoint, partial, client)
    else:
        assert config.store is not None  # EmbedConfig requires exactly one of store and cube
        rows, with_footprint, dimension = _embed_store(config, config.store, checkpoint, partial, client)
    partial.replace(config.out)
    logger.info("wrote %s: %d rows of %d-d embeddings (%d with footprints)", config.out, rows, dimension,
                with_footprint)  # fmt: skip
    return EmbedReport(config.out, rows, dimension, with_footprint)


def _embed_store(
    config: DaskStageConfig, store: str, checkpoint: str, partial: Path, client: Client | None
) -> tuple[int, int, int]:
    from softcon.tasks.dask_cluster import open_dask_client

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
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open_dask_client(config, client) as dask_client:
        futures = {
            dask_client.submit(embed_block, store, checkpoint, start, stop, pure=False): number
            for number, (start, stop) in enumerate(bounds)
        }
        return _write_in_order(
            futures, partial, lambda number, rows: _store_table(attrs, plan, patch_size, bounds[number][0], rows)
        )


def quality_rule(train_config: dict[str, Any]) -> QualityRule:
    """Preprocess's thresholds and S1 gap as recorded by the training store named in a checkpoint's training config;
    preprocess's defaults for what it does not record (a store that is gone, an imported corpus)."""
    store = train_config.get("store")
    params = dict(((training_store.read_store_attrs(store) if store else None) or {}).get("params") or {})
    names = ("max_cloud_fraction", "max_nodata_fraction", "s1_max_gap_days")
    recorded = PreprocessConfig.model_validate({name: params[name] for name in names if name in params})
    return QualityRule(recorded.max_cloud_fraction, recorded.max_nodata_fraction, s1_max_gap(recorded))


def cube_blocks(cube: str, size: int, sensor: str, s1_gap: np.timedelta64) -> tuple[tuple[str, ...], list[CubeBlock]]:
    """The cube's tile ids and its windows of ``size`` px in blocks: per tile (id order), per S2 time step (sorted;
    for an S1 encoder only those with S1 within ``s1_gap``), row-major runs of about ``BLOCK_PIXELS`` pixels.

    Raises:
        FileNotFoundError: no cube at ``cube``.
        ValueError: no tiles, a tile without S2 and SCL, or with pixels other than preprocess's 10 m.
    """
    try:
        tiles = tuple(cube_tile_ids(open_cube(cube)))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cube {cube} does not exist") from error
    if not tiles:
        raise ValueError(f"cube {cube!r} has no tiles; run `softcon ingest --cube {cube}` first")
    per_block = max(1, BLOCK_PIXELS // (size * size))
    blocks = []
    for tile_index, tile_id in enumerate(tiles):
        tile = open_tile_dataset(cube, tile_id, chunks=None)
        if "s2" not in tile or "scl" not in tile:
            raise ValueError(f"tile {tile_id!r} of cube {cube!r} has no s2/scl arrays; run `softcon ingest`")
        resolution = tile_resolution(tile)
        if resolution is not None and not np.isclose(resolution, S2_RESOLUTION_M):
            raise ValueError(f"tile {tile_id!r} of cube {cube!r} has {resolution:g} m pixels; the encoder was "
                             f"trained on {S2_RESOLUTION_M:g} m patches")  # fmt: skip
        times = np.sort(tile["time"].values.astype("datetime64[ns]"))
        if sensor == "s1":
            has_s1 = "s1" in tile and "time_s1" in tile.coords
            s1_times = tile["time_s1"].values.astype("datetime64[ns]") if has_s1 else np.array([], "M8[ns]")
            times = times[patches.match_s1_dates(times, s1_times, s1_gap) >= 0]
        windows = patches.patch_windows((tile.sizes["y"], tile.sizes["x"]), size)
        for time in times:
            blocks += [CubeBlock(tile_index, time, windows[first : first + per_block])
                       for first in range(0, len(windows), per_block)]  # fmt: skip
    return tiles, blocks


def _embed_cube(
    config: DaskStageConfig, cube: str, checkpoint: str, partial: Path, client: Client | None
) -> tuple[int, int, int]:
    from softcon.tasks.dask_cluster import open_dask_client

    state = read_checkpoint(checkpoint)
    size, sensor = int(state["meta"]["img_size"]), str(state["meta"].get("sensor", "s2"))
    rule = quality_rule(dict(state["config"]))
    del state  # it holds the optimiser's moments too: not kept while the cube is embedded
    tiles, blocks = cube_blocks(cube, size, sensor, rule.s1_max_gap)
    if not blocks:
        raise ValueError(
            f"cube {cube!r} has no window of {size} px to embed"
            + (" on an S2 date with S1 within the training store's s1_max_gap_days" if sensor == "s1" else "")
        )
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open_dask_client(config, client) as dask_client:
        futures = {
            dask_client.submit(embed_cube_block, cube, checkpoint, tiles, block, size, rule, pure=False): number
            for number, block in enumerate(blocks)
        }
        return _write_in_order(futures, partial, lambda number, rows: _cube_table(tiles, blocks[number], size, rows))
