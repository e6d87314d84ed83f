"""Training-store dataset: normalised tensors, two views per scene, augmentations on tensors.

The store (written by the preprocess stage) keeps samples in Zarr shards along the sample axis (one shard
per write block, inner chunks of one sample). ``SampleReader`` reads one sample as one byte-range read of its
shard and one decode (the shard's index is cached); ``BlockShuffleSampler`` visits blocks (shards) in
random order and shuffles samples only inside a buffer of ``buffer_blocks`` blocks, so the reads stay
within a few shards and memory is bounded by the batches in flight, never by the store.

Every random choice (second date, crop offset, flips, 90° turns, dropped channels) is drawn from a
generator seeded by (seed, epoch, sample), so an item is the same whichever worker loads it and whenever
it is loaded: that is what makes resumed training exact and ``num_workers`` irrelevant to the result.

A DataLoader with automatic batching calls ``StoreDataset.__getitems__`` with a batch's positions: every
sample is decoded straight into one batch tensor (no per-item tensors, no ``torch.stack``), equal bit for
bit to stacking the per-item ``__getitem__`` results; ``make_loader``'s ``collate_batch`` passes that batch
through unchanged.

Two ways to apply normalization and augmentation, with identical results:

- on the CPU in the workers (default): items carry ``view_a``/``view_b`` (or ``image``);
- batched, after the DataLoader, on the GPU when there is one (``defer_augment=True``): items carry the
  raw patches and the drawn parameters (``raw_a``, ``aug_a``, ``drop_a``, ...), the workers only read
  and collate uint16, and ``GpuAugment`` turns a batch into ``view_a``/``view_b`` on the device::

      dataset = StoreDataset(store, crop_size=224, defer_augment=True, channel_dropout=0.1)
      sampler = BlockShuffleSampler(dataset, seed=0, buffer_blocks=4)
      loader = make_loader(dataset, batch_size=256, sampler=sampler, num_workers=8)
      augment = GpuAugment(dataset, device="cuda")
      for batch in loader:
          batch = augment(batch)  # view_a, view_b: (B, C, 224, 224) float32 on cuda
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal

import fsspec
import numcodecs.blosc
import numpy as np
import torch
import zarr
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, default_collate, get_worker_info
from zarr.storage import FsspecStore, LocalStore

from softcon.compat.torch_internals import storage_use_count
from softcon.compat.zarr_internals import chunk_key, sharding_layout
from softcon.models.range_reads import range_reads
from softcon.models.remote_shards import EMPTY_CHUNK, RemoteShards, check_shard_index, shared_shard_dir
from softcon.models.training_store import open_store

Sensor = Literal["s2", "s1"]
SSL4EO_CROP_SIZE = 224
"""Random crop at training time of SSL4EO-S12 / SoftCon (from 264 px patches)."""
N_AUG = 5
"""Per-view augmentation parameters: top, left, flip along width, flip along height, quarter turns."""


class SampleReader:
    """Reads one sample of a store image array: one byte-range read and one decode, nothing else.

    For the store's layout (Zarr v3 shards along the sample axis, inner chunks of one sample, Blosc or no
    compression, index at the end with a CRC32C) on a local disk, the shard index is read once per shard
    (kept in ``indexes``, 16 bytes per sample) and each sample is one ``pread`` of its compressed bytes,
    decoded straight into its own array. Reading a whole shard through zarr instead costs a fresh
    ``shard``-sized array per read (page faults: it is above malloc's mmap threshold), a copy of every
    decoded inner chunk, zarr's thread hand-offs and, with DataLoader workers, one decode of every shard per
    worker; measured in ``bench/bench_loader.py``. On object storage (an fsspec URL: ``s3://``, ``gs://``...)
    the same layout is read through ``RemoteShards`` (``remote``): per shard one ranged GET of the index and
    one of the chunks the dataset can ask for (``wanted``: sorted store sample indices, None for all), held in
    memory for ``index_cache`` shards and decoded with the same code. Any other layout or store falls back to
    ``array[sample]``.
    """

    def __init__(self, array: zarr.Array, index_cache: int, wanted: np.ndarray | None = None) -> None:
        self.array = array
        self.sample_shape: tuple[int, ...] = tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.index_cache = index_cache
        self.indexes: OrderedDict[int, np.ndarray | None] = OrderedDict()  # shard -> (n, 2) offsets, sizes
        self._lock = threading.Lock()  # the index cache is shared by a dataset's decode threads
        self.root: Path | None = None
        self.remote: RemoteShards | None = None
        self.blosc = False
        layout = sharding_layout(array)
        shards = array.shards
        store = array.store
        if not (isinstance(store, LocalStore | FsspecStore) and sys.byteorder == "little" and layout and shards):
            return
        if (
            layout.chunk_shape != (1, *self.sample_shape)
            or not layout.index_at_end
            or layout.index_codecs != ("bytes", "crc32c")
            or layout.codecs not in (("bytes",), ("bytes", "blosc"))
            or layout.endian not in (None, "little")
        ):
            return
        self.blosc = layout.codecs == ("bytes", "blosc")
        self.per_shard = int(shards[0])
        if isinstance(store, LocalStore):
            self.root = Path(store.root)
            return
        fs, root = fsspec.core.url_to_fs(store.fs.unstrip_protocol(store.path))
        self.remote = RemoteShards(range_reads(fs), partial(self._shard_path, root.rstrip("/")), self.per_shard, wanted)

    @property
    def fast(self) -> bool:
        """Whether samples are read as byte ranges of their shard (local or remote), not through zarr."""
        return self.root is not None or self.remote is not None

    def _shard_path(self, root: str, shard: int) -> str:
        return f"{root}/{self.array.path}/{chunk_key(self.array, (shard,) + (0,) * len(self.sample_shape))}"

    def prefetch(self, samples: Iterable[int]) -> None:
        """Start fetching the shards of ``samples`` from object storage (nothing for a local store)."""
        if self.remote is not None:
            self.remote.capacity = self.index_cache
            self.remote.prefetch(sorted({sample // self.per_shard for sample in samples}))

    def hand_out(self, samples: Iterable[int], batch: int, keep: int) -> None:
        """The main process of a loader with workers hands out batch number ``batch``, which reads ``samples``:
        see ``RemoteShards.hand_out`` (nothing for a local store)."""
        if self.remote is not None:
            self.remote.hand_out(sorted({sample // self.per_shard for sample in samples}), batch, keep)

    def _index(self, shard: int) -> np.ndarray | None:
        """(per_shard, 2) uint64 offsets and sizes of a shard's samples, None for a shard not written."""
        with self._lock:
            if shard in self.indexes:
                self.indexes.move_to_end(shard)
                return self.indexes[shard]
        assert self.root is not None
        key = chunk_key(self.array, (shard,) + (0,) * len(self.sample_shape))
        path = self.root / self.array.path / key
        try:
            with open(path, "rb") as file:
                size = 16 * self.per_shard + 4
                file.seek(-size, 2)
                raw = file.read(size)
        except FileNotFoundError:
            index = None
        else:
            index = check_shard_index(raw, self.per_shard, str(path))
        with self._lock:
            self.indexes[shard] = index
            while len(self.indexes) > self.index_cache:
                self.indexes.popitem(last=False)
        return index

    def read(self, sample: int) -> np.ndarray:
        """Raw (C, H, W) values of store sample ``sample`` in a new array."""
        if not self.fast:
            return np.asarray(self.array[sample])
        return self.read_into(sample, np.empty(self.sample_shape, self.dtype))

    def read_into(self, sample: int, out: np.ndarray) -> np.ndarray:
        """Decode store sample ``sample`` straight into ``out``: a C-contiguous (C, H, W) array of the store's
        dtype, e.g. one slot of a batch (no intermediate array, no copy)."""
        if out.shape != self.sample_shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_into needs a C-contiguous {self.sample_shape} {self.dtype} array")
        if not self.fast:
            out[...] = self.array[sample]
            return out
        shard, position = divmod(sample, self.per_shard)
        data = self._chunk(shard, position)
        if data is None:
            out.fill(self.array.fill_value)
        elif self.blosc:
            numcodecs.blosc.decompress(data, out)
        else:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
        return out

    def _chunk(self, shard: int, position: int) -> bytes | memoryview | None:
        """The compressed bytes of one inner chunk, None when it was never written (fill value)."""
        if self.remote is not None:
            self.remote.capacity = self.index_cache
            fetched = self.remote.get(shard)
            if fetched.index is None or fetched.index[position, 0] == EMPTY_CHUNK:
                return None
            data = fetched.chunks.get(position)
            if data is None:  # a sample outside ``wanted``
                offset, size = (int(v) for v in fetched.index[position])
                return self.remote.read_range(shard, offset, offset + size)
            return data
        index = self._index(shard)
        if index is None or index[position, 0] == EMPTY_CHUNK:
            return None
        offset, size = (int(v) for v in index[position])
        assert self.root is not None
        key = chunk_key(self.array, (shard,) + (0,) * len(self.sample_shape))
        with open(self.root / self.array.path / key, "rb") as file:
            file.seek(offset)
            return file.read(size)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a training store's group."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{node.path} in the training store is a group, not an array")
    return node


def _read(group: zarr.Group, name: str) -> np.ndarray:
    """All the values of a training store's array (a table: split, labels...) as a numpy array."""
    return np.asarray(_array(group, name)[:])


def split_code(group: zarr.Group, split: str) -> int:
    """The integer code of a split name ("train", "val", "test") in this store."""
    attrs: dict[str, Any] = dict(group.attrs)
    names = list(attrs.get("split_names", ["train", "val", "test"]))
    if split not in names:
        raise ValueError(f"split {split!r} is not one of the store's splits {names}")
    return names.index(split)


def draw_view_params(
    rng: np.random.Generator,
    channels: int,
    height: int,
    width: int,
    *,
    crop_size: int | None,
    augment: bool,
    channel_dropout: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The random choices of one view: (N_AUG,) int64 [top, left, flip_w, flip_h, turns] and (C,) dropped.

    Always draws the same numbers from ``rng`` whatever the options, so that switching an augmentation
    on or off does not shift the choices of the other ones. At least one channel is always kept.
    """
    size_h, size_w = (height, width) if crop_size is None else (crop_size, crop_size)
    top, left = int(rng.integers(0, height - size_h + 1)), int(rng.integers(0, width - size_w + 1))
    flip_w, flip_h = rng.random() < 0.5, rng.random() < 0.5
    turns = int(rng.integers(0, 4))
    dropped = rng.random(channels) < channel_dropout
    if not augment:
        top, left = (height - size_h) // 2, (width - size_w) // 2
        flip_w = flip_h = False
        turns = 0
        dropped[:] = False
    if size_h != size_w:  # a quarter turn of a non-square view would change its shape
        turns = 2 * (turns % 2)
    if dropped.all():
        dropped[int(rng.integers(0, channels))] = False
    return np.array([top, left, flip_w, flip_h, turns], dtype=np.int64), dropped


def apply_view_params(x: torch.Tensor, params: torch.Tensor, crop_size: int | None) -> torch.Tensor:
    """Crop, flips and quarter turns of one (C, H, W) view; the reference for ``GpuAugment``."""
    top, left, flip_w, flip_h, turns = (int(v) for v in params)
    if crop_size is not None:
        x = x[:, top : top + crop_size, left : left + crop_size]
    if flip_w:
        x = x.flip(2)
    if flip_h:
        x = x.flip(1)
    if turns:
        x = torch.rot90(x, turns, dims=(1, 2))
    return x.contiguous()


class StoreDataset(Dataset):
    """Samples of one split of a training store as normalised float tensors.

    Each item is a dict:
        two_views=True:  "view_a", "view_b" (C, H', W') float32 — two dates of the scene's location when
                         it has at least two samples in the split, else the same patch twice (the views
                         still differ by their augmentations)
        two_views=False: "image" (C, H', W') float32
        always:          "labels" (K,) float32 multi-hot, "fractions" (K,) float32, "labelled" bool,
                         "index" int64 (sample index in the store), "other" int64 (store index of view b)
        masks=True:      "mask" (H', W') int64 class indices (255: no class), cropped, flipped and turned
                         exactly as "image"
        defer_augment:   instead of the views, "raw_a"/"raw_b" (or "raw") (C, H, W) in the store's dtype
                         (uint16 S2, float32 S1), "aug_a"/"aug_b" (N_AUG,) int64 and "drop_a"/"drop_b"
                         (C,) bool; ``GpuAugment`` makes the views from them

    Normalisation is (x - mean) / std per band with the store's statistics (or ``norm_stats``); nodata
    (S2 value 0, S1 NaN) becomes 0 after normalisation, i.e. the band mean, and so do dropped channels.

    Args:
        store: path or URL of the training store.
        split: "train", "val" or "test".
        sensor: "s2" or "s1".
        two_views: return two views per item (training) or one (feature extraction).
        crop_size: random crop side (centre crop when ``augment`` is False); None keeps the patch.
            SSL4EO-S12 crops ``SSL4EO_CROP_SIZE`` (224) px from 264 px patches.
        seed: base seed of every random choice.
        augment: random crop position, flips, 90° rotations and channel dropout; False for evaluation.
        norm_stats: {"mean": [...], "std": [...]} overriding the store's (e.g. a checkpoint's).
        cache_blocks: how many shard indexes to keep (16 bytes per sample each); ``make_loader`` raises it
            to the sampler's ``buffer_blocks``.
        channel_dropout: probability that a channel of a view is set to its mean (0 after normalisation).
        defer_augment: leave normalisation and augmentation to ``GpuAugment`` after the DataLoader.
        decode_threads: threads that decode (and normalise) the samples of a batch in ``__getitems__``. The
            decode and the lookups release the GIL, and the batch stays in this process's memory: with
            ``num_workers=0`` this uses several cores without the DataLoader workers' shared-memory batches.
        masks: also yield each sample's per-pixel class mask (a store written with preprocess ``masks``); one
            view per item (``two_views=False``), augmented on the CPU (not with ``defer_augment``).
    """

    def __init__(
        self,
        store: str | Path,
        split: str = "train",
        sensor: Sensor = "s2",
        two_views: bool = True,
        crop_size: int | None = None,
        seed: int = 0,
        *,
        augment: bool = True,
        norm_stats: dict[str, Any] | None = None,
        cache_blocks: int = 8,
        channel_dropout: float = 0.0,
        defer_augment: bool = False,
        decode_threads: int = 1,
        masks: bool = False,
    ) -> None:
        if sensor not in ("s2", "s1"):
            raise ValueError(f"sensor {sensor!r} is not one of ('s2', 's1')")
        if not 0 <= channel_dropout < 1:
            raise ValueError(f"channel_dropout {channel_dropout} must be in [0, 1)")
        if cache_blocks < 1:
            raise ValueError(f"cache_blocks {cache_blocks} must be at least 1")
        if decode_threads < 1:
            raise ValueError(f"decode_threads {decode_threads} must be at least 1")
        if masks and (two_views or defer_augment):
            raise ValueError("masks go with one view augmented in the loader: two_views=False, defer_augment=False")
        self.store = str(store)
        group = open_store(store)
        if sensor not in group:
            raise ValueError(f"training store {store} has no {sensor!r} array")
        if masks and "masks" not in group:
            raise ValueError(
                f"training store {store} has no per-pixel masks; write it with `softcon preprocess --masks` (a new "
                "--out, or the same one: the store is rebuilt)"
            )
        self.masks = masks
        self.sensor = sensor
        self.split = split
        self.two_views = two_views
        self.crop_size = crop_size
        self.seed = seed
        self.augment = augment
        self.channel_dropout = channel_dropout
        self.defer_augment = defer_augment
        self.decode_threads = decode_threads
        self.epoch = 0
        self.cache_blocks = cache_blocks
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.channel_names: list[str] = list(self.attrs.get("bands" if sensor == "s2" else "pols", []))
        self.class_names: list[str] = list(self.attrs.get("class_names", []))

        image = _array(group, sensor)
        channels, height, width = image.shape[1:]
        self.image_shape: tuple[int, int, int] = (channels, height, width)  # (C, H, W)
        # A block is what one read decodes: a shard when the array is sharded, else a chunk.
        self.block_size = int((image.shards or image.chunks)[0])
        if crop_size is not None and crop_size > min(self.image_shape[1:]):
            raise ValueError(f"crop_size {crop_size} is larger than the patches {self.image_shape[1:]}")

        stats = norm_stats or self.attrs.get("norm_stats", {}).get(sensor)
        if stats is None:
            raise ValueError(f"training store {store} has no norm_stats for {sensor!r}")
        self.mean = torch.tensor(stats["mean"], dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(stats["std"], dtype=torch.float32).clamp_min(1e-6).view(-1, 1, 1)  # (C, 1, 1)
        if self.mean.shape[0] != self.image_shape[0]:
            raise ValueError(
                f"norm_stats have {self.mean.shape[0]} bands, the {sensor} array has {self.image_shape[0]}"
            )

        code = split_code(group, split)
        self.indices = np.flatnonzero(_read(group, "split") == code)  # (N,) store sample indices, sorted
        self.labels = torch.from_numpy(_read(group, "labels").astype(np.float32))  # (S, K)
        self.fractions = torch.from_numpy(_read(group, "fractions").astype(np.float32))  # (S, K)
        self.labelled = torch.from_numpy(_read(group, "labelled").astype(bool))  # (S,)
        locations = _read(group, "location")[self.indices]  # (N,)
        # Samples of one location in this split (its dates) as a run of ``_by_location``: numpy arrays,
        # a few bytes per sample, instead of Python dicts.
        self._by_location = self.indices[np.argsort(locations, kind="stable")]  # (N,) store indices
        sorted_locations = np.sort(locations, kind="stable")
        position = np.searchsorted(sorted_locations, locations)  # (N,) run start of each sample's location
        self._run_start = position
        self._run_stop = np.searchsorted(sorted_locations, locations, side="right")
        self._reader: SampleReader | None = None
        self._mask_reader: SampleReader | None = None
        self._local: threading.local | None = None  # per thread: the (C, H, W) decode buffer of the batch path
        self._pool: ThreadPoolExecutor | None = None  # the decode threads
        self._table: np.ndarray | None = None  # (C, 65536) normalised values of uint16 (or uint8) inputs
        self._batches = BatchPool()  # batch tensors of the main-process path, handed out again once free
        self._process = os.getpid()  # the process the readers and threads above belong to
        self.shared_shards: tuple[str, int] | None = None
        """(directory, pid of the loader's main process) while ``make_loader`` shares fetched shards with workers."""

    @property
    def in_chans(self) -> int:
        return self.image_shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Change the random choices of every item (call once per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the store and start with an empty cache
        state = self.__dict__.copy()
        state["_reader"] = state["_mask_reader"] = state["_local"] = state["_pool"] = state["_table"] = None
        state["_process"] = None
        return state

    def _own_process(self) -> None:
        """Drop the readers and threads of another process: a forked worker inherits the dataset unpickled, with
        thread pools whose threads (and fetches in flight) stayed behind in its parent."""
        if self._process != os.getpid():
            self._reader = self._mask_reader = self._local = self._pool = self._table = None
            self._batches = BatchPool()
            self._process = os.getpid()

    @property
    def reader(self) -> SampleReader:
        """This process's reader of the image array (opened on first use, so again in each worker)."""
        self._own_process()
        if self._reader is None:
            self._reader = self._open_reader(self.sensor)
        self._reader.index_cache = self.cache_blocks  # make_loader may have raised it
        return self._reader

    @property
    def mask_reader(self) -> SampleReader:
        """This process's reader of the ``masks`` array (opened on first use)."""
        self._own_process()
        if self._mask_reader is None:
            self._mask_reader = self._open_reader("masks")
        self._mask_reader.index_cache = self.cache_blocks
        return self._mask_reader

    def _open_reader(self, name: str) -> SampleReader:
        array = _array(zarr.open_group(self.store, mode="r"), name)
        reader = SampleReader(array, index_cache=self.cache_blocks, wanted=self.indices)
        if reader.remote is not None and self.shared_shards is not None and self.shared_shards[1] != os.getpid():
            reader.remote.shared = Path(self.shared_shards[0]) / array.path  # a worker: the main process fetches
        return reader

    def _readers(self) -> list[SampleReader]:
        return [self.reader, self.mask_reader] if self.masks else [self.reader]

    def share_shards(self, directory: Path | None) -> None:
        """Have the workers of the next loader read the shards this process fetches from files in ``directory``
        (None: each process fetches its own)."""
        self.shared_shards = (str(directory), os.getpid()) if directory is not None else None
        for reader in self._readers():
            if reader.remote is not None:
                reader.remote.start_publishing(None)

    def publish_shards(self, on: bool) -> None:
        """Start (or stop) writing the shards this process fetches to the ``share_shards`` directory."""
        if self.shared_shards is None:
            return
        for reader in self._readers():
            if reader.remote is not None:
                reader.remote.start_publishing(Path(self.shared_shards[0]) / reader.array.path if on else None)

    def view_size(self) -> tuple[int, int]:
        """(H', W') of a view: the crop, or the whole patch."""
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        return self.image_shape[1], self.image_shape[2]

    def read_mask(self, sample: int, params: np.ndarray) -> np.ndarray:
        """(H', W') int64 class mask of store sample ``sample`` under a view's ``params`` (crop, flips, turns)."""
        mask = self.mask_reader.read(sample)[None]  # (1, H, W) uint8
        return self._oriented(mask, params, *self.view_size())[0].astype(np.int64)

    @property
    def _blocks(self) -> OrderedDict[int, np.ndarray | None]:
        """The cached shard indexes (a few bytes per sample; no decoded blocks are kept)."""
        return self.reader.indexes

    def prefetch(self, positions: Iterable[int]) -> None:
        """Start fetching what the samples at dataset ``positions`` need from object storage (their shards, and
        for two views those of their locations' first and last dates), so that it arrives while earlier batches
        decode; nothing for a local store."""
        samples = self.indices[np.asarray(list(positions), dtype=np.int64)]
        self.reader.prefetch(self._reads(samples))
        if self.masks:
            self.mask_reader.prefetch(samples.tolist())

    def hand_out(self, positions: Iterable[int], batch: int, keep: int) -> None:
        """The loader's main process hands batch number ``batch`` (``positions``) to a worker: wait until what it
        reads is fetched and shared, and delete what no batch since ``batch - keep`` reads."""
        samples = self.indices[np.asarray(list(positions), dtype=np.int64)]
        self.reader.hand_out(self._reads(samples), batch, keep)
        if self.masks:
            self.mask_reader.hand_out(samples.tolist(), batch, keep)

    def _reads(self, samples: np.ndarray) -> list[int]:
        """Store samples whose shards a batch of ``samples`` reads: themselves and, for view b, another date of
        the same location (a location's dates are consecutive in the store: its first and last cover them)."""
        if not self.two_views:
            return samples.tolist()
        i = np.searchsorted(self.indices, samples)
        first, last = self._by_location[self._run_start[i]], self._by_location[self._run_stop[i] - 1]
        return np.concatenate([samples, first, last]).tolist()

    def read_sample(self, sample: int) -> np.ndarray:
        """Raw (C, H, W) values of one store sample: one byte-range read of its shard, one decode."""
        return self.reader.read(sample)

    def normalise(self, raw: np.ndarray) -> torch.Tensor:
        """(C, H, W) raw values -> normalised float32, nodata -> 0."""
        x = torch.from_numpy(raw.astype(np.float32))  # (C, H, W), a new array: the in-place ops are safe
        nodata = ~torch.isfinite(x) if self.sensor == "s1" else x == 0  # S1: NaN and inf
        x.sub_(self.mean).div_(self.std)  # in place: the same values as (x - mean) / std, no temporaries
        return x.masked_fill_(nodata, 0.0)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The augmentation parameters and dropped channels of one view."""
        C, H, W = self.image_shape
        return draw_view_params(
            rng, C, H, W, crop_size=self.crop_size, augment=self.augment, channel_dropout=self.channel_dropout
        )

    def transform(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Crop, flips, 90° rotations and channel dropout of one normalised (C, H, W) view."""
        params, dropped = self.draw(rng)
        x = apply_view_params(x, torch.from_numpy(params), self.crop_size)
        if dropped.any():
            x[torch.from_numpy(dropped)] = 0.0
        return x

    def other_date(self, sample: int, rng: np.random.Generator) -> int:
        """Another sample (date) of the same location in this split, or ``sample`` when it has none."""
        i = int(np.searchsorted(self.indices, sample))
        dates = self._by_location[self._run_start[i] : self._run_stop[i]]
        others = dates[dates != sample]
        return int(rng.choice(others)) if len(others) else sample

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = int(self.indices[i])
        rng = np.random.default_rng([self.seed, self.epoch, sample])
        item: dict[str, torch.Tensor] = {
            "labels": self.labels[sample],
            "fractions": self.fractions[sample],
            "labelled": self.labelled[sample],
            "index": torch.tensor(sample, dtype=torch.int64),
        }
        views = ("a", "b") if self.two_views else ("",)
        # The draw order (view a, then the second date, then view b) is fixed: it is the reproducibility
        # contract shared by both augmentation paths.
        others = {"a": sample, "": sample}
        for view in views:
            if view == "b":
                others["b"] = self.other_date(sample, rng)
            params, dropped = self.draw(rng)
            if self.masks:
                item["mask"] = torch.from_numpy(self.read_mask(sample, params))
            raw = self.read_sample(others[view])
            suffix = f"_{view}" if view else ""
            if self.defer_augment:
                item[f"raw{suffix}"] = torch.from_numpy(raw)  # (C, H, W) store dtype, a fresh array per read
                item[f"aug{suffix}"] = torch.from_numpy(params)
                item[f"drop{suffix}"] = torch.from_numpy(dropped)
            else:
                if self.crop_size is not None:  # crop before converting to float: less to convert
                    top, left, size = int(params[0]), int(params[1]), self.crop_size
                    raw = raw[:, top : top + size, left : left + size]
                    params = np.concatenate([[0, 0], params[2:]])
                x = apply_view_params(self.normalise(raw), torch.from_numpy(params), self.crop_size)
                if dropped.any():
                    x[torch.from_numpy(dropped)] = 0.0
                item["image" if not view else f"view_{view}"] = x
        item["other"] = torch.tensor(others.get("b", sample), dtype=torch.int64)
        return item

    def __getitems__(self, positions: list[int]) -> _Batch:
        """A whole batch at once (``DataLoader`` calls this with a batch's dataset positions).

        Equal to stacking ``self[i]`` for ``i`` in ``positions`` (same draws, same values, bit for bit), but
        every sample is decoded straight into one (B, C, H, W) batch array (``defer_augment``) or, cropped,
        flipped and turned as a view of a reused decode buffer, converted and normalised straight into one
        (B, C, H', W') float32 batch: no per-item tensors, no ``torch.stack``. uint16/uint8 stores are
        normalised through a per-band lookup table built with the same float32 operations as
        ``normalise`` (one pass, exactly the same numbers). In a DataLoader worker the batch tensors are
        allocated in shared memory, where they would be copied to anyway. The returned list holds per-item
        views for the default collate; ``collate_batch`` (``make_loader``'s) returns ``.batch`` as it is.
        """
        samples = self.indices[np.asarray(positions, dtype=np.int64)]  # (B,) store indices
        B, (C, H, W) = len(samples), self.image_shape
        views = ("a", "b") if self.two_views else ("",)
        others = {view: samples.copy() for view in views}  # (B,) store index read for each view
        params = {view: np.empty((B, N_AUG), np.int64) for view in views}
        dropped = {view: np.empty((B, C), bool) for view in views}
        for b, sample in enumerate(samples.tolist()):  # the draw order of __getitem__
            rng = np.random.default_rng([self.seed, self.epoch, sample])
            for view in views:
                if view == "b":
                    others["b"][b] = self.other_date(sample, rng)
                params[view][b], dropped[view][b] = self.draw(rng)
        batch: dict[str, torch.Tensor] = {
            "labels": self.labels[torch.from_numpy(samples)],
            "fractions": self.fractions[torch.from_numpy(samples)],
            "labelled": self.labelled[torch.from_numpy(samples)],
            "index": torch.from_numpy(samples.astype(np.int64)),
        }
        reader = self.reader
        reader.prefetch([*samples.tolist(), *(others["b"].tolist() if self.two_views else [])])
        if self.masks:
            self.mask_reader.prefetch(samples.tolist())
        for view in views:
            suffix = f"_{view}" if view else ""
            if self.defer_augment:
                raw = self._new_batch((B, C, H, W), torch.from_numpy(np.empty(0, reader.dtype)).dtype)
                self._each(partial(_read_slot, reader, others[view].tolist(), raw.numpy()), B)
                batch[f"raw{suffix}"] = raw
                batch[f"aug{suffix}"] = torch.from_numpy(params[view])
                batch[f"drop{suffix}"] = torch.from_numpy(dropped[view])
                continue
            size = (self.crop_size, self.crop_size) if self.crop_size is not None else (H, W)
            x = self._new_batch((B, C, *size), torch.float32)
            if reader.dtype in (np.uint8, np.uint16):
                self._lookup_table(reader.dtype)  # built once, before the threads read it
            slot = partial(self._augment_slot, reader, others[view].tolist(), params[view], dropped[view], size, x)
            self._each(slot, B)
            batch["image" if not view else f"view_{view}"] = x
        batch["other"] = torch.from_numpy(others["b" if self.two_views else ""].astype(np.int64))
        if self.masks:
            mask = np.empty((B, *self.view_size()), np.int64)
            self._each(partial(_mask_slot, self, samples.tolist(), params[""], mask), B)
            batch["mask"] = torch.from_numpy(mask)
        return _Batch(batch, B)

    def _augment_slot(
        self, reader: SampleReader, samples: list[int], params: np.ndarray, dropped: np.ndarray,
        size: tuple[int, int], x: torch.Tensor, b: int,
    ) -> None:  # fmt: skip
        """Decode ``samples[b]``, crop, flip and turn it, and normalise it into slot ``b`` of the batch ``x``."""
        raw = self._oriented(reader.read_into(samples[b], self._decode_buffer(reader.dtype)), params[b], *size)
        x_np = x.numpy()
        self._normalise_into(raw, x[b], x_np[b])
        if dropped[b].any():
            x_np[b, dropped[b]] = 0.0

    def _each(self, work: Callable[[int], Any], n: int) -> None:
        """``work(b)`` for b in range(n), on ``decode_threads`` threads when there are several."""
        if self.decode_threads == 1 or n < 2:
            for b in range(n):
                work(b)
            return
        self._own_process()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="softcon-decode")
        for _ in self._pool.map(work, range(n)):  # re-raises the first error
            pass

    def _new_batch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised batch tensor: in a DataLoader worker a new one in shared memory, where the batch
        goes next; in the main process one of ``BatchPool``'s, whose pages are already mapped."""
        if get_worker_info() is None:
            return self._batches.take(shape, dtype)
        numel = int(np.prod(shape))
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)

    def _decode_buffer(self, dtype: np.dtype) -> np.ndarray:
        """This thread's reused (C, H, W) decode buffer (only read through views, never handed out)."""
        if self._local is None:
            self._local = threading.local()
        buffer = getattr(self._local, "decoded", None)
        if buffer is None:
            buffer = self._local.decoded = np.empty(self.image_shape, dtype)
        return buffer

    def _lookup_table(self, dtype: np.dtype) -> np.ndarray:
        """(C, V) normalised value of every uint8/uint16 input value, with ``normalise``'s float32 operations."""
        if self._table is None:
            values = torch.arange(np.iinfo(dtype).max + 1, dtype=torch.float32)  # exact in float32
            table = (values - self.mean.view(-1, 1)) / self.std.view(-1, 1)  # (C, V): normalise's operations
            if self.sensor == "s2":
                table[:, 0] = 0.0  # nodata
            self._table = table.numpy()
        return self._table

    @staticmethod
    def _oriented(raw: np.ndarray, params: np.ndarray, size_h: int, size_w: int) -> np.ndarray:
        """``apply_view_params`` as a numpy view of ``raw`` (no copy): crop, flips, quarter turns."""
        top, left, flip_w, flip_h, turns = (int(v) for v in params)
        raw = raw[:, top : top + size_h, left : left + size_w]
        if flip_w:
            raw = raw[:, :, ::-1]
        if flip_h:
            raw = raw[:, ::-1, :]
        return np.rot90(raw, turns, axes=(1, 2)) if turns else raw

    def _normalise_into(self, raw: np.ndarray, out: torch.Tensor, out_np: np.ndarray) -> None:
        """``normalise(raw)`` written into ``out`` (a float32 (C, H', W') slot of a batch; ``out_np`` its array)."""
        if raw.dtype in (np.uint8, np.uint16):
            from softcon.models.lookup import lookup_into  # here: loaders that only decode never load numba

            lookup_into(raw, self._lookup_table(raw.dtype), out_np)
            return
        np.copyto(out_np, raw, casting="unsafe")
        nodata = ~torch.isfinite(out) if self.sensor == "s1" else out == 0
        out.sub_(self.mean).div_(self.std).masked_fill_(nodata, 0.0)


def _read_slot(reader: SampleReader, samples: list[int], out: np.ndarray, b: int) -> None:
    """Decode ``samples[b]`` into slot ``b`` of the batch array ``out``."""
    reader.read_into(samples[b], out[b])


def _mask_slot(dataset: StoreDataset, samples: list[int], params: np.ndarray, out: np.ndarray, b: int) -> None:
    """The mask of ``samples[b]`` under its view's ``params[b]`` into slot ``b`` of the batch array ``out``."""
    out[b] = dataset.read_mask(samples[b], params[b])


class _Batch(list):
    """What ``StoreDataset.__getitems__`` returns: per-item dicts (views into the batch) for the default
    collate, and the batch itself as ``.batch`` for ``collate_batch``."""

    def __init__(self, batch: dict[str, torch.Tensor], size: int) -> None:
        super().__init__({key: value[b] for key, value in batch.items()} for b in range(size))
        self.batch = batch


def collate_batch(data: list) -> Any:
    """Collate of ``make_loader``: a batch made by ``StoreDataset.__getitems__`` passes unchanged (no copy);
    anything else goes through torch's ``default_collate``."""
    return data.batch if isinstance(data, _Batch) else default_collate(data)


class BatchPool:
    """Batch tensors handed out again once nothing uses them, so that a batch costs no fresh pages.

    A batch of tens to hundreds of MB is above malloc's mmap threshold: each new one is pages the kernel maps
    and zeroes on first touch, which costs about a quarter of decoding into it and, from several decode threads
    at once, serialises on the process's page tables (one core: 681 vs 822 samples/s into fresh vs mapped
    memory; two threads: 1,050 vs 1,797). The pool keeps up to ``size`` tensors per (shape, dtype), as many as
    were in use at once, and hands out a new view of a kept one only when its storage is used by the pool's
    own tensor alone: a batch the consumer still holds (or any view or array made from it) is never written.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._kept: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[BatchPool], tuple[int]]:
        # a copy (a spawned DataLoader worker's dataset) starts empty: the tensors and the lock stay in this process
        return BatchPool, (self.size,)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised (shape, dtype) tensor that nothing else uses."""
        with self._lock:
            kept = self._kept.setdefault((tuple(shape), dtype), [])
            for tensor in kept:
                if _storage_users(tensor) == 1:  # the pool's tensor alone
                    return tensor.view(shape)  # a tensor of its own: it holds the storage while in use
            fresh = torch.empty(shape, dtype=dtype)
            if len(kept) < self.size and _storage_users(fresh) == 1:  # 0: torch cannot tell, so never keep it
                kept.append(fresh)
                return fresh.view(shape)
            return fresh


def _storage_users(tensor: torch.Tensor) -> int:
    """Tensors sharing ``tensor``'s storage (itself included); 0 where torch does not tell, so never reused."""
    return storage_use_count(tensor) or 0


class GpuAugment:
    """Normalisation and augmentation of a deferred batch, batched on ``device`` (the GPU when there is one).

    Takes a batch of ``StoreDataset(..., defer_augment=True)`` items and returns it with ``view_a`` /
    ``view_b`` (or ``image``) (B, C, H', W') float32 on ``device``, equal to what the per-item CPU path
    gives for the same seed; raw keys are removed, the other tensors are moved to ``device``.
    """

    def __init__(self, dataset: StoreDataset, device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sensor = dataset.sensor
        self.crop_size = dataset.crop_size
        self.mean = dataset.mean.to(self.device)[None]  # (1, C, 1, 1)
        self.std = dataset.std.to(self.device)[None]  # (1, C, 1, 1)

    def views(self, raw: torch.Tensor, params: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw -> (B, C, H', W') normalised, cropped, flipped, turned, channels dropped."""
        raw = raw.to(self.device, non_blocking=True)
        unsigned16 = raw.dtype == torch.uint16
        if unsigned16:  # CUDA has no indexing kernels for uint16: index the same bits as int16
            raw = raw.view(torch.int16)
        params = params.to(self.device)  # (B, N_AUG)
        B = raw.shape[0]
        if self.crop_size is not None:  # crop before converting: less to convert
            size = self.crop_size
            steps = torch.arange(size, device=self.device)
            rows = (params[:, 0, None] + steps)[:, :, None]  # (B, S, 1)
            cols = (params[:, 1, None] + steps)[:, None, :]  # (B, 1, S)
            batch = torch.arange(B, device=self.device)[:, None, None]  # (B, 1, 1)
            raw = raw.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, S, S)
        x = (raw.int() & 0xFFFF).float() if unsigned16 else raw.float()  # (B, C, H', W')
        nodata = ~torch.isfinite(x) if self.sensor == "s1" else x == 0  # S1: NaN and inf
        x = ((x - self.mean) / self.std).masked_fill(nodata, 0.0)
        out = torch.empty_like(x) if x.shape[2] == x.shape[3] else x.clone()
        # The 16 (flip_w, flip_h, turns) combinations, each applied to its samples at once.
        combos = params[:, 2] * 8 + params[:, 3] * 4 + params[:, 4]  # (B,)
        for combo in torch.unique(combos).tolist():
            members = torch.nonzero(combos == combo).flatten()
            part = x[members]
            if combo // 8:
                part = part.flip(3)
            if (combo // 4) % 2:
                part = part.flip(2)
            if combo % 4:
                part = torch.rot90(part, combo % 4, dims=(2, 3))
            out[members] = part
        dropped = dropped.to(self.device)  # (B, C)
        return out.masked_fill(dropped[:, :, None, None], 0.0)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if not key.startswith(("raw", "aug", "drop")):
                out[key] = value.to(self.device, non_blocking=True)
        for suffix, name in (("_a", "view_a"), ("_b", "view_b"), ("", "image")):
            if f"raw{suffix}" in batch:
                out[name] = self.views(batch[f"raw{suffix}"], batch[f"aug{suffix}"], batch[f"drop{suffix}"])
        return out


class BlockShuffleSampler(Sampler[int]):
    """Visit blocks (store shards) in random order, shuffling samples within a buffer of blocks.

    A full random permutation would decode a shard per sample; this keeps reads sequential in shards
    while mixing ``buffer_blocks`` shards (and therefore several locations and dates) in every batch.
    """

    def __init__(self, dataset: StoreDataset, *, seed: int = 0, buffer_blocks: int = 4) -> None:
        if buffer_blocks < 1:
            raise ValueError(f"buffer_blocks {buffer_blocks} must be at least 1")
        self.dataset = dataset
        self.seed = seed
        self.buffer_blocks = buffer_blocks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """Dataset positions (0..len-1) in this epoch's order."""
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        blocks = self.dataset.indices // self.dataset.block_size  # (N,)
        unique = np.unique(blocks)
        rng.shuffle(unique)
        positions = []
        for start in range(0, len(unique), self.buffer_blocks):
            buffer = np.flatnonzero(np.isin(blocks, unique[start : start + self.buffer_blocks]))
            positions.append(rng.permutation(buffer))
        return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(self.dataset)


class PrefetchingBatches(Sampler[list[int]]):
    """A batch sampler's batches, each handed to ``dataset.prefetch`` ``ahead`` samples before it is loaded.

    For a store on object storage: the shards of the next buffer are on their way while the current one decodes.
    With DataLoader workers (``share``: the directory ``make_loader`` made) this process is the only one that
    fetches: every shard it fetches is written there for the workers, a batch goes to a worker only once its
    shards are written, and a shard's file is deleted once ``keep`` later batches went out (the DataLoader has
    at most ``num_workers * prefetch_factor`` batches in flight, so the worker that read it is done). The
    directory goes with this object. The batches themselves are ``batches``' own, unchanged.
    """

    def __init__(
        self, batches: Sampler[list[int]], dataset: StoreDataset, ahead: int, *, share: Path | None = None,
        keep: int = 0,
    ) -> None:  # fmt: skip
        self.batches = batches
        self.sampler = getattr(batches, "sampler", None)
        self.dataset = dataset
        self.ahead = ahead
        self.share = share
        self.keep = keep
        if share is not None:
            weakref.finalize(self, _remove_share, share, os.getpid())

    def __iter__(self) -> Iterator[list[int]]:
        if self.share is not None:
            self.dataset.publish_shards(True)
        handed = 0
        try:
            queue: deque[list[int]] = deque()
            queued = 0  # samples in the queue
            for batch in self.batches:
                self.dataset.prefetch(batch)
                queue.append(batch)
                queued += len(batch)
                while queued - len(queue[0]) >= self.ahead:  # the batches behind the first cover the look-ahead
                    queued -= len(queue[0])
                    yield self._handed_out(queue.popleft(), handed)
                    handed += 1
            for batch in queue:
                yield self._handed_out(batch, handed)
                handed += 1
        finally:
            if self.share is not None:
                self.dataset.publish_shards(False)

    def _handed_out(self, batch: list[int], number: int) -> list[int]:
        if self.share is not None:
            self.dataset.hand_out(batch, number, self.keep)
        return batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _remove_share(share: Path, owner: int) -> None:
    """Remove a loader's shared-shard directory, in its own process only (not in a forked child that exits)."""
    if os.getpid() == owner:
        shutil.rmtree(share, ignore_errors=True)


def _one_thread_per_worker(worker_id: int) -> None:
    # Each worker decodes its own batches; intra-op threads in every worker would oversubscribe the cores.
    # torch's worker loop sets one thread too (torch 2.x); said here so the loader does not rely on it.
    torch.set_num_threads(1)


def make_loader(
    dataset: StoreDataset,
    batch_size: int | None = None,
    *,
    sampler: BlockShuffleSampler | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool = True,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler``'s block-shuffled order, batched before the workers.

    Batches are formed in the main process from the sampler's order, so the batches (and, items being
    seeded per sample, their contents) are the same for any ``num_workers``. A worker loads a whole batch
    with ``StoreDataset.__getitems__`` (each sample decoded once, straight into the batch, allocated in
    shared memory) and ``collate_batch`` hands it on without a copy; the dataset's shard-index cache is
    raised to the sampler's buffer. Peak memory is the batches in flight (``num_workers * prefetch_factor``),
    whatever the store's size. Training (``tasks.train``) loads through this function, with ``batch_sampler``.

    Args:
        dataset: the store dataset (``defer_augment=True`` to augment batches on the GPU afterwards).
        batch_size: samples per batch, cut from ``sampler``'s order; not with ``batch_sampler``.
        sampler: the order; default ``BlockShuffleSampler(dataset, seed=dataset.seed)``.
        batch_sampler: the batches themselves (lists of dataset positions) instead of ``batch_size``,
            ``sampler`` and ``drop_last``: e.g. ``models.distributed.ShardedBatchSampler``, one rank's share of
            an epoch's global batches from a resumed position. When its ``sampler`` attribute is a
            ``BlockShuffleSampler``, the cache is raised to that sampler's buffer.
        num_workers: worker processes reading and decoding (0: in the main process), forked or spawned (the dataset
            pickles without its readers, caches and batch pool). On object storage the main process fetches
            the shards one buffer ahead (``PrefetchingBatches``); with workers it fetches each shard once for all
            of them and shares it through a temporary directory (``/dev/shm`` when it has room, else ``TMPDIR``;
            a few buffers of shards at a time, removed with the loader), see ``models/remote_shards.py``.
        pin_memory: page-locked batches for fast, asynchronous host-to-GPU copies; default when CUDA is
            available.
        drop_last: drop the last incomplete batch.
        prefetch_factor: batches each worker loads ahead.

    Raises:
        ValueError: both or neither of ``batch_size`` and ``batch_sampler``, or ``sampler`` with
            ``batch_sampler``.
    """
    if (batch_size is None) == (batch_sampler is None):
        raise ValueError(
            f"make_loader needs one of batch_size and batch_sampler, got batch_size={batch_size!r} and "
            f"batch_sampler={batch_sampler!r}"
        )
    if batch_sampler is None:
        sampler = sampler if sampler is not None else BlockShuffleSampler(dataset, seed=dataset.seed)
        assert batch_size is not None  # one of the two, checked above
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    elif sampler is not None:
        raise ValueError("make_loader takes sampler or batch_sampler, not both (batch_sampler holds its own order)")
    order = getattr(batch_sampler, "sampler", None)  # BatchSampler and ShardedBatchSampler keep the order they cut
    buffer_blocks = order.buffer_blocks if isinstance(order, BlockShuffleSampler) else 1
    dataset.cache_blocks = max(dataset.cache_blocks, buffer_blocks)
    dataset.share_shards(None)
    ahead = buffer_blocks * dataset.block_size
    if num_workers == 0 and dataset.reader.remote is not None:
        # Object storage: the next buffer's shards are fetched while this one decodes, so twice the buffer is held
        # (and a shard each side for other dates across a shard's edge).
        dataset.cache_blocks = max(dataset.cache_blocks, 2 * buffer_blocks + 2)
        batch_sampler = PrefetchingBatches(batch_sampler, dataset, ahead)
    elif dataset.reader.remote is not None:
        share = shared_shard_dir()
        dataset.share_shards(share)  # before the DataLoader forks or pickles the dataset for its workers
        keep = num_workers * prefetch_factor + 1
        batch_sampler = PrefetchingBatches(batch_sampler, dataset, ahead, share=share, keep=keep)
    workers: dict[str, Any] = (
        {"prefetch_factor": prefetch_factor, "worker_init_fn": _one_thread_per_worker} if num_workers else {}
    )
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_batch,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **workers,
    )
