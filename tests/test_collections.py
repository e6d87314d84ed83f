from __future__ import annotations

import json

import pytest
from real_data import REAL

from softcon.tasks.collections import spec_for_item

STAC_ITEMS = REAL / "stac_items"
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12", "SCL")


def _real_items() -> list[dict]:
    items = []
    for path in sorted(STAC_ITEMS.rglob("*.json")) + sorted(STAC_ITEMS.rglob("*.geojson")):
        data = json.loads(path.read_text())
        features = data if isinstance(data, list) else data.get("features", [data])
        items += [f for f in features if f.get("type") == "Feature"]
    return items


KNOWN = [i for i in _real_items() if i.get("collection") in ("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-1-rtc")]
KNOWN += [i for i in _real_items() if i.get("collection") == "sentinel-1-grd" and "vv" in i["assets"]]


@pytest.mark.parametrize("item", KNOWN, ids=[f"{i['collection']}:{i['id'][:40]}" for i in KNOWN])
def test_every_band_has_an_asset_in_real_items(item: dict) -> None:
    spec = spec_for_item(item)
    bands = S2_BANDS if spec.sensor == "s2" else ("VV", "VH")
    for band in bands:
        assert spec.asset_key(band, item) in item["assets"]


def test_offset_follows_processing_baseline() -> None:
    by_baseline = {i["properties"].get("s2:processing_baseline"): i for i in KNOWN if spec_for_item(i).sensor == "s2"}
    assert spec_for_item(by_baseline["05.11"]).s2_offset(by_baseline["05.11"]) == -1000
    assert spec_for_item(by_baseline["02.12"]).s2_offset(by_baseline["02.12"]) == 0


def test_planetary_computer_rtc_is_linear() -> None:
    rtc = next(i for i in KNOWN if i["collection"] == "sentinel-1-rtc")
    assert spec_for_item(rtc).s1_value_scale(rtc) == "linear"
    assert spec_for_item(rtc).asset_nodata(rtc, "VV") == -32768


def test_unknown_collection_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown collection 'landsat-c2-l2'"):
        spec_for_item({"id": "x", "collection": "landsat-c2-l2", "assets": {}})
