"""StoreDataset: shapes, dtypes, normalisation, determinism, two dates as views, schema check."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from store_factory import SyntheticStore, write_store
from torch.utils.data import BatchSampler, DataLoader, default_collate

from softcon.models import training_store
from softcon.models.data import (
    N_AUG,
    SSL4EO_CROP_SIZE,
    BlockShuffleSampler,
    GpuAugment,
    SampleReader,
    StoreDataset,
    apply_view_params,
    collate_batch,
    make_loader,
)
from softcon.models.distributed import ShardedBatchSampler
from softcon.models.remote_shards import coalesce_ranges


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("data") / "store.zarr")


def test_item_shapes_and_dtypes(store: SyntheticStore) -> None:
    item = StoreDataset(store.path, crop_size=8)[0]
    assert item["view_a"].shape == item["view_b"].shape == (12, 8, 8)
    assert item["view_a"].dtype == torch.float32
    assert item["labels"].shape == item["fractions"].shape == (store.n_classes,)
    assert item["labelled"].dtype == torch.bool


@pytest.mark.parametrize(("sensor", "channels"), [("s2", 12), ("s1", 2)])
def test_single_view_is_normalised_with_nodata_zero(store: SyntheticStore, sensor: str, channels: int) -> None:
    dataset = StoreDataset(store.path, sensor=sensor, two_views=False, augment=False)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # (N, C, H, W)
    assert images.shape[1] == channels
    assert torch.isfinite(images).all()
    assert images.mean().abs() < 0.2 and 0.5 < images.std() < 1.5
    raw = dataset.read_sample(int(dataset.indices[0]))
    nodata = np.isnan(raw) if sensor == "s1" else raw == 0
    assert nodata.any() and (images[0].numpy()[nodata] == 0).all()


def test_splits_partition_the_store(store: SyntheticStore) -> None:
    sizes = [len(StoreDataset(store.path, split=split)) for split in ("train", "val", "test")]
    assert sum(sizes) == store.n_samples and all(sizes)


def test_items_are_deterministic_by_seed_and_epoch(store: SyntheticStore) -> None:
    first, second = StoreDataset(store.path, seed=3), StoreDataset(store.path, seed=3)
    assert torch.equal(first[5]["view_a"], second[5]["view_a"])
    assert torch.equal(first[5]["view_b"], second[5]["view_b"])
    second.set_epoch(1)
    assert not torch.equal(first[5]["view_a"], second[5]["view_a"])


def test_views_are_two_dates_of_one_location(store: SyntheticStore) -> None:
    dataset = StoreDataset(store.path, augment=False)
    group = zarr.open_group(str(store.path), mode="r")
    location = group["location"][:]
    for i in range(6):
        item = dataset[i]
        sample = int(item["index"])
        candidates = [s for s in np.flatnonzero(location == location[sample]) if s != sample]
        assert any(torch.equal(item["view_b"], dataset.normalise(dataset.read_sample(int(s)))) for s in candidates)
        assert torch.equal(item["view_a"], dataset.normalise(dataset.read_sample(sample)))


def test_block_sampler_is_a_permutation(store: SyntheticStore) -> None:
    dataset = StoreDataset(store.path)
    sampler = BlockShuffleSampler(dataset, seed=0, buffer_blocks=2)
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_wrong_schema_version_is_refused(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    group.attrs["schema_version"] = 0
    with pytest.raises(ValueError, match="schema_version 0; this code reads schema_version 1"):
        StoreDataset(tmp_path / "old.zarr")


def test_unknown_split_is_refused(store: SyntheticStore) -> None:
    with pytest.raises(ValueError, match="split 'holdout' is not one of"):
        StoreDataset(store.path, split="holdout")


def _batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]


def _assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for one, other in zip(first, second, strict=True):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), key


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_store(tmp_path_factory.mktemp("data") / "sharded.zarr", sharded=True, chunk=8)


def test_block_is_a_shard(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path)
    assert dataset.block_size == 8  # one read decodes one shard, not one inner chunk
    raw = zarr.open_group(str(sharded.path), mode="r")["s2"]
    assert raw.chunks[0] == 1 and np.array_equal(dataset.read_sample(13), raw[13])
    # the preprocess stage's layout and codec: the loader's one-pread-one-decode path, not zarr's fallback
    assert dataset.reader.root is not None and dataset.reader.blosc


@pytest.mark.parametrize("sensor", ["s2", "s1"])
@pytest.mark.parametrize("two_views", [True, False], ids=["two-views", "one-view"])
def test_batched_augment_equals_per_item_augment(sharded: SyntheticStore, sensor: str, two_views: bool) -> None:
    options = dict(sensor=sensor, two_views=two_views, crop_size=10, seed=5, channel_dropout=0.3)
    per_item = StoreDataset(sharded.path, **options)
    deferred = StoreDataset(sharded.path, **options, defer_augment=True)
    expected = _batches(make_loader(per_item, 16))
    augment = GpuAugment(deferred, device="cpu")
    got = [augment(batch) for batch in make_loader(deferred, 16)]
    _assert_batches_equal(expected, got)
    assert got[0]["view_a" if two_views else "image"].shape == (16, per_item.in_chans, 10, 10)
    assert not any(key.startswith(("raw", "aug", "drop")) for key in got[0])


@pytest.mark.parametrize("defer", [True, False], ids=["raw", "augmented"])
def test_batch_memory_is_reused_only_once_nothing_holds_it(sharded: SyntheticStore, defer: bool) -> None:
    dataset = StoreDataset(sharded.path, crop_size=None if defer else 10, seed=3, defer_augment=defer)
    key = "raw_a" if defer else "view_a"
    kept = dataset.__getitems__(list(range(8))).batch[key]
    expected = kept.clone()
    item_view = dataset.__getitems__(list(range(8, 16)))[2][key]  # one item's view keeps its whole batch
    item_expected = item_view.clone()
    for start in (16, 24, 32):  # batches taken and dropped meanwhile: they share memory among themselves
        pointers = {_memory(dataset.__getitems__(list(range(start, start + 8))).batch[key]) for _ in range(3)}
        assert len(pointers) == 1
        assert _memory(kept) not in pointers and _memory(item_view) not in pointers
    assert torch.equal(kept, expected) and torch.equal(item_view, item_expected)
    pointer = _memory(kept)
    del kept
    assert _memory(dataset.__getitems__(list(range(8))).batch[key]) in (pointer, *pointers)


def _memory(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_lookup_kernel_equals_numpy_take_on_flipped_and_turned_views(dtype: type) -> None:
    from softcon.models.lookup import lookup_into

    rng = np.random.default_rng(0)
    raw = rng.integers(0, np.iinfo(dtype).max + 1, (3, 12, 12), dtype=dtype)
    table = rng.random((3, np.iinfo(dtype).max + 1), dtype=np.float32)
    for view in (raw[:, 2:10, 1:9], raw[:, ::-1, 3:11][:, 1:9], np.rot90(raw[:, 4:12, :8][:, :, ::-1], 3, axes=(1, 2))):
        out = np.empty(view.shape, np.float32)
        lookup_into(view, table, out)
        assert np.array_equal(out, np.stack([np.take(table[c], view[c]) for c in range(3)]))


def test_deferred_items_are_raw_store_values(sharded: SyntheticStore) -> None:
    item = StoreDataset(sharded.path, defer_augment=True)[3]
    assert item["raw_a"].dtype == torch.uint16 and item["raw_a"].shape == (12, sharded.size, sharded.size)
    assert item["aug_a"].shape == (N_AUG,) and item["drop_a"].shape == (12,)
    raw = zarr.open_group(str(sharded.path), mode="r")["s2"]
    assert np.array_equal(item["raw_b"].numpy(), raw[int(item["other"])])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_augment_on_cuda_equals_cpu(sharded: SyntheticStore) -> None:
    options = dict(crop_size=10, seed=2, channel_dropout=0.2)
    expected = _batches(make_loader(StoreDataset(sharded.path, **options), 16, pin_memory=True))
    deferred = StoreDataset(sharded.path, **options, defer_augment=True)
    augment = GpuAugment(deferred, device="cuda")
    for batch, reference in zip(make_loader(deferred, 16, pin_memory=True), expected, strict=True):
        assert batch["raw_a"].is_pinned()
        views = augment(batch)
        assert views["view_a"].is_cuda
        torch.testing.assert_close(views["view_a"].cpu(), reference["view_a"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(views["view_b"].cpu(), reference["view_b"], rtol=1e-6, atol=1e-6)


def test_two_workers_give_the_same_batches_as_none(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path, crop_size=12, seed=9, channel_dropout=0.1)
    sampler = BlockShuffleSampler(dataset, seed=9, buffer_blocks=2)
    in_process = _batches(make_loader(dataset, 8, sampler=sampler, num_workers=0))
    in_workers = _batches(make_loader(dataset, 8, sampler=sampler, num_workers=2))
    _assert_batches_equal(in_process, in_workers)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_spawned_workers_give_the_same_batches_as_none(sharded: SyntheticStore, start_method: str) -> None:
    """Workers that are not forked (macOS's default, Python 3.14's forkserver on Linux) get the dataset pickled: a
    dataset that had already loaded batches in this process (its batch pool holds a lock) must pickle too."""
    dataset = StoreDataset(sharded.path, crop_size=12, seed=9, channel_dropout=0.1)
    sampler = BlockShuffleSampler(dataset, seed=9, buffer_blocks=2)
    in_process = _batches(make_loader(dataset, 8, sampler=sampler))
    loader = make_loader(dataset, 8, sampler=sampler, num_workers=2)
    loader.multiprocessing_context = start_method
    _assert_batches_equal(in_process, _batches(loader))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_form_batch_sampler_loads_the_sampler_batches(sharded: SyntheticStore, num_workers: int) -> None:
    """Training passes ``batch_sampler=ShardedBatchSampler(...)``: the same batches as ``batch_size`` + ``sampler``."""
    dataset = StoreDataset(sharded.path, crop_size=12, seed=9, channel_dropout=0.1)
    sampler = BlockShuffleSampler(dataset, seed=9, buffer_blocks=2)
    expected = _batches(make_loader(dataset, 8, sampler=sampler))
    loader = make_loader(dataset, batch_sampler=ShardedBatchSampler(sampler, 8), num_workers=num_workers)
    assert loader.collate_fn is collate_batch
    _assert_batches_equal(expected, _batches(loader))


def test_rank_loaders_make_up_the_global_batches(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path, crop_size=12, seed=9)
    sampler = BlockShuffleSampler(dataset, seed=9, buffer_blocks=2)
    expected = _batches(make_loader(dataset, 8, sampler=sampler))
    ranks = [
        _batches(make_loader(dataset, batch_sampler=ShardedBatchSampler(sampler, 8, rank=rank, world_size=2)))
        for rank in (0, 1)
    ]
    got = [{key: torch.cat([first[key], second[key]]) for key in first} for first, second in zip(*ranks, strict=True)]
    _assert_batches_equal(expected, got)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs one of batch_size and batch_sampler"),
        ({"batch_size": 8, "batch_sampler": "sharded"}, "needs one of batch_size and batch_sampler"),
        ({"sampler": "order", "batch_sampler": "sharded"}, "sampler or batch_sampler, not both"),
    ],
    ids=["neither", "batch-size-and-batch-sampler", "sampler-and-batch-sampler"],
)
def test_make_loader_refuses_conflicting_batching(sharded: SyntheticStore, options: dict, message: str) -> None:
    dataset = StoreDataset(sharded.path)
    sampler = BlockShuffleSampler(dataset)
    named = {"order": sampler, "sharded": ShardedBatchSampler(sampler, 8)}
    with pytest.raises(ValueError, match=message):
        make_loader(dataset, **{key: named.get(value, value) for key, value in options.items()})


def test_pin_memory_follows_cuda_by_default(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path)
    assert make_loader(dataset, 8).pin_memory == torch.cuda.is_available()
    assert make_loader(dataset, 8, pin_memory=True).pin_memory


def test_sampler_shuffles_blocks_then_within_a_buffer(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path)
    blocks = dataset.indices // dataset.block_size  # (N,) block of each dataset position
    sampler = BlockShuffleSampler(dataset, seed=1, buffer_blocks=2)
    order = sampler.order()
    visited = blocks[order]
    # Consecutive buffers: every window of one buffer's samples holds at most 2 blocks.
    starts = np.r_[0, np.cumsum([np.isin(blocks, pair).sum() for pair in _pairs(visited)])]
    for start, stop in itertools.pairwise(starts):
        assert len(np.unique(visited[start:stop])) <= 2
    assert list(dict.fromkeys(visited)) != sorted(set(visited))  # blocks are not visited in store order
    assert not np.array_equal(order, np.sort(order))


def _pairs(visited: np.ndarray) -> list[np.ndarray]:
    first_seen = np.array(list(dict.fromkeys(visited.tolist())))
    return [first_seen[i : i + 2] for i in range(0, len(first_seen), 2)]


@pytest.mark.parametrize("training_form", [False, True], ids=["sampler", "batch-sampler"])
def test_block_cache_is_bounded_by_the_buffer(sharded: SyntheticStore, training_form: bool) -> None:
    dataset = StoreDataset(sharded.path, cache_blocks=1)
    sampler = BlockShuffleSampler(dataset, buffer_blocks=3)
    if training_form:
        loader = make_loader(dataset, batch_sampler=ShardedBatchSampler(sampler, 4))
    else:
        loader = make_loader(dataset, 4, sampler=sampler)
    assert dataset.cache_blocks == 3
    for _ in loader:
        assert len(dataset._blocks) <= 3


def test_channel_dropout_zeroes_whole_channels_but_never_all(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path, two_views=False, channel_dropout=0.5, seed=4)
    dropped_counts = []
    for i in range(len(dataset)):
        image = dataset[i]["image"]  # (C, H, W)
        zero = (image == 0).flatten(1).all(dim=1)  # (C,) channel entirely at its mean
        assert not zero.all()
        dropped_counts.append(int(zero.sum()))
    assert 3 < np.mean(dropped_counts) < 9  # about half of 12 channels


def test_flips_and_turns_follow_the_parameters() -> None:
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    assert torch.equal(apply_view_params(x, torch.tensor([0, 0, 1, 0, 0]), None), x.flip(2))
    assert torch.equal(apply_view_params(x, torch.tensor([0, 0, 0, 1, 0]), None), x.flip(1))
    assert torch.equal(apply_view_params(x, torch.tensor([0, 0, 0, 0, 1]), None), torch.rot90(x, 1, (1, 2)))
    assert torch.equal(apply_view_params(x, torch.tensor([1, 2, 0, 0, 0]), 2), x[:, 1:3, 2:4])


def test_single_date_location_gets_two_augmentations(tmp_path: Path) -> None:
    store = write_store(tmp_path / "single.zarr", dates_per_location=1)
    item = StoreDataset(store.path, crop_size=12, seed=0)[0]
    assert int(item["other"]) == int(item["index"])  # the same patch ...
    assert not torch.equal(item["view_a"], item["view_b"])  # ... under two augmentations


def test_ssl4eo_crop_default_fits_the_default_patch() -> None:
    from softcon.config import PreprocessConfig

    assert SSL4EO_CROP_SIZE == 224 < PreprocessConfig().patch_size == 264


def _preprocess_layout_store(path: Path, n_samples: int = 20, block: int = 8) -> np.ndarray:
    """A store written by models/training_store.py (Blosc, shards of ``block``); the last shard left unwritten."""
    plan = training_store.SamplePlan(
        location=np.arange(n_samples, dtype=np.int64),
        tile=np.zeros(n_samples, np.int32),
        time=np.full(n_samples, np.datetime64("2024-06-01", "ns")),
        row=np.zeros(n_samples, np.int32),
        col=np.zeros(n_samples, np.int32),
        split=np.zeros(n_samples, np.uint8),
        labels=np.zeros((n_samples, 2), np.uint8),
        fractions=np.zeros((n_samples, 2), np.float32),
        labelled=np.ones(n_samples, bool),
    )
    stats = {"mean": [1000.0] * 3, "std": [100.0] * 3}
    attrs = {"bands": ["B02", "B03", "B04"], "pols": ["VV"], "norm_stats": {"s2": stats, "s1": stats}}
    training_store.create_store(
        str(path), plan, n_bands=3, n_pols=1, patch_size=6, samples_per_block=block, attrs=attrs
    )
    rng = np.random.default_rng(0)
    s2 = rng.integers(0, 10_000, (2 * block, 3, 6, 6)).astype(np.uint16)
    training_store.write_images(str(path), 0, s2, rng.normal(size=(2 * block, 1, 6, 6)).astype(np.float32))
    return s2


@pytest.mark.parametrize("sensor", ["s2", "s1"])
def test_sample_reader_equals_zarr_on_the_preprocess_layout(tmp_path: Path, sensor: str) -> None:
    s2 = _preprocess_layout_store(tmp_path / "store.zarr")
    array = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")[sensor]
    reader = SampleReader(array, index_cache=2)
    assert reader.root is not None and reader.blosc  # the byte-range path, not the zarr fallback
    for sample in range(array.shape[0]):  # two written shards, then one never written (fill values)
        np.testing.assert_array_equal(reader.read(sample), array[sample])
    assert len(reader.indexes) == 2  # the index cache is bounded
    if sensor == "s2":
        np.testing.assert_array_equal(reader.read(9), s2[9])
        assert np.all(reader.read(19) == 0)  # unwritten shard: fill value


def test_sample_reader_refuses_a_corrupt_shard_index(tmp_path: Path) -> None:
    _preprocess_layout_store(tmp_path / "store.zarr")
    shard = tmp_path / "store.zarr" / "s2" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a bit flip in the index (offsets, sizes) at the end of the shard
    shard.write_bytes(bytes(data))
    reader = SampleReader(zarr.open_group(str(tmp_path / "store.zarr"), mode="r")["s2"], index_cache=2)
    reader.read(0)
    with pytest.raises(ValueError, match=r"checksum mismatch.*corrupt"):
        reader.read(8)


def test_unsharded_store_falls_back_to_zarr(store: SyntheticStore) -> None:
    array = zarr.open_group(str(store.path), mode="r")["s2"]
    reader = SampleReader(array, index_cache=2)
    assert reader.root is None
    np.testing.assert_array_equal(reader.read(5), array[5])


def _stacked_items(dataset: StoreDataset, loader) -> list[dict[str, torch.Tensor]]:
    """The reference: each batch of ``loader``'s batch sampler as per-item ``__getitem__`` results, stacked."""
    return [default_collate([dataset[i] for i in positions]) for positions in loader.batch_sampler]


def _assert_identical(expected: list[dict], got: list[dict]) -> None:
    assert len(expected) == len(got) > 0
    for one, other in zip(expected, got, strict=True):
        assert one.keys() == other.keys()
        for key in one:  # bit for bit, same dtype; S1 raw values keep their NaN nodata
            torch.testing.assert_close(other[key], one[key], rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize("sensor", ["s2", "s1"])
@pytest.mark.parametrize("two_views", [True, False], ids=["two-views", "one-view"])
@pytest.mark.parametrize("defer", [False, True], ids=["cpu-augment", "deferred"])
@pytest.mark.parametrize("threads", [1, 3], ids=["1-thread", "3-decode-threads"])
def test_batch_path_equals_stacked_items(
    sharded: SyntheticStore, sensor: str, two_views: bool, defer: bool, threads: int
) -> None:
    dataset = StoreDataset(
        sharded.path, sensor=sensor, two_views=two_views, crop_size=10, seed=3, channel_dropout=0.3,
        defer_augment=defer, decode_threads=threads,
    )  # fmt: skip
    dataset.set_epoch(2)
    loader = make_loader(dataset, 8, sampler=BlockShuffleSampler(dataset, seed=3, buffer_blocks=2))
    expected = _stacked_items(dataset, loader)
    got = _batches(loader)
    _assert_identical(expected, got)
    image = got[0]["raw_a" if defer and two_views else "raw" if defer else "view_a" if two_views else "image"]
    assert image.shape[:2] == (8, dataset.in_chans)
    # the batch is fresh memory every time (a kept batch is never overwritten by the next one)
    assert got[0][next(iter(got[0]))].data_ptr() != got[1][next(iter(got[1]))].data_ptr()


@pytest.mark.parametrize("two_views", [True, False], ids=["two-views", "one-view"])
def test_batch_path_in_two_workers_equals_stacked_items(sharded: SyntheticStore, two_views: bool) -> None:
    dataset = StoreDataset(
        sharded.path, two_views=two_views, crop_size=12, seed=9, channel_dropout=0.1, decode_threads=2
    )  # decode threads inside each worker process, too
    loader = make_loader(dataset, 8, sampler=BlockShuffleSampler(dataset, seed=9, buffer_blocks=2), num_workers=2)
    expected = _stacked_items(dataset, loader)
    got = _batches(loader)
    _assert_identical(expected, got)
    assert all(len({id(batch[key]) for batch in got}) == len(got) for key in got[0])  # one tensor per batch


def test_batch_path_without_crop_or_augment_is_the_normalised_patch(sharded: SyntheticStore) -> None:
    dataset = StoreDataset(sharded.path, two_views=False, augment=False, seed=1)
    batch = dataset.__getitems__([0, 3, 5]).batch
    for b, position in enumerate((0, 3, 5)):
        sample = int(dataset.indices[position])
        assert torch.equal(batch["image"][b], dataset.normalise(dataset.read_sample(sample)))
    nodata = torch.from_numpy(dataset.read_sample(int(dataset.indices[0])) == 0)  # (C, H, W)
    assert nodata.any() and (batch["image"][0][nodata] == 0).all() and (batch["image"][0][~nodata] != 0).any()


def test_plain_dataloader_with_default_collate_still_works(sharded: SyntheticStore) -> None:
    # tasks/train.py builds its own DataLoader (default collate): __getitems__ must serve it too
    dataset = StoreDataset(sharded.path, crop_size=10, seed=4)
    batches = BatchSampler(BlockShuffleSampler(dataset, seed=4), 8, drop_last=True)
    plain = _batches(DataLoader(dataset, batch_sampler=batches))
    _assert_identical(_batches(make_loader(dataset, 8, sampler=BlockShuffleSampler(dataset, seed=4))), plain)


def test_read_into_refuses_a_wrong_buffer(sharded: SyntheticStore) -> None:
    reader = StoreDataset(sharded.path).reader
    with pytest.raises(ValueError, match="C-contiguous"):
        reader.read_into(0, np.empty(reader.sample_shape, np.float32))


def test_coalesce_ranges_merges_ranges_within_the_gap() -> None:
    starts, stops = np.array([100, 0, 70, 400]), np.array([150, 50, 95, 500])  # gaps 20, 5, 250 once sorted
    assert coalesce_ranges(starts, stops, max_gap=10) == [(0, 50), (70, 150), (400, 500)]
    assert coalesce_ranges(starts, stops, max_gap=0) == [(0, 50), (70, 95), (100, 150), (400, 500)]
    assert coalesce_ranges(starts, stops, max_gap=1000) == [(0, 500)]


@pytest.mark.parametrize(
    "options",
    [{"seed": 3}, {"two_views": False, "augment": False}, {"defer_augment": True, "crop_size": 10, "seed": 4}],
    ids=["two-views", "augment-off", "deferred"],
)
def test_fsspec_store_takes_the_shard_path_and_equals_the_local_one(
    sharded: SyntheticStore, tmp_path: Path, options: dict
) -> None:
    """A store behind an fsspec URL (here fsspec's in-memory filesystem; S3 in test_object_store.py) is read as
    ranged GETs of whole shards, with the same batches as the local store."""
    import fsspec

    url = f"memory://{tmp_path.name}/store.zarr"
    fsspec.filesystem("memory").put(str(sharded.path), url, recursive=True)
    local, remote = StoreDataset(sharded.path, **options), StoreDataset(url, **options)
    _assert_batches_equal(_batches(make_loader(local, 8)), _batches(make_loader(remote, 8)))
    fetched = remote.reader.remote
    assert fetched is not None and remote.reader.fast and remote.reader.root is None
    assert fetched.reads.name == "fsspec"  # obstore reads s3:// only
    shards = len(np.unique(remote.indices // remote.block_size))
    assert fetched.requests == 2 * shards  # per shard: its index, then its wanted chunks in one range
    fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)
