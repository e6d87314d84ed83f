"""Security: no code runs from weight files, no credential reaches a record, no path escapes the cube, and every
server the project starts listens on 127.0.0.1 only.

The rows of docs/reliability.md ("Security") name these tests.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import xarray as xr
from data_fixtures import sample_ingest_config
from header_proxy import HeaderProxy, serve_header_proxy

import softcon.serve as serve
from softcon.config import PreprocessConfig
from softcon.flows.reproduce import reproduce_run
from softcon.tasks.dask_cluster import open_dask_client
from softcon.tasks.grid import tile_from_id
from softcon.tasks.ingest import run_ingest
from softcon.tasks.sample_data import SampleData
from softcon.tasks.stac_server import serve_stac

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("flows", "tasks", "models", "softcon", "bench", "tests", "docs", "infra")
LOOPBACK = "127.0.0.1"


def _python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def _listening(pids: set[int]) -> list[str]:
    """Listening TCP addresses of these processes, as ``ip:port``."""
    return sorted(
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    )


def _family(pid: int) -> set[int]:
    return {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}


# ---------------------------------------------------------------------------------------- torch.load


def test_every_torch_load_in_the_source_tree_passes_weights_only_true() -> None:
    calls = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                ok = len(weights_only) == 1 and isinstance(weights_only[0], ast.Constant) and weights_only[0].value
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok is True))
    # models/encoder.py's load_torch_file reads every weights file and checkpoint; tests may load directly.
    assert "models/encoder.py" in {where.split(":")[0] for where, _ in calls}
    assert [where for where, ok in calls if not ok] == []


# ------------------------------------------------------------------------------------------ secrets


@pytest.fixture
def token_proxy(data_stac_url: str) -> Iterator[type[HeaderProxy]]:
    with serve_header_proxy(data_stac_url) as handler:
        yield handler


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKESOFTCON0TEST1",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-7Hq2vX9pLm3Rt8Yw",
    "SOFTCON_TEST_STAC_TOKEN": "Bearer fake-stac-token-Zr4Kp8Qm2Vx6",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-Bn5Ct9Df3Gh7",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-Jk2Lm6Np0Qr4",
    "PREFECT_API_KEY": "pnu_fakeprefectkeySoftcon1234567890ab",
}


@pytest.mark.slow
def test_no_credential_reaches_mlflow_prefect_logs_or_stdout(
    data_sample: SampleData, token_proxy: type[HeaderProxy], tmp_path: Path
) -> None:
    """``softcon ingest`` run as a user would, with fake credentials in its environment and the STAC token
    sent through ``--header``: the token is used (the API refuses requests without it), and no secret value
    appears in MLflow (params, tags, metric names, artifacts), the Prefect database, the task-result cache,
    any other file under the project folder, the logs or the output."""
    token_proxy.expected = SECRETS["SOFTCON_TEST_STAC_TOKEN"]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOFTCON_", "PREFECT_", "MLFLOW_"))}
    env |= SECRETS | {
        "SOFTCON_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    west, south, east, north = data_sample.bbox
    command = [
        sys.executable, "-m", "softcon", "ingest", "--stac", token_proxy.root, "--collection", "sentinel-2-l2a",
        "--collection", "sentinel-1-rtc", "--bbox", f"{west},{south},{east},{north}",
        "--start", str(data_sample.start), "--end", str(data_sample.end), "--tile-size", "64", "--max-cloud", "100",
        "--header", "Authorization=SOFTCON_TEST_STAC_TOKEN", "--cube", str(tmp_path / "cube.zarr"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    authorised = [path for _, path, header in token_proxy.seen if header == token_proxy.expected]
    assert any("/search" in path for path in authorised)  # the header was really sent
    assert "MLflow run id" in output

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert runs
    recorded = [output]
    for run in runs:
        recorded += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
        local = Path(client.download_artifacts(run.info.run_id, "", dst_path=str(tmp_path / run.info.run_id)))
        recorded += [path.read_text(errors="replace") for path in local.rglob("*") if path.is_file()]
    # The variable's NAME is recorded (the run can be reproduced with it), never its value.
    assert [run.data.params.get("headers.Authorization") for run in runs] == ["SOFTCON_TEST_STAC_TOKEN"]

    files = [path for path in home.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files) and any(path.suffix == ".db" for path in files)
    for name, secret in SECRETS.items():
        assert [i for i, text in enumerate(recorded) if secret in text] == [], name
        assert [str(path) for path in files if secret.encode() in path.read_bytes()] == [], name


# --------------------------------------------------------------------------------------------- paths


def test_item_ids_with_path_parts_stay_data_and_write_nothing_outside_the_cube(
    data_sample: SampleData, tmp_path: Path
) -> None:
    features = json.loads(data_sample.items_file.read_text())["features"]
    hostile = {"sentinel-2-l2a": "../../../escaped_s2", "sentinel-1-rtc": "tiles/../../escaped_s1/x"}
    for collection, item_id in hostile.items():
        next(f for f in features if f["collection"] == collection)["id"] = item_id
    items = tmp_path / "work" / "items.json"
    items.parent.mkdir()
    items.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    cube = tmp_path / "work" / "deep" / "cube.zarr"
    before = {p for p in tmp_path.rglob("*")}

    report = run_ingest(sample_ingest_config(data_sample, str(items), cube))

    assert set(hostile.values()) <= set(report.items) and report.tile_dates_written > 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(cube) or cube.is_relative_to(p) for p in created)  # or its parents
    assert not any("escaped" in p.name for p in tmp_path.parent.rglob("*escaped*"))
    recorded = set()
    for tile_id in report.tiles:
        attrs = xr.open_zarr(cube, group=f"tiles/{tile_id}", consolidated=False).attrs
        recorded |= {i for ids in (*attrs["s2_items"].values(), *attrs["s1_items"].values()) for i in ids}
    assert set(hostile.values()) <= recorded  # kept verbatim, as data


@pytest.mark.parametrize("tile_id", ["../../etc_1_2", "32632_0653440_5152000/..", "32632_../_1", "a_b_c", "1_2"])
def test_a_tile_id_read_from_a_cube_must_be_a_grid_id(tile_id: str) -> None:
    with pytest.raises(ValueError, match="is not EPSG_XXXXXXX_YYYYYYY"):
        tile_from_id(tile_id, resolution=10, size=64)


def test_a_reproduction_run_id_cannot_name_a_folder_outside_the_reproductions(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    for run_id in (f"../../../{victim}", "..", "a/b"):
        with pytest.raises(ValueError, match="not an MLflow run id"):
            reproduce_run(run_id)
    assert (victim / "keep.txt").is_file()


# ------------------------------------------------------------------------------------------- servers


def test_the_stac_server_listens_on_loopback_only(data_sample: SampleData) -> None:
    with serve_stac([data_sample.items_file]) as url:
        assert url.startswith(f"http://{LOOPBACK}:")
        address = url.removeprefix("http://")
        rustac = [p for p in psutil.Process().children() if "rustac" in p.name() and address in p.cmdline()]
        assert len(rustac) == 1
        addresses = _listening(_family(rustac[0].pid))
    assert addresses and all(a.startswith(f"{LOOPBACK}:") for a in addresses), addresses


def test_the_local_dask_cluster_listens_on_loopback_only() -> None:
    before = _listening({os.getpid()})
    with open_dask_client(PreprocessConfig(n_workers=1), None) as client:
        assert client.scheduler.address.startswith(f"tcp://{LOOPBACK}:")
        addresses = sorted(set(_listening(_family(os.getpid()))) - set(before))
    assert len(addresses) >= 3  # scheduler, dashboard, worker (and its nanny)
    assert all(a.startswith(f"{LOOPBACK}:") for a in addresses), addresses


def test_softcon_serve_starts_prefect_and_mlflow_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The start arguments of ``softcon serve`` (the servers themselves are started in
    tests/test_integration_servers.py)."""
    started: dict[str, list[str]] = {}

    class _Process:
        def poll(self) -> None:
            return None

    def start(name: str, command: list[str], env: dict[str, str], logs: Path) -> tuple[_Process, Path]:
        started[name] = command
        return _Process(), logs / f"{name}.log"

    monkeypatch.setattr(serve, "start_service", start)
    monkeypatch.setattr(serve, "wait_for_http", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "stop_process", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve.subprocess, "run", lambda *args, **kwargs: None)
    with serve.serve(tmp_path) as services:
        assert services.prefect_api_url.startswith(f"http://{LOOPBACK}:")
        assert services.mlflow_url.startswith(f"http://{LOOPBACK}:")
    for name in ("prefect-server", "mlflow-server"):
        command = started[name]
        assert command[command.index("--host") + 1] == LOOPBACK, command
    assert "--host" not in started["worker"]  # the worker only polls the API, it does not listen


def test_no_product_code_or_test_helper_binds_every_interface() -> None:
    """Servers in product code and the test helpers (fixtures, proxies, factories): no 0.0.0.0, no '' host,
    no bare ':0' Dask dashboard (which listens on every interface)."""
    markers = ("0.0.0.0", 'dashboard_address=":0"', "dashboard_address=':0'", 'HTTPServer(("",', "HTTPServer(('',")
    helpers = [
        path
        for path in _python_files()
        if path.parts[len(ROOT.parts)] in ("flows", "tasks", "models", "softcon", "infra")
        or (path.parent.name == "tests" and not path.name.startswith("test_"))
    ]
    assert ROOT / "tests" / "data_fixtures.py" in helpers and ROOT / "tasks" / "stac_server.py" in helpers
    offenders = [f"{path.relative_to(ROOT)}: {m}" for path in helpers for m in markers if m in path.read_text()]
    assert offenders == []
