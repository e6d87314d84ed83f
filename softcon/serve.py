"""Local servers for the scale-out path: a Prefect server, a process work-pool worker and an MLflow server.

``softcon serve`` starts all three on 127.0.0.1 with their records in the project folder (or in PostgreSQL,
given database URLs), prints the UI addresses and stops them on exit; ``softcon deploy`` registers the
deployments of ``infra/prefect.yaml`` with that server. The integration tests use the same functions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_DIR / "infra" / "prefect.yaml"
WORK_POOL = "softcon-process"
"""The process work pool the deployments in ``infra/prefect.yaml`` run on."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (``prefect``, ``mlflow``), next to the running Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def wait_for_http(
    url: str, *, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200.

    Raises:
        RuntimeError: when the process exits first or ``timeout`` seconds pass, with the end of its log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = f"exited with {process.returncode}" if process is not None and process.poll() is not None else "timed out"
    raise RuntimeError(f"{url} did not come up ({state})" + (f"; log {log}:\n{tail}" if log else ""))


@dataclass
class Services:
    """Addresses of the running servers and the environment that points a client or a flow at them."""

    home: Path
    prefect_api_url: str
    mlflow_url: str
    work_pool: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")


def services_env(
    home: Path, prefect_api_url: str, mlflow_url: str, *, prefect_database_url: str | None = None
) -> dict[str, str]:
    """The environment of the servers, the worker and the flows it runs: one project folder, the two servers."""
    env = {
        **os.environ,
        "SOFTCON_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": prefect_api_url,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "true",
        "SOFTCON_MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "SOFTCON_PROJECT_DIR": str(PROJECT_DIR),
        "PYTHONUNBUFFERED": "1",
    }
    if prefect_database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_database_url
    else:
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    return env


def start_service(name: str, command: list[str], env: dict[str, str], logs: Path) -> tuple[subprocess.Popen, Path]:
    log = logs / f"{name}.log"
    handle = log.open("ab")
    # Own process group, so stopping it also stops the server's children (uvicorn workers, flow runs).
    process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    return process, log


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@contextmanager
def serve(
    home: Path,
    *,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    prefect_database_url: str | None = None,
    mlflow_backend_uri: str | None = None,
    work_pool: str = WORK_POOL,
    start_timeout: float = 240,
) -> Iterator[Services]:
    """Start the Prefect server, a process worker and the MLflow server on 127.0.0.1; stop them all on exit.

    Args:
        home: project folder (``SOFTCON_HOME``): Prefect's database (SQLite unless ``prefect_database_url``),
            MLflow's ``mlflow.db`` (unless ``mlflow_backend_uri``) and artifacts, logs under ``home/logs``.
        prefect_port, mlflow_port: ports; default: free ones.
        prefect_database_url: ``postgresql+asyncpg://user@host:port/db`` for Prefect.
        mlflow_backend_uri: ``postgresql+psycopg2://user@host:port/db`` for MLflow.
        work_pool: the process work pool the worker polls (created if missing).
        start_timeout: seconds each server may take to answer.

    Raises:
        RuntimeError: a server did not come up (the message holds the end of its log).
    """
    home = Path(home).resolve()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_port = prefect_port or free_port()
    mlflow_port = mlflow_port or free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = services_env(home, api_url, mlflow_url, prefect_database_url=prefect_database_url)
    services = Services(home=home, prefect_api_url=api_url, mlflow_url=mlflow_url, work_pool=work_pool, env=env)
    backend = mlflow_backend_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = home / "mlartifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        for name, command in [
            (
                "prefect-server",
                [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            ),
            (
                "mlflow-server",
                [
                    _bin("mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    backend,
                    "--default-artifact-root",
                    artifacts.as_uri(),
                ],
            ),
        ]:
            services.processes[name], services.logs[name] = start_service(name, command, env, logs)
        wait_for_http(
            f"{api_url}/health",
            timeout=start_timeout,
            process=services.processes["prefect-server"],
            log=services.logs["prefect-server"],
        )
        subprocess.run(
            [_bin("prefect"), "work-pool", "create", work_pool, "--type", "process", "--overwrite"],
            env=env,
            check=True,
            capture_output=True,
            timeout=start_timeout,
        )
        services.processes["worker"], services.logs["worker"] = start_service(
            "worker", [_bin("prefect"), "worker", "start", "--pool", work_pool, "--type", "process"], env, logs
        )
        wait_for_http(
            f"{mlflow_url}/health",
            timeout=start_timeout,
            process=services.processes["mlflow-server"],
            log=services.logs["mlflow-server"],
        )
        yield services
    finally:
        for process in reversed(list(services.processes.values())):  # worker first, then the servers
            stop_process(process)


DAILY_DEPLOYMENT = "daily-ingest/daily"
"""The scheduled deployment of infra/prefect.yaml (registered paused: it reaches Earth Search)."""


def set_schedule_active(api_url: str, deployment: str, *, active: bool) -> int:
    """Pause or resume every schedule of a deployment on the Prefect server at ``api_url``; how many there are."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        for schedule in found.schedules:
            client.update_deployment_schedule(found.id, schedule.id, active=active)
        return len(found.schedules)


def deploy(
    api_url: str,
    *,
    env: dict[str, str] | None = None,
    prefect_yaml: Path = PREFECT_YAML,
    names: list[str] | None = None,
) -> str:
    """Register the deployments of ``prefect_yaml`` (all, or ``names``) with the Prefect server at ``api_url``.

    The deployments run flows from this checkout (``SOFTCON_PROJECT_DIR``, set here) on the process pool.

    Returns:
        The output of ``prefect deploy``.

    Raises:
        RuntimeError: with that output, when the command fails.
    """
    selection = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    command = [_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", str(prefect_yaml), *selection]
    env = {**(env or os.environ), "PREFECT_API_URL": api_url, "SOFTCON_PROJECT_DIR": str(PROJECT_DIR)}
    done = subprocess.run(command, env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout
