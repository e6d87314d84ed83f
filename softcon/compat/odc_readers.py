"""odc-loader's rasterio reader and odc-stac's auxiliary-data reader, for ``tasks/aligned_reads.py``'s driver.

Checked against odc-stac 0.5.3 and odc-loader 0.6.5 (pinned ``odc-stac<0.6``, ``odc-loader<0.7`` in
pyproject.toml). Private APIs wrapped here:

- ``odc.loader._reader.nodata_mask``, ``resolve_band_query`` and ``same_nodata``: the helpers odc-loader's own
  rasterio read uses to pick the band and compare nodata values (re-exported as they are);
- ``odc.loader.RioReader._src``: the ``RasterSource`` a reader was opened on (``reader_source``);
- ``odc.stac._mdtools.StacAuxReader``: the auxiliary-data reader ``odc.stac.load`` gives its default driver.

``RioDriver``, ``RioReader``, ``resolve_dst_dtype``, ``resolve_dst_nodata`` and ``resolve_src_nodata`` are
exported by ``odc.loader`` itself (defined in its private ``_rio`` and ``_reader`` modules); they are re-exported
from here too, so that the driver subclasses and calls odc's reader through this one module.
"""

from __future__ import annotations

from odc.loader import (
    RasterSource,
    RioDriver,
    RioReader,
    resolve_dst_dtype,
    resolve_dst_nodata,
    resolve_src_nodata,
)
from odc.loader._reader import nodata_mask, resolve_band_query, same_nodata
from odc.stac._mdtools import StacAuxReader

__all__ = [
    "RioDriver",
    "RioReader",
    "StacAuxReader",
    "nodata_mask",
    "reader_source",
    "resolve_band_query",
    "resolve_dst_dtype",
    "resolve_dst_nodata",
    "resolve_src_nodata",
    "same_nodata",
]


def reader_source(reader: RioReader) -> RasterSource:
    """The raster source ``reader`` was opened on (``RioReader``'s private ``_src``)."""
    return reader._src
