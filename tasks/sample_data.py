"""Seeded generator of a small, realistic Sentinel-2 / Sentinel-1 / ESA WorldCover sample area.

Writes, for ``tiles`` tiles of the project grid near 11°E 46.5°N (UTM 32N):

- ``worldcover/…_Map.tif``: a WorldCover-format uint8 COG in EPSG:4326 (1/12000°, nodata 0) of
  spatially coherent class regions (warped Voronoi cells, so that a patch holds 1–4 classes);
- ``s2/<item>/<band>.tif``: Sentinel-2 L2A-like COGs per band at native resolution (10/20/60 m), uint16
  reflectance x10000 plus the baseline >= 04.00 offset of +1000 (nodata 0), per-class spectra, texture,
  noise and clouds with their shadows; ``SCL.tif`` the Sen2Cor classification at 20 m;
- ``s1/<item>/{vv,vh}.tif``: Sentinel-1 RTC-like float32 backscatter in dB (nodata -32768, the
  Planetary Computer value), class-dependent with gamma speckle, a day after each S2 date;
- STAC Items shaped like Earth Search v1 ``sentinel-2-l2a`` and Planetary Computer ``sentinel-1-rtc`` /
  ``esa-worldcover`` Items (S1 assets declare ``raster:bands[0].unit = "dB"``), their Collections, and
  ``items.json``, an ItemCollection holding every Item. Asset hrefs are absolute local paths.

Two worlds: ``painted`` (the default) paints each pixel with its class's spectrum, so per-band statistics
already tell the classes apart; ``structured`` (``tasks/sample_world.py``, docs/sample_world.md) gives classes
shared spectra and distinct spatial structure, and also writes

- ``dynamic_world/…_label.tif``: a coarse (30 m), noisy Dynamic-World-like label COG (labels 0..8, nodata 255)
  in the scenes' UTM CRS, the pretraining labels (labels stage: ``source=<that file>, scheme=dynamic-world``);
- ``bigearthnet/<patch>/<patch>_<band>.tif`` + ``<patch>_labels_metadata.json``: BigEarthNet-format S2 patches
  with CORINE level-3 labels, cut from landscapes next to the scenes on the scenes' dates, and
  ``bigearthnet/{train,val,test}.csv`` splitting them by location block (evaluate: ``--bigearthnet``).

Same parameters, same bytes; a manifest of the parameters lets a second call reuse the files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer

from softcon.tasks.grid import Tile, tiles_for_bbox
from softcon.tasks.sample_world import (
    CLASSES,
    DYNAMIC_WORLD_NODATA,
    Clouds,
    Landscape,
    WorldParams,
    apply_clouds,
    corine_labels,
    draw_atmosphere,
    draw_clouds,
    draw_landscape,
    dynamic_world_labels,
    render_backscatter,
    render_reflectance,
    smooth_field,
)

log = logging.getLogger(__name__)

World = Literal["painted", "structured"]
MANIFEST = "manifest.json"
GENERATOR_VERSION = 1
SCENE_MARGIN_PX = 30
"""10 m pixels of structured landscape drawn around the scenes, so that the maps cover the tiles' edges."""
CENTRE_LONLAT = (11.0, 46.5)
START_DATE = date(2024, 6, 1)
DATE_STEP_DAYS = 5
WORLDCOVER_RES_DEG = 1 / 12000  # the real product: 36000 px per 3° tile

S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_NATIVE_RES: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
    "B09": 60, "B11": 20, "B12": 20, "SCL": 20,
}  # fmt: skip
S2_ASSET_KEYS: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22",
    "SCL": "scl",
}  # fmt: skip
S2_META: dict[str, tuple[str, float, float]] = {  # band: (common name, centre µm, FWHM µm)
    "B01": ("coastal", 0.443, 0.027), "B02": ("blue", 0.49, 0.098), "B03": ("green", 0.56, 0.045),
    "B04": ("red", 0.665, 0.038), "B05": ("rededge", 0.704, 0.019), "B06": ("rededge", 0.74, 0.018),
    "B07": ("rededge", 0.783, 0.028), "B08": ("nir", 0.842, 0.145), "B8A": ("nir08", 0.865, 0.033),
    "B09": ("nir09", 0.945, 0.026), "B11": ("swir16", 1.61, 0.143), "B12": ("swir22", 2.19, 0.242),
}  # fmt: skip

# Surface reflectance x10000 per WorldCover class, bands in S2_BANDS order (typical library spectra:
# vegetation has the red edge and NIR plateau, water is dark beyond red, built-up is bright and flat).
CLASS_SPECTRA: dict[int, tuple[int, ...]] = {
    10: (200, 250, 450, 250, 700, 2000, 2600, 2900, 3000, 900, 1500, 700),  # tree cover
    20: (300, 400, 600, 550, 1000, 1800, 2200, 2400, 2500, 800, 2200, 1300),  # shrubland
    30: (300, 400, 700, 500, 1100, 2400, 2900, 3200, 3300, 950, 2300, 1300),  # grassland
    40: (350, 450, 750, 600, 1200, 2300, 2800, 3100, 3200, 950, 2500, 1500),  # cropland
    50: (1200, 1300, 1400, 1500, 1600, 1700, 1750, 1800, 1850, 600, 2000, 1800),  # built-up
    60: (1500, 1700, 2000, 2400, 2600, 2800, 2900, 3000, 3050, 900, 3500, 3000),  # bare
    70: (8000, 8500, 8300, 8000, 7800, 7500, 7300, 7000, 6800, 2500, 800, 600),  # snow and ice
    80: (400, 500, 600, 400, 300, 200, 180, 150, 140, 60, 80, 50),  # permanent water
    90: (300, 400, 550, 400, 700, 1300, 1500, 1600, 1650, 500, 1000, 600),  # herbaceous wetland
}
# (VV, VH) dB per class: C-band backscatter of forest, fields, cities (double bounce), calm water.
CLASS_BACKSCATTER: dict[int, tuple[float, float]] = {
    10: (-7.5, -13.5), 20: (-9.0, -16.0), 30: (-11.0, -18.0), 40: (-10.0, -17.0), 50: (-4.0, -10.0),
    60: (-14.0, -22.0), 70: (-12.0, -20.0), 80: (-20.0, -27.0), 90: (-9.0, -16.5),
}  # fmt: skip
# Class draw weights of an Alpine valley: forest, meadows, fields, a town, a lake, rock and a glacier.
CLASS_WEIGHTS: dict[int, float] = {
    10: 0.3,
    20: 0.05,
    30: 0.2,
    40: 0.15,
    50: 0.1,
    60: 0.05,
    70: 0.04,
    80: 0.08,
    90: 0.03,
}
SCL_OF_CLASS: dict[int, int] = {10: 4, 20: 4, 30: 4, 40: 4, 50: 5, 60: 5, 70: 11, 80: 6, 90: 4, 95: 4, 100: 4}
S1_NODATA = -32768.0


@dataclass(frozen=True)
class SampleData:
    """What ``write_sample_data`` wrote."""

    root: Path
    """Folder holding everything."""
    items_file: Path
    """ItemCollection JSON with every Item (S2, S1, WorldCover)."""
    bbox: tuple[float, float, float, float]
    """Lon/lat W,S,E,N whose grid tiles are exactly the sample tiles."""
    start: date
    """First S2 acquisition day."""
    end: date
    """Last acquisition day (S1 included)."""
    epsg: int
    """UTM CRS of the scenes and tiles."""
    collections: list[str]
    """Collection ids of the Items."""
    collection_files: list[Path]
    """Collection JSON files."""
    worldcover: Path
    """The land-cover COG."""
    tile_ids: list[str]
    """Grid tiles the scenes cover."""
    s2_dates: list[date]
    s1_dates: list[date]
    cloud_fractions: list[float]
    """Cloud + shadow fraction of each S2 date."""
    world: World = "painted"
    """Which generative model drew the scenes."""
    dynamic_world: Path | None = None
    """Structured world: the Dynamic-World-like label COG (pretraining labels, scheme ``dynamic-world``)."""
    bigearthnet: Path | None = None
    """Structured world: the BigEarthNet-format evaluation folder (patch folders and split lists)."""


def _grid_layout(tiles: int) -> tuple[int, int]:
    """(rows, cols) of a near-square block of exactly ``tiles`` tiles."""
    rows = max(r for r in range(1, math.isqrt(tiles) + 1) if tiles % r == 0)
    return rows, tiles // rows


def _sample_tiles(tiles: int, tile_size: int, resolution: float) -> tuple[list[Tile], tuple[float, ...]]:
    """The sample's tiles on the project grid and their UTM bounds (left, bottom, right, top)."""
    lon, lat = CENTRE_LONLAT
    anchor = tiles_for_bbox(
        (lon - 1e-4, lat - 1e-4, lon + 1e-4, lat + 1e-4), resolution=resolution, tile_size=tile_size
    )[0]
    rows, cols = _grid_layout(tiles)
    side = anchor.side
    grid = [
        Tile(anchor.epsg, anchor.x0 + c * side, anchor.y0 - r * side, resolution, tile_size)
        for r in range(rows)
        for c in range(cols)
    ]
    bounds = (anchor.x0, anchor.y0 - rows * side, anchor.x0 + cols * side, anchor.y0)
    return grid, bounds


def _inner_lonlat_bbox(bounds: tuple[float, ...], epsg: int) -> tuple[float, float, float, float]:
    """A lon/lat box inside the UTM rectangle (so that the grid maps it back to the same tiles)."""
    left, bottom, right, top = bounds
    to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    margin = 0.02 * min(right - left, top - bottom)  # UTM grid convergence tilts lon/lat lines ~1.5° here
    xs = np.array([left, right, right, left]) + np.array([margin, -margin, -margin, margin])
    ys = np.array([top, top, bottom, bottom]) + np.array([-margin, -margin, margin, margin])
    lons, lats = to_lonlat.transform(xs, ys)
    west, east = max(lons[0], lons[3]), min(lons[1], lons[2])
    south, north = max(lats[2], lats[3]), min(lats[0], lats[1])
    return (round(float(west), 6), round(float(south), 6), round(float(east), 6), round(float(north), 6))


@dataclass(frozen=True)
class _LandCoverField:
    """Warped Voronoi land-cover regions, defined everywhere in UTM metres."""

    seeds_x: np.ndarray
    seeds_y: np.ndarray
    classes: np.ndarray
    waves: np.ndarray  # (n, 4): amplitude, kx, ky, phase for the warp

    @classmethod
    def draw(cls, rng: np.random.Generator, bounds: tuple[float, ...], tile_side: float) -> _LandCoverField:
        left, bottom, right, top = bounds
        n_seeds = max(6, round(3 * (right - left) * (top - bottom) / tile_side**2))
        codes = np.array(list(CLASS_WEIGHTS))
        weights = np.array(list(CLASS_WEIGHTS.values()))
        classes = rng.choice(codes, size=n_seeds, p=weights / weights.sum())
        classes[: min(4, n_seeds)] = [10, 30, 80, 50][: min(4, n_seeds)]  # always tree, grass, water, town
        pad = 0.1 * tile_side
        seeds_x = rng.uniform(left - pad, right + pad, n_seeds)
        seeds_y = rng.uniform(bottom - pad, top + pad, n_seeds)
        wavelength = rng.uniform(0.3, 1.0, (6, 1)) * tile_side
        angle = rng.uniform(0, 2 * np.pi, (6, 1))
        waves = np.hstack(
            [
                rng.uniform(0.03, 0.08, (6, 1)) * tile_side,
                2 * np.pi / wavelength * np.cos(angle),
                2 * np.pi / wavelength * np.sin(angle),
                rng.uniform(0, 2 * np.pi, (6, 1)),
            ]
        )
        return cls(seeds_x, seeds_y, classes.astype(np.uint8), waves)

    def classes_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Class code at UTM positions (any shape)."""
        shape = x.shape
        x, y = x.ravel(), y.ravel()
        wx = sum(a * np.sin(kx * x + ky * y + p) for a, kx, ky, p in self.waves[:3])
        wy = sum(a * np.sin(kx * x + ky * y + p) for a, kx, ky, p in self.waves[3:])
        xw, yw = x + wx, y + wy
        best = np.zeros(x.shape, dtype=np.int64)
        best_d = np.full(x.shape, np.inf)
        for i, (sx, sy) in enumerate(zip(self.seeds_x, self.seeds_y, strict=True)):
            d = (xw - sx) ** 2 + (yw - sy) ** 2
            closer = d < best_d
            best[closer], best_d[closer] = i, d[closer]
        return self.classes[best].reshape(shape)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Downsample the last two axes by block averaging (edges padded by replication)."""
    if factor == 1:
        return array
    h, w = array.shape[-2:]
    ph, pw = -h % factor, -w % factor
    padded = np.pad(array, [(0, 0)] * (array.ndim - 2) + [(0, ph), (0, pw)], mode="edge")
    shape = (*padded.shape[:-2], padded.shape[-2] // factor, factor, padded.shape[-1] // factor, factor)
    return padded.reshape(shape).mean(axis=(-3, -1))


def _write_cog(path: Path, array: np.ndarray, transform: Affine, crs: str, nodata: float) -> None:
    """One-band deflate COG (GDAL writes no timestamp, so same array → same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "COG", "width": array.shape[1], "height": array.shape[0], "count": 1,
        "dtype": array.dtype.name, "crs": crs, "transform": transform, "nodata": nodata,
        "compress": "deflate", "blocksize": 256, "overviews": "none",
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _lonlat_geometry(bounds: tuple[float, ...], epsg: int) -> tuple[dict[str, Any], list[float]]:
    left, bottom, right, top = bounds
    to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    lons, lats = to_lonlat.transform([left, right, right, left, left], [top, top, bottom, bottom, top])
    ring = [[round(lo, 7), round(la, 7)] for lo, la in zip(lons, lats, strict=True)]
    return {"type": "Polygon", "coordinates": [ring]}, [
        float(min(lons)),
        float(min(lats)),
        float(max(lons)),
        float(max(lats)),
    ]


def _s2_item(
    item_id: str, when: datetime, bounds: tuple[float, ...], epsg: int, folder: Path,
    shapes: dict[str, tuple[int, int]], cloud_cover: float,
) -> dict[str, Any]:  # fmt: skip
    geometry, bbox = _lonlat_geometry(bounds, epsg)
    assets: dict[str, Any] = {}
    for band, key in S2_ASSET_KEYS.items():
        res = S2_NATIVE_RES[band]
        asset: dict[str, Any] = {
            "href": str(folder / f"{band}.tif"),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": f"{band} - {res}m",
            "gsd": res,
            "proj:shape": list(shapes[band]),
            "proj:transform": [res, 0, bounds[0], 0, -res, bounds[3]],
            "roles": ["data", "reflectance"] if band != "SCL" else ["data"],
        }
        if band == "SCL":
            asset["title"] = "Scene classification map (SCL)"
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint8", "spatial_resolution": res}]
        else:
            name, centre, fwhm = S2_META[band]
            asset["eo:bands"] = [{"name": band, "common_name": name, "center_wavelength": centre,
                                  "full_width_half_max": fwhm}]  # fmt: skip
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "spatial_resolution": res,
                                      "scale": 0.0001, "offset": -0.1}]  # fmt: skip
        assets[key] = asset
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sentinel-2/v1.0.0/schema.json",
        ],
        "id": item_id,
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "platform": "sentinel-2b",
            "constellation": "sentinel-2",
            "instruments": ["msi"],
            "eo:cloud_cover": round(cloud_cover, 4),
            "proj:epsg": epsg,
            "mgrs:utm_zone": epsg % 100,
            "mgrs:latitude_band": "T",
            "mgrs:grid_square": "PS",
            "s2:processing_baseline": "05.11",
            "s2:product_type": "S2MSI2A",
            "softcon:synthetic": True,
        },
        "links": [],
        "assets": assets,
        "collection": "sentinel-2-l2a",
    }


def _s1_item(
    item_id: str, when: datetime, bounds: tuple[float, ...], epsg: int, folder: Path, shape: tuple[int, int]
) -> dict[str, Any]:
    geometry, bbox = _lonlat_geometry(bounds, epsg)
    transform = [10.0, 0.0, bounds[0], 0.0, -10.0, bounds[3]]
    assets = {
        pol.lower(): {
            "href": str(folder / f"{pol.lower()}.tif"),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "title": f"{pol}: {'vertical' if pol == 'VV' else 'horizontal'} receive",
            "description": "Terrain-corrected gamma naught in dB (synthetic; the real collection is linear).",
            "raster:bands": [{"nodata": S1_NODATA, "data_type": "float32", "spatial_resolution": 10.0, "unit": "dB"}],
        }
        for pol in ("VV", "VH")
    }
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
            "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": item_id,
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "platform": "SENTINEL-1A",
            "constellation": "Sentinel-1",
            "proj:epsg": epsg,
            "proj:shape": list(shape),
            "proj:transform": transform,
            "sar:polarizations": ["VV", "VH"],
            "sar:product_type": "GRD",
            "sar:instrument_mode": "IW",
            "sar:frequency_band": "C",
            "sar:center_frequency": 5.405,
            "sat:orbit_state": "descending",
            "softcon:synthetic": True,
        },
        "links": [],
        "assets": assets,
        "collection": "sentinel-1-rtc",
    }


def _worldcover_item(path: Path, transform: Affine, shape: tuple[int, int]) -> dict[str, Any]:
    west, north = transform.c, transform.f
    east, south = west + shape[1] * transform.a, north + shape[0] * transform.e
    ring = [[west, north], [east, north], [east, south], [west, south], [west, north]]
    classes = [{"value": code, "description": name} for code, name in WORLDCOVER_NAMES.items()]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/classification/v1.0.0/schema.json",
        ],
        "id": path.stem.removesuffix("_Map"),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [west, south, east, north],
        "properties": {
            "datetime": None,
            "start_datetime": "2021-01-01T00:00:00Z",
            "end_datetime": "2021-12-31T23:59:59Z",
            "proj:epsg": 4326,
            "esa_worldcover:product_version": "2.0.0",
            "softcon:synthetic": True,
        },
        "links": [],
        "assets": {
            "map": {
                "href": str(path),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "title": "Land Cover Classes",
                "proj:shape": list(shape),
                "proj:transform": list(transform)[:6],
                "raster:bands": [{"nodata": 0, "sampling": "area", "data_type": "uint8", "spatial_resolution": 10}],
                "classification:classes": classes,
            }
        },
        "collection": "esa-worldcover",
    }


WORLDCOVER_NAMES: dict[int, str] = {
    10: "Tree cover", 20: "Shrubland", 30: "Grassland", 40: "Cropland", 50: "Built-up",
    60: "Bare / sparse vegetation", 70: "Snow and ice", 80: "Permanent water bodies",
    90: "Herbaceous wetland", 95: "Mangroves", 100: "Moss and lichen",
}  # fmt: skip


def _collection(cid: str, description: str, bbox: list[float], start: str, end: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": cid,
        "description": description,
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[start, end]]}},
        "links": [],
    }


def _cloud_targets(dates: int, rng: np.random.Generator) -> list[float]:
    """Cloud fraction per date: the first mostly clear, the second quite cloudy, the rest in between."""
    targets = [0.02, 0.85][:dates]
    targets += list(rng.uniform(0.05, 0.35, max(0, dates - 2)))
    return [float(t) for t in targets]


@dataclass(frozen=True)
class _Scenes:
    """What a world's scene writer wrote."""

    items: list[dict[str, Any]]
    """S2 and S1 Items, in date order."""
    cloud_fractions: list[float]
    worldcover: tuple[Path, Affine, tuple[int, int]]
    """The WorldCover-format COG, its transform and shape."""
    dynamic_world: Path | None = None
    bigearthnet: Path | None = None


def _write_painted_scenes(
    out: Path, rng: np.random.Generator, bounds: tuple[float, ...], epsg: int, s2_dates: list[date],
    s1_dates: list[date], tile_side: float,
) -> _Scenes:  # fmt: skip
    """The painted world: each pixel its class's spectrum, with texture, noise, clouds and speckle."""
    left, bottom, right, top = bounds
    land_cover = _LandCoverField.draw(rng, bounds, tile_side)

    # Truth at 10 m over the scene; every band is derived from it and then averaged to native resolution.
    width, height = round((right - left) / 10), round((top - bottom) / 10)
    xs = left + 5 + 10 * np.arange(width)
    ys = top - 5 - 10 * np.arange(height)
    classes = land_cover.classes_at(*np.meshgrid(xs, ys))  # (y, x) WorldCover codes
    spectra = np.array([CLASS_SPECTRA[int(c)] for c in range(256) if c in CLASS_SPECTRA], dtype=np.float64)
    lookup = np.zeros(256, dtype=np.int64)
    lookup[list(CLASS_SPECTRA)] = np.arange(len(CLASS_SPECTRA))
    base = spectra[lookup[classes]].transpose(2, 0, 1)  # (band, y, x)
    texture = 1 + 0.06 * smooth_field(rng, (height, width), 3)  # within-field variability

    worldcover = _write_worldcover(out, land_cover.classes_at, bounds, epsg)

    targets = _cloud_targets(len(s2_dates), rng)
    items: list[dict[str, Any]] = []
    cloud_fractions: list[float] = []
    backscatter = np.array([CLASS_BACKSCATTER[int(c)] for c in range(256) if c in CLASS_BACKSCATTER])
    s1_lookup = np.zeros(256, dtype=np.int64)
    s1_lookup[list(CLASS_BACKSCATTER)] = np.arange(len(CLASS_BACKSCATTER))
    for index, (day, target) in enumerate(zip(s2_dates, targets, strict=True)):
        seasonal = 1 + 0.04 * smooth_field(rng, (height, width), 20) + 0.02 * index
        reflectance = base * texture * seasonal
        reflectance += rng.normal(0, 0.015, reflectance.shape) * reflectance + rng.normal(0, 20, reflectance.shape)
        clouds = draw_clouds(rng, (height, width), target)
        reflectance = apply_clouds(reflectance, clouds)
        cloud_fractions.append(float((clouds.cloud | clouds.shadow).mean()))
        items.append(_write_s2_scene(out, day, reflectance, _scene_classification(classes, clouds), clouds, bounds,
                                     epsg))  # fmt: skip
        pols = []
        for p in range(2):
            mean_db = backscatter[s1_lookup[classes], p] + 0.8 * smooth_field(rng, (height, width), 5)
            # Multiplicative gamma speckle of a 4.4-look product, applied in linear power.
            speckle = rng.gamma(4.4, 1 / 4.4, classes.shape)
            pols.append((10 * np.log10(10 ** (mean_db / 10) * speckle)).astype(np.float32))
        items.append(_write_s1_scene(out, s1_dates[index], index, np.stack(pols), bounds, epsg))
    return _Scenes(items=items, cloud_fractions=cloud_fractions, worldcover=worldcover)


def _scene_classification(worldcover_codes: np.ndarray, clouds: Clouds) -> np.ndarray:
    """Sen2Cor-like SCL at 10 m: vegetation / not vegetated / water / snow by class, then shadows and clouds."""
    scl = np.vectorize(SCL_OF_CLASS.get, otypes=[np.uint8])(worldcover_codes)
    scl[clouds.shadow] = 3
    scl[clouds.cloud] = 8
    scl[clouds.thick] = 9
    return scl


def _write_s2_scene(
    out: Path, day: date, reflectance: np.ndarray, scl: np.ndarray, clouds: Clouds,
    bounds: tuple[float, ...], epsg: int,
) -> dict[str, Any]:  # fmt: skip
    """One S2 L2A-like scene: each band averaged to its native resolution, offset +1000, and SCL at 20 m."""
    left, _, _, top = bounds
    crs = f"EPSG:{epsg}"
    item_id = f"S2B_32TPS_{day:%Y%m%d}_0_L2A"
    folder = out / "s2" / item_id
    shapes: dict[str, tuple[int, int]] = {}
    for b, band in enumerate(S2_BANDS):
        factor = S2_NATIVE_RES[band] // 10
        values = _block_mean(reflectance[b], factor)
        dn = np.clip(np.round(values) + 1000, 1, 65535).astype(np.uint16)  # +1000: baseline >= 04.00
        shapes[band] = dn.shape
        transform = Affine(S2_NATIVE_RES[band], 0, left, 0, -S2_NATIVE_RES[band], top)
        _write_cog(folder / f"{band}.tif", dn, transform, crs, 0)
    scl20 = scl[::2, ::2]
    shapes["SCL"] = scl20.shape
    _write_cog(folder / "SCL.tif", scl20, Affine(20, 0, left, 0, -20, top), crs, 0)
    when = datetime(day.year, day.month, day.day, 10, 17, 31)
    return _s2_item(item_id, when, bounds, epsg, folder, shapes, 100 * float(clouds.cloud.mean()))


def _write_s1_scene(
    out: Path, day: date, index: int, backscatter: np.ndarray, bounds: tuple[float, ...], epsg: int
) -> dict[str, Any]:
    """One S1 RTC-like scene: (VV, VH) dB COGs at 10 m and their Item."""
    left, _, _, top = bounds
    s1_id = f"S1A_IW_GRDH_1SDV_{day:%Y%m%d}T053012_{day:%Y%m%d}T053037_0{50000 + index}_rtc"
    folder = out / "s1" / s1_id
    for pol, db in zip(("vv", "vh"), backscatter, strict=True):
        _write_cog(folder / f"{pol}.tif", db, Affine(10, 0, left, 0, -10, top), f"EPSG:{epsg}", S1_NODATA)
    when = datetime(day.year, day.month, day.day, 5, 30, 24)
    return _s1_item(s1_id, when, bounds, epsg, folder, backscatter.shape[1:])


@dataclass(frozen=True)
class _PlacedLandscape:
    """A structured landscape and the UTM position of its upper-left corner (10 m pixels)."""

    landscape: Landscape
    left: float
    top: float

    def worldcover_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """WorldCover codes at UTM positions (any shape); 0 outside the landscape."""
        rows = np.floor((self.top - y) / 10).astype(np.int64)
        cols = np.floor((x - self.left) / 10).astype(np.int64)
        height, width = self.landscape.classes.shape
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        codes = WORLDCOVER_OF_CLASS[self.landscape.classes[rows.clip(0, height - 1), cols.clip(0, width - 1)]]
        return np.where(inside, codes, 0).astype(np.uint8)


WORLDCOVER_OF_CLASS = np.array([c.worldcover for c in CLASSES], dtype=np.uint8)
BIGEARTHNET_PATCH_PX = 120
"""BigEarthNet patch side at 10 m (1.2 km)."""


def _scene_landscape(rng: np.random.Generator, bounds: tuple[float, ...], params: WorldParams) -> _PlacedLandscape:
    """The structured landscape under the scenes, with ``SCENE_MARGIN_PX`` around them."""
    left, bottom, right, top = bounds
    margin = SCENE_MARGIN_PX
    shape = (round((top - bottom) / 10) + 2 * margin, round((right - left) / 10) + 2 * margin)
    landscape = draw_landscape(rng, shape, params)
    return _PlacedLandscape(landscape, left - 10 * margin, top + 10 * margin)


def _write_structured_scenes(
    out: Path, seed: int, bounds: tuple[float, ...], epsg: int, s2_dates: list[date], s1_dates: list[date],
    params: WorldParams,
) -> _Scenes:  # fmt: skip
    """The structured world: scenes observed from one landscape, its two label products, and the evaluation set."""
    rng = np.random.default_rng((seed, 1))  # the scenes' stream; the evaluation blocks have their own
    placed = _scene_landscape(rng, bounds, params)
    landscape, m = placed.landscape, SCENE_MARGIN_PX
    worldcover = _write_worldcover(out, placed.worldcover_at, bounds, epsg)
    worldcover_codes = WORLDCOVER_OF_CLASS[landscape.classes[m:-m, m:-m]]
    targets = _cloud_targets(len(s2_dates), rng)
    items: list[dict[str, Any]] = []
    cloud_fractions: list[float] = []
    for index, (day, target) in enumerate(zip(s2_dates, targets, strict=True)):
        atmosphere = draw_atmosphere(rng, params)
        reflectance = render_reflectance(rng, landscape, index, atmosphere, params)[:, m:-m, m:-m]
        clouds = draw_clouds(rng, worldcover_codes.shape, target)
        reflectance = apply_clouds(reflectance, clouds)
        cloud_fractions.append(float((clouds.cloud | clouds.shadow).mean()))
        scl = _scene_classification(worldcover_codes, clouds)
        items.append(_write_s2_scene(out, day, reflectance, scl, clouds, bounds, epsg))
        backscatter = render_backscatter(rng, landscape, index)[:, m:-m, m:-m]
        items.append(_write_s1_scene(out, s1_dates[index], index, backscatter, bounds, epsg))
    labels = dynamic_world_labels(rng, landscape, len(s2_dates) // 2, params)
    resolution = 10 * params.dw_factor
    dynamic_world = out / "dynamic_world" / f"dynamic_world_label_{s2_dates[0]:%Y%m%d}_{s2_dates[-1]:%Y%m%d}.tif"
    transform = Affine(resolution, 0, placed.left, 0, -resolution, placed.top)
    _write_cog(dynamic_world, labels, transform, f"EPSG:{epsg}", DYNAMIC_WORLD_NODATA)
    bigearthnet = _write_bigearthnet(out / "bigearthnet", seed, bounds, epsg, s2_dates, params)
    return _Scenes(items, cloud_fractions, worldcover, dynamic_world=dynamic_world, bigearthnet=bigearthnet)


def _block_split(block: int) -> str:
    """Split of an evaluation block: every 4th block tests, every 8th (offset 1) validates, the rest train."""
    return "test" if block % 4 == 3 else "val" if block % 8 == 1 else "train"


def _write_bigearthnet(
    folder: Path, seed: int, bounds: tuple[float, ...], epsg: int, s2_dates: list[date], params: WorldParams
) -> Path:
    """BigEarthNet-format S2 patches cut from evaluation blocks east of the scenes, and split lists by block.

    Each block is an independent landscape of ``eval_block_patches``² patches observed on one of the scenes'
    dates (cloud-free, as BigEarthNet keeps only cloud-free patches); blocks lie one patch apart on a grid, and
    a block's patches share a split, so no test patch has a training neighbour.
    """
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    block_cols = math.ceil(math.sqrt(params.eval_blocks))
    origin = (bounds[2] + 10 * BIGEARTHNET_PATCH_PX, bounds[3])  # one patch east of the scenes
    with rasterio.Env():  # one GDAL environment for the ~10 000 small files, not one per file
        for block in range(params.eval_blocks):
            rng = np.random.default_rng((seed, 2, block))
            day = s2_dates[block % len(s2_dates)]
            patches = _write_bigearthnet_block(folder, rng, divmod(block, block_cols), origin, epsg, day, params)
            splits[_block_split(block)] += patches
    for split, names in splits.items():
        (folder / f"{split}.csv").write_text("".join(f"{name}\n" for name in names))
    return folder


def _write_bigearthnet_block(
    folder: Path, rng: np.random.Generator, block: tuple[int, int], origin: tuple[float, float], epsg: int, day: date,
    world: WorldParams,
) -> list[str]:  # fmt: skip
    """Draw one evaluation block, observe it on ``day`` and write its patches; returns their names."""
    size = BIGEARTHNET_PATCH_PX
    per_side = world.eval_block_patches
    landscape = draw_landscape(rng, (per_side * size,) * 2, world)
    day_index = (day - START_DATE).days // DATE_STEP_DAYS
    reflectance = render_reflectance(rng, landscape, day_index, draw_atmosphere(rng, world), world)
    projection = CRS.from_epsg(epsg).to_wkt("WKT1_GDAL")
    names = []
    for r in range(per_side):
        for c in range(per_side):
            row, col = block[0] * (per_side + 1) + r, block[1] * (per_side + 1) + c  # patch grid, blocks 1 apart
            window = np.s_[r * size : (r + 1) * size, c * size : (c + 1) * size]
            patch = _BigEarthNetPatch(
                name=f"S2B_MSIL2A_{day:%Y%m%d}T101731_{row}_{col}",
                ulx=int(origin[0] + col * 10 * size), uly=int(origin[1] - row * 10 * size), epsg=epsg,
                projection=projection, day=day, labels=corine_labels(landscape.classes[window], world),
            )  # fmt: skip
            _write_bigearthnet_patch(folder, patch, reflectance[(slice(None), *window)])
            names.append(patch.name)
    return names


@dataclass(frozen=True)
class _BigEarthNetPatch:
    """Where and when a BigEarthNet-format patch lies, and its labels."""

    name: str
    ulx: int
    uly: int
    epsg: int
    projection: str
    day: date
    labels: list[str]


def _write_bigearthnet_patch(root: Path, patch: _BigEarthNetPatch, reflectance: np.ndarray) -> None:
    """One patch folder as BigEarthNet v1 ships it: plain uint16 GeoTIFFs per band at native resolution (no
    L2A offset: its processing baseline predates it) and the label JSON with CORINE level-3 names."""
    folder = root / patch.name
    folder.mkdir(parents=True, exist_ok=True)
    for b, band in enumerate(S2_BANDS):
        res = S2_NATIVE_RES[band]
        dn = np.clip(np.round(_block_mean(reflectance[b], res // 10)), 1, 65535).astype(np.uint16)
        profile = {"driver": "GTiff", "width": dn.shape[1], "height": dn.shape[0], "count": 1, "dtype": "uint16",
                   "crs": f"EPSG:{patch.epsg}", "transform": Affine(res, 0, patch.ulx, 0, -res, patch.uly)}  # fmt: skip
        with rasterio.open(folder / f"{patch.name}_{band}.tif", "w", **profile) as dst:
            dst.write(dn, 1)
    side = 10 * BIGEARTHNET_PATCH_PX
    metadata = {
        "labels": patch.labels,
        "coordinates": {"ulx": patch.ulx, "uly": patch.uly, "lrx": patch.ulx + side, "lry": patch.uly - side},
        "projection": patch.projection,
        "tile_source": f"S2B_MSIL1C_{patch.day:%Y%m%d}T101731_N0510_R022_T32TPS_{patch.day:%Y%m%d}T121914.SAFE",
        "acquisition_date": f"{patch.day} 10:17:31",
    }
    (folder / f"{patch.name}_labels_metadata.json").write_text(json.dumps(metadata))


def write_sample_data(
    out: Path, *, tiles: int = 4, tile_size: int = 256, dates: int = 4, seed: int = 0, resolution: float = 10.0,
    world: World = "painted", world_params: WorldParams | None = None,
) -> SampleData:  # fmt: skip
    """Write a seeded Sentinel-2/-1 + WorldCover sample area with its STAC Items under ``out``.

    Args:
        out: folder to write into (created; reused when its manifest matches the parameters).
        tiles: number of grid tiles the scenes cover (laid out as a near-square block).
        tile_size: tile side in pixels of the grid.
        dates: number of S2 acquisitions (5 days apart; S1 one day after each).
        seed: seed of every random draw.
        resolution: grid pixel size in metres (the rasters keep their native 10/20/60 m).
        world: ``painted`` (class spectra painted per pixel) or ``structured`` (shared spectra, distinct spatial
            structure, plus a Dynamic-World-like label COG and a BigEarthNet-format evaluation folder).
        world_params: the structured world's numbers; default ``WorldParams()``, the calibrated world of
            docs/sample_world.md (tests pass fewer evaluation blocks). Recorded in the manifest.

    Example:
        >>> sample = write_sample_data(Path("sample"), tiles=2, tile_size=64, dates=3)
        >>> sample.items_file  # serve it with tasks.stac_server.serve_stac
    """
    if tiles < 1 or tile_size < 8 or dates < 1:
        raise ValueError(f"need tiles >= 1, tile_size >= 8, dates >= 1; got {tiles}, {tile_size}, {dates}")
    if world not in ("painted", "structured"):
        raise ValueError(f"world must be 'painted' or 'structured', got {world!r}")
    out = Path(out).resolve()
    params: dict[str, Any] = {"version": GENERATOR_VERSION, "tiles": tiles, "tile_size": tile_size, "dates": dates,
                              "seed": seed, "resolution": resolution}  # fmt: skip
    world_params = world_params or WorldParams()
    if world == "structured":  # the painted world's params stay as they were, so its old files are reused
        params = json.loads(json.dumps({**params, "world": world, "world_params": asdict(world_params)}))
    manifest = out / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("params") == params:
            log.info("sample data in %s already written with %s; reusing it", out, params)
            return _sample_from_manifest(recorded)
        log.info("sample data in %s has other parameters; rewriting it", out)
        for sub in ("s2", "s1", "worldcover", "collections", "dynamic_world", "bigearthnet"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    grid_tiles, bounds = _sample_tiles(tiles, tile_size, resolution)
    epsg = grid_tiles[0].epsg
    s2_dates = [START_DATE + timedelta(days=DATE_STEP_DAYS * i) for i in range(dates)]
    s1_dates = [d + timedelta(days=1) for d in s2_dates]
    if world == "painted":
        scenes = _write_painted_scenes(out, np.random.default_rng(seed), bounds, epsg, s2_dates, s1_dates,
                                       grid_tiles[0].side)  # fmt: skip
    else:
        scenes = _write_structured_scenes(out, seed, bounds, epsg, s2_dates, s1_dates, world_params)
    items = scenes.items
    worldcover = scenes.worldcover
    wc_path, wc_transform, wc_shape = worldcover
    items.append(_worldcover_item(wc_path, wc_transform, wc_shape))
    bbox = _inner_lonlat_bbox(bounds, epsg)
    _, outer = _lonlat_geometry(bounds, epsg)
    collection_files = []
    start, end = s2_dates[0], max(s1_dates[-1], s2_dates[-1])
    for cid, text in (
        ("sentinel-2-l2a", "Synthetic Sentinel-2 L2A, Earth Search v1 layout"),
        ("sentinel-1-rtc", "Synthetic Sentinel-1 RTC, Planetary Computer layout, values in dB"),
        ("esa-worldcover", "Synthetic ESA WorldCover 2021 v200 layout"),
    ):
        path = out / "collections" / f"{cid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        interval = ("2021-01-01T00:00:00Z", "2021-12-31T23:59:59Z") if cid == "esa-worldcover" else (
            f"{start}T00:00:00Z", f"{end}T23:59:59Z")  # fmt: skip
        path.write_text(json.dumps(_collection(cid, text, outer, *interval), indent=1))
        collection_files.append(path)
    items_file = out / "items.json"
    items_file.write_text(json.dumps({"type": "FeatureCollection", "features": items}, indent=1))
    sample = SampleData(
        root=out, items_file=items_file, bbox=bbox, start=start, end=end, epsg=epsg,
        collections=["sentinel-2-l2a", "sentinel-1-rtc", "esa-worldcover"], collection_files=collection_files,
        worldcover=wc_path, tile_ids=[t.tile_id for t in grid_tiles], s2_dates=s2_dates, s1_dates=s1_dates,
        cloud_fractions=scenes.cloud_fractions, world=world, dynamic_world=scenes.dynamic_world,
        bigearthnet=scenes.bigearthnet,
    )  # fmt: skip
    manifest.write_text(json.dumps({"params": params, "sample": asdict(sample)}, indent=1, default=str))
    log.info("wrote %s sample data (%d tiles, %d dates) to %s", world, tiles, dates, out)
    return sample


def _write_worldcover(
    out: Path, classes_at: Callable[[np.ndarray, np.ndarray], np.ndarray], bounds: tuple[float, ...], epsg: int
) -> tuple[Path, Affine, tuple[int, int]]:
    """Sample WorldCover codes (``classes_at`` UTM x, y) on the WorldCover lon/lat grid around the scene (nodata 0
    outside)."""
    _, (west, south, east, north) = _lonlat_geometry(bounds, epsg)
    res = WORLDCOVER_RES_DEG
    margin = 20 * res
    col0, col1 = math.floor((west - margin) / res), math.ceil((east + margin) / res)
    row0, row1 = math.floor(-(north + margin) / res), math.ceil(-(south - margin) / res)
    lon_centres = (np.arange(col0, col1) + 0.5) * res
    lat_centres = -(np.arange(row0, row1) + 0.5) * res
    lon, lat = np.meshgrid(lon_centres, lat_centres)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x, y = to_utm.transform(lon, lat)
    codes = classes_at(np.asarray(x), np.asarray(y))
    left, bottom, right, top = bounds
    pad = 100.0  # the product covers a little beyond the scenes, then nodata, like a tile edge
    outside = (x < left - pad) | (x > right + pad) | (y < bottom - pad) | (y > top + pad)
    codes = np.where(outside, 0, codes).astype(np.uint8)
    transform = Affine(res, 0, col0 * res, 0, -res, -row0 * res)
    lat_tag = f"N{math.floor(south):02d}"
    lon_tag = f"E{math.floor(west):03d}"
    path = out / "worldcover" / f"ESA_WorldCover_10m_2021_v200_{lat_tag}{lon_tag}_Map.tif"
    _write_cog(path, codes, transform, "EPSG:4326", 0)
    return path, transform, codes.shape


def _sample_from_manifest(recorded: dict[str, Any]) -> SampleData:
    values = dict(recorded["sample"])
    for key in ("root", "items_file", "worldcover", "dynamic_world", "bigearthnet"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    values["collection_files"] = [Path(p) for p in values["collection_files"]]
    values["bbox"] = tuple(values["bbox"])
    values["start"], values["end"] = date.fromisoformat(values["start"]), date.fromisoformat(values["end"])
    values["s2_dates"] = [date.fromisoformat(d) for d in values["s2_dates"]]
    values["s1_dates"] = [date.fromisoformat(d) for d in values["s1_dates"]]
    return SampleData(**values)


def read_truth_classes(sample: SampleData, tile: Tile) -> np.ndarray:
    """Generator's land-cover codes at the pixel centres of ``tile`` (for tests and diagnostics)."""
    recorded = json.loads((sample.root / MANIFEST).read_text())["params"]
    _, bounds = _sample_tiles(recorded["tiles"], recorded["tile_size"], recorded["resolution"])
    xs = tile.x0 + tile.resolution * (0.5 + np.arange(tile.size))
    ys = tile.y0 - tile.resolution * (0.5 + np.arange(tile.size))
    if recorded.get("world") == "structured":
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in recorded["world_params"].items()
        }
        placed = _scene_landscape(np.random.default_rng((recorded["seed"], 1)), bounds, WorldParams(**fields))
        return placed.worldcover_at(*np.meshgrid(xs, ys))
    land_cover = _LandCoverField.draw(np.random.default_rng(recorded["seed"]), bounds, tile.side)
    return land_cover.classes_at(*np.meshgrid(xs, ys))
