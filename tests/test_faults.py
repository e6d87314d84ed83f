"""Fault injection: a flaky network, bad files, kill -9 in every writing stage, concurrent backfills, a full disk.

The kill -9 tests kill ingest and preprocess at each instrumented point of a run (``tests/ingest_child.py``,
``tests/preprocess_child.py``: the child sends itself SIGKILL there), then run the stage again and compare its
output with a clean run's (``tasks/digest.py``: per-array digests, time steps keyed by their time) and check it.

Each test injects one fault into a real run and checks the outcome the same way: the run completes (or fails
with a clear message), and ``check_store`` finds nothing wrong with what is on disk. What
``tests/test_ingest_reliability.py`` already proves (retry policy, a corrupt file alone, SIGKILL at the two
points of an append, concurrent ingests) is not repeated here; ``docs/reliability.md`` lists both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ingest_child
import mlflow
import preprocess_child
import pytest
import torch
import xarray as xr
import zarr
from cube_factory import write_cube
from data_fixtures import sample_ingest_config
from fault_proxy import flaky_proxy

from softcon.config import IngestConfig, PreprocessConfig, TrainConfig
from softcon.models import training_store
from softcon.tasks.check_store import INGEST_AGAIN, PREPROCESS_AGAIN, RECREATE_TILE, check_store
from softcon.tasks.cube_store import StoreFullError
from softcon.tasks.digest import array_digests
from softcon.tasks.ingest import IngestReport, run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_server import serve_stac

ROOT = Path(__file__).resolve().parents[1]
INGEST_CHILD = Path(__file__).resolve().parent / "ingest_child.py"
PREPROCESS_CHILD_FILE = Path(__file__).resolve().parent / "preprocess_child.py"


def _tile(cube: Path, tile_id: str) -> xr.Dataset:
    return xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False).load()


def _assert_same_cube(cube: Path, reference: Path, tile_ids: list[str]) -> None:
    """Same tiles, steps, pixels and item ids as the reference (steps in any order: appends may interleave)."""
    for tile_id in tile_ids:
        got, want = _tile(cube, tile_id), _tile(reference, tile_id)
        xr.testing.assert_identical(got.sortby("time").sortby("time_s1"), want.sortby("time").sortby("time_s1"))


def _assert_checks(store: Path) -> None:
    result = check_store(str(store))
    assert result.ok, [f"{p.path}: {p.what}" for p in result.problems]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _kill_when(child: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """SIGKILL the child as soon as ``ready()`` is true (work visibly underway); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None:
            pytest.fail(f"the child ended (rc {child.returncode}) before {what}: {child.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------------------- network


def test_ingest_through_a_proxy_failing_30_percent_of_requests_equals_a_clean_run(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, clean = data_cube
    cube = tmp_path / "cube.zarr"
    with flaky_proxy(data_sample.root, failure_rate=0.3, seed=0) as proxy:
        # The same Items with their assets served over HTTP by the proxy: GDAL's range reads go through it too.
        items = tmp_path / "items.json"
        items.write_text(data_sample.items_file.read_text().replace(str(data_sample.root), proxy.files_url))
        with serve_stac([*data_sample.collection_files, items]) as api:
            proxy.upstream = api
            report = run_ingest(sample_ingest_config(data_sample, proxy.url, cube, retry_delay=0.05))
    assert proxy.stats.failed["api"] >= 1 and proxy.stats.failed["files"] >= 10, proxy.stats
    assert report.items_failed == [] and report.tile_dates_written == clean.tile_dates_written
    _assert_same_cube(cube, reference, report.tiles)
    _assert_checks(cube)


# --------------------------------------------------------------------------------------------- files


@pytest.mark.slow
def test_corrupt_cog_and_missing_asset_in_one_run_are_skipped_reported_and_the_rest_ingested(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    from softcon.flows.ingest import ingest_flow

    reference, _ = data_cube
    items = json.loads(data_sample.items_file.read_text())
    s2 = next(i for i in items["features"] if i["collection"] == "sentinel-2-l2a")
    s1 = next(i for i in items["features"] if i["collection"] == "sentinel-1-rtc")
    source = Path(s2["assets"]["red"]["href"])
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # header fine, pixels cut off
    s2["assets"]["red"]["href"] = str(corrupt)
    s1["assets"]["vh"]["href"] = str(tmp_path / "deleted" / "vh.tif")
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    cube = tmp_path / "cube.zarr"

    result = ingest_flow(sample_ingest_config(data_sample, str(path), cube, retry_delay=0.0), experiment="faults")

    assert result.metrics["items_failed"] == 2
    failed = json.loads(Path(mlflow.MlflowClient().download_artifacts(result.run_id, "failed_items.json")).read_text())
    assert set(failed) == {s2["id"], s1["id"]}
    assert "vh.tif" in failed[s1["id"]] and "corrupt.tif" in failed[s2["id"]]
    s2_day, s1_day = s2["properties"]["datetime"][:10], s1["properties"]["datetime"][:10]
    for tile_id in data_sample.tile_ids:
        got, want = _tile(cube, tile_id), _tile(reference, tile_id)
        # Every other tile-date of the clean cube is there, pixel for pixel; only the two items' days are not.
        assert got.attrs["s2_items"] == {d: ids for d, ids in want.attrs["s2_items"].items() if d != s2_day}
        assert got.attrs["s1_items"] == {d: ids for d, ids in want.attrs["s1_items"].items() if d != s1_day}
        kept = want.sel(time=[t for t in want.time.values if str(t)[:10] != s2_day])
        xr.testing.assert_identical(got.s2.sortby("time"), kept.s2.sortby("time"))
    _assert_checks(cube)


# ----------------------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_during_ingest_then_rerun_completes_and_the_cube_checks(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, _ = data_cube
    cube = tmp_path / "cube.zarr"
    config = sample_ingest_config(data_sample, str(data_sample.items_file), cube)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    # Each append sleeps first (holding the tile lock), so the kill lands while the run is between writes.
    child = subprocess.Popen(
        [sys.executable, str(INGEST_CHILD), str(config_file), "--slow-append", "0.5"], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def first_step_written() -> bool:
        try:
            tiles = zarr.open_group(str(cube), path="tiles", mode="r")
            return any(tiles[t]["time"].shape[0] > 0 for t in tiles.group_keys())
        except (FileNotFoundError, KeyError, ValueError):
            return False

    _kill_when(child, first_step_written, "a time step written")
    after_kill = check_store(str(cube))
    # Either consistent already, or an interrupted append that the re-run truncates (hidden from readers).
    assert all(problem.fix == INGEST_AGAIN for problem in after_kill.problems), after_kill.problems

    report = run_ingest(config)
    assert report.tile_dates_written > 0
    _assert_same_cube(cube, reference, data_sample.tile_ids)
    _assert_checks(cube)


def _run_killed(command: list[str]) -> None:
    """Run a child that kills itself with SIGKILL at its ``--kill-at`` point; fail if it ends otherwise."""
    child = subprocess.run(
        [sys.executable, *command], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, f"rc {child.returncode}: {child.stderr[-3000:]}"


def _cube_record(cube: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Per-array digests (time steps keyed by time, so in any order) and each tile's item ids."""
    tiles = zarr.open_group(str(cube), path="tiles", mode="r")
    items = {t: {k: tiles[t].attrs[k] for k in ("s2_items", "s1_items")} for t in sorted(tiles.group_keys())}
    return array_digests(cube), items


@pytest.fixture(scope="module")
def clean_cube_record(data_cube: tuple[Path, IngestReport]) -> tuple[dict[str, str], dict[str, dict]]:
    return _cube_record(data_cube[0])


INGEST_KILLS = [*ingest_child.KILL_POINTS, "output-deleted-first"]


@pytest.mark.slow
@pytest.mark.parametrize("point", INGEST_KILLS)
def test_kill_9_at_each_point_of_an_ingest_then_a_rerun_equals_a_clean_run(
    point: str, clean_cube_record: tuple[dict, dict], data_sample: SampleData, tmp_path: Path
) -> None:
    cube = tmp_path / "cube.zarr"
    config = sample_ingest_config(data_sample, str(data_sample.items_file), cube)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    kill_at, extra = point, []
    if point == "output-deleted-first":  # a finished cube deleted, then the run again killed mid-append
        run_ingest(config)
        shutil.rmtree(cube)
        kill_at = "before-time-commit"
    if point == "mid-repair":  # the kill lands in the repair of an earlier killed append
        _run_killed([str(INGEST_CHILD), str(config_file), "--kill-at", "after-data-grew"])
    if point == "between-dates":
        extra = ["--write-batch", "1"]
    _run_killed([str(INGEST_CHILD), str(config_file), "--kill-at", kill_at, *extra])
    if (cube / "zarr.json").exists():  # only work the re-run finishes: an interrupted append or tile creation
        after_kill = check_store(str(cube))
        assert all(problem.fix in (INGEST_AGAIN, RECREATE_TILE) for problem in after_kill.problems), after_kill
    else:
        assert point == "before-first-tile", "no cube after the kill"

    report = run_ingest(config)
    assert report.tile_dates_written > 0 and report.tile_dates_repaired == 0
    assert _cube_record(cube) == clean_cube_record
    _assert_checks(cube)


@dataclass(frozen=True)
class Store:
    config: PreprocessConfig
    """The clean store's configuration (``out`` is the clean store)."""


@pytest.fixture(scope="module")
def preprocess_client() -> Iterator[object]:
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client:
        yield client


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory, preprocess_client: object) -> Store:
    from softcon.tasks.preprocess import run_preprocess

    folder = tmp_path_factory.mktemp("faults-store")
    cube = write_cube(folder / "cube.zarr", n_tiles=2, size=64, n_dates=3)
    config = PreprocessConfig(
        cube=cube.path, out=str(folder / "store.zarr"), patch_size=16, split_block=32, val_fraction=0.2,
        test_fraction=0.2, max_nodata_fraction=0.5, samples_per_block=8,
    )  # fmt: skip
    run_preprocess(config, client=preprocess_client)  # type: ignore[arg-type]
    return Store(config)


PREPROCESS_CHILD = """
import sys, time
from distributed import Client
from softcon.config import PreprocessConfig
from softcon import progress
from softcon.tasks.preprocess import run_preprocess

def on_progress(step, done, total):
    print(step, done, total, flush=True)
    if step == "blocks" and done >= 1:
        time.sleep(0.3)  # a slow driver, so that the kill lands with blocks still to write

with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as client, \
        progress.listen(on_progress):
    run_preprocess(PreprocessConfig.model_validate_json(sys.argv[1]), client=client)
"""


@pytest.mark.slow
def test_kill_9_during_preprocess_then_rerun_completes_and_the_store_checks(
    clean_store: Store, preprocess_client: object, tmp_path: Path
) -> None:
    from softcon.tasks.preprocess import run_preprocess

    config = clean_store.config.model_copy(update={"out": str(tmp_path / "store.zarr")})
    child = subprocess.Popen(
        [sys.executable, "-c", PREPROCESS_CHILD, config.model_dump_json()], env=_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    progress: list[str] = []

    def two_blocks_done() -> bool:  # reads the child's progress lines as they come
        progress.append(child.stdout.readline())  # type: ignore[union-attr]
        return progress[-1].split()[:2] == ["blocks", "2"]

    _kill_when(child, two_blocks_done, "two blocks written")
    (problem,) = check_store(config.out).problems  # the only problem: not complete, and the fix resumes
    assert "not complete (2 of" in problem.what and problem.fix == PREPROCESS_AGAIN

    report = run_preprocess(config, client=preprocess_client)  # type: ignore[arg-type]
    assert 0 < report.blocks_written < int(progress[-1].split()[2])  # resumed, not redone
    _assert_checks(Path(config.out))
    xr.testing.assert_identical(
        xr.open_zarr(config.out, chunks=None).drop_attrs(),
        xr.open_zarr(clean_store.config.out, chunks=None).drop_attrs(),
    )


def _store_record(store: str) -> tuple[dict[str, str], dict[str, object]]:
    """Per-array digests and the attributes (but the manifest, and ``params.out``: the store's own path)."""
    attrs = training_store.read_store_attrs(store)
    assert attrs is not None, f"no store at {store}"
    attrs.pop(training_store.MANIFEST_ATTR, None)
    attrs["params"] = {key: value for key, value in attrs["params"].items() if key != "out"}
    return array_digests(store), attrs


PREPROCESS_KILLS = [*preprocess_child.KILL_POINTS, "output-deleted-first"]


@pytest.mark.slow
@pytest.mark.parametrize("point", PREPROCESS_KILLS)
def test_kill_9_at_each_point_of_a_preprocess_then_a_rerun_equals_a_clean_run(
    point: str, clean_store: Store, preprocess_client: object, tmp_path: Path
) -> None:
    from softcon.tasks.preprocess import run_preprocess

    config = clean_store.config.model_copy(update={"out": str(tmp_path / "store.zarr")})
    clean = _store_record(clean_store.config.out)
    n_blocks = len(clean[1]["blocks_done"])  # type: ignore[arg-type]
    child_config, kill_at = config, point
    if point == "clearing-old-store":  # a store of other parameters is replaced
        shutil.copytree(clean_store.config.out, config.out)
        child_config = config.model_copy(update={"max_cloud_fraction": 1.0})
    if point == "repairing":  # a lost shard is being written again
        shutil.copytree(clean_store.config.out, config.out)
        (Path(config.out) / "s2" / "c" / "2" / "0" / "0" / "0").unlink()
    if point == "output-deleted-first":  # a finished store deleted, then the run again killed
        run_preprocess(config, client=preprocess_client)  # type: ignore[arg-type]
        shutil.rmtree(config.out)
        kill_at = "blocks-1"
    _run_killed([str(PREPROCESS_CHILD_FILE), child_config.model_dump_json(), "--kill-at", kill_at])
    attrs = training_store.read_store_attrs(config.out)
    assert attrs is None or attrs.get("complete") is not True, "a killed run left a store marked complete"

    report = run_preprocess(config, client=preprocess_client)  # type: ignore[arg-type]
    resumed = {"blocks-1": n_blocks - 1, "blocks-3": n_blocks - 3, "statistics": 0, "before-complete": 0,
               "repairing": 1, "output-deleted-first": n_blocks - 1}  # fmt: skip
    if point in resumed:
        assert report.blocks_written == resumed[point]
    elif point != "mid-block":  # the driver may or may not have marked the first block when the kill came
        assert report.blocks_written == n_blocks
    assert _store_record(config.out) == clean
    _assert_checks(Path(config.out))


TRAIN_CHILD = """
import sys
import torch
from softcon.config import TrainConfig
from softcon.tasks.train import run_training

torch.set_num_threads(1)
run_training(TrainConfig.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_kill_9_during_training_then_resume_completes_like_a_straight_run(clean_store: Store, tmp_path: Path) -> None:
    from softcon.tasks.train import read_checkpoint, run_training

    store = clean_store.config.out
    config = TrainConfig(
        store=store, out=str(tmp_path / "killed"), backbone="resnet18", steps=6, batch_size=8, warmup_steps=2,
        checkpoint_every=2, mask_patch=4, embed_dim=16, device="cpu", num_workers=0,
    )  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_CHILD, config.model_dump_json()], env=_env(), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out = Path(config.out)
    _kill_when(child, lambda: (out / "step_000002.pt").exists(), "a first checkpoint")
    assert not (out / "step_000006.pt").exists()
    _assert_checks(Path(store))  # training only reads the store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the child: CPU kernels sum in another order with another thread count
    try:
        resumed = run_training(config.model_copy(update={"resume": True}))
        straight = run_training(config.model_copy(update={"out": str(tmp_path / "straight")}))
    finally:
        torch.set_num_threads(threads)
    assert resumed.steps == straight.steps == 6
    expected, got = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for part in ("student", "teacher", "projector"):
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key}"


# ------------------------------------------------------------------------------------------ backfills


@pytest.mark.slow
def test_two_concurrent_backfills_over_overlapping_dates_leave_no_duplicate_step(
    data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    from softcon.flows.backfill import backfill_flow
    from softcon.tasks.backfill import done_windows

    reference, _ = data_cube
    cube = tmp_path / "cube.zarr"
    request = sample_ingest_config(data_sample, str(data_sample.items_file), cube, retry_delay=0.0)
    middle = data_sample.s2_dates[1]
    ranges = [(request.start, middle), (middle, request.end)]  # both hold the middle S2 date
    errors: list[BaseException] = []
    spans: list[tuple[float, float]] = []

    def backfill(start: object, end: object) -> None:
        began = time.monotonic()
        try:
            backfill_flow(request.model_copy(update={"start": start, "end": end}), period="week", experiment="faults")
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        spans.append((began, time.monotonic()))

    threads = [threading.Thread(target=backfill, args=dates) for dates in ranges]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert max(began for began, _ in spans) < min(ended for _, ended in spans)  # they did run at the same time
    _assert_checks(cube)  # no time step twice, ids and arrays consistent
    _assert_same_cube(cube, reference, data_sample.tile_ids)
    recorded = done_windows(request)
    days = data_sample.s2_dates + data_sample.s1_dates
    assert all(any(window.contains(day) for window in recorded) for day in days)  # no entry of one lost


def test_concurrent_ledger_writes_keep_every_period(tmp_path: Path) -> None:
    from datetime import date, timedelta

    from softcon.tasks.backfill import DateWindow, read_ledger, record_window

    cube = tmp_path / "cube.zarr"
    zarr.open_group(str(cube), mode="w", zarr_format=3).require_group("tiles")
    request = IngestConfig(stac="items.json", bbox=(11.0, 46.4, 11.1, 46.5), start=date(2024, 1, 1),
                           end=date(2024, 1, 31), cube=str(cube))  # fmt: skip

    def record(first: int) -> None:  # two backfills finishing periods at the same time
        for k in range(15):
            day = date(2024, 1, 1) + timedelta(days=first + 2 * k)
            record_window(request, DateWindow(day, day))

    threads = [threading.Thread(target=record, args=(first,)) for first in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(read_ledger(str(cube))) == 30  # without the ledger lock, ~1/3 of the entries were lost


# --------------------------------------------------------------------------------------------- disk


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of ``request.param`` bytes mounted on a fresh folder (needs root; skipped otherwise)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize(
    "small_disk", ["64k", "200k", "400k"], indirect=True, ids=["full-at-tile-creation", "full-mid-tile", "full-later"]
)
def test_full_disk_gives_a_clear_error_and_no_partial_step(
    small_disk: Path, data_cube: tuple[Path, IngestReport], data_sample: SampleData, tmp_path: Path
) -> None:
    reference, _ = data_cube
    cube = small_disk / "cube.zarr"
    config = sample_ingest_config(data_sample, str(data_sample.items_file), cube, retry_delay=0.0)
    with pytest.raises(StoreFullError, match="no space left on the disk holding cube") as raised:
        run_ingest(config)
    message = str(raised.value)
    assert str(cube) in message and "Free space there" in message and "run softcon ingest again" in message
    if cube.exists():
        _assert_checks(cube)  # every visible step complete, the failed append rolled back
        moved = tmp_path / "cube.zarr"
        shutil.copytree(cube, moved, ignore=shutil.ignore_patterns(".ingest-locks"))
        run_ingest(config.model_copy(update={"cube": str(moved)}))  # on a larger disk the run continues
        _assert_same_cube(moved, reference, data_sample.tile_ids)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["200k"], indirect=True)
def test_full_disk_fails_the_ingest_flow_at_once_without_retries(
    small_disk: Path, data_sample: SampleData, tmp_path: Path
) -> None:
    from softcon.flows.ingest import ingest_flow

    config: IngestConfig = sample_ingest_config(data_sample, str(data_sample.items_file), small_disk / "cube.zarr")
    started = time.monotonic()
    state = ingest_flow(config, experiment="faults", return_state=True)
    assert state.is_failed()
    with pytest.raises(StoreFullError):
        state.result()
    assert time.monotonic() - started < 30  # the task's retries wait 5 s then 30 s: none was made


def test_the_cli_prints_a_full_disk_error_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import typer

    from softcon.cli import run_stage_flow

    def full(_config: object) -> None:
        raise StoreFullError(errno.ENOSPC, "no space left on the disk holding cube /x (0.0 MiB free) ... Free space")

    with pytest.raises(typer.Exit) as raised:
        run_stage_flow(full, None)
    assert raised.value.exit_code == 1
    assert "no space left on the disk holding cube /x" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(PermissionError):  # other OS errors are not hidden
        run_stage_flow(lambda _config: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")), None)
