"""Scene loading: STAC items of one tile and sensor onto the tile grid with odc-stac, harmonised to the cube's
units.

- Sentinel-2: ``(band, y, x)`` uint16 reflectance x10000 with the processing-baseline offset removed (not twice:
  the collection spec decides, ``tasks/collections.py``), 0 = nodata, and SCL ``(y, x)`` uint8;
- Sentinel-1: ``(pol, y, x)`` float32 backscatter in dB (linear power and amplitude converted; values whose
  range contradicts the declared scale refused per item; inf is nodata), NaN = nodata.

The items of one solar day form one time step (a mosaic of its granules). Several days of one sensor go
through one odc-stac load when their items allow it (``load_days``); a load that keeps failing falls back to
one load per day and isolates the failing items (``load_day_isolating``). odc-stac reads through
``tasks/aligned_reads.py``'s driver, with the run's GDAL settings, URL signing and retries
(``ReadOptions``, built from ``tasks/stac_access.py``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar, cast

import numpy as np
import odc.stac
import pystac
import rasterio
import xarray as xr
from numpy.typing import DTypeLike

from softcon.tasks.aligned_reads import ALIGNED_DRIVER
from softcon.tasks.collections import CollectionSpec, spec_for_item
from softcon.tasks.cube_store import S1_POLS
from softcon.tasks.grid import Tile
from softcon.tasks.stac_access import StacAccess, describe_error, is_url, with_retries

__all__ = [
    "REMOTE_READ_THREADS",
    "SCL_CLOUD_CODES",
    "ReadOptions",
    "check_s1_scale",
    "load_day_isolating",
    "load_days",
    "load_s1_day",
    "load_s1_days",
    "load_s2_day",
    "load_s2_days",
    "s2_day_quality",
]

log = logging.getLogger(__name__)

SCL_CLOUD_CODES = (3, 8, 9, 10)
"""Sen2Cor cloud shadow, cloud medium/high probability, thin cirrus."""
T = TypeVar("T")


@dataclass(frozen=True)
class ReadOptions:
    """How assets are read: URL patching (signing), GDAL settings, retry policy."""

    patch_url: Callable[[str], str] | None = None
    gdal: dict[str, Any] = field(default_factory=dict)
    retries: int = 3
    retry_delay: float = 1.0
    threads: int | None = None
    """Reads run at once within one load (odc-stac's ``pool``; each thread gets the same GDAL settings);
    None: ``REMOTE_READ_THREADS`` for assets read over the network, one at a time for local files."""
    stac_items: dict[tuple[str, str], pystac.Item] = field(default_factory=dict, compare=False, repr=False)
    """Parsed pystac Items by (collection, id), shared by the loads of a run (an item covers several tiles)."""

    @classmethod
    def from_access(cls, access: StacAccess, *, threads: int | None = None) -> ReadOptions:
        """The run's signing, GDAL settings (headers, GDAL's HTTP retries) and retry policy for asset reads."""
        return cls(
            patch_url=access.patch_url, gdal=access.gdal_options(), retries=access.retries,
            retry_delay=access.retry_delay, threads=threads,
        )  # fmt: skip

    def pystac_item(self, item: dict[str, Any]) -> pystac.Item:
        """The item as a pystac Item, without its links (a "self" link to an API would turn local paths into
        API URLs)."""
        key = (str(item.get("collection")), str(item["id"]))
        if key not in self.stac_items:
            self.stac_items[key] = pystac.Item.from_dict({**item, "links": []})
        return self.stac_items[key]


def load_s2_day(
    items: Sequence[dict[str, Any]], tile: Tile, bands: Sequence[str], read: ReadOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One solar day of S2 on the tile grid: (band, y, x) uint16 harmonized reflectance, (y, x) SCL."""
    ((_, loaded),) = load_s2_days({date.min: list(items)}, tile, bands, read).items()
    return loaded


def load_s2_days(
    days: dict[date, list[dict[str, Any]]], tile: Tile, bands: Sequence[str], read: ReadOptions | None = None
) -> dict[date, tuple[np.ndarray, np.ndarray]]:
    """Several solar days of S2 in one odc-stac load: day -> (band, y, x) uint16 reflectance, (y, x) SCL.

    Each day's items are mosaicked together (one time step per key of ``days``), exactly as a load of
    that day alone; the items must share a collection spec and all carry SCL or all lack it.
    """
    items = [item for day_items in days.values() for item in day_items]
    spec = spec_for_item(items[0])
    band_keys = [spec.asset_key(band) for band in bands]
    with_scl = all(spec.assets["SCL"] in item["assets"] for item in items)
    keys = [*band_keys, spec.assets["SCL"]] if with_scl else band_keys
    resampling = {"*": "bilinear", spec.assets["SCL"]: "nearest"}
    data = _odc_load(days, keys, tile, resampling, read=read)
    out = {}
    for t, (day, day_items) in enumerate(sorted(days.items())):
        stack = np.stack([data[key].values[t] for key in band_keys])  # (band, y, x)
        offset = spec.s2_offset(day_items[0])
        stack = harmonize(stack, offset)
        scl = data[spec.assets["SCL"]].values[t].astype(np.uint8) if with_scl else np.zeros(stack.shape[1:], np.uint8)
        out[day] = (stack, scl)
    return out


def harmonize(stack: np.ndarray, offset: int) -> np.ndarray:
    """Reflectance as uint16 with the BOA offset (``<= 0``) added: 0 stays nodata, valid pixels clip to 1."""
    if stack.dtype != np.uint16:  # odc-stac keeps the assets' dtype; other types are clipped in
        if stack.dtype.kind == "f":  # NaN and inf (float assets) are nodata, never a saturated 65535
            stack = np.where(np.isfinite(stack), stack, 0)
        stack = np.clip(stack, 0, 65535).astype(np.uint16)
    if not offset:
        return stack
    nodata = stack == 0
    out = np.maximum(stack, 1 - offset)  # valid pixels end at least at 1: no uint16 wrap-around below
    out -= np.uint16(-offset)
    out[nodata] = 0
    return out


def load_s1_day(items: Sequence[dict[str, Any]], tile: Tile, read: ReadOptions | None = None) -> np.ndarray:
    """One solar day of S1 on the tile grid: (pol, y, x) float32 dB, NaN where there is no data.

    A polarization that the day's items do not all carry (single-pol VV products) is all NaN.
    """
    ((_, loaded),) = load_s1_days({date.min: list(items)}, tile, read).items()
    return loaded


def load_s1_days(
    days: dict[date, list[dict[str, Any]]], tile: Tile, read: ReadOptions | None = None
) -> dict[date, np.ndarray]:
    """Several solar days of S1 in one odc-stac load: day -> (pol, y, x) float32 dB, NaN = no data.

    A polarization that the items do not all carry is all NaN; the items must share a collection spec.
    """
    items = [item for day_items in days.values() for item in day_items]
    spec: CollectionSpec = spec_for_item(items[0])
    pols = [pol for pol in S1_POLS if all(spec.assets[pol] in item["assets"] for item in items)]
    if not pols:
        raise KeyError(f"items {[i['id'] for i in items]} carry none of the assets {[spec.assets[p] for p in S1_POLS]}")
    keys = {pol: spec.asset_key(pol) for pol in pols}
    data = _odc_load(days, list(keys.values()), tile, {"*": "bilinear"}, dtype="float32", read=read)
    result = {}
    for t, (day, day_items) in enumerate(sorted(days.items())):
        scale = spec.s1_value_scale(day_items[0])
        nodata = spec.asset_nodata(day_items[0], pols[0])
        raw = {pol: data[keys[pol]].values[t].astype(np.float64) for pol in keys}
        for values in raw.values():
            values[(values == nodata) | ~np.isfinite(values)] = np.nan  # inf is nodata too, never stored
        check_s1_scale(np.stack(list(raw.values())), scale, f"S1 items {[i['id'] for i in day_items]}")
        out = []
        for pol in S1_POLS:
            if pol not in keys:
                out.append(np.full(tile.geobox.shape, np.nan, np.float32))
                continue
            values = raw[pol]
            if scale != "db":
                values[values <= 0] = np.nan
                with np.errstate(invalid="ignore", divide="ignore"):
                    # linear power -> 10 log10; amplitude digital numbers (GRD) -> 20 log10, uncalibrated.
                    values = (20 if scale == "amplitude" else 10) * np.log10(values)
            out.append(values.astype(np.float32))
        result[day] = np.stack(out)
    return result


S1_MIN_VALUES_TO_JUDGE = 100
"""Valid pixels needed before the value range is used to check an S1 scale."""
S1_NEGATIVE_FRACTION = 0.01
"""Linear power and amplitude are never negative; dB backscatter of land and water nearly always is."""


def check_s1_scale(values: np.ndarray, scale: str, what: str) -> None:
    """Refuse S1 values whose range contradicts their declared scale (NaN = nodata, ignored).

    Raises:
        ValueError: negative values declared linear power or amplitude (they are dB already), or values
            declared dB without negative ones (linear power or amplitude mislabelled as dB).
    """
    valid = values[np.isfinite(values)]
    if valid.size < S1_MIN_VALUES_TO_JUDGE:
        return
    negative = float((valid < 0).mean())
    if scale != "db" and negative > S1_NEGATIVE_FRACTION:
        raise ValueError(
            f"{what}: {negative:.0%} of the values are negative, impossible for {scale} backscatter; they look "
            "like dB already. Declare raster:bands unit 'dB' on the VV/VH assets (or fix the collection's "
            "s1_scale in tasks/collections.py)"
        )
    if scale == "db" and negative < S1_NEGATIVE_FRACTION:
        raise ValueError(
            f"{what}: declared dB but {1 - negative:.0%} of the values are >= 0 (median {np.median(valid):.3g}); "
            "they look like linear power or amplitude. Fix the assets' raster:bands unit ('linear' or drop it)"
        )


REMOTE_READ_THREADS = 4
"""Concurrent reads of one load when its assets are URLs: COG range requests wait on the network, not a core."""


def read_pool(items: Sequence[pystac.Item], threads: int | None) -> int | None:
    """odc-stac's ``pool`` for a load: ``threads``, or by default concurrent reads for remote assets only."""
    if threads is None:
        hrefs = (asset.href for item in items for asset in item.assets.values())
        remote = any(is_url(href) and not href.startswith("file://") for href in hrefs)
        threads = REMOTE_READ_THREADS if remote else 1
    return threads if threads > 1 else None


def _odc_load(
    days: dict[date, list[dict[str, Any]]],
    keys: Sequence[str],
    tile: Tile,
    resampling: dict[str, str],
    dtype: str | None = None,
    read: ReadOptions | None = None,
) -> xr.Dataset:
    """One odc-stac load of the days' items onto the tile; time step ``t`` is the ``t``-th day in date order."""
    read = read or ReadOptions()
    stac_items = [read.pystac_item(item) for day_items in days.values() for item in day_items]
    day_of = [day for day, day_items in days.items() for _ in day_items]
    # odc-stac's dtype defaults to None (each band's own dtype), but its annotation (numpy's DTypeLike) omits None.
    band_dtype = cast(DTypeLike, dtype)
    with warnings.catch_warnings(), rasterio.Env(**read.gdal):
        warnings.simplefilter("ignore")  # odc-stac warns about common-name aliases
        # fail_on_error: a read error must raise (and be retried or reported), never become silent nodata.
        # Grouped by the day keys given (the tile's solar day), not odc's own solar-day guess.
        data = odc.stac.load(
            stac_items, bands=list(keys), geobox=tile.geobox, resampling=resampling,
            groupby=lambda _item, _parsed, index: day_of[index], chunks=None, fail_on_error=True, dtype=band_dtype,
            patch_url=read.patch_url, pool=read_pool(stac_items, read.threads), driver=ALIGNED_DRIVER,
        )  # fmt: skip
    if data.sizes["time"] != len(days):  # pragma: no cover (a grouping bug)
        raise AssertionError(f"odc-stac returned {data.sizes['time']} time steps for {len(days)} days")
    return data


def load_day_isolating(
    items: Sequence[dict[str, Any]], load: Callable[[Sequence[dict[str, Any]]], T], read: ReadOptions, what: str
) -> tuple[T | None, dict[str, str]]:
    """Load one tile-date with retries; if it keeps failing, find the failing items and load the rest.

    Returns:
        (the loaded day or ``None`` when every item failed, failed item id -> error text)
    """

    def attempt(subset: Sequence[dict[str, Any]]) -> T:
        return with_retries(lambda: load(subset), what=what, retries=read.retries, delay=read.retry_delay)

    try:
        return attempt(items), {}
    except Exception as error:
        if len(items) == 1:
            return None, {items[0]["id"]: describe_error(error)}
    good, failed = [], {}
    for item in items:
        try:
            attempt([item])
            good.append(item)
        except Exception as error:
            failed[item["id"]] = describe_error(error)
    if not good:
        return None, failed
    try:
        return attempt(good), failed
    except Exception as error:  # every item alone reads but not together: report them all
        return None, {**failed, **{item["id"]: describe_error(error) for item in good}}


def s2_day_quality(s2: np.ndarray, scl: np.ndarray, within: np.ndarray | None = None) -> tuple[float, float]:
    """(cloud fraction, nodata fraction) of one tile-date: SCL 3/8/9/10, and all-zero or SCL 0 pixels.

    ``within`` (a boolean pixel mask, e.g. the requested area on the tile) limits both fractions to its pixels.
    """
    nodata = (s2 == 0).all(axis=0)
    if scl.any():
        nodata |= scl == 0
    cloud = np.isin(scl, SCL_CLOUD_CODES)
    if within is not None:
        return float(cloud[within].mean()), float(nodata[within].mean())
    return float(cloud.mean()), float(nodata.mean())


def _combinable(items: Sequence[dict[str, Any]], sensor: str, bands: Sequence[str]) -> bool:
    """Whether items of several days can go through one load: one collection spec, the same assets used."""
    spec = spec_for_item(items[0])
    if any(spec_for_item(item) != spec for item in items[1:]):
        return False
    keys = [spec.assets["SCL"]] if sensor == "s2" else [spec.assets[pol] for pol in S1_POLS]
    return len({tuple(key in item["assets"] for key in keys) for item in items}) == 1


def load_days(
    sensor: str, days: dict[date, list[dict[str, Any]]], tile: Tile, bands: Sequence[str], read: ReadOptions,
) -> Iterator[tuple[date, list[dict[str, Any]], Any, dict[str, str]]]:  # fmt: skip
    """Load several tile-dates of one sensor: (day, its items that loaded, pixels or ``None``, failed items).

    First one odc-stac load for all the days (with retries: one setup, one dataset, instead of one per
    day); if that keeps failing, each day is loaded on its own and its failing items are isolated
    (``load_day_isolating``), so one bad item costs only its own pixels.
    """
    if not days:
        return
    items = [item for day_items in days.values() for item in day_items]
    what = f"{tile.tile_id} {sensor.upper()} {min(days)}..{max(days)}"
    if len(days) > 1 and _combinable(items, sensor, bands):
        try:
            loaded: dict[date, tuple[np.ndarray, np.ndarray]] | dict[date, np.ndarray]
            if sensor == "s2":
                loaded = with_retries(
                    lambda: load_s2_days(days, tile, bands, read), what=what, retries=read.retries,
                    delay=read.retry_delay,
                )  # fmt: skip
            else:
                loaded = with_retries(
                    lambda: load_s1_days(days, tile, read), what=what, retries=read.retries, delay=read.retry_delay
                )
        except Exception as error:
            log.info("%s: loading the days together failed (%s); loading day by day", what, error)
        else:
            for day in sorted(days):
                yield day, days[day], loaded.pop(day), {}
            return
    for day in sorted(days):
        what = f"{tile.tile_id} {day} {sensor.upper()}"
        load_one: Callable[[Sequence[dict[str, Any]]], Any] = (
            (lambda subset: load_s2_day(subset, tile, bands, read))
            if sensor == "s2"
            else (lambda subset: load_s1_day(subset, tile, read))
        )
        one, failed = load_day_isolating(days[day], load_one, read, what)
        yield day, [i for i in days[day] if i["id"] not in failed], one, failed
