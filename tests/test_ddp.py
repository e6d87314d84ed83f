"""Data-parallel training: the block sampler sharded per rank, and a two-process DDP run on gloo."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from store_factory import SyntheticStore, write_store

from softcon.config import TrainConfig
from softcon.models.data import BlockShuffleSampler, StoreDataset
from softcon.models.distributed import ShardedBatchSampler, rank_batch_size
from softcon.tasks.train import read_checkpoint, run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("ddp") / "store.zarr")


def epoch_sampler(store: SyntheticStore, epoch: int = 0) -> BlockShuffleSampler:
    sampler = BlockShuffleSampler(StoreDataset(store.path, "train"), seed=3)
    sampler.set_epoch(epoch)
    return sampler


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_shards_are_disjoint_and_make_up_the_global_batch(store: SyntheticStore, world_size: int) -> None:
    sampler = epoch_sampler(store)
    order = sampler.order()
    shards = [ShardedBatchSampler(sampler, 8, rank=rank, world_size=world_size).batches() for rank in range(world_size)]
    n_batches = len(order) // 8
    assert all(len(batches) == n_batches for batches in shards)
    for b in range(n_batches):
        parts = [shards[rank][b] for rank in range(world_size)]
        assert all(len(part) == 8 // world_size for part in parts)
        assert [i for part in parts for i in part] == order[b * 8 : (b + 1) * 8].tolist()  # rank r: slice r


def test_resumed_shards_skip_the_batches_already_seen(store: SyntheticStore) -> None:
    sampler = epoch_sampler(store, epoch=2)
    full = ShardedBatchSampler(sampler, 8, rank=1, world_size=2).batches()
    resumed = ShardedBatchSampler(sampler, 8, rank=1, world_size=2, first_batch=2, max_batches=1).batches()
    assert resumed == full[2:3]


def test_uneven_global_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by the 4 processes"):
        rank_batch_size(10, 4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, config_json: str, report: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    logged: list[dict[str, float]] = []
    result = run_training(TrainConfig.model_validate_json(config_json), on_metrics=lambda s, m: logged.append(m))
    Path(report, f"rank{rank}.json").write_text(
        json.dumps({"checksum": result.weights_checksum, "steps": result.steps, "logged": len(logged)})
    )


@pytest.mark.slow
def test_two_process_ddp_run_on_gloo_keeps_replicas_identical(store: SyntheticStore, tmp_path: Path) -> None:
    config = TrainConfig(
        store=str(store.path), out=str(tmp_path / "ckpt"), backbone="resnet18", steps=4, batch_size=8,
        warmup_steps=1, checkpoint_every=2, log_every=2, mask_patch=4, embed_dim=16, device="cpu",
    )  # fmt: skip
    mp.spawn(ddp_worker, args=(2, free_port(), config.model_dump_json(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(report["steps"] == 4 for report in reports)
    # gradients were all-reduced every step: both replicas hold the same weights
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-12, abs=1e-9)
    assert [report["logged"] for report in reports] == [2, 0]  # only rank 0 reports metrics
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*.pt"))
    assert checkpoints == ["step_000002.pt", "step_000004.pt"]  # written once, by rank 0
    state = read_checkpoint(tmp_path / "ckpt" / "step_000004.pt")
    assert state["step"] == 4 and np.isfinite(state["metrics"]["loss"])
    assert state["teacher"].keys() == state["student"].keys()
