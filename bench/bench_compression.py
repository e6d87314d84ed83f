"""Compressed bytes per pixel of real Sentinel rasters in the cube's and the training store's encodings.

The sample scenes the other benchmarks generate compress unlike real data, so docs/scaling.md takes storage
per pixel from real samples (``tests/data/real``, see its README): the Sentinel-2 L1C Virginia crop (12 of
13 bands, the 20/60 m bands repeated onto the 10 m grid as the cube holds them) and the 6 BigEarthNet S1
patches (VV, VH float32 dB). Each is written with the cube's codecs (zarr's default, zstd) in the cube's chunks
(one date: ``(1, band, y, x)``) and with the training store's (``training_store.IMAGE_COMPRESSOR``, one
sample per chunk); the figure is bytes on disk per pixel-date (all bands) and the ratio to raw.

Run: ``python bench/bench_compression.py [--real DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from softcon.models.training_store import IMAGE_COMPRESSOR  # noqa: E402

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def read_s2(folder: Path) -> np.ndarray:
    """(band, y, x) uint16 on the 10 m grid of the crop."""
    bands = []
    with rasterio.open(folder / "s2_B02_crop.tif") as reference:
        shape = reference.shape
    for band in S2_BANDS:
        with rasterio.open(folder / f"s2_{band}_crop.tif") as source:
            values = source.read(1)
        factor = shape[0] // values.shape[0]
        bands.append(np.repeat(np.repeat(values, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]])
    return np.stack(bands).astype(np.uint16)


def read_s1(folder: Path) -> np.ndarray:
    """(patch, pol, y, x) float32 dB of every BigEarthNet S1 example."""
    patches = []
    for patch in sorted(p for p in folder.iterdir() if p.is_dir()):
        pols = []
        for pol in ("VV", "VH"):
            with rasterio.open(next(patch.glob(f"*_{pol}.tif"))) as source:
                pols.append(source.read(1).astype(np.float32))
        patches.append(np.stack(pols))
    return np.stack(patches)


def bytes_per_pixel(values: np.ndarray, chunks: tuple[int, ...], compressors: object) -> float:
    """Bytes on disk per (y, x) pixel of one date, all channels, with these codecs and chunks."""
    with tempfile.TemporaryDirectory() as folder:
        kwargs = {} if compressors is None else {"compressors": compressors}
        array = zarr.create_array(f"{folder}/a.zarr", shape=values.shape, dtype=values.dtype, chunks=chunks, **kwargs)
        array[...] = values
        on_disk = sum(p.stat().st_size for p in Path(folder, "a.zarr").rglob("*") if p.name != "zarr.json")
    images = int(np.prod(values.shape[:-3])) if values.ndim > 3 else 1
    return on_disk / (images * values.shape[-1] * values.shape[-2])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=ROOT / "tests" / "data" / "real")
    args = parser.parse_args(argv)
    s2 = read_s2(args.real / "sentinel2_l1c_virginia")
    s1 = read_s1(args.real / "bigearthnet" / "BigEarthNet-S1-Example")
    raw_s2, raw_s1 = s2.shape[0] * 2, s1.shape[1] * 4
    results = {
        "s2_raw_bytes_per_px": raw_s2,
        "s2_cube_bytes_per_px": bytes_per_pixel(s2[None], (1, *s2.shape), None),
        "s2_store_bytes_per_px": bytes_per_pixel(s2[None], (1, *s2.shape), IMAGE_COMPRESSOR),
        "s1_raw_bytes_per_px": raw_s1,
        "s1_cube_bytes_per_px": bytes_per_pixel(s1, (1, *s1.shape[1:]), None),
        "s1_store_bytes_per_px": bytes_per_pixel(s1, (1, *s1.shape[1:]), IMAGE_COMPRESSOR),
    }
    print(f"S2 {s2.shape} uint16 from {args.real.name}/sentinel2_l1c_virginia; S1 {s1.shape} float32 (BigEarthNet)")
    for key, value in results.items():
        raw = results[f"{key[:2]}_raw_bytes_per_px"]
        print(f"{key:24s} {value:8.3f}   ratio to raw {raw / value:5.2f}x")
    return results


if __name__ == "__main__":
    main()
