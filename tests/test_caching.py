"""Stage caching: data fingerprints, and a train stage re-run that is skipped unless data, code or --refresh say no."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr
from store_factory import write_store

from softcon.config import TrainConfig
from softcon.flows.caching import STAGE_POLICIES, path_fingerprint, stage_cache_policy


def _tile(path: Path, steps: int) -> zarr.Array:
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    return group.require_array("s2", shape=(steps, 4, 4), chunks=(1, 4, 4), dtype="uint16")


def test_zarr_fingerprint_follows_metadata_not_file_times(tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    assert path_fingerprint(store) == "absent"
    array = _tile(store, 2)
    array[:] = 7
    before = path_fingerprint(store)
    assert before.startswith("zarr:")
    array[:] = 7  # the same bytes written again (labels rewriting landcover): same key
    assert path_fingerprint(store) == before
    array.resize((3, 4, 4))  # a new time step (ingest appending a date): another key
    assert path_fingerprint(store) != before


def test_file_and_url_fingerprints(tmp_path: Path) -> None:
    raster = tmp_path / "landcover.tif"
    raster.write_bytes(b"abc")
    first = path_fingerprint(raster)
    raster.write_bytes(b"abd")
    assert first.startswith("file:") and path_fingerprint(raster) != first
    assert path_fingerprint("s3://bucket/cube.zarr") == "url:s3://bucket/cube.zarr"
    assert path_fingerprint(None) == "none"


def test_every_stage_has_a_policy_and_unknown_stages_are_refused() -> None:
    assert sorted(STAGE_POLICIES) == ["evaluate", "finetune", "ingest", "labels", "preprocess", "train"]
    with pytest.raises(ValueError, match="no cache policy for stage 'pipeline'"):
        stage_cache_policy("pipeline")


@pytest.mark.slow
def test_train_rerun_is_served_from_the_cache_until_the_store_changes_or_refresh(tmp_path: Path) -> None:
    from softcon.flows.train import train_flow

    store = write_store(tmp_path / "store.zarr")
    config = TrainConfig(
        store=str(store.path), out=str(tmp_path / "checkpoints"), backbone="resnet18", steps=2, batch_size=8,
        warmup_steps=1, checkpoint_every=2, mask_patch=4, embed_dim=16, device="cpu",
    )  # fmt: skip
    first = train_flow(config, experiment="caching-test")
    checkpoint = Path(first.output)
    written = checkpoint.stat().st_mtime_ns

    cached = train_flow(config, experiment="caching-test")
    assert cached.run_id != first.run_id  # a new MLflow run records the re-run ...
    assert checkpoint.stat().st_mtime_ns == written  # ... but nothing was trained or written
    assert cached.metrics == first.metrics

    forced = train_flow(config, experiment="caching-test", refresh=True)
    assert checkpoint.stat().st_mtime_ns != written
    assert forced.metrics == first.metrics  # CPU training is deterministic

    written = checkpoint.stat().st_mtime_ns
    # The store was rewritten (its attributes changed, as a new preprocess run changes its fingerprint).
    zarr.open_group(str(store.path), mode="a").attrs["edited"] = True
    train_flow(config, experiment="caching-test")
    assert checkpoint.stat().st_mtime_ns != written
