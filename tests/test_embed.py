"""``softcon embed``: a store's patches, or a cube's windows, as GeoParquet rows with footprints on the tile grid and
the encoder's features, read back with geopandas; a cube window embeds to the same vector as the same store patch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pytest
import shapely
import torch
from cube_factory import SyntheticCube, write_cube
from distributed import Client
from pydantic import ValidationError
from pyproj import Transformer
from ssl4eo_tree import PATCH as SSL4EO_PATCH
from ssl4eo_tree import build_tree

from softcon.config import EmbedConfig, ImportSSL4EOConfig, PreprocessConfig, TrainConfig
from softcon.models.data import StoreDataset
from softcon.tasks.embed import run_embed
from softcon.tasks.grid import tile_from_id
from softcon.tasks.preprocess import run_preprocess
from softcon.tasks.ssl4eo_import import run_import_ssl4eo
from softcon.tasks.train import load_encoder, run_training

PATCH = 16


@pytest.fixture(scope="module")
def client() -> Client:
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as dask:
        yield dask


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCube:
    """Two 64 px tiles, three dates: tile 0's second date is cloudy, its third has a nodata corner (one window)."""
    return write_cube(tmp_path_factory.mktemp("cube") / "cube.zarr")


@pytest.fixture(scope="module")
def store(cube: SyntheticCube, tmp_path_factory: pytest.TempPathFactory, client: Client) -> str:
    out = str(tmp_path_factory.mktemp("store") / "store.zarr")
    config = PreprocessConfig(cube=cube.path, out=out, patch_size=PATCH, split_block=32, val_fraction=0.2,
                              test_fraction=0.2, max_nodata_fraction=0.5, samples_per_block=8)  # fmt: skip
    run_preprocess(config, client=client)
    return out


def _train(store: str, folder: Path, sensor: str = "s2") -> str:
    config = TrainConfig(store=store, out=str(folder), sensor=sensor, steps=2, batch_size=8, warmup_steps=1,
                         mask_patch=4, embed_dim=16, device="cpu")  # fmt: skip
    return str(run_training(config).checkpoint)


@pytest.fixture(scope="module")
def checkpoint(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _train(store, tmp_path_factory.mktemp("ckpt"))


def test_rows_footprints_and_embeddings(store: str, checkpoint: str, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "embeddings.parquet"
    report = run_embed(EmbedConfig(model=checkpoint, store=store, out=str(out)), checkpoint, client=client)
    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 4326 and len(frame) == report.rows == report.with_footprint
    assert list(frame["sample"]) == list(range(len(frame)))
    assert {"tile", "time", "split", "labelled", "embedding"} <= set(frame.columns)
    assert any(column.startswith("label_") for column in frame.columns)
    assert not Path(f"{out}.partial").exists()

    # footprints: the patch window on its tile of the grid, in lon/lat
    for i in (0, len(frame) - 1):
        row = frame.iloc[i]
        tile = tile_from_id(row["tile"], resolution=10.0, size=PATCH)
        left, top = tile.x0 + row["col"] * 10.0, tile.y0 - row["row"] * 10.0
        to_lonlat = Transformer.from_crs(f"EPSG:{tile.epsg}", "EPSG:4326", always_xy=True)
        corners = [to_lonlat.transform(x, y) for x, y in ((left, top), (left + 160, top), (left, top - 160))]
        polygon = row["geometry"]
        assert polygon.is_valid
        for corner in corners:
            assert shapely.Point(corner).distance(polygon.exterior) < 1e-9

    # embeddings: the encoder's features of those patches, normalised as the loader normalises them
    encoder, meta = load_encoder(checkpoint)
    for split in ("train", "test"):
        dataset = StoreDataset(store, split, "s2", two_views=False, augment=False, norm_stats=meta["norm_stats"])
        sample = int(dataset.indices[0])
        with torch.no_grad():
            expected = encoder(dataset[0]["image"][None])[0].numpy()
        np.testing.assert_allclose(np.asarray(frame.iloc[sample]["embedding"]), expected, rtol=1e-4, atol=1e-5)
        assert frame.iloc[sample]["split"] == split


def test_a_store_without_a_grid_has_no_footprints(client: Client, tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "SSL4EO-S12")
    store = str(tmp_path / "ssl4eo.zarr")
    config = ImportSSL4EOConfig(root=str(tree), out=store, s2="s2a", patch_size=SSL4EO_PATCH, samples_per_block=4,
                                val_fraction=0.25, test_fraction=0.25)  # fmt: skip
    run_import_ssl4eo(config, client=client)
    train = TrainConfig(store=store, out=str(tmp_path / "ckpt"), steps=1, batch_size=4, warmup_steps=1,
                        mask_patch=4, embed_dim=8, device="cpu", crop_size=32)  # fmt: skip
    checkpoint = str(run_training(train).checkpoint)
    out = tmp_path / "e.parquet"
    report = run_embed(EmbedConfig(model=checkpoint, store=store, out=str(out)), checkpoint, client=client)
    frame = geopandas.read_parquet(out)
    assert report.rows == 8 and report.with_footprint == 0 and frame.geometry.isna().all()
    assert sorted(set(frame["location"])) == [0, 1, 2, 3]


def test_refuses_what_it_cannot_embed(store: str, checkpoint: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_embed(EmbedConfig(model="x", store=store, out=str(tmp_path / "e.parquet")), str(tmp_path / "none.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_embed(EmbedConfig(model="x", store=str(tmp_path / "none.zarr"), out=str(tmp_path / "e.parquet")),
                  checkpoint)  # fmt: skip


KEY = ["tile", "time", "row", "col"]
"""What names a patch of a store built from the cube, and the same window of the cube."""


def _embed_both(cube: SyntheticCube, store: str, checkpoint: str, client: Client, folder: Path) -> tuple[Any, Any]:
    """The cube's and the store's embedding files, read back with geopandas."""
    frames = []
    for source in ({"cube": cube.path}, {"store": store}):
        out = folder / f"{next(iter(source))}.parquet"
        run_embed(EmbedConfig(model=checkpoint, out=str(out), **source), checkpoint, client=client)
        frames.append(geopandas.read_parquet(out))
    return frames[0], frames[1]


def test_a_cube_window_embeds_as_the_same_patch_of_a_store_built_from_the_cube(
    cube: SyntheticCube, store: str, checkpoint: str, client: Client, tmp_path: Path
) -> None:
    cube_rows, store_rows = _embed_both(cube, store, checkpoint, client, tmp_path)
    windows = (cube.size // PATCH) ** 2
    assert cube_rows.crs.to_epsg() == 4326 and len(cube_rows) == len(cube.tile_ids) * len(cube.times) * windows
    assert cube_rows.geometry.notna().all() and set(cube_rows["embedding"].map(len)) == {512}  # resnet18
    assert {"tile", "row", "col", "time", "cloud_fraction", "nodata_fraction", "quality"} <= set(cube_rows.columns)
    assert not {"sample", "location", "split", "labelled"} & set(cube_rows.columns)
    assert not any(column.startswith("label_") for column in cube_rows.columns)

    # preprocess's verdicts: the windows it keeps are exactly the store's patches
    kept = cube_rows[cube_rows["quality"] == "keep"]
    assert sorted(map(tuple, kept[KEY].astype(str).values)) == sorted(map(tuple, store_rows[KEY].astype(str).values))
    tile, step = cube.cloudy
    cloudy = cube_rows[(cube_rows["tile"] == tile) & (cube_rows["time"] == cube.times[step])]
    assert (cloudy["quality"] == "cloud").all() and (cloudy["cloud_fraction"] == 1).all()
    tile, step = cube.nodata
    corner = cube_rows[(cube_rows["tile"] == tile) & (cube_rows["time"] == cube.times[step]) & (cube_rows["row"] == 0)
                       & (cube_rows["col"] == 0)]  # fmt: skip
    assert list(corner["quality"]) == ["nodata"] and list(corner["nodata_fraction"]) == [1.0]

    # the same pixels through the same conversion and normalisation: the same embedding and footprint
    pairs = kept.merge(store_rows, on=KEY, suffixes=("_cube", "_store"))
    assert len(pairs) == len(store_rows)
    np.testing.assert_allclose(np.stack(pairs["embedding_cube"]), np.stack(pairs["embedding_store"]), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert all(a.equals_exact(b, 0) for a, b in zip(pairs["geometry_cube"], pairs["geometry_store"], strict=True))


def test_an_s1_encoder_embeds_the_cube_dates_with_s1_as_the_store_does(
    cube: SyntheticCube, store: str, client: Client, tmp_path: Path
) -> None:
    """S1 in dB, VV then VH, from the nearest S1 date within the store's gap: dates without S1 give no row."""
    checkpoint = _train(store, tmp_path / "ckpt", sensor="s1")
    cube_rows, store_rows = _embed_both(cube, store, checkpoint, client, tmp_path)
    assert set(cube_rows["time"]) == set(cube.times[:-1])  # the cube's last S2 date has no S1 acquisition
    pairs = cube_rows.merge(store_rows, on=KEY, suffixes=("_cube", "_store"))
    assert len(pairs) == (cube_rows["quality"] == "keep").sum() > 0
    np.testing.assert_allclose(np.stack(pairs["embedding_cube"]), np.stack(pairs["embedding_store"]), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(("sources", "given"), [({}, "neither"), ({"store": "s.zarr", "cube": "c.zarr"}, "both")])
def test_exactly_one_of_store_and_cube(sources: dict[str, str], given: str) -> None:
    with pytest.raises(ValidationError, match=rf"give exactly one of store .* or cube .* to embed; {given} given"):
        EmbedConfig(model="m", out="e.parquet", **sources)


def test_refuses_a_cube_that_is_not_there(checkpoint: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cube .* does not exist"):
        run_embed(EmbedConfig(model="x", cube=str(tmp_path / "none.zarr"), out=str(tmp_path / "e.parquet")),
                  checkpoint)  # fmt: skip
    assert not (tmp_path / "e.parquet.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["store", "cube"])
def test_cli_embeds_through_the_flow_and_logs_the_datasets(
    source: str, cube: SyntheticCube, store: str, checkpoint: str, tmp_path: Path
) -> None:
    import json

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from softcon.cli import app
    from softcon.settings import get_settings

    out = tmp_path / "cli.parquet"
    location = {"store": store, "cube": cube.path}[source]
    result = CliRunner().invoke(app, ["embed", checkpoint, f"--{source}", location, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["output"] == str(out) and outcome["metrics"]["rows"] == len(geopandas.read_parquet(out))
    run = MlflowClient(get_settings().tracking_uri).get_run(outcome["run_id"])
    contexts = {(i.dataset.name.split(":")[0], {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in run.inputs.dataset_inputs}  # fmt: skip
    assert contexts == {(source, "input"), ("embeddings", "output")}


def test_cli_refuses_both_a_store_and_a_cube_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from softcon.cli import app

    args = ["embed", "m.pt", "--store", "s.zarr", "--cube", "c.zarr", "--out", str(tmp_path / "e.parquet")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "give exactly one of store (a training store) or cube (a cube) to embed; both given" in " ".join(
        result.stderr.split()
    )
