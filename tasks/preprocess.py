"""Preprocess stage: cut the cube's tiles into patches with Dask and write the training store.

Three passes, each a map over small units on the Dask cluster, so no process ever holds the cube:

1. per tile (``summarize_tile``): the patch grid, each patch-date's SCL cloud and S2 nodata fractions,
   and each patch location's class fractions from the land cover (one land cover per location);
2. per block of samples (``write_sample_block``): read the kept patches' S2 and nearest-date S1 (and, with
   ``masks``, their land cover as class indices) from the cube and write them as one shard of the store; the
   driver records finished blocks;
3. per block of samples (``block_train_stats``): per-band moments and histograms of the training
   samples, tree-reduced into the normalization statistics.

Between 1 and 2 the driver builds the sample plan (order, spatial split, targets) and creates the
store; see ``models/training_store.py`` for the layout and how a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time as timer
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from softcon import progress as stage_progress
from softcon.config import S1_POLARIZATIONS, S2_L1C_BANDS, S2_L2A_BANDS, PreprocessConfig
from softcon.models import training_store
from softcon.models.training_store import SamplePlan
from softcon.progress import ProgressCallback
from softcon.tasks import norm_stats, patches, split
from softcon.tasks.cube_store import open_cube, open_tile_dataset
from softcon.tasks.cube_store import tile_ids as cube_tile_ids
from softcon.tasks.dask_cluster import open_dask_client

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)

DASHBOARD_LINK = "dask.dashboard"
"""Name under which the Dask dashboard's link is announced (and tagged on the MLflow run)."""

S2_RESOLUTION_M = 10.0
"""Pixel size the store is cut at: every S2 band on the 10 m grid (SSL4EO-S12 resamples 20/60 m bands too)."""
SAMPLES_PER_BLOCK = 64
"""Default samples per write block = per shard of the image arrays (``PreprocessConfig.samples_per_block``)."""


def s1_max_gap(config: PreprocessConfig) -> np.timedelta64:
    """The S1/S2 date-matching window of ``config`` as a timedelta (nanoseconds, so fractional days work)."""
    return np.timedelta64(round(config.s1_max_gap_days * 86_400e9), "ns")


@dataclass(frozen=True)
class CubeIndex:
    """What the driver needs to know about a cube, read from its coordinates and attributes only."""

    tiles: tuple[str, ...]
    tile_shapes: tuple[tuple[int, int], ...]
    times: tuple[np.ndarray, ...]  # per tile, datetime64[ns]
    s1_times: tuple[np.ndarray, ...]  # per tile, datetime64[ns], empty when the tile has no s1
    class_codes: tuple[int, ...]
    class_names: tuple[str, ...]
    bands: tuple[str, ...] = S2_L2A_BANDS
    """The cube's Sentinel-2 bands, in its order: any subset of the L1C and L2A bands, the same on every tile."""


@dataclass(frozen=True)
class TileSummary:
    """Per-tile result of pass 1: small arrays, sent from a worker to the driver."""

    tile_id: str
    windows: np.ndarray  # (n_windows, 2) int32 row, col
    times: np.ndarray  # (n_times,) datetime64[ns]
    verdicts: np.ndarray  # (n_times, n_windows) uint8 KEEP / DROP_CLOUD / DROP_NODATA
    fractions: np.ndarray  # (n_windows, n_classes) float32
    labelled_fraction: np.ndarray  # (n_windows,) float64


@dataclass(frozen=True)
class PreprocessReport:
    """Outcome of ``run_preprocess``."""

    store: str
    """Path or URL of the training store."""
    counts: dict[str, int]
    """patches (total patch-dates), kept, dropped_cloud, dropped_nodata, and samples per split."""
    seconds: float
    """Wall time of this call."""
    norm_stats: dict[str, Any]
    """{"s2": {"mean", "std", "p01", "p99", "count"}, "s1": {...}} over the training split."""
    dashboard_link: str | None = None
    """Dask dashboard of the cluster used, None when the store was reused."""
    blocks_written: int = 0
    """Write blocks (shards) written by this call; a resumed run writes only the unfinished ones."""
    reused: bool = False
    """True when a complete store with the same fingerprint was found and nothing was computed."""
    damage: str = ""
    """What this call found wrong with the store it was resuming or reusing (and repaired); empty if nothing."""
    cube_fingerprint: str = ""
    """``cube_fingerprint`` of the cube the store was built from (empty for a store written before it was kept)."""

    def metrics(self) -> dict[str, float]:
        """Flat float metrics for MLflow."""
        metrics = {f"{key}": float(value) for key, value in self.counts.items()}
        metrics["kept_fraction"] = self.counts["kept"] / max(self.counts["patches"], 1)
        metrics["seconds"] = self.seconds
        return metrics


def _open_tile(cube: str, tile_id: str) -> xr.Dataset:
    # chunks=None: lazy backend arrays, no Dask graph inside a worker task (which could otherwise try to
    # use the distributed scheduler it is running on).
    return open_tile_dataset(cube, tile_id, chunks=None)


def read_cube_index(cube: str) -> CubeIndex:
    """Tiles, their shapes and dates, and the class scheme of a cube; validates the contract.

    Raises:
        ValueError: when the cube, its tiles, an S2 array or the land cover is missing, or the tiles
            disagree on the class scheme.
        PermissionError: when the object store refuses the credentials (named, never shown).
    """
    try:
        root = open_cube(cube)
    except FileNotFoundError as error:
        raise ValueError(f"no cube at {cube!r}; run `softcon ingest --cube {cube}` first") from error
    except PermissionError as error:
        raise PermissionError(
            f"access to cube {cube!r} was denied ({error}); check the object-store credentials in the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for s3://, GOOGLE_APPLICATION_CREDENTIALS "
            "for gs://, AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY for az://) and the bucket's policy"
        ) from error
    tile_ids = cube_tile_ids(root)
    if not tile_ids:
        raise ValueError(f"cube {cube!r} has no tiles; run `softcon ingest --cube {cube}` first")
    shapes, times, s1_times = [], [], []
    scheme: tuple[tuple[int, ...], tuple[str, ...]] | None = None
    cube_bands: tuple[str, ...] | None = None
    for tile_id in tile_ids:
        tile = _open_tile(cube, tile_id)
        if "s2" not in tile or "scl" not in tile:
            raise ValueError(
                f"tile {tile_id!r} of cube {cube!r} has no s2/scl arrays; run `softcon ingest --cube {cube}`"
            )
        if "landcover" not in tile:
            raise ValueError(
                f"tile {tile_id!r} of cube {cube!r} has no landcover; run `softcon labels --cube {cube}` first"
            )
        bands = tuple(str(b) for b in tile["s2"]["band"].values)
        unknown = [band for band in bands if band not in S2_L1C_BANDS]
        if unknown or len(set(bands)) != len(bands):
            raise ValueError(f"tile {tile_id!r} has S2 bands {bands}; the store takes distinct bands of {S2_L1C_BANDS}")
        if cube_bands is not None and bands != cube_bands:
            raise ValueError(f"tile {tile_id!r} has S2 bands {bands}, other tiles {cube_bands}: ingest one band set")
        cube_bands = bands
        resolution = tile_resolution(tile)
        if resolution is not None and not np.isclose(resolution, S2_RESOLUTION_M):
            raise ValueError(
                f"tile {tile_id!r} of cube {cube!r} has {resolution:g} m pixels; the store needs every S2 band at "
                f"{S2_RESOLUTION_M:g} m: re-run `softcon ingest --resolution {S2_RESOLUTION_M:g}` into a new cube"
            )
        if "s1" in tile:
            patches.s1_db_scale(tile["s1"].attrs.get("units"))  # raises on units it cannot turn into dB
        attrs = tile["landcover"].attrs
        if "class_codes" not in attrs:
            raise ValueError(f"landcover of tile {tile_id!r} has no class_codes attribute; re-run `softcon labels`")
        codes = [int(c) for c in attrs["class_codes"]]
        names = [str(n) for n in attrs.get("class_names", [str(c) for c in codes])]
        # Code 0 is nodata by contract, never a class.
        kept = [(c, n) for c, n in zip(codes, names, strict=True) if c != 0]
        tile_scheme = (tuple(c for c, _ in kept), tuple(n for _, n in kept))
        if scheme is not None and tile_scheme != scheme:
            raise ValueError(f"tile {tile_id!r} has class scheme {tile_scheme}, other tiles {scheme}")
        scheme = tile_scheme
        shapes.append((int(tile.sizes["y"]), int(tile.sizes["x"])))
        times.append(tile["time"].values.astype("datetime64[ns]"))
        has_s1 = "s1" in tile and "time_s1" in tile.coords
        s1_times.append(tile["time_s1"].values.astype("datetime64[ns]") if has_s1 else np.array([], "M8[ns]"))
    assert scheme is not None and cube_bands is not None  # at least one tile was read
    return CubeIndex(
        tiles=tuple(tile_ids),
        tile_shapes=tuple(shapes),
        times=tuple(times),
        s1_times=tuple(s1_times),
        class_codes=scheme[0],
        class_names=scheme[1],
        bands=cube_bands,
    )


def tile_resolution(tile: xr.Dataset) -> float | None:
    """Pixel size in metres from the x coordinate (or the ingest ``resolution`` attribute); None if unknown."""
    if tile.sizes.get("x", 0) > 1:
        x = tile["x"].values[:2].astype(np.float64)
        return float(abs(x[1] - x[0]))
    value = tile.attrs.get("resolution")
    return float(value) if value is not None else None


def store_fingerprint(config: PreprocessConfig, index: CubeIndex, samples_per_block: int) -> str:
    """Hash of everything the store's bytes depend on: parameters that shape it and the cube's dates."""
    params = config.model_dump(mode="json", exclude={"out", "n_workers", "dask_address"})
    if not config.masks:  # stores without masks keep the fingerprint they were written under
        del params["masks"]
    payload = {
        "schema_version": training_store.SCHEMA_VERSION,
        "params": params,
        "samples_per_block": samples_per_block,
        "tiles": index.tiles,
        "shapes": index.tile_shapes,
        "times": [[str(t) for t in times] for times in index.times],
        "s1_times": [[str(t) for t in times] for times in index.s1_times],
        "classes": [index.class_codes, index.class_names],
    }
    if index.bands != S2_L2A_BANDS:  # stores of the full L2A set keep the fingerprint they were written under
        payload["bands"] = index.bands
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cube_fingerprint(index: CubeIndex) -> str:
    """The version of the cube a store is built from: SHA-256 of its tiles, their shapes, every committed time
    step of both sensors and the land-cover classes. A committed step never changes in place (ingest only
    appends, and repairs rewrite the same items), so two cubes with one fingerprint give the store the same
    pixels; it is recorded in the store's ``cube_fingerprint`` attribute and on the preprocess MLflow run."""
    payload = {
        "tiles": index.tiles,
        "shapes": index.tile_shapes,
        "times": [[str(t) for t in times] for times in index.times],
        "s1_times": [[str(t) for t in times] for times in index.s1_times],
        "classes": [index.class_codes, index.class_names],
        "bands": index.bands,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def summarize_tile(
    cube: str,
    tile_id: str,
    *,
    patch_size: int,
    stride: int | None,
    class_codes: tuple[int, ...],
    max_cloud_fraction: float,
    max_nodata_fraction: float,
) -> TileSummary:
    """Pass 1 for one tile: patch grid, quality verdict per patch-date, class fractions per location."""
    tile = _open_tile(cube, tile_id)
    windows = patches.patch_windows((tile.sizes["y"], tile.sizes["x"]), patch_size, stride)
    n_times = tile.sizes["time"]
    cloud = np.zeros((n_times, len(windows)))
    nodata = np.zeros((n_times, len(windows)))
    for t in range(n_times):  # one date at a time bounds memory to one (band, y, x) image
        scl = tile["scl"].isel(time=t).values
        s2 = tile["s2"].isel(time=t).values
        cloud[t] = patches.window_fractions(patches.cloud_mask(scl), windows, patch_size)
        nodata[t] = patches.window_fractions(patches.s2_nodata_mask(s2), windows, patch_size)
    landcover = tile["landcover"].values
    fractions = np.zeros((len(windows), len(class_codes)), dtype=np.float32)
    labelled = np.zeros(len(windows))
    for i, (row, col) in enumerate(windows):
        window = landcover[row : row + patch_size, col : col + patch_size]
        fractions[i], labelled[i] = patches.class_fractions(window, class_codes)
    verdicts = patches.quality_verdicts(
        cloud, nodata, max_cloud_fraction=max_cloud_fraction, max_nodata_fraction=max_nodata_fraction
    )
    return TileSummary(
        tile_id=tile_id,
        windows=windows,
        times=tile["time"].values.astype("datetime64[ns]"),
        verdicts=verdicts,
        fractions=fractions,
        labelled_fraction=labelled,
    )


def build_plan(
    summaries: list[TileSummary], config: PreprocessConfig, tile_shapes: tuple[tuple[int, int], ...]
) -> tuple[SamplePlan, dict[str, int]]:
    """Order kept patch-dates by location then time, assign spatial splits and targets.

    Location ids number every patch window of every tile (tiles sorted, windows row-major), so a
    location keeps its id whatever dates are dropped.

    Returns:
        The plan and the counts (patches, kept, dropped_cloud, dropped_nodata, train, val, test).
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in training_store.PLAN_DTYPES}
    block_of_sample: list[split.BlockId] = []
    counts = {"patches": 0, "kept": 0, "dropped_cloud": 0, "dropped_nodata": 0}
    next_location = 0
    for tile_index, summary in enumerate(summaries):
        block_size = config.split_block or max(tile_shapes[tile_index])
        counts["patches"] += summary.verdicts.size
        counts["dropped_cloud"] += int((summary.verdicts == patches.DROP_CLOUD).sum())
        counts["dropped_nodata"] += int((summary.verdicts == patches.DROP_NODATA).sum())
        # (n_windows, n_times) so that a row-major walk is location-major then time.
        keep = (summary.verdicts == patches.KEEP).T
        window_index, time_index = np.nonzero(keep)
        counts["kept"] += len(window_index)
        rows, cols = summary.windows[window_index, 0], summary.windows[window_index, 1]
        columns["location"].append(next_location + window_index.astype(np.int64))
        columns["tile"].append(np.full(len(window_index), tile_index, dtype=np.int32))
        columns["time"].append(summary.times[time_index])
        columns["row"].append(rows)
        columns["col"].append(cols)
        fractions = summary.fractions[window_index]
        columns["fractions"].append(fractions)
        columns["labels"].append(patches.multi_hot(fractions, config.label_threshold))
        columns["labelled"].append(summary.labelled_fraction[window_index] >= config.min_labelled_fraction)
        block_of_sample += [
            split.patch_block(summary.tile_id, int(r), int(c), config.patch_size, block_size)
            for r, c in zip(rows, cols, strict=True)
        ]
        next_location += len(summary.windows)
    # Blocks come from every window, not only kept ones, so a cloudier date cannot reshuffle the split.
    all_blocks = [
        split.patch_block(s.tile_id, int(r), int(c), config.patch_size, config.split_block or max(shape))
        for s, shape in zip(summaries, tile_shapes, strict=True)
        for r, c in s.windows
    ]
    assignment = split.assign_splits(all_blocks, config.val_fraction, config.test_fraction, config.seed)
    columns["split"] = [np.array([assignment[b] for b in block_of_sample], dtype=np.uint8)]
    n_classes = summaries[0].fractions.shape[1] if summaries else 0
    plan_values = {}
    for name, dtype in training_store.PLAN_DTYPES.items():
        parts = columns[name]
        if parts:
            plan_values[name] = np.concatenate(parts).astype(dtype)
        else:
            plan_values[name] = np.zeros((0, n_classes) if name in ("labels", "fractions") else 0, dtype)
    plan = SamplePlan(**plan_values)
    for split_index, name in enumerate(split.SPLIT_NAMES):
        counts[name] = int((plan.split == split_index).sum())
    warning = empty_split_warning(config, counts)
    if warning:
        logger.warning(warning)
    return plan, counts


def empty_split_warning(config: PreprocessConfig, counts: Mapping[str, int]) -> str | None:
    """What to change when a split asked for (a fraction above 0) got no sample; None when every one has some."""
    wanted = {"train": 1.0, "val": config.val_fraction, "test": config.test_fraction}
    empty = [name for name in split.SPLIT_NAMES if wanted[name] > 0 and counts.get(name, 0) == 0]
    if not empty or counts.get("kept", 0) == 0:
        return None
    block = f"{config.split_block} px" if config.split_block else "one tile"
    sizes = ", ".join(f"{name} {counts.get(name, 0)}" for name in split.SPLIT_NAMES)
    return (
        f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty ({sizes} samples): the split "
        f"assigns whole blocks of {block} to one split, and the area holds too few of them; set a smaller "
        "--split-block (in pixels, a multiple of the patch size) or ingest a larger area. Evaluation needs "
        "samples in the test (or val) split"
    )


def read_block_images(
    cube: str,
    tiles: tuple[str, ...],
    plan: SamplePlan,
    patch_size: int,
    s1_max_gap: np.timedelta64,
    *,
    n_bands: int = len(S2_L2A_BANDS),
) -> tuple[np.ndarray, np.ndarray]:
    """S2 (uint16) and nearest-date S1 (float32 dB, NaN when none) patches of the samples of ``plan``.

    Reads each (tile, date) once, as the bounding box of the block's patches on it. S1 stored as linear
    power (``units`` attribute) is converted to dB here.
    """
    n = len(plan)
    s2_out = np.zeros((n, n_bands, patch_size, patch_size), dtype=np.uint16)
    s1_out = np.full((n, len(S1_POLARIZATIONS), patch_size, patch_size), np.nan, dtype=np.float32)
    for tile_index in np.unique(plan.tile):
        tile = _open_tile(cube, tiles[tile_index])
        tile_times = tile["time"].values.astype("datetime64[ns]")
        has_s1 = "s1" in tile and "time_s1" in tile.coords
        s1_times = tile["time_s1"].values.astype("datetime64[ns]") if has_s1 else np.array([], "M8[ns]")
        s1_match = patches.match_s1_dates(tile_times, s1_times, s1_max_gap)
        if has_s1:
            pols = [str(p) for p in tile["s1"]["pol"].values]
            pol_order = [pols.index(p) for p in S1_POLARIZATIONS]
            s1_scale = patches.s1_db_scale(tile["s1"].attrs.get("units"))
        in_tile = plan.tile == tile_index
        for time_value in np.unique(plan.time[in_tile]):
            members = np.nonzero(in_tile & (plan.time == time_value))[0]
            time_index = int(np.flatnonzero(tile_times == time_value)[0])  # time steps are in append order
            rows, cols = plan.row[members], plan.col[members]
            box = dict(
                y=slice(int(rows.min()), int(rows.max()) + patch_size),
                x=slice(int(cols.min()), int(cols.max()) + patch_size),
            )
            s2 = tile["s2"].isel({"time": time_index, **box}).values
            s1 = None
            if s1_match[time_index] >= 0:
                s1 = tile["s1"].isel({"time_s1": int(s1_match[time_index]), **box}).values[pol_order]
                s1 = patches.s1_to_db(s1, s1_scale)
            for member, row, col in zip(members, rows - rows.min(), cols - cols.min(), strict=True):
                s2_out[member] = s2[:, row : row + patch_size, col : col + patch_size]
                if s1 is not None:
                    s1_out[member] = s1[:, row : row + patch_size, col : col + patch_size]
    return s2_out, s1_out


def class_index_table(class_codes: tuple[int, ...]) -> np.ndarray:
    """(256,) uint8 lookup from a land-cover code to its index in the class list; nodata (0) and codes outside the
    scheme map to ``MASK_NODATA``."""
    table = np.full(256, training_store.MASK_NODATA, dtype=np.uint8)
    table[list(class_codes)] = np.arange(len(class_codes), dtype=np.uint8)
    return table


def read_block_masks(
    cube: str, tiles: tuple[str, ...], plan: SamplePlan, patch_size: int, class_codes: tuple[int, ...]
) -> np.ndarray:
    """(n, patch_size, patch_size) uint8 class indices of the plan's patch windows, from each tile's ``landcover``
    (one land cover per tile, so every date of a location gets the same mask)."""
    table = class_index_table(class_codes)
    masks = np.full((len(plan), patch_size, patch_size), training_store.MASK_NODATA, dtype=np.uint8)
    for tile_index in np.unique(plan.tile):
        members = np.flatnonzero(plan.tile == tile_index)
        rows, cols = plan.row[members], plan.col[members]
        top, left = int(rows.min()), int(cols.min())
        box = {"y": slice(top, int(rows.max()) + patch_size), "x": slice(left, int(cols.max()) + patch_size)}
        landcover = table[_open_tile(cube, tiles[tile_index])["landcover"].isel(box).values]
        for member, row, col in zip(members, rows - top, cols - left, strict=True):
            masks[member] = landcover[row : row + patch_size, col : col + patch_size]
    return masks


def write_sample_block(
    cube: str,
    out: str,
    tiles: tuple[str, ...],
    plan: SamplePlan,
    start: int,
    patch_size: int,
    s1_max_gap: np.timedelta64,
    n_bands: int = len(S2_L2A_BANDS),
    class_codes: tuple[int, ...] | None = None,
) -> int:
    """Pass 2 for one block: read its patches from the cube and write them at ``start`` (with their masks when
    ``class_codes`` is given); returns start."""
    s2, s1 = read_block_images(cube, tiles, plan, patch_size, s1_max_gap, n_bands=n_bands)
    training_store.write_images(out, start, s2, s1)
    if class_codes is not None:
        training_store.write_masks(out, start, read_block_masks(cube, tiles, plan, patch_size, class_codes))
    return start


def block_train_stats(out: str, start: int, stop: int) -> tuple[norm_stats.SensorStats, norm_stats.SensorStats] | None:
    """Pass 3 for one block: partial S2 and S1 statistics of its training samples (None if none)."""
    s2, s1, sample_split = training_store.read_images(out, start, stop)
    train = sample_split == split.TRAIN
    if not train.any():
        return None
    return norm_stats.s2_partial_stats(s2[train]), norm_stats.s1_partial_stats(s1[train])


def _add_partials(*partials: Any) -> Any:
    present = [p for p in partials if p is not None]
    if not present:
        return None
    s2, s1 = present[0]
    for other_s2, other_s1 in present[1:]:
        s2, s1 = s2 + other_s2, s1 + other_s1
    return s2, s1


def _report_from_attrs(out: str, attrs: dict[str, Any], seconds: float, **extra: Any) -> PreprocessReport:
    return PreprocessReport(
        store=out, counts=dict(attrs["counts"]), seconds=seconds, norm_stats=attrs["norm_stats"],
        cube_fingerprint=attrs.get("cube_fingerprint", ""), **extra,
    )  # fmt: skip


def run_preprocess(
    config: PreprocessConfig,
    *,
    client: Client | None = None,
    samples_per_block: int | None = None,
) -> PreprocessReport:
    """Cut the cube into patches and write the training store at ``config.out``.

    A complete store with the same fingerprint (parameters and cube dates) is reused without starting
    a cluster, once it matches the manifest it recorded when it was finished (a listing and its metadata
    files, no chunk read); an incomplete one is resumed, writing only the blocks not yet marked done.
    Damage found on the way is repaired and logged: image shards lost or changed (or, in an incomplete
    store, missing from a done block) are written again by resuming; changed metadata or attributes, lost
    plan chunks or a store without a manifest are rebuilt from the cube (the store is derived data).

    Args:
        config: the stage configuration (cube, out, patch grid, quality thresholds, split, Dask).
        client: a Dask client to use; default: connect to ``config.dask_address`` or start a
            LocalCluster of ``config.n_workers`` processes, closed on return.
        samples_per_block: overrides ``config.samples_per_block`` (samples per write block = per shard).

    Progress goes to ``softcon.progress``: ``report`` for the steps "tiles", "blocks" and "stats", and
    ``announce("dask.dashboard", link)`` once the Dask client is up, before any work is submitted.

    Returns:
        The report: store path, counts, normalization statistics, wall time, dashboard link.

    Raises:
        ValueError: when the cube has no tiles or no land cover (naming the stage to run), when no
            patch passes the quality checks, or when ``config.out`` holds something that is not a
            training store (which writing the store would delete).

    Example:
        >>> report = run_preprocess(PreprocessConfig(cube="cube.zarr", out="store.zarr", patch_size=32))
        >>> report.counts["kept"], report.norm_stats["s2"]["mean"][:3]
    """
    started = timer.perf_counter()
    progress = stage_progress.report
    if samples_per_block is not None:
        if samples_per_block <= 0:
            raise ValueError(f"samples_per_block must be positive, got {samples_per_block}")
        config = config.model_copy(update={"samples_per_block": samples_per_block})
    samples_per_block = config.samples_per_block
    index = read_cube_index(config.cube)
    fingerprint = store_fingerprint(config, index, samples_per_block)
    attrs, damage = existing_store(config.out, fingerprint, source=f"the cube {config.cube}")
    if attrs is not None and attrs.get("complete"):
        logger.info("training store %s is complete with the same parameters and matches its manifest; reusing it",
                    config.out)  # fmt: skip
        return _report_from_attrs(config.out, attrs, timer.perf_counter() - started, reused=True)

    with open_dask_client(config, client) as dask_client:
        dashboard_link = dask_client.dashboard_link
        logger.info("Dask dashboard: %s", dashboard_link)
        stage_progress.announce(DASHBOARD_LINK, dashboard_link)
        if attrs is not None:
            logger.info("resuming training store %s (%d blocks done)", config.out, len(attrs["blocks_done"]))
            plan, counts, done = training_store.read_plan(config.out), attrs["counts"], set(attrs["blocks_done"])
        else:
            plan, counts = _plan_store(config, index, fingerprint, samples_per_block, dask_client, progress)
            done = set()
        bounds = training_store.block_bounds(len(plan), samples_per_block)
        written = _write_blocks(config, index, plan, bounds, done, dask_client, progress)
        stats = train_stats(config.out, bounds, dask_client, progress, index.bands)
        cube_version = cube_fingerprint(index)
        training_store.finish_store(config.out, {"norm_stats": stats, "cube_fingerprint": cube_version})
    seconds = timer.perf_counter() - started
    logger.info("wrote %s: %s in %.1f s (%d blocks written now)", config.out, counts, seconds, written)
    return PreprocessReport(
        store=config.out,
        counts=counts,
        seconds=seconds,
        norm_stats=stats,
        dashboard_link=dashboard_link,
        blocks_written=written,
        damage=damage.describe(),
        cube_fingerprint=cube_version,
    )


def existing_store(
    out: str, fingerprint: str, *, source: str
) -> tuple[dict[str, Any] | None, training_store.StoreDamage]:
    """The attributes of the store at ``out`` to reuse or resume (None: write a new one), once what the listing
    and metadata show wrong with it is repaired, and that damage.

    Lost or changed image shards are marked not done (resuming writes them again); any other damage means a
    rebuild from ``source`` (named in the log). Both are logged.

    Raises:
        ValueError: when ``out`` holds something that is not a training store.
    """
    attrs = training_store.read_store_attrs(out)
    if attrs is None or attrs.get("fingerprint") != fingerprint:
        training_store.check_replaceable(out)
        return None, training_store.StoreDamage()
    damage = training_store.find_damage(out, attrs)
    if damage.rebuild:
        logger.warning(
            "training store %s is damaged (%s); rebuilding it from %s (the store is derived data; its source "
            "is only read)", out, damage.describe(), source,
        )  # fmt: skip
        return None, damage
    if damage.shards:
        logger.warning("training store %s: %s; writing blocks %s again", out, damage.describe(),
                       list(damage.lost_blocks))  # fmt: skip
        training_store.reopen_blocks(out, damage.lost_blocks)
        attrs = training_store.read_store_attrs(out)
    return attrs, damage


def _plan_store(
    config: PreprocessConfig,
    index: CubeIndex,
    fingerprint: str,
    samples_per_block: int,
    client: Client,
    progress: ProgressCallback,
) -> tuple[SamplePlan, dict[str, int]]:
    """Pass 1 on the cluster, then the plan, then a fresh store holding it."""
    from distributed import as_completed

    futures = client.map(
        summarize_tile,
        [config.cube] * len(index.tiles),
        index.tiles,
        patch_size=config.patch_size,
        stride=config.stride,
        class_codes=index.class_codes,
        max_cloud_fraction=config.max_cloud_fraction,
        max_nodata_fraction=config.max_nodata_fraction,
        pure=False,
    )
    for done, _ in enumerate(as_completed(futures), start=1):
        progress("tiles", done, len(futures))
    summaries = client.gather(futures)
    plan, counts = build_plan(summaries, config, index.tile_shapes)
    logger.info("patch plan: %s", counts)
    if counts["kept"] == 0:
        raise ValueError(
            f"no patch of cube {config.cube!r} passed the quality checks ({counts}); raise "
            f"max_cloud_fraction ({config.max_cloud_fraction}) or max_nodata_fraction "
            f"({config.max_nodata_fraction}), or ingest clearer dates"
        )
    training_store.create_store(
        config.out,
        plan,
        n_bands=len(index.bands),
        n_pols=len(S1_POLARIZATIONS),
        patch_size=config.patch_size,
        samples_per_block=samples_per_block,
        attrs={
            "fingerprint": fingerprint,
            "class_names": list(index.class_names),
            "class_codes": list(index.class_codes),
            "bands": list(index.bands),
            "pols": list(S1_POLARIZATIONS),
            "tiles": list(index.tiles),
            "split_names": list(split.SPLIT_NAMES),
            "cube": config.cube,
            "params": config.model_dump(mode="json"),
            "counts": counts,
            "samples_per_block": samples_per_block,
            "s1_max_gap_days": config.s1_max_gap_days,
            "resolution_m": S2_RESOLUTION_M,
            "s1_units": "dB",
        },
        masks=config.masks,
    )
    return plan, counts


def _write_blocks(
    config: PreprocessConfig,
    index: CubeIndex,
    plan: SamplePlan,
    bounds: list[tuple[int, int]],
    done: set[int],
    client: Client,
    progress: ProgressCallback,
) -> int:
    """Pass 2: write every block not yet done, marking each as it finishes; returns how many it wrote."""
    todo = [i for i in range(len(bounds)) if i not in done]
    logger.info("writing %d of %d blocks", len(todo), len(bounds))
    futures = {
        client.submit(
            write_sample_block,
            config.cube,
            config.out,
            index.tiles,
            plan.select(*bounds[i]),
            bounds[i][0],
            config.patch_size,
            s1_max_gap(config),
            len(index.bands),
            index.class_codes if config.masks else None,
            pure=False,
        ): i
        for i in todo
    }
    collect_blocks(config.out, futures, len(bounds), progress)
    return len(todo)


def collect_blocks(out: str, futures: dict[Future, int], n_blocks: int, progress: ProgressCallback) -> None:
    """Mark each block of ``futures`` (future -> block number) done in the store as it finishes, reporting step
    "blocks" out of ``n_blocks``; a worker's error is raised here, leaving the blocks not yet marked to resume."""
    from distributed import as_completed

    finished = n_blocks - len(futures)
    progress("blocks", finished, n_blocks)
    for future in as_completed(futures):
        future.result()
        training_store.mark_blocks_done(out, [futures[future]])
        finished += 1
        progress("blocks", finished, n_blocks)


def train_stats(
    out: str, bounds: list[tuple[int, int]], client: Client, progress: ProgressCallback, bands: tuple[str, ...]
) -> dict[str, Any]:
    """Pass 3: per-block partial statistics of the training split, tree-reduced on the workers."""
    partials = [client.submit(block_train_stats, out, start, stop, pure=False) for start, stop in bounds]
    fan_in = 8  # partials per reduction task: S2 histograms are 12 x 65536 int64 (6 MB) each
    while len(partials) > 1:
        partials = [
            client.submit(_add_partials, *partials[i : i + fan_in], pure=False) for i in range(0, len(partials), fan_in)
        ]
    reduced = partials[0].result()
    progress("stats", 1, 1)
    if reduced is None:
        raise ValueError(f"the training split of {out!r} is empty; lower val_fraction/test_fraction")
    s2, s1 = reduced
    return {
        "s2": {
            "names": list(bands),
            **norm_stats.finalize_stats(s2, np.arange(norm_stats.S2_LEVELS, dtype=np.float64)),
        },
        "s1": {"names": list(S1_POLARIZATIONS), **norm_stats.finalize_stats(s1, norm_stats.s1_bin_centres())},
    }
