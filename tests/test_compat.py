"""The adapters in ``softcon/compat/`` against the installed dependencies: each fails naming the dependency and the
adapter when a private API it wraps changed, and the project reaches those APIs through the adapters only.

No network: every store, run and model here is made in ``tmp_path`` or in memory.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def broken(dependency: str, adapter: str, what: str) -> str:
    """The failure message: which dependency changed (``a/b`` for either of two), which adapter to fix, and what
    differs."""
    installed = " / ".join(f"{name} {version(name)}" for name in dependency.split("/"))
    return (
        f"{installed} changed a private API that softcon/compat/{adapter}.py wraps: {what}. Update the adapter "
        f"(and its pin in pyproject.toml), or pin {dependency} back to the version it was checked against."
    )


@contextmanager
def reported(dependency: str, adapter: str) -> Iterator[None]:
    """A wrapped name gone, or called with arguments it no longer takes, fails with ``broken``'s message."""
    try:
        yield
    except (ImportError, AttributeError, TypeError) as error:
        pytest.fail(broken(dependency, adapter, f"{type(error).__name__}: {error}"))


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


# ------------------------------------------------------------------------------------------------- odc


ODC_SIGNATURES = {
    "nodata_mask": ["pix", "nodata"],
    "resolve_band_query": ["src", "n", "selection"],
    "resolve_dst_dtype": ["src_dtype", "cfg"],
    "resolve_dst_nodata": ["dst_dtype", "cfg", "src_nodata"],
    "resolve_src_nodata": ["nodata", "cfg"],
    "same_nodata": ["a", "b"],
}


def test_odc_readers_wrap_odc_loader_and_odc_stac() -> None:
    with reported("odc-loader/odc-stac", "odc_readers"):
        from odc.loader.types import RasterLoadParams, RasterSource

        from softcon.compat import odc_readers

        for name, expected in ODC_SIGNATURES.items():
            found = parameters(getattr(odc_readers, name))
            assert found == expected, broken("odc-loader", "odc_readers", f"{name} takes {found}, not {expected}")
        assert parameters(odc_readers.RioReader.__init__) == ["self", "src", "ctx"], broken(
            "odc-loader", "odc_readers", "RioReader(src, ctx) changed"
        )
        read = inspect.signature(odc_readers.RioReader.read).parameters
        assert list(read) == ["self", "cfg", "dst_geobox", "dst", "selection"], broken(
            "odc-loader", "odc_readers", f"RioReader.read takes {list(read)}"
        )
        assert read["dst"].kind is read["selection"].kind is inspect.Parameter.KEYWORD_ONLY, broken(
            "odc-loader", "odc_readers", "RioReader.read's dst and selection are no longer keyword-only"
        )
        assert parameters(odc_readers.RioDriver.open) == ["self", "src", "ctx"], broken(
            "odc-loader", "odc_readers", "RioDriver.open(src, ctx) changed"
        )
        assert "aux_reader" in parameters(odc_readers.RioDriver.__init__), broken(
            "odc-loader", "odc_readers", "RioDriver no longer takes aux_reader"
        )

        src = RasterSource("file:///nowhere.tif", band=2)
        ctx: Any = None  # a LocalContext: the reader only keeps it
        reader = odc_readers.RioReader(src, ctx)
        assert odc_readers.reader_source(reader) is src, broken("odc-loader", "odc_readers", "RioReader._src is gone")
        cfg = RasterLoadParams(dtype="float32", fill_value=-1)
        assert odc_readers.resolve_band_query(src, 3) == 2, broken("odc-loader", "odc_readers", "resolve_band_query")
        assert odc_readers.resolve_dst_dtype("uint16", cfg) == np.float32, broken(
            "odc-loader", "odc_readers", "resolve_dst_dtype"
        )
        assert odc_readers.resolve_src_nodata(0, cfg) == 0, broken("odc-loader", "odc_readers", "resolve_src_nodata")
        assert odc_readers.resolve_dst_nodata(np.dtype("float32"), cfg, 0) == -1, broken(
            "odc-loader", "odc_readers", "resolve_dst_nodata"
        )
        assert odc_readers.same_nodata(float("nan"), float("nan")) and not odc_readers.same_nodata(0, None), broken(
            "odc-loader", "odc_readers", "same_nodata"
        )
        mask = odc_readers.nodata_mask(np.array([0, 1, 0], np.uint16), 0)
        assert mask.tolist() == [True, False, True], broken("odc-loader", "odc_readers", "nodata_mask")

        aux = odc_readers.StacAuxReader()
        assert callable(getattr(aux, "read", None)), broken("odc-stac", "odc_readers", "StacAuxReader has no read()")
        driver = odc_readers.RioDriver(aux_reader=aux)
        assert isinstance(driver.open(src, ctx), odc_readers.RioReader), broken(
            "odc-loader", "odc_readers", "RioDriver.open no longer returns a RioReader"
        )


def test_aligned_driver_subclasses_the_wrapped_reader() -> None:
    with reported("odc-loader/odc-stac", "odc_readers"):
        from softcon.compat.odc_readers import RioDriver, RioReader, StacAuxReader
        from softcon.tasks.aligned_reads import ALIGNED_DRIVER, AlignedRioReader

        assert isinstance(ALIGNED_DRIVER, RioDriver) and issubclass(AlignedRioReader, RioReader)
        assert isinstance(ALIGNED_DRIVER.aux_reader, StacAuxReader), broken(
            "odc-loader", "odc_readers", "RioDriver no longer keeps its aux_reader"
        )


# ------------------------------------------------------------------------------------------------ zarr


def test_zarr_sharding_layout_reads_the_codecs(tmp_path: Path) -> None:
    with reported("zarr", "zarr_internals"):
        import zarr
        from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec

        from softcon.compat.zarr_internals import ShardingLayout, sharding_layout

        group = zarr.open_group(str(tmp_path / "store.zarr"), mode="w", zarr_format=3)
        shape, chunks, shards = (8, 2, 4, 4), (1, 2, 4, 4), (4, 2, 4, 4)
        blosc = group.create_array(
            "blosc", shape=shape, chunks=chunks, shards=shards, dtype="uint16", fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        )  # fmt: skip
        raw = group.create_array("raw", shape=shape, chunks=chunks, shards=shards, dtype="uint16", compressors=None)
        start = group.create_array(
            "start", shape=(8,), chunks=(4,), dtype="uint16", compressors=None,
            serializer=ShardingCodec(chunk_shape=(2,), codecs=[BytesCodec(endian="big")], index_location="start"),
        )  # fmt: skip
        plain = group.create_array("plain", shape=(8,), chunks=(4,), dtype="int8")

        expected = {
            "blosc": ShardingLayout(chunks, ("bytes", "blosc"), "little", ("bytes", "crc32c"), index_at_end=True),
            "raw": ShardingLayout(chunks, ("bytes",), "little", ("bytes", "crc32c"), index_at_end=True),
            "start": ShardingLayout((2,), ("bytes",), "big", ("bytes", "crc32c"), index_at_end=False),
        }
        for name, array in (("blosc", blosc), ("raw", raw), ("start", start)):
            found = sharding_layout(array)
            assert found == expected[name], broken("zarr", "zarr_internals", f"sharding layout of {name}: {found}")
        assert sharding_layout(plain) is None, broken("zarr", "zarr_internals", "an unsharded array reads as sharded")


def test_zarr_sharded_store_takes_the_fast_reader(tmp_path: Path) -> None:
    """``SampleReader`` reads shard bytes itself only for the layout ``sharding_layout`` reports."""
    with reported("zarr", "zarr_internals"):
        import zarr
        from zarr.codecs import BloscCodec

        from softcon.models.data import SampleReader

        group = zarr.open_group(str(tmp_path / "store.zarr"), mode="w", zarr_format=3)
        array = group.create_array(
            "s2", shape=(8, 2, 4, 4), chunks=(1, 2, 4, 4), shards=(4, 2, 4, 4), dtype="uint16", fill_value=0,
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        )  # fmt: skip
        values = np.arange(array.size, dtype=np.uint16).reshape(array.shape)
        array[:6] = values[:6]
        reader = SampleReader(array, index_cache=2)
        assert reader.root is not None, broken(
            "zarr", "zarr_internals", "the training store's shards are not recognised"
        )
        for sample in range(8):
            want = values[sample] if sample < 6 else np.zeros_like(values[sample])
            np.testing.assert_array_equal(reader.read(sample), want, err_msg=broken("zarr", "zarr_internals", "shards"))


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
def test_zarr_chunk_keys_names_and_consolidated_metadata(tmp_path: Path) -> None:
    with reported("zarr", "zarr_internals"):
        import zarr

        from softcon.compat.zarr_internals import chunk_key, dimension_names, has_consolidated_metadata

        path = str(tmp_path / "cube.zarr")
        group = zarr.open_group(path, mode="w", zarr_format=3)
        array = group.create_array("s2", shape=(4, 3), chunks=(2, 3), dtype="int16", dimension_names=["time", "x"])
        array[:] = 1
        plain = group.create_array("plain", shape=(2,), chunks=(2,), dtype="int8")
        key = chunk_key(array, (1, 0))
        assert key == "c/1/0" and (tmp_path / "cube.zarr" / "s2" / key).is_file(), broken(
            "zarr", "zarr_internals", f"chunk (1, 0) has key {key!r}"
        )
        assert dimension_names(array) == ("time", "x") and dimension_names(plain) == (), broken(
            "zarr", "zarr_internals", "dimension_names"
        )
        assert not has_consolidated_metadata(zarr.open_group(path, mode="r", use_consolidated=False)), broken(
            "zarr", "zarr_internals", "consolidated metadata where there is none"
        )
        zarr.consolidate_metadata(path)
        assert has_consolidated_metadata(zarr.open_group(path, mode="r", use_consolidated=True)), broken(
            "zarr", "zarr_internals", "no consolidated metadata after consolidate_metadata"
        )


def test_zarr_async_creation_views_and_sync(tmp_path: Path) -> None:
    with reported("zarr", "zarr_internals"):
        import asyncio

        import zarr

        from softcon.compat.zarr_internals import (
            AsyncArray,
            array_from_async,
            async_array,
            create_array_async,
            shape_view,
            sync,
        )

        path = str(tmp_path / "cube.zarr")
        group = zarr.open_group(path, mode="w", zarr_format=3)

        async def create_both() -> list[AsyncArray[Any]]:
            spec: dict[str, Any] = {"shape": (2,), "dtype": "int64", "chunks": (1,), "fill_value": 0}
            return list(
                await asyncio.gather(
                    create_array_async(group, "time", **spec, attributes={"units": "s"}, dimension_names=["time"]),
                    create_array_async(group, "other", **spec),
                )
            )

        created = sync(create_both())
        assert all(isinstance(array, AsyncArray) for array in created), broken(
            "zarr", "zarr_internals", f"create_array_async made {[type(a).__name__ for a in created]}"
        )
        time_array = array_from_async(created[0])
        assert isinstance(time_array, zarr.Array) and async_array(time_array) is created[0], broken(
            "zarr", "zarr_internals", "zarr.Array(async_array) and Array._async_array no longer round-trip"
        )
        time_array[:] = [10, 20]
        reopened = zarr.open_group(path, mode="r")["time"]
        assert isinstance(reopened, zarr.Array) and reopened.attrs["units"] == "s", broken(
            "zarr", "zarr_internals", "create_array_async lost the attributes"
        )

        # Write ahead at a longer shape without changing the stored one; fill values too make a chunk file.
        view = shape_view(time_array, (4,), write_empty_chunks=True)
        sync(view.setitem(slice(2, 4), np.array([30, 0])))
        stored = zarr.open_array(path, path="time", mode="r")
        assert stored.shape == (2,), broken("zarr", "zarr_internals", "shape_view wrote its shape to the store")
        assert (tmp_path / "cube.zarr" / "time" / "c" / "3").is_file(), broken(
            "zarr", "zarr_internals", "shape_view(write_empty_chunks=True) skipped a chunk of fill values"
        )
        time_array.resize((4,))
        np.testing.assert_array_equal(
            zarr.open_array(path, path="time", mode="r")[:],
            [10, 20, 30, 0],
            err_msg=broken("zarr", "zarr_internals", ""),
        )


# ------------------------------------------------------------------------------------------------ timm


def test_timm_dinov2_filter_converts_the_original_format() -> None:
    """Registers, SwiGLU ``w12``/``w3`` and the class token's position: a tiny ViT-g/14-reg4 in DINOv2's format."""
    with reported("timm", "timm_dinov2"):
        import timm

        from softcon.compat.timm_dinov2 import convert_dinov2_state_dict

        model = timm.create_model(
            "vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1, embed_dim=32, num_heads=2
        )
        torch.manual_seed(0)
        timm_state = {name: torch.randn_like(value) for name, value in model.state_dict().items()}
        dim = timm_state["cls_token"].shape[-1]
        cls_position = torch.randn(1, 1, dim)
        original = {  # the facebookresearch layout of the same weights
            name.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): value
            for name, value in timm_state.items()
            if name not in ("cls_token", "reg_token", "pos_embed")
        }
        original["cls_token"] = timm_state["cls_token"] - cls_position
        original["register_tokens"] = timm_state["reg_token"]
        original["pos_embed"] = torch.cat([cls_position, timm_state["pos_embed"]], dim=1)
        original["mask_token"] = torch.zeros(1, dim)

        converted = convert_dinov2_state_dict(original, model)
        assert set(converted) == set(timm_state), broken(
            "timm", "timm_dinov2", f"keys differ: {sorted(set(converted) ^ set(timm_state))}"
        )
        for name, value in timm_state.items():
            assert torch.allclose(converted[name], value), broken("timm", "timm_dinov2", f"{name} converted wrongly")
        model.load_state_dict(converted, strict=True)


def test_timm_vit_position_embedding_is_the_step_after_patch_embed() -> None:
    """With the prefix tokens, the position embedding resampled to the grid, the patch tokens of a non-square
    image (dynamic_img_size, as the masked forward builds its ViTs) go on to timm's own ``forward_features``."""
    with reported("timm", "timm_vit"):
        import timm

        from softcon.compat.timm_vit import add_position_embedding

        torch.manual_seed(0)
        vit: Any = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, dynamic_img_size=True)
        vit.eval()
        x = torch.randn(2, 3, 48, 32)  # a 3 x 2 patch grid, not the 2 x 2 one the model was built for
        with torch.no_grad():
            patches = vit.patch_embed(x)
            tokens = add_position_embedding(vit, patches)
            assert tokens.shape == (2, vit.num_prefix_tokens + 3 * 2, vit.embed_dim), broken(
                "timm", "timm_vit", f"_pos_embed gave shape {tuple(tokens.shape)}"
            )
            assert torch.equal(tokens[:, 0], vit.cls_token[:, 0].expand(2, -1) + vit.pos_embed[:, 0]), broken(
                "timm", "timm_vit", "_pos_embed no longer puts the class token (with its position) first"
            )
            features = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(tokens))))
            torch.testing.assert_close(
                features, vit.forward_features(x), msg=broken("timm", "timm_vit", "forward_features differs")
            )


# ---------------------------------------------------------------------------------------------- mlflow


def test_mlflow_monitor_logs_system_metrics_of_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with reported("mlflow", "mlflow_monitor"):
        from mlflow.tracking import MlflowClient

        from softcon.compat.mlflow_monitor import finish_system_metrics, start_system_metrics

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("compat"))
        started = time.monotonic()
        monitor = start_system_metrics(run.info.run_id, 60.0, tracking_uri=uri)
        finish_system_metrics(monitor)  # stops at once (not after the interval) and logs one last sample
        assert time.monotonic() - started < 30, broken("mlflow", "mlflow_monitor", "finish waited for the interval")
        metrics = client.get_run(run.info.run_id).data.metrics
        for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert name in metrics, broken("mlflow", "mlflow_monitor", f"no {name} logged, only {sorted(metrics)}")


# --------------------------------------------------------------------------------------------- prefect


def test_prefect_storage_round_trip_in_any_context() -> None:
    """Synchronous writes and reads even inside a running event loop, where Prefect would hand back coroutines.

    On fsspec's in-memory file system: Prefect wants a location after the scheme, which ``file:///...`` lacks.
    """
    with reported("prefect", "prefect_storage"):
        import asyncio
        import uuid

        import fsspec
        from prefect.filesystems import RemoteFileSystem

        from softcon.compat.prefect_storage import read_path_sync, write_path_sync

        bucket = f"softcon-compat-{uuid.uuid4().hex}"
        storage = RemoteFileSystem(basepath=f"memory://{bucket}/results")
        memory = fsspec.filesystem("memory")
        written = write_path_sync(storage, "a/key", b"outside a loop")
        assert memory.cat_file(f"/{bucket}/results/a/key") == b"outside a loop", broken(
            "prefect", "prefect_storage", f"write_path wrote to {written!r}"
        )
        assert read_path_sync(storage, "a/key") == b"outside a loop", broken("prefect", "prefect_storage", "read")

        async def in_a_loop() -> tuple[object, object]:
            return write_path_sync(storage, "b", b"inside a loop"), read_path_sync(storage, "b")

        written_in_loop, read_in_loop = asyncio.run(in_a_loop())
        assert isinstance(written_in_loop, str) and read_in_loop == b"inside a loop", broken(
            "prefect", "prefect_storage", f"_sync=True gave {type(written_in_loop).__name__} in a running loop"
        )
        memory.rm(f"/{bucket}", recursive=True)


def test_prefect_storage_block_id_makes_an_unsaved_block_a_result_storage() -> None:
    """What ``flows/result_storage.py`` relies on: a block given an id by hand, never saved, is taken by
    ``prefect.task`` as its result storage, and its result records name that id."""
    with reported("prefect", "prefect_storage"):
        import uuid

        from prefect import task
        from prefect.filesystems import RemoteFileSystem
        from prefect.results import ResultStore

        from softcon.compat.prefect_storage import block_document_id, set_block_id

        storage = RemoteFileSystem(basepath="memory://softcon-compat/results")  # nothing is written there
        assert block_document_id(storage) is None, broken("prefect", "prefect_storage", "an unsaved block has an id")
        document_id = uuid.uuid5(uuid.NAMESPACE_URL, "softcon-results:compat")
        set_block_id(storage, document_id)
        assert block_document_id(storage) == document_id, broken("prefect", "prefect_storage", "the id did not stick")
        stage = task(result_storage=storage, persist_result=True)(lambda: 1)  # TypeError when Prefect wants a save
        assert stage.result_storage is storage, broken("prefect", "prefect_storage", "task() replaced the storage")
        store = ResultStore(result_storage=storage)
        assert store.result_storage_block_id == document_id, broken(
            "prefect", "prefect_storage", f"result records name block {store.result_storage_block_id}"
        )


# ----------------------------------------------------------------------------------------------- torch


def test_torch_storage_use_count_counts_the_tensors_of_a_storage() -> None:
    with reported("torch", "torch_internals"):
        from softcon.compat.torch_internals import storage_use_count

        assert getattr(torch._C, "_storage_Use_Count", None) is not None, broken(
            "torch", "torch_internals", "torch._C._storage_Use_Count is gone (the loader's tensor pool reuses none)"
        )
        fresh = torch.empty(4, 3)
        assert storage_use_count(fresh) == 1, broken("torch", "torch_internals", f"{storage_use_count(fresh)}, not 1")
        view = fresh.view(12)
        assert storage_use_count(fresh) == storage_use_count(view) == 2, broken(
            "torch", "torch_internals", "a view does not count as a second holder"
        )
        storage = fresh.untyped_storage()
        assert storage_use_count(storage) == 3, broken("torch", "torch_internals", "a storage object is no holder")
        del view, storage
        assert storage_use_count(fresh) == 1, broken("torch", "torch_internals", "holders gone are still counted")
        assert storage_use_count(fresh.clone()) == 1, broken("torch", "torch_internals", "a clone shares storage")


def test_torch_foreach_lerp_is_lerp_of_each_tensor() -> None:
    with reported("torch", "torch_internals"):
        from softcon.compat.torch_internals import foreach_lerp_

        generator = torch.Generator().manual_seed(0)
        shapes = [(3, 4), (5,), (2, 2, 2), ()]
        targets = [torch.randn(shape, generator=generator) for shape in shapes]
        sources = [torch.randn(shape, generator=generator) for shape in shapes]
        expected = [torch.lerp(target, source, 0.25) for target, source in zip(targets, sources, strict=True)]
        before = [target.data_ptr() for target in targets]
        foreach_lerp_(targets, sources, 0.25)
        assert [target.data_ptr() for target in targets] == before, broken(
            "torch", "torch_internals", "_foreach_lerp_ no longer works in place"
        )
        for target, want in zip(targets, expected, strict=True):
            torch.testing.assert_close(target, want, msg=broken("torch", "torch_internals", "_foreach_lerp_"))


# ---------------------------------------------------------------------------------------------- the rule


PRIVATE_USE = re.compile(
    r"(from|import)\s+(zarr|odc|timm|mlflow|prefect|torch)[\w.]*\._"  # a private module of one of them
    r"|\bzarr\.core\b|\._async_(array|group)\b"  # zarr's internals
    r"|\b_convert_dinov2\b|\bsystem_metrics_monitor\b"  # timm's DINOv2 filter, MLflow's monitor
    r"|\._pos_embed\b"  # timm's ViT position embedding
    r"|\b_block_document_id\b|\b_sync\s*="  # Prefect's block id and async_dispatch's keyword
    r"|\btorch\._(C|foreach_\w*)\b|\b_storage_Use_Count\b|\._cdata\b"  # torch's internals
)


def test_private_apis_are_reached_through_softcon_compat_only() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("softcon", "flows", "tasks", "models")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "compat" not in path.relative_to(ROOT).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_USE.search(line)
    ]
    assert not offenders, "private dependency APIs used outside softcon/compat/ (wrap them there):\n" + "\n".join(
        offenders
    )


ADAPTER_DEPENDENCIES = {
    "odc_readers": {"odc-stac", "odc-loader"},
    "zarr_internals": {"zarr"},
    "timm_dinov2": {"timm"},
    "timm_vit": {"timm"},
    "mlflow_monitor": {"mlflow"},
    "prefect_storage": {"prefect"},
    "torch_internals": {"torch"},
}
"""Each adapter and the dependencies whose private APIs it wraps: the pins that must name it."""


def test_each_adapter_is_pinned_around_the_installed_version() -> None:
    from packaging.requirements import Requirement

    pinned: dict[str, list[Requirement]] = {}
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        # "timm>=1.0,<2",  # private API: softcon/compat/timm_dinov2.py, timm_vit.py
        match = re.match(r'\s*"([^"]+)",\s*# private API: softcon/compat/(\w+\.py(?:,\s*\w+\.py)*)\s*$', line)
        if match:
            for module in re.findall(r"(\w+)\.py", match[2]):
                pinned.setdefault(module, []).append(Requirement(match[1]))
    adapters = {path.stem for path in (ROOT / "softcon" / "compat").glob("*.py") if path.stem != "__init__"}
    assert set(pinned) == adapters, f"adapters without a pin: {adapters - set(pinned)}; pins naming none: " + str(
        set(pinned) - adapters
    )
    assert set(ADAPTER_DEPENDENCIES) == adapters, "ADAPTER_DEPENDENCIES does not list the adapters of softcon/compat/"
    for adapter, requirements in pinned.items():
        names = {requirement.name for requirement in requirements}
        assert names == ADAPTER_DEPENDENCIES[adapter], f"softcon/compat/{adapter}.py is pinned on {names}"
        for requirement in requirements:
            installed = version(requirement.name)
            assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement} has no upper bound"
            assert requirement.specifier.contains(installed), (
                f"{requirement.name} {installed} is outside its pin {requirement} (softcon/compat/{adapter}.py)"
            )
