"""The ingest Prefect flow and its MLflow run: the request as params, counts and throughput as metrics,
the item list and failed items as artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from softcon.config import IngestConfig
from softcon.tasks.sample_data import write_sample_data


@pytest.mark.slow
def test_flow_records_params_metrics_and_the_item_list(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from softcon.flows.ingest import ingest_flow

    sample = write_sample_data(tmp_path / "sample", tiles=1, tile_size=64, dates=3)
    items = json.loads(sample.items_file.read_text())["features"]
    broken = next(i for i in items if i["collection"] == "sentinel-2-l2a" and i["properties"]["eo:cloud_cover"] < 50)
    broken["assets"]["red"]["href"] = str(tmp_path / "missing.tif")  # fails: skipped and reported
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    config = IngestConfig(
        stac=str(path), bbox=sample.bbox, start=sample.start, end=sample.end, tile_size=64, max_cloud=50,
        max_tile_cloud=1.0, retry_delay=0, cube=str(tmp_path / "cube.zarr"),
    )  # fmt: skip
    found = [i for i in items if i["collection"] in config.collections]
    cloudy = [i["id"] for i in found if (i["properties"].get("eo:cloud_cover") or 0) > 50]
    assert len(cloudy) == 1  # the sample's ~85 % cloudy date

    # The temporary Prefect API can take a while to start on a busy machine.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        result = ingest_flow(config, experiment="ingest-test")

    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["softcon.stage"] == "ingest"
    params = run.data.params
    assert params["stac"] == str(path) and json.loads(params["bbox"]) == list(sample.bbox)
    assert params["start"] == sample.start.isoformat() and params["end"] == sample.end.isoformat()
    assert json.loads(params["collections"]) == ["sentinel-2-l2a", "sentinel-1-rtc"] and params["max_cloud"] == "50.0"
    metrics = run.data.metrics
    assert metrics["items_found"] == len(found) == 6
    assert metrics["items_filtered"] == 1
    assert metrics["items_failed"] == 1
    assert metrics["items_ingested"] == len(found) - 2  # the two clear S2 days but the broken one, and every S1
    assert metrics["bytes_written"] > 0 and metrics["seconds"] > 0
    assert metrics["mb_per_s"] == pytest.approx(metrics["pixel_bytes"] / 1e6 / metrics["seconds"])
    assert all(result.metrics[name] == pytest.approx(value) for name, value in metrics.items())

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"items.json", "failed_items.json", "ingest_report.json"} <= artifacts
    statuses = json.loads(Path(client.download_artifacts(result.run_id, "items.json")).read_text())
    assert set(statuses) == {i["id"] for i in found}
    assert statuses[broken["id"]] == "failed" and statuses[cloudy[0]] == "filtered"
    assert sum(s == "ingested" for s in statuses.values()) == metrics["items_ingested"]
    failed = json.loads(Path(client.download_artifacts(result.run_id, "failed_items.json")).read_text())
    assert list(failed) == [broken["id"]] and "missing.tif" in failed[broken["id"]]
