from __future__ import annotations

import urllib.request

from pystac_client import Client

from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_server import serve_stac


def test_search_by_collection_bbox_and_datetime(data_sample: SampleData, data_stac_url: str) -> None:
    client = Client.open(data_stac_url)
    day = data_sample.s2_dates[0].isoformat()
    search = client.search(collections=["sentinel-2-l2a"], bbox=data_sample.bbox, datetime=f"{day}/{day}")
    assert [item.id for item in search.items()] == [f"S2B_32TPS_{day.replace('-', '')}_0_L2A"]


def test_paging_returns_every_item(data_sample: SampleData, data_stac_url: str) -> None:
    search = Client.open(data_stac_url).search(bbox=data_sample.bbox, limit=2)
    ids = [item.id for item in search.items()]
    assert len(ids) == 2 * len(data_sample.s2_dates) + 1  # S2 + S1 per date, one WorldCover
    assert len(set(ids)) == len(ids)


def test_server_stops_on_exit(data_sample: SampleData) -> None:
    with serve_stac([data_sample.items_file]) as url:
        assert urllib.request.urlopen(f"{url}/search").status == 200
    try:
        urllib.request.urlopen(f"{url}/search", timeout=2)
    except OSError:
        return
    raise AssertionError("server still answers after the context exited")
