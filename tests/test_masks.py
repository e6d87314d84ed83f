"""Per-pixel label masks: preprocess writes the land cover of each patch as class indices, a store without them is
not reused when they are asked for, check-store accepts them, and the loader crops, flips and turns a mask exactly
as it does the image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from cube_factory import CLASS_CODES, SyntheticCube, write_cube
from distributed import Client
from store_factory import write_store

from softcon.config import PreprocessConfig
from softcon.models import training_store
from softcon.models.data import StoreDataset, apply_view_params, make_loader
from softcon.tasks.check_store import check_store
from softcon.tasks.preprocess import read_cube_index, run_preprocess, store_fingerprint

PATCH = 16
SAMPLES_PER_BLOCK = 8


@pytest.fixture(scope="module")
def client() -> Client:
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as dask:
        yield dask


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCube:
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


def _config(cube: SyntheticCube, out: Path, **changes: object) -> PreprocessConfig:
    values = dict(cube=cube.path, out=str(out), patch_size=PATCH, split_block=32, val_fraction=0.2, test_fraction=0.2,
                  max_nodata_fraction=0.5, samples_per_block=SAMPLES_PER_BLOCK)  # fmt: skip
    return PreprocessConfig(**(values | changes))


@pytest.fixture(scope="module")
def masked_store(cube: SyntheticCube, client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    config = _config(cube, tmp_path_factory.mktemp("store") / "store.zarr", masks=True)
    run_preprocess(config, client=client)
    return config.out


def test_masks_are_the_landcover_windows_as_class_indices(masked_store: str, cube: SyntheticCube) -> None:
    store = zarr.open_group(masked_store, mode="r")
    masks = store["masks"]
    n = store["s2"].shape[0]
    assert masks.shape == (n, PATCH, PATCH) and masks.dtype == np.uint8
    assert masks.shards == (SAMPLES_PER_BLOCK, PATCH, PATCH) and masks.chunks == (1, PATCH, PATCH)
    table = {code: index for index, code in enumerate(CLASS_CODES)} | {0: training_store.MASK_NODATA}
    tile, row, col = store["tile"][:], store["row"][:], store["col"][:]
    for sample in range(n):
        landcover = xr.open_zarr(cube.path, group=f"tiles/{cube.tile_ids[tile[sample]]}", consolidated=False)[
            "landcover"
        ].values
        window = landcover[row[sample] : row[sample] + PATCH, col[sample] : col[sample] + PATCH]
        np.testing.assert_array_equal(masks[sample], np.vectorize(table.get)(window))
    values = set(np.unique(masks[:]).tolist())
    assert values == {0, 1, 2, 3, training_store.MASK_NODATA}  # the four stripes and the nodata corner
    assert check_store(masked_store).ok, check_store(masked_store).problems


def test_check_store_names_a_mask_value_that_is_no_class(masked_store: str, tmp_path: Path) -> None:
    copy = tmp_path / "store.zarr"
    shutil.copytree(masked_store, copy)
    zarr.open_group(str(copy), mode="r+")["masks"][0, 0, 0] = 7
    problems = [p.what for p in check_store(str(copy)).problems if p.path == "masks"]
    assert "values [7] are neither a class index (< 4) nor 255 (no class)" in problems


def test_a_store_without_masks_is_not_reused_when_masks_are_asked_for(
    cube: SyntheticCube, client: Client, tmp_path: Path
) -> None:
    plain = _config(cube, tmp_path / "store.zarr")
    run_preprocess(plain, client=client)
    assert "masks" not in zarr.open_group(plain.out, mode="r")
    masked = plain.model_copy(update={"masks": True})
    index = read_cube_index(cube.path)
    assert store_fingerprint(masked, index, SAMPLES_PER_BLOCK) != store_fingerprint(plain, index, SAMPLES_PER_BLOCK)
    report = run_preprocess(masked, client=client)
    assert not report.reused and "masks" in zarr.open_group(plain.out, mode="r")
    assert run_preprocess(masked, client=client).reused  # the same option again: reused


def _identity_store(path: Path, n_samples: int = 12, size: int = 10) -> np.ndarray:
    """A store whose band 0 is 1 + the mask and whose statistics are mean 0, std 1: the normalised band 0 of any
    view, minus 1, is the mask of that view."""
    plan = training_store.SamplePlan(
        location=np.arange(n_samples, dtype=np.int64), tile=np.zeros(n_samples, np.int32),
        time=np.full(n_samples, np.datetime64("2024-06-01", "ns")), row=np.zeros(n_samples, np.int32),
        col=np.zeros(n_samples, np.int32), split=np.zeros(n_samples, np.uint8),
        labels=np.zeros((n_samples, 4), np.uint8), fractions=np.zeros((n_samples, 4), np.float32),
        labelled=np.ones(n_samples, bool),
    )  # fmt: skip
    stats = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    attrs = {"bands": ["B02", "B03"], "pols": ["VV"], "norm_stats": {"s2": stats, "s1": stats},
             "class_names": ["a", "b", "c", "d"]}  # fmt: skip
    training_store.create_store(
        str(path), plan, n_bands=2, n_pols=1, patch_size=size, samples_per_block=4, attrs=attrs, masks=True
    )
    rng = np.random.default_rng(0)
    masks = rng.choice(np.array([0, 1, 2, 3, 255], np.uint8), size=(n_samples, size, size))
    s2 = np.stack([masks.astype(np.uint16) + 1, rng.integers(1, 100, masks.shape).astype(np.uint16)], axis=1)
    training_store.write_images(str(path), 0, s2, np.zeros((n_samples, 1, size, size), np.float32))
    training_store.write_masks(str(path), 0, masks)
    return masks


def test_the_loader_crops_flips_and_turns_mask_and_image_alike(tmp_path: Path) -> None:
    masks = _identity_store(tmp_path / "store.zarr")
    dataset = StoreDataset(tmp_path / "store.zarr", two_views=False, crop_size=7, seed=3, masks=True, decode_threads=2)
    dataset.set_epoch(1)
    turned = 0
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["mask"].shape == (7, 7) and item["mask"].dtype == torch.int64
        assert torch.equal(item["image"][0].long() - 1, item["mask"])
        params, _ = dataset.draw(np.random.default_rng([3, 1, i]))  # the item's own draw, applied to the raw mask
        expected = apply_view_params(torch.from_numpy(masks[i][None].astype(np.int64)), torch.from_numpy(params), 7)
        assert torch.equal(expected[0], item["mask"])
        turned += int(params[2] or params[3] or params[4])
    assert turned > len(dataset) // 2  # the augmentations did flip and turn
    batches = list(make_loader(dataset, batch_size=4, drop_last=False))  # the batch path, on two decode threads
    for batch in batches:
        assert torch.equal(batch["image"][:, 0].long() - 1, batch["mask"])
        for b, sample in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["mask"][b], dataset[sample]["mask"])


def test_masks_refused_without_the_array_or_with_two_views(tmp_path: Path) -> None:
    plain = write_store(tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match=r"no per-pixel masks.*softcon preprocess --masks"):
        StoreDataset(plain.path, two_views=False, masks=True)
    with pytest.raises(ValueError, match="two_views=False"):
        StoreDataset(plain.path, two_views=True, masks=True)
