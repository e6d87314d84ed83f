"""How each STAC collection (and provider) names its assets and encodes its values.

Earth Search v1 names Sentinel-2 assets by common name (``red``, ``nir08``, ``scl``), Planetary Computer by
band (``B04``, ``B8A``, ``SCL``); the provider is detected from the asset keys an item carries.
Sentinel-2 processing baseline 04.00 and later adds 1000 to every reflectance (L2A ``BOA_ADD_OFFSET``, L1C
``RADIO_ADD_OFFSET``: the same rule), except in files Earth Search already harmonized
(``earthsearch:boa_offset_applied``). L1C (``sentinel-2-l1c``, Earth Search) has the cirrus band B10 and no scene
classification: its SCL is written as 0 (unknown), so no tile-date or patch is dropped for cloud, only for nodata,
and the items' ``eo:cloud_cover`` filter is the cloud screen;
Planetary Computer ``sentinel-1-rtc`` is linear gamma-naught power, which the cube keeps in dB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

S2_BAND_TO_EARTHSEARCH: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22",
    "SCL": "scl",
}  # fmt: skip
"""Sentinel-2 band name to Earth Search v1 asset key."""
S2_L1C_BAND_TO_EARTHSEARCH: dict[str, str] = {**S2_BAND_TO_EARTHSEARCH, "B10": "cirrus"}
"""Earth Search v1 ``sentinel-2-l1c``: the L2A keys plus the cirrus band B10; its items carry no SCL."""
S2_BAND_TO_PC: dict[str, str] = {band: band for band in S2_BAND_TO_EARTHSEARCH}
"""Sentinel-2 band name to Planetary Computer asset key (the band names themselves)."""
S1_POL_TO_ASSET: dict[str, str] = {"VV": "vv", "VH": "vh"}

S2_OFFSET_BASELINE = (4, 0)
"""Processing baseline from which L2A reflectance carries BOA_ADD_OFFSET (ESA, January 2022)."""
S2_BOA_ADD_OFFSET = -1000
"""Digital-number offset to add to L2A reflectance from baseline 04.00 on."""
S2_OFFSET_START = date(2022, 1, 25)
"""First acquisitions processed with baseline 04.00 (used when an item does not state its baseline)."""
S2_OFFSET_APPLIED_FLAGS = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")
"""Item properties by which Earth Search says the offset is already removed from the files."""

Sensor = Literal["s2", "s1"]
S1Scale = Literal["linear", "db", "amplitude"]


@dataclass(frozen=True)
class CollectionSpec:
    """How to read one collection of one provider."""

    name: str
    """STAC collection id."""
    sensor: Sensor
    """``s2`` (optical) or ``s1`` (SAR)."""
    assets: Mapping[str, str] = field(default_factory=dict)
    """Band (S2 ``B02``…, ``SCL``) or polarization (``VV``) to asset key."""
    nodata: float = 0
    """Nodata value of the assets when the item does not say."""
    s1_scale: S1Scale | None = None
    """S1 value scale when the item does not say: linear power, dB, or amplitude digital numbers."""

    def asset_key(self, band: str, item: Mapping[str, Any] | None = None) -> str:
        """The asset key holding ``band``; raises ``KeyError`` naming the known bands."""
        if band not in self.assets:
            raise KeyError(f"{self.name} has no band {band!r}; known: {sorted(self.assets)}")
        key = self.assets[band]
        if item is not None and key not in item.get("assets", {}):
            raise KeyError(f"item {item.get('id')} of {self.name} has no asset {key!r} for band {band}")
        return key

    def asset_nodata(self, item: Mapping[str, Any], band: str) -> float:
        """Nodata of a band's asset: its ``raster:bands`` value, else the collection default."""
        asset = item["assets"][self.asset_key(band, item)]
        raster_bands = asset.get("raster:bands") or [{}]
        nodata = raster_bands[0].get("nodata")
        return float(nodata) if nodata is not None else float(self.nodata)

    def s2_offset(self, item: Mapping[str, Any]) -> int:
        """Digital-number offset to add to this item's reflectance (``-1000`` from baseline 04.00).

        0 when the provider already harmonized the files (Earth Search's ``earthsearch:boa_offset_applied``,
        earlier ``sentinel:boa_offset_applied``); without ``s2:processing_baseline`` the acquisition date
        decides (baseline 04.00 started on 2022-01-25).

        Raises:
            ValueError: for a processing baseline that is not ``NN.NN``.
        """
        if self.sensor != "s2":
            return 0
        properties = item.get("properties", {})
        if any(properties.get(flag) is True for flag in S2_OFFSET_APPLIED_FLAGS):
            return 0
        baseline = properties.get("s2:processing_baseline")
        if baseline is None:
            when = properties.get("datetime") or properties.get("start_datetime") or ""
            return S2_BOA_ADD_OFFSET if str(when)[:10] >= S2_OFFSET_START.isoformat() else 0
        major, _, minor = str(baseline).partition(".")
        if not (major.isdigit() and (minor.isdigit() or not minor)):
            raise ValueError(
                f"item {item.get('id')}: s2:processing_baseline {baseline!r} is not NN.NN (e.g. '05.11'); "
                "fix the item or drop the property to decide the offset by date"
            )
        return S2_BOA_ADD_OFFSET if (int(major), int(minor or 0)) >= S2_OFFSET_BASELINE else 0

    def s1_value_scale(self, item: Mapping[str, Any]) -> S1Scale:
        """Scale of the S1 values: an asset's ``raster:bands`` ``unit`` of dB wins, else the default."""
        for pol in ("VV", "VH"):
            key = self.assets.get(pol)
            asset = item.get("assets", {}).get(key) if key else None
            if asset:
                unit = ((asset.get("raster:bands") or [{}])[0].get("unit") or "").lower()
                if unit == "db":
                    return "db"
        return self.s1_scale or "linear"


EARTHSEARCH_S2_L2A = CollectionSpec("sentinel-2-l2a", "s2", S2_BAND_TO_EARTHSEARCH)
EARTHSEARCH_S2_C1_L2A = CollectionSpec("sentinel-2-c1-l2a", "s2", S2_BAND_TO_EARTHSEARCH)
EARTHSEARCH_S2_L1C = CollectionSpec("sentinel-2-l1c", "s2", S2_L1C_BAND_TO_EARTHSEARCH)
PC_S2_L2A = CollectionSpec("sentinel-2-l2a", "s2", S2_BAND_TO_PC)
PC_S1_RTC = CollectionSpec("sentinel-1-rtc", "s1", S1_POL_TO_ASSET, nodata=-32768, s1_scale="linear")
S1_GRD = CollectionSpec("sentinel-1-grd", "s1", S1_POL_TO_ASSET, nodata=0, s1_scale="amplitude")

KNOWN_COLLECTIONS = ("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-2-l1c", "sentinel-1-rtc", "sentinel-1-grd")


def spec_for_item(item: Mapping[str, Any], collection: str | None = None) -> CollectionSpec:
    """The reading spec of an item, from its collection and (for S2) the asset keys it carries.

    Raises:
        ValueError: for a collection this module does not know.
    """
    name = collection or item.get("collection")
    assets = item.get("assets", {})
    if name in ("sentinel-2-l2a", "sentinel-2-c1-l2a"):
        if "B04" in assets or "SCL" in assets:
            return PC_S2_L2A if name == "sentinel-2-l2a" else CollectionSpec(name, "s2", S2_BAND_TO_PC)
        return EARTHSEARCH_S2_L2A if name == "sentinel-2-l2a" else EARTHSEARCH_S2_C1_L2A
    if name == "sentinel-2-l1c":
        return EARTHSEARCH_S2_L1C
    if name == "sentinel-1-rtc":
        return PC_S1_RTC
    if name == "sentinel-1-grd":
        return S1_GRD
    raise ValueError(f"unknown collection {name!r} of item {item.get('id')}; known: {list(KNOWN_COLLECTIONS)}")


def sensor_of(collection: str) -> Sensor:
    """``s2`` or ``s1`` for a known collection name."""
    if collection.startswith("sentinel-2"):
        return "s2"
    if collection.startswith("sentinel-1"):
        return "s1"
    raise ValueError(f"unknown collection {collection!r}; known: {list(KNOWN_COLLECTIONS)}")
