"""An odc-stac reader driver that reads grid-aligned coarser bands with a resampled read instead of a warp.

Sentinel-2's 20 m and 60 m bands sit on grids aligned with the 10 m one: one source pixel covers exactly
k x k tile pixels (k = 2 or 6). odc-stac pastes a band whose grid equals the tile's, but warps every other
one (``rasterio.warp.reproject``), and GDAL's warper takes its general per-pixel path for a band with a
nodata value: about 4-5x the CPU of a resampled window read (``DatasetReader.read(out_shape=...)``) of the
same pixels, which gives the same values (``tests/test_aligned_reads.py``: equal for 20 m bands, within 1 of
the warp's rounding for 60 m ones). This driver does that read for a single-band source in the tile's CRS
whose pixel size is an integer multiple of the tile's and whose pixel edges fall on tile pixel edges, read
with bilinear or nearest resampling into the source's own dtype, where (for bilinear) no nodata pixel is
within reach (next to nodata the warper and the resampled read weigh neighbours differently). Anything
else (another CRS, a rotation, a dtype conversion, nodata nearby, a nodata value the file does not carry,
multi-band sources) goes to odc-stac's own reader unchanged.

Usage: ``odc.stac.load(items, ..., driver=ALIGNED_DRIVER)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rasterio
from odc.geo.converters import rio_geobox
from odc.geo.geobox import GeoBox
from odc.geo.overlap import compute_reproject_roi
from odc.geo.roi import roi_is_empty, roi_shape
from odc.loader.types import RasterLoadParams, RasterSource
from rasterio.enums import Resampling
from rasterio.windows import Window, from_bounds

from softcon.compat.odc_readers import (
    RioDriver,
    RioReader,
    StacAuxReader,
    nodata_mask,
    reader_source,
    resolve_band_query,
    resolve_dst_dtype,
    resolve_dst_nodata,
    resolve_src_nodata,
    same_nodata,
)

RESAMPLED_READS = {"bilinear": Resampling.bilinear, "nearest": Resampling.nearest}
"""Resampling methods for which a resampled read gives the warp's values on an aligned integer upscale."""
_EPS = 1e-6


def integer_upscale(src: GeoBox, dst: GeoBox) -> int | None:
    """k when ``src`` pixels are k x k ``dst`` pixels (k >= 2) on the same CRS with aligned edges, else None."""
    if src.crs != dst.crs:
        return None
    s, d = src.affine, dst.affine
    if s.b or s.d or d.b or d.d or d.a == 0 or d.e == 0:
        return None
    kx, ky = s.a / d.a, s.e / d.e
    k = round(kx)
    if k < 2 or abs(kx - k) > _EPS or abs(ky - k) > _EPS:
        return None
    offset_x, offset_y = (d.c - s.c) / d.a, (d.f - s.f) / d.e  # in tile pixels
    if abs(offset_x - round(offset_x)) > _EPS or abs(offset_y - round(offset_y)) > _EPS:
        return None
    return k


def _inside(window: Window, width: int, height: int) -> bool:
    return (
        window.col_off >= -_EPS
        and window.row_off >= -_EPS
        and window.col_off + window.width <= width + _EPS
        and window.row_off + window.height <= height + _EPS
    )


def _has_nodata(rdr: Any, bidx: int, window: Window, nodata: float | None) -> bool:
    """Whether the source pixels under ``window``, with the one-pixel margin that bilinear weights reach, hold
    nodata: there GDAL's warper and its resampled read weigh neighbours differently."""
    if nodata is None and np.dtype(rdr.dtypes[bidx - 1]).kind != "f":
        return False  # an integer band without a nodata value has none
    outer = Window(window.col_off - 1, window.row_off - 1, window.width + 2, window.height + 2)
    outer = outer.round_offsets(op="floor").round_lengths(op="ceil").intersection(Window(0, 0, rdr.width, rdr.height))
    return bool(nodata_mask(rdr.read(bidx, window=outer), nodata).any())


def upsampled_read(
    src: RasterSource, cfg: RasterLoadParams, dst_geobox: GeoBox
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The part of ``dst_geobox`` that ``src`` covers, by one resampled window read; None when not applicable."""
    resampling = RESAMPLED_READS.get(cfg.resampling)
    if resampling is None:
        return None
    with rasterio.open(src.uri, "r", sharing=False) as rdr:
        bidx = resolve_band_query(src, rdr.count)
        if not isinstance(bidx, int):
            return None
        src_geobox = rio_geobox(rdr)
        if not isinstance(src_geobox, GeoBox) or integer_upscale(src_geobox, dst_geobox) is None:
            return None
        file_nodata = rdr.nodatavals[bidx - 1]
        src_nodata = resolve_src_nodata(file_nodata, cfg)
        dtype = resolve_dst_dtype(rdr.dtypes[bidx - 1], cfg)
        if dtype != np.dtype(rdr.dtypes[bidx - 1]) or not same_nodata(src_nodata, file_nodata):
            return None  # GDAL resamples in the file's dtype, honouring only the file's own nodata
        rows, cols = compute_reproject_roi(src_geobox, dst_geobox, ttol=0.05).roi_dst
        if not (isinstance(rows, slice) and isinstance(cols, slice)):  # odc-geo types them as slice-like
            return None
        roi = (rows, cols)
        if roi_is_empty(roi):
            return None
        window = from_bounds(*dst_geobox[roi].boundingbox, transform=rdr.transform)
        if not _inside(window, rdr.width, rdr.height):
            return None
        if resampling != Resampling.nearest and _has_nodata(rdr, bidx, window, src_nodata):
            return None
        out = np.empty(roi_shape(roi), dtype=dtype)
        rdr.read(bidx, out=out, window=window, resampling=resampling)
    dst_nodata = resolve_dst_nodata(dtype, cfg, src_nodata)
    if dst_nodata is not None and not same_nodata(src_nodata, dst_nodata):
        np.copyto(out, dst_nodata, where=nodata_mask(out, src_nodata))
    return roi, out


class AlignedRioReader(RioReader):
    """odc-stac's rasterio reader, with ``upsampled_read`` first for aligned coarser single-band sources."""

    def read(
        self, cfg: RasterLoadParams, dst_geobox: GeoBox, *, dst: np.ndarray | None = None, selection: Any = None
    ) -> tuple[tuple[slice, slice], np.ndarray]:
        if dst is None and selection is None:
            try:
                result = upsampled_read(reader_source(self), cfg, dst_geobox)
            except rasterio.errors.RasterioError:
                if cfg.fail_on_error:
                    raise
                result = None  # odc-stac's reader reports and skips it as it does for its own reads
            if result is not None:
                return result
        return super().read(cfg, dst_geobox, dst=dst, selection=selection)


class AlignedRioDriver(RioDriver):
    """``RioDriver`` whose readers are ``AlignedRioReader``."""

    def open(self, src: RasterSource, ctx: Any) -> RioReader:
        return AlignedRioReader(src, ctx)


ALIGNED_DRIVER = AlignedRioDriver(aux_reader=StacAuxReader())
