"""Cached stage results on object storage (``SOFTCON_RESULTS_URL``): a stage done in one pod is a cache hit in the
next, against the SeaweedFS S3 server of s3_fixtures.py.

Each "pod" is a child process with its own ``SOFTCON_HOME``: its own Prefect database (the temporary local API)
and its own local result folder, which is what a short-lived container loses. The pods share the object store
and, as pods in every deployment do, the MLflow tracking store (a SQLite file here): a cached result names the
MLflow run that made it, and flows/caching.py uses it only while that run exists.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import s3fs
import zarr
from affine import Affine
from labels_helpers import TILE_A, make_cube, write_raster
from prefect.filesystems import RemoteFileSystem
from prefect.results import ResultStore
from s3_fixtures import BUCKET, S3Server, aws_env

from softcon.config import LabelsConfig
from softcon.flows.result_storage import ResultStorageError, check_result_storage, task_result_storage
from softcon.settings import get_settings
from softcon.tasks.labels import run_labels

REPO = Path(__file__).resolve().parents[1]
CACHE_HIT = "Finished in state Cached(type=COMPLETED)"
POD_SCRIPT = """
import sys
from softcon.settings import configure_runtime

configure_runtime()  # as the CLI does: Prefect and MLflow records under this pod's SOFTCON_HOME

from softcon.flows.labels import labels_flow
from softcon.config import LabelsConfig

result = labels_flow(LabelsConfig.model_validate_json(sys.argv[1]), experiment="result-storage")
print("POD-RESULT", result.model_dump_json())
"""


@dataclass(frozen=True)
class Pod:
    """One finished child process: its home folder, exit status and everything it printed."""

    home: Path
    returncode: int
    output: str


@dataclass(frozen=True)
class Cluster:
    """What every pod of a test shares: the S3 server, the MLflow store and the labels stage's config."""

    server: S3Server
    s3: s3fs.S3FileSystem
    """A client of the server, for the tests' own look at what the pods wrote."""
    root: Path
    config: LabelsConfig
    results_url: str

    def run_pod(
        self,
        name: str,
        *,
        results_url: str | None,
        config: LabelsConfig | None = None,
        aws: dict[str, str] | None = None,
    ) -> Pod:
        """Run the labels flow in a fresh process with its own home (``root/name``).

        Args:
            name: the pod's home folder under ``root``.
            results_url: its ``SOFTCON_RESULTS_URL``; None leaves it unset.
            config: the stage config; default: the cluster's.
            aws: its ``AWS_*`` variables; default: the server's endpoint and credentials.
        """
        home = self.root / name
        inherited = ("SOFTCON_", "PREFECT_", "MLFLOW_", "AWS_")
        env = {key: value for key, value in os.environ.items() if not key.startswith(inherited)}
        env |= {
            "SOFTCON_HOME": str(home),
            "SOFTCON_MLFLOW_TRACKING_URI": f"sqlite:///{self.root / 'mlflow.db'}",
            "SOFTCON_MLFLOW_ARTIFACT_ROOT": (self.root / "mlartifacts").as_uri(),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            # Nothing beyond the loopback server: no EC2 metadata lookup, no ~/.aws of whoever runs the tests.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            **(aws_env(self.server, self.server.secret_key) if aws is None else aws),
        }
        if results_url is not None:
            env["SOFTCON_RESULTS_URL"] = results_url
        config = config or self.config
        done = subprocess.run(
            [sys.executable, "-c", POD_SCRIPT, config.model_dump_json()],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return Pod(home, done.returncode, done.stdout + done.stderr)


def _landcover_objects(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """Every object of the cube's ``landcover`` arrays → (last modified, ETag): a rewrite changes the first."""
    found = cluster.s3.find(cluster.config.cube, detail=True)
    return {key: (str(info["LastModified"]), info["ETag"]) for key, info in found.items() if "/landcover/" in key}


def _record_objects(cluster: Cluster) -> list[str]:
    """The cached result records under the results URL (not the access check's object)."""
    return [key for key in cluster.s3.find(cluster.results_url) if not key.endswith(".softcon-access-check")]


def _stripes() -> np.ndarray:
    """64 x 64 WorldCover codes in four vertical stripes (tree, shrub, grass, water)."""
    return np.repeat(np.array([10, 20, 30, 80], dtype=np.uint8), 16)[None, :].repeat(64, axis=0)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-tile cube on S3 already labelled from a local raster, and a first pod that labelled it again with
    its result cached on S3.

    Labelling the cube once beforehand makes every later run rewrite the same bytes and metadata, so the cube's
    fingerprint, and with it the cache key, is the same in every pod whichever way the stage keys on it.
    """
    server: S3Server = request.getfixturevalue("s3_server")
    root = tmp_path_factory.mktemp("pods")
    raster = write_raster(root / "landcover.tif", _stripes(), Affine(10, 0, TILE_A.x0, 0, -10, TILE_A.y0),
                          "EPSG:32632", nodata=0)  # fmt: skip
    config = LabelsConfig(cube=f"s3://{BUCKET}/{root.name}/cube.zarr", source=str(raster))
    with pytest.MonkeyPatch.context() as patch:
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in aws_env(server, server.secret_key).items():
            patch.setenv(name, value)
        make_cube(config.cube, [TILE_A])  # type: ignore[arg-type]  (zarr opens URLs as well as paths)
        run_labels(config)
        s3fs.S3FileSystem.clear_instance_cache()
    client = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint,
                               skip_instance_cache=True)  # fmt: skip
    made = Cluster(server, client, root, config, results_url=f"s3://{BUCKET}/{root.name}/results")
    first = made.run_pod("pod-1", results_url=made.results_url)
    assert first.returncode == 0, first.output[-5000:]
    assert CACHE_HIT not in first.output
    yield made


@pytest.mark.slow
def test_a_pod_with_a_new_home_finds_the_cached_result_on_the_object_store(cluster: Cluster) -> None:
    written = _landcover_objects(cluster)
    assert written  # the first pod wrote land cover into the cube on S3

    second = cluster.run_pod("pod-2", results_url=cluster.results_url)

    assert second.returncode == 0, second.output[-5000:]
    assert CACHE_HIT in second.output
    assert _landcover_objects(cluster) == written  # the stage did not run again
    assert _record_objects(cluster)  # the records live on S3 ...
    for pod in ("pod-1", "pod-2"):  # ... and in neither pod's home
        assert not any((cluster.root / pod / "prefect" / "results").glob("*"))


@pytest.mark.slow
def test_without_a_results_url_a_pod_with_a_new_home_runs_the_stage_again(cluster: Cluster) -> None:
    written = _landcover_objects(cluster)

    local = cluster.run_pod("pod-local", results_url=None)

    assert local.returncode == 0, local.output[-5000:]
    assert CACHE_HIT not in local.output
    rewritten = _landcover_objects(cluster)
    assert rewritten.keys() == written.keys() and rewritten != written  # same chunks, written again
    assert any((local.home / "prefect" / "results").glob("*"))  # its record went to its own home


@pytest.mark.slow
def test_missing_credentials_stop_the_stage_before_it_runs(cluster: Cluster, tmp_path: Path) -> None:
    # A local cube and raster: the stage itself needs no credentials, only the results URL does.
    cube = make_cube(tmp_path / "cube.zarr", [TILE_A])

    pod = cluster.run_pod(
        "pod-no-credentials",
        results_url=cluster.results_url,
        config=cluster.config.model_copy(update={"cube": str(cube)}),
        aws={"AWS_ENDPOINT_URL": cluster.server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"},
    )

    assert pod.returncode != 0
    assert "ResultStorageError: cannot write cached task results to SOFTCON_RESULTS_URL=" in pod.output
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in pod.output  # says what to set
    assert "landcover" not in zarr.open_group(str(cube), mode="r")[f"tiles/{TILE_A.tile_id}"]  # nothing labelled


# ---- the storage and its records, in this process ----------------------------------------------------------------


@pytest.fixture
def use_results_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], RemoteFileSystem | None]]:
    """Set (or unset) ``SOFTCON_RESULTS_URL`` and return the stage tasks' storage; settings re-read afterwards."""

    def use(url: str | None) -> RemoteFileSystem | None:
        if url is None:
            monkeypatch.delenv("SOFTCON_RESULTS_URL", raising=False)
        else:
            monkeypatch.setenv("SOFTCON_RESULTS_URL", url)
        get_settings.cache_clear()
        return task_result_storage()

    yield use
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.usefixtures("s3_env")
def test_records_round_trip_and_expire_on_the_object_store(
    use_results_url: Callable[[str | None], RemoteFileSystem | None], request: pytest.FixtureRequest
) -> None:
    storage = use_results_url(f"s3://{BUCKET}/{request.node.name}/results")
    check_result_storage()
    writer, reader = ResultStore(result_storage=storage), ResultStore(result_storage=storage)  # separate caches

    writer.write({"tiles": 1}, key="stage-key")
    assert reader.exists("stage-key")
    assert reader.read("stage-key").result == {"tiles": 1}

    # How flows/caching.py invalidates a cached result whose outputs are gone: a record that expired already.
    writer.write(None, key="stage-key", expiration=datetime.now(UTC) - timedelta(seconds=1))
    assert not ResultStore(result_storage=storage).exists("stage-key")
    assert not reader.exists("absent-key")


def test_wrong_credentials_are_named_and_the_secret_is_not_printed(
    s3_env: S3Server,
    use_results_url: Callable[[str | None], RemoteFileSystem | None],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps file systems with the credentials they started with
    use_results_url(f"s3://{BUCKET}/{request.node.name}/results")

    with pytest.raises(ResultStorageError) as raised:
        check_result_storage()

    message = str(raised.value)
    assert message.startswith(f"cannot write cached task results to SOFTCON_RESULTS_URL='s3://{BUCKET}/")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and s3_env.secret_key not in message


def test_without_the_setting_the_stage_tasks_keep_prefects_local_default(
    use_results_url: Callable[[str | None], RemoteFileSystem | None],
) -> None:
    assert use_results_url(None) is None
    check_result_storage()  # nothing to check


@pytest.mark.parametrize(
    "url",
    ["softcon/results", "/shared/results", "s3://", "http://example.org/results", "file:///shared/results"],
    ids=["no-protocol", "local-path", "no-bucket", "http", "file"],
)
def test_a_url_that_is_not_an_object_store_is_refused_naming_the_setting(
    use_results_url: Callable[[str | None], RemoteFileSystem | None], url: str
) -> None:
    with pytest.raises(ValueError, match=r"SOFTCON_RESULTS_URL='.*' is not an object-store URL: expected .*s3://"):
        use_results_url(url)
