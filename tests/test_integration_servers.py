"""Integration: real Prefect server + process worker + MLflow server on loopback, deployments, a backfill
started through the Prefect API as the UI's custom run does, and (SQLite) the finetune deployment run for segmentation
and multilabel; SQLite backends, then PostgreSQL for both.

Each test takes a few minutes on 2 busy cores (server start-ups dominate); both are marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import zarr
from cube_factory import write_cube, write_masked_store

from softcon.serve import deploy, free_port, serve
from softcon.tasks.sample_data import SampleData, write_sample_data

# The generator's S2 days that pass the default cloud limits: 06-06 is filtered (eo:cloud_cover over 80 %).
BACKFILL_DAYS = [date(2024, 6, 1), date(2024, 6, 11), date(2024, 6, 16)]
DAILY_DAY = BACKFILL_DAYS[1]  # the daily deployment's run is scheduled for 06:00 UTC the day after
PG_BIN = Path("/usr/lib/postgresql")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("integration-sample"), tiles=1, tile_size=64, dates=4)


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(PG_BIN.glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster on a free loopback port in a temporary folder, trust auth, removed after."""
    initdb, pg_ctl, createdb = _pg_tool("initdb"), _pg_tool("pg_ctl"), _pg_tool("createdb")
    if not (initdb and pg_ctl and createdb):
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it in CI)")
    folder = Path(tempfile.mkdtemp(prefix="softcon-pg-"))
    folder.chmod(0o777)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    port = free_port()
    subprocess.run(
        _as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
        timeout=300,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "postgres.log"), "-w", "start"]),
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        for database in ("prefect", "mlflow"):
            subprocess.run(
                [createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                check=True,
                capture_output=True,
                timeout=120,
            )
        yield Postgres(port)
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True, timeout=120
        )
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_final(client: Any, run: Any, timeout: float) -> Any:
    """The flow run once its state is final (or as it is after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            break
        time.sleep(2)
    return run


def _backfill_through_the_api(
    api_url: str, sample: SampleData, cube: Path, experiment: str, timeout: float
) -> tuple[object, list[object]]:
    """Start the backfill deployment as the UI's custom run does, wait, return it and its child runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    parameters = {
        "request": {
            "stac": str(sample.items_file),
            "collections": ["sentinel-2-l2a"],
            "bbox": list(sample.bbox),
            "start": sample.start.isoformat(),
            "end": sample.end.isoformat(),
            "cube": str(cube),  # the other fields as the form leaves them: the defaults (1,056 px tiles)
        },
        "period": "day",
        "max_in_flight": 2,
        "deployment": "ingest/ingest",
        "experiment": experiment,
        "poll_seconds": 1.0,
    }
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("backfill/backfill")
        parent = _wait_until_final(
            client, client.create_flow_run_from_deployment(deployment.id, parameters=parameters), timeout
        )
        ingest = client.read_deployment_by_name("ingest/ingest")
        children = [
            run
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["backfill"])))
            if run.deployment_id == ingest.id
        ]
    return parent, children


def _daily_through_the_api(api_url: str, sample: SampleData, cube: Path, experiment: str, timeout: float) -> object:
    """Check the daily schedule is registered paused and can be turned on; run the daily deployment once, as
    the scheduler would, with a scheduled time in the past; return the finished run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    from softcon.serve import DAILY_DEPLOYMENT, set_schedule_active

    scheduled = datetime.combine(DAILY_DAY + timedelta(days=1), datetime.min.time(), UTC).replace(hour=6)
    parameters = {
        "stac": str(sample.items_file), "bbox": list(sample.bbox), "collections": ["sentinel-2-l2a"],
        "cube": str(cube), "timezone": "UTC", "experiment": experiment,
    }  # fmt: skip
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DAILY_DEPLOYMENT)
        assert deployment.schedules and not any(s.active for s in deployment.schedules)  # registered paused
        assert set_schedule_active(api_url, DAILY_DEPLOYMENT, active=True) == len(deployment.schedules)
        assert all(s.active for s in client.read_deployment_by_name(DAILY_DEPLOYMENT).schedules)
        set_schedule_active(api_url, DAILY_DEPLOYMENT, active=False)
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters, state=Scheduled(scheduled_time=scheduled)
        )
        return _wait_until_final(client, run, timeout)


def _finetune_through_the_api(api_url: str, store: str, home: Path, experiment: str, timeout: float) -> list[Any]:
    """Run the finetune deployment once per task (segmentation on the masks, multilabel on the labels) from
    random init, as the UI's custom run does; return the finished runs."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("finetune/finetune")
        for task in ("segmentation", "multilabel"):
            config = {"model": "random", "backbone": "test_resnet", "task": task, "store": store, "epochs": 2,
                      "batch_size": 8, "device": "cpu", "out": str(home / "data" / f"finetune-{task}")}  # fmt: skip
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": config, "experiment": experiment}
            )
            runs.append(_wait_until_final(client, run, timeout))
    return runs


def _cube_days(cube: Path) -> list[date]:
    tile = next(iter(zarr.open_group(str(cube), mode="r")["tiles"].group_keys()))
    times = xr.open_zarr(str(cube), group=f"tiles/{tile}", consolidated=False).time.values
    return sorted(date.fromisoformat(str(t)[:10]) for t in times)


def _check_backfill(
    home: Path,
    sample: SampleData,
    *,
    prefect_database_url: str | None = None,
    mlflow_backend_uri: str | None = None,
    daily: bool = False,
    finetune: bool = False,
) -> None:
    from mlflow import MlflowClient

    cube = home / "data" / "cube.zarr"
    started = time.monotonic()
    with serve(home, prefect_database_url=prefect_database_url, mlflow_backend_uri=mlflow_backend_uri) as services:
        up = time.monotonic()
        output = deploy(services.prefect_api_url, env=services.env)
        assert "backfill/backfill" in output and "ingest/ingest" in output
        parent, children = _backfill_through_the_api(services.prefect_api_url, sample, cube, "integration", 600)
        worker_log = services.logs["worker"].read_text(errors="replace")[-4000:]
        assert parent.state is not None and parent.state.is_completed(), f"{parent.state}\n{worker_log}"
        assert len(children) == 3, [c.name for c in children]
        assert all(child.state.is_completed() for child in children), [c.state for c in children]
        assert sorted(child.name for child in children) == [f"ingest-{day.isoformat()}" for day in BACKFILL_DAYS]
        assert _cube_days(cube) == BACKFILL_DAYS

        client = MlflowClient(services.mlflow_url)
        experiment = client.get_experiment_by_name("integration")
        backfills = client.search_runs([experiment.experiment_id], filter_string="tags.`softcon.stage` = 'backfill'")
        assert len(backfills) == 1 and backfills[0].data.tags["prefect.flow_run_id"] == str(parent.id)
        ingests = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{backfills[0].info.run_id}'"
        )
        assert sorted(run.data.params["start"] for run in ingests) == [day.isoformat() for day in BACKFILL_DAYS]
        assert {run.data.tags["prefect.flow_run_id"] for run in ingests} == {str(child.id) for child in children}
        assert all(run.data.metrics["tile_dates_written"] == 1 for run in ingests)
        if daily:
            daily_cube = home / "data" / "daily.zarr"
            run = _daily_through_the_api(services.prefect_api_url, sample, daily_cube, "integration", 600)
            worker_log = services.logs["worker"].read_text(errors="replace")[-4000:]
            assert run.state is not None and run.state.is_completed(), f"{run.state}\n{worker_log}"
            assert _cube_days(daily_cube) == [DAILY_DAY]  # the day before the scheduled time, not the clock's
        if finetune:
            store = write_masked_store(write_cube(home / "data" / "masked-cube.zarr"), home / "data" / "masked.zarr")
            runs = _finetune_through_the_api(services.prefect_api_url, store, home, "integration", 600)
            worker_log = services.logs["worker"].read_text(errors="replace")[-4000:]
            assert all(run.state.is_completed() for run in runs), f"{[run.state for run in runs]}\n{worker_log}"
            finetunes = client.search_runs(
                [experiment.experiment_id], filter_string="tags.`softcon.stage` = 'finetune'"
            )
            assert {run.data.tags["prefect.flow_run_id"] for run in finetunes} == {str(run.id) for run in runs}
            by_task = {run.data.params["task"]: run for run in finetunes}
            assert 0 <= by_task["segmentation"].data.metrics["test/miou"] <= 1
            assert 0 <= by_task["multilabel"].data.metrics["test/map_micro"] <= 1
            for run in finetunes:
                artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
                assert {"finetuned", "confusion_matrix.png", "finetune.json"} <= artifacts, artifacts
        print(f"servers up in {up - started:.0f} s, deploy + backfill in {time.monotonic() - up:.0f} s")


@pytest.mark.slow
def test_backfill_and_finetune_deployments_on_real_servers_with_sqlite(sample: SampleData, tmp_path: Path) -> None:
    _check_backfill(tmp_path / "home", sample, daily=True, finetune=True)


@pytest.mark.slow
def test_backfill_deployment_on_real_servers_with_postgresql(
    sample: SampleData, tmp_path: Path, postgres: Postgres
) -> None:
    _check_backfill(
        tmp_path / "home",
        sample,
        prefect_database_url=postgres.url("prefect", "postgresql+asyncpg"),
        mlflow_backend_uri=postgres.url("mlflow", "postgresql+psycopg2"),
    )
