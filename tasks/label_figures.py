"""Pictures and tables of the labels stage: class histogram and a tile's label map beside its RGB composite.

Pure matplotlib/pandas on what the cube holds; the flow logs the results to MLflow. The Agg backend is
selected here, so nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from softcon.tasks.cube_store import open_tile_dataset

WORLDCOVER_COLOURS: dict[int, str] = {
    10: "#006400", 20: "#ffbb22", 30: "#ffff4c", 40: "#f096ff", 50: "#fa0000", 60: "#b4b4b4",
    70: "#f0f0f0", 80: "#0064c8", 90: "#0096a0", 95: "#00cf75", 100: "#fae6a0",
}  # fmt: skip
"""The official WorldCover legend colours."""


def class_histogram_table(class_pixels: Mapping[str, int], class_codes: Mapping[str, int]) -> pd.DataFrame:
    """One row per class: code, name, pixels and fraction of the labelled pixels (sums to 1)."""
    labelled = sum(class_pixels.values()) or 1
    rows = [
        {"code": int(code), "class": name, "pixels": int(class_pixels.get(name, 0)),
         "fraction": class_pixels.get(name, 0) / labelled}
        for name, code in class_codes.items()
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["code", "class", "pixels", "fraction"])


def class_histogram_figure(table: pd.DataFrame, *, title: str = "Land-cover classes") -> Figure:
    """Horizontal bar chart of the class fractions."""
    figure, axes = plt.subplots(figsize=(7, 0.35 * len(table) + 1.2), layout="constrained")
    axes.barh(table["class"], table["fraction"], color=[class_colour(int(c)) for c in table["code"]], edgecolor="0.3")
    axes.invert_yaxis()
    axes.set_xlabel("fraction of labelled pixels")
    axes.set_title(title)
    for y, (fraction, pixels) in enumerate(zip(table["fraction"], table["pixels"], strict=True)):
        axes.text(fraction, y, f" {pixels:,}", va="center", fontsize=7)
    return figure


def class_colour(code: int) -> str:
    """A class code's legend colour (hex): WorldCover's own for its codes, else tab20's."""
    if code in WORLDCOVER_COLOURS:
        return WORLDCOVER_COLOURS[code]
    return matplotlib.colors.to_hex(plt.get_cmap("tab20")(code % 20))


def rgb_composite(tile: xr.Dataset) -> np.ndarray | None:
    """(y, x, 3) float RGB in [0, 1] from the S2 date with the fewest nodata pixels (B04, B03, B02),
    stretched between the 2nd and 98th percentiles; None when the tile has no S2."""
    if "s2" not in tile or tile.sizes.get("time", 0) == 0:
        return None
    s2 = tile["s2"].sel(band=["B04", "B03", "B02"])
    valid = (s2 != 0).all("band").sum(("y", "x")).values
    rgb = s2.isel(time=int(np.argmax(valid))).values.astype(np.float32)  # (3, y, x)
    good = (rgb > 0).all(axis=0)
    if not good.any():
        return None
    low, high = np.percentile(rgb[:, good], [2, 98])
    return np.clip((np.moveaxis(rgb, 0, -1) - low) / max(high - low, 1e-6), 0, 1)


def quicklook_figure(tile: xr.Dataset, class_codes: Mapping[str, int], *, title: str = "") -> Figure:
    """One tile's RGB composite (left) beside its label map (right), with a legend of the classes present."""
    land_cover = tile["landcover"].values
    codes = sorted(class_codes.values())
    # Colour index 0 is nodata (white); class k gets index k+1.
    lookup = np.zeros(256, dtype=np.int64)
    for i, code in enumerate(codes):
        lookup[code] = i + 1
    cmap = ListedColormap(["#ffffff"] + [class_colour(c) for c in codes])
    rgb = rgb_composite(tile)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 5.2), layout="constrained")
    if rgb is not None:
        left.imshow(rgb)
        left.set_title("Sentinel-2 RGB (B04, B03, B02)")
    else:
        left.text(0.5, 0.5, "no Sentinel-2 in this tile", ha="center", va="center")
    right.imshow(lookup[land_cover], cmap=cmap, vmin=0, vmax=len(codes), interpolation="nearest")
    right.set_title("land cover (white = nodata)")
    for axes in (left, right):
        axes.set_xticks([])
        axes.set_yticks([])
    present = set(np.unique(land_cover).tolist())
    handles = [Patch(facecolor=class_colour(code), edgecolor="0.3", label=name)
               for name, code in class_codes.items() if code in present]  # fmt: skip
    if handles:
        right.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    figure.suptitle(title)
    return figure


def cube_quicklook(cube: str, tile_ids: list[str]) -> Figure:
    """The quick-look of the tile with the most classes present (ties: the first), from the cube."""
    best, best_count = tile_ids[0], -1
    for tile_id in tile_ids:
        present = int(
            np.count_nonzero(
                np.bincount(open_tile_dataset(cube, tile_id)["landcover"].values.ravel(), minlength=256)[1:]
            )
        )
        if present > best_count:
            best, best_count = tile_id, present
    tile = open_tile_dataset(cube, best)
    attrs = tile["landcover"].attrs
    codes = dict(zip(attrs["class_names"], (int(c) for c in attrs["class_codes"]), strict=True))
    title = f"tile {best} · {attrs.get('product', '')} {attrs.get('year', '')} · scheme {attrs.get('class_scheme', '')}"
    return quicklook_figure(tile, codes, title=title)
