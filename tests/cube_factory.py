"""Seeded writer of a small synthetic cube that follows the cube contract of DESIGN.md.

Each tile: 12 S2 bands of uint16 noise around band-specific means, SCL mostly clear (4 = vegetation)
with one fully cloudy date on tile 0, S1 VV/VH in dB one day after each S2 date except the last, and a
land cover of four vertical class stripes with a nodata corner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr

from softcon.config import S1_POLARIZATIONS, S2_L2A_BANDS

CLASS_CODES = (10, 20, 30, 80)
CLASS_NAMES = ("tree_cover", "shrubland", "grassland", "water")


@dataclass(frozen=True)
class SyntheticCube:
    """A written cube and what the tests need to know about it."""

    path: str
    tile_ids: tuple[str, ...]
    times: tuple[np.datetime64, ...]
    size: int
    cloudy: tuple[str, int]
    """(tile id, time index) of the fully cloudy date."""
    nodata: tuple[str, int]
    """(tile id, time index) whose top-left 16 x 16 px are S2 nodata."""


def write_cube(
    path: str | Path,
    *,
    n_tiles: int = 2,
    size: int = 64,
    n_dates: int = 3,
    with_s1: bool = True,
    with_landcover: bool = True,
    resolution: float = 10.0,
    s1_units: str | None = None,
    seed: int = 0,
    bands: tuple[str, ...] = S2_L2A_BANDS,
    time_order: tuple[int, ...] | None = None,
) -> SyntheticCube:
    """Write a cube of ``n_tiles`` tiles of ``size`` px and ``n_dates`` S2 dates at ``path``.

    ``time_order`` writes the S2 dates in that order (indices into the sorted dates), as a backfill that ingests
    a later period first leaves them; ``SyntheticCube`` keeps naming dates by their sorted index.

    ``s1_units="linear"`` writes S1 as linear power (10^(dB/10)) with that ``units`` attribute; the default
    writes dB without a ``units`` attribute (the contract's default).
    """
    rng = np.random.default_rng(seed)
    path = str(path)
    zarr.open_group(path, mode="w", zarr_format=3).require_group("tiles")
    times = pd.date_range("2024-06-01", periods=n_dates, freq="10D").values.astype("datetime64[ns]")
    s1_times = times[:-1] + np.timedelta64(1, "D")
    tile_ids = tuple(f"32632_{i:03d}_000" for i in range(n_tiles))
    band_means = np.linspace(500, 3000, len(bands)).astype(np.float64)
    for tile_number, tile_id in enumerate(tile_ids):
        x = 500_000 + tile_number * size * resolution + resolution / 2 + resolution * np.arange(size)
        y = 5_000_000 - resolution / 2 - resolution * np.arange(size)
        s2 = rng.normal(band_means[None, :, None, None], 200, (n_dates, len(bands), size, size))
        s2 = np.clip(s2, 1, 10_000).astype(np.uint16)
        scl = np.full((n_dates, size, size), 4, dtype=np.uint8)
        if tile_number == 0 and n_dates >= 3:
            scl[1] = 9  # a fully cloudy date
            s2[2, :, :16, :16] = 0  # a nodata corner on another date
        landcover = np.zeros((size, size), dtype=np.uint8)
        for stripe, code in enumerate(CLASS_CODES):
            landcover[:, stripe * size // 4 : (stripe + 1) * size // 4] = code
        landcover[: size // 4, : size // 4] = 0
        data_vars = {
            "s2": (("time", "band", "y", "x"), s2),
            "scl": (("time", "y", "x"), scl),
        }
        if with_landcover:
            data_vars["landcover"] = (
                ("y", "x"),
                landcover,
                {
                    "class_codes": list(CLASS_CODES),
                    "class_names": list(CLASS_NAMES),
                    "scheme": "worldcover",
                    "product": "synthetic",
                },
            )
        coords = {"time": times, "band": list(bands), "x": x, "y": y}
        if with_s1:
            s1 = rng.normal(-12, 3, (len(s1_times), len(S1_POLARIZATIONS), size, size)).astype(np.float32)
            s1[:, :, :4, :4] = np.nan
            s1_attrs = {}
            if s1_units == "linear":
                s1, s1_attrs = (10 ** (s1 / 10)).astype(np.float32), {"units": "linear"}
            data_vars["s1"] = (("time_s1", "pol", "y", "x"), s1, s1_attrs)
            coords |= {"time_s1": s1_times, "pol": list(S1_POLARIZATIONS)}
        tile = xr.Dataset(data_vars, coords=coords).rio.write_crs("EPSG:32632")
        tile.attrs["s2_item_ids"] = [f"S2_{tile_id}_{i}" for i in range(n_dates)]
        if time_order is not None:
            tile = tile.isel(time=list(time_order))
            tile.attrs["s2_item_ids"] = [tile.attrs["s2_item_ids"][i] for i in time_order]
        tile.to_zarr(path, group=f"tiles/{tile_id}", mode="w", zarr_format=3, consolidated=False)
    return SyntheticCube(
        path=path, tile_ids=tile_ids, times=tuple(times), size=size, cloudy=(tile_ids[0], 1), nodata=(tile_ids[0], 2)
    )


def write_masked_store(cube: SyntheticCube, out: str | Path, *, patch_size: int = 16) -> str:
    """A training store with per-pixel masks cut from ``cube`` (split blocks of 32 px, 8 samples a block): what the
    fine-tuning, predict and export tests train on."""
    from distributed import Client

    from softcon.config import PreprocessConfig
    from softcon.tasks.preprocess import run_preprocess

    config = PreprocessConfig(cube=cube.path, out=str(out), patch_size=patch_size, split_block=32, val_fraction=0.2,
                              test_fraction=0.2, max_nodata_fraction=0.5, samples_per_block=8, masks=True)  # fmt: skip
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as client:
        run_preprocess(config, client=client)
    return str(out)
