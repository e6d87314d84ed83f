"""Several writers appending to one Zarr cube on object storage: per-tile leases on Zarr v3 vs icechunk commits.

Against a SeaweedFS S3 gateway on 127.0.0.1 (the tests' server, ``tests/s3_fixtures.py``, started with its
Prometheus metrics on, so that the server counts the S3 requests). An append: a tile's ``s2`` array, (time, 12, 256,
256) uint16 in chunks of one step, zstd, resized by +1 along time and the new step's chunk written (random data).

- A0: plain Zarr v3 on S3 (``s3://softcon/bench-writers/cube.zarr``, tiles in ``tiles/<id>/``), no coordination.
- A: the same under the tile's lease, ``softcon.tasks.object_writes.object_lease`` (``tile_lock`` on S3).
- B: icechunk: per append a writable session on ``main``, the group from ``session.store``, and a commit with
  ``rebase_with=icechunk.ConflictDetector()`` (concurrent commits race for the branch; the loser rebases).

One writer: ``--appends`` appends per method to its own tile, the methods interleaved (one warm-up each). Two writer
processes: each ``--steps`` appends to its own tile, started together after a warm-up append, ``--rounds`` rounds
alternating A and B. Prints a Markdown table (median seconds per append, ratio to A0's, wall time, server-counted S3
requests per append by type, HEAD filed under GET by SeaweedFS, non-2xx ones with their code), icechunk's rebase
and failure counts, and the tile lengths.

    PYTHONPATH=/tmp/icepkgs python bench/bench_cube_writers.py   # icechunk unpacked there
    pip install icechunk && python bench/bench_cube_writers.py   # a normal run: icechunk is no project dependency
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import s3fs
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3_fixtures import BUCKET, S3Server, aws_env, seaweedfs  # noqa: E402

from softcon.tasks.object_writes import object_lease  # noqa: E402

try:
    import icechunk
except ImportError:
    sys.exit("icechunk is not importable: pip install icechunk (not a project dependency), or put it on PYTHONPATH")

STEP = (12, 256, 256)
CUBE = f"s3://{BUCKET}/bench-writers/cube.zarr"
ICE_PREFIX = "bench-writers/icechunk"
WRITERS = ("w1", "w2")
METHODS = {"A0": "plain Zarr, no lease", "A": "Zarr + object_lease", "B": "icechunk commit"}
Commit = tuple[str, str] | None  # icechunk's (base, new) snapshot, ("", "") for plain Zarr, None: failed


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[tuple[S3Server, str]]:
    """The fixture's SeaweedFS with ``-metricsPort`` added to its command line; yields it and its metrics URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    popen = subprocess.Popen

    def with_metrics(command: list[str], *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        return popen([*command, f"-metricsPort={port}"], *args, **kwargs)

    with contextlib.ExitStack() as stack:
        with mock.patch.object(subprocess, "Popen", with_metrics):
            server = stack.enter_context(seaweedfs(root))
        yield server, f"http://127.0.0.1:{port}/metrics"


def s3_requests(metrics: str) -> Counter[str]:
    """The server's S3 request counts so far, by type (``GET``, ``PUT``...), non-2xx ones as ``type code``."""
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    counts: Counter[str] = Counter()
    for labels, value in re.findall(r"^SeaweedFS_s3_request_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        code = label.get("code", "200")
        counts[label["type"] if code.startswith("2") else f"{label['type']} {code}"] += int(float(value))
    return counts


def ice_repo(*, create: bool = False) -> icechunk.Repository:
    """The icechunk repository on the server, credentials from the ``AWS_*`` variables."""
    storage = icechunk.s3_storage(
        bucket=BUCKET, prefix=ICE_PREFIX, endpoint_url=os.environ["AWS_ENDPOINT_URL"], allow_http=True,
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"], secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1", force_path_style=True,
    )  # fmt: skip
    return icechunk.Repository.create(storage) if create else icechunk.Repository.open(storage)


def create_tiles(group: zarr.Group, tiles: list[str]) -> None:
    for tile in tiles:
        group.create_array(f"tiles/{tile}/s2", shape=(0, *STEP), chunks=(1, *STEP), dtype="uint16",
                           compressors=zarr.codecs.ZstdCodec())  # fmt: skip


def append_step(group: zarr.Group, tile: str, block: np.ndarray) -> None:
    """One append: the tile's ``s2`` one step longer, the new step written."""
    array: zarr.Array = group[f"tiles/{tile}/s2"]  # type: ignore[assignment]
    steps = array.shape[0]
    array.resize((steps + 1, *STEP))
    array[steps] = block


def append_zarr(tile: str, block: np.ndarray, *, lease: bool) -> Commit:
    lock = object_lease(f"{CUBE}/.ingest-locks/{tile}.lock") if lease else contextlib.nullcontext()
    with lock:
        append_step(zarr.open_group(CUBE, mode="r+"), tile, block)
    return ("", "")


def append_icechunk(repo: icechunk.Repository, tile: str, block: np.ndarray, *, tries: int = 20) -> Commit:
    session = repo.writable_session("main")
    base = session.snapshot_id
    append_step(zarr.open_group(session.store, mode="r+"), tile, block)
    try:
        new = session.commit(f"append {tile}", rebase_with=icechunk.ConflictDetector(), rebase_tries=tries)
    except (icechunk.ConflictError, icechunk.RebaseFailedError) as error:
        print(f"icechunk commit of {tile} failed: {error}", file=sys.stderr)
        return None
    return base, new


def appender(method: str) -> Callable[[str, np.ndarray], Commit]:
    if method == "B":
        repo = ice_repo()
        return lambda tile, block: append_icechunk(repo, tile, block)
    return lambda tile, block: append_zarr(tile, block, lease=method == "A")


def random_step(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10_000, STEP, dtype=np.uint16)


def writer(method: str, tile: str, steps: int, barrier: Any, results: Any) -> None:
    """A writer process: one warm-up append, then (when all are ready) ``steps`` timed appends to ``tile``."""
    append, block = appender(method), random_step(1 + WRITERS.index(tile))
    append(tile, block)
    barrier.wait(timeout=300)  # all warmed up: the parent reads the request counts
    barrier.wait(timeout=60)
    spans, commits = [], []
    for _ in range(steps):
        started = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        commits.append(append(tile, block))
        spans.append((started, time.perf_counter()))
    results.put((spans, commits))


def concurrent_round(method: str, steps: int, metrics: str) -> tuple[float, list[float], list[Commit], Counter[str]]:
    """Two writer processes on their own tiles: wall seconds, seconds per append, commits, S3 requests."""
    context = get_context("spawn")
    barrier, results = context.Barrier(len(WRITERS) + 1), context.Queue()
    processes = [context.Process(target=writer, args=(method, t, steps, barrier, results)) for t in WRITERS]
    for process in processes:
        process.start()
    barrier.wait(timeout=300)
    before = s3_requests(metrics)
    barrier.wait(timeout=60)
    outcomes = [results.get(timeout=600) for _ in processes]
    requests = s3_requests(metrics) - before
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0, f"writer {process.name} exited with {process.exitcode}"
    spans = [span for found, _ in outcomes for span in found]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return wall, [end - start for start, end in spans], [c for _, found in outcomes for c in found], requests


def setup() -> None:
    """The cube with tiles ``a0``, ``a`` and the writers', the icechunk repository with ``b`` and the writers'."""
    create_tiles(zarr.open_group(CUBE, mode="a"), ["a0", "a", *WRITERS])
    session = ice_repo(create=True).writable_session("main")
    create_tiles(zarr.open_group(session.store, mode="a"), ["b", *WRITERS])
    session.commit("tiles")


def one_writer(appends: int, metrics: str) -> tuple[list[str], float]:
    """Table rows of the one-writer runs, and A0's median seconds per append."""
    appenders = {method: appender(method) for method in METHODS}
    tiles, block = {"A0": "a0", "A": "a", "B": "b"}, random_step(0)
    for method, append in appenders.items():
        append(tiles[method], block)  # warm-up: connections, caches
    seconds: defaultdict[str, list[float]] = defaultdict(list)
    requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for round_ in range(appends):
        for method in [*METHODS][round_ % 3 :] + [*METHODS][: round_ % 3]:  # each method first in turn
            before = s3_requests(metrics)
            started = time.perf_counter()
            appenders[method](tiles[method], block)
            seconds[method].append(time.perf_counter() - started)
            requests[method] += s3_requests(metrics) - before
    floor = statistics.median(seconds["A0"])
    total = {method: f"{sum(spent):.2f}" for method, spent in seconds.items()}
    return [row(f"1 writer × {appends}", m, seconds[m], floor, total[m], requests[m]) for m in METHODS], floor


def two_writers(steps: int, rounds: int, floor: float, metrics: str) -> tuple[list[str], list[Commit]]:
    """Table rows of the two-writer rounds (A and B alternating), and icechunk's timed commits."""
    walls: defaultdict[str, list[float]] = defaultdict(list)
    seconds: defaultdict[str, list[float]] = defaultdict(list)
    requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
    commits: list[Commit] = []
    for _ in range(rounds):
        for method in ("A", "B"):
            wall, spent, done, used = concurrent_round(method, steps, metrics)
            walls[method].append(wall)
            seconds[method] += spent
            requests[method] += used
            commits += done if method == "B" else []
    scenario = f"2 writers × {steps} (processes, own tiles)"
    wall = {method: " / ".join(f"{w:.2f}" for w in found) for method, found in walls.items()}
    return [row(scenario, m, seconds[m], floor, wall[m], requests[m]) for m in ("A", "B")], commits


def row(scenario: str, method: str, seconds: list[float], floor: float, wall: str, requests: Counter[str]) -> str:
    """A table row; ``requests`` over all of ``seconds``' appends."""
    median, appends = statistics.median(seconds), len(seconds)
    kinds = ", ".join(f"{kind} {count / appends:.1f}" for kind, count in sorted(requests.items()))
    return (f"| {scenario} | {method}: {METHODS[method]} | {median:.3f} | {median / floor:.2f} | {wall} | "
            f"{requests.total() / appends:.1f} ({kinds}) |")  # fmt: skip


def tile_lengths() -> dict[str, list[int]]:
    """Time steps of the writers' tiles in the cube (A) and in the icechunk repository (B)."""
    ice = ice_repo().readonly_session("main").store
    groups = {"A": zarr.open_group(CUBE, mode="r"), "B": zarr.open_group(ice, mode="r")}
    return {method: [group[f"tiles/{t}/s2"].shape[0] for t in WRITERS] for method, group in groups.items()}  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=20, help="appends per method, one writer")
    parser.add_argument("--steps", type=int, default=10, help="appends per writer, two writers")
    parser.add_argument("--rounds", type=int, default=3, help="two-writer rounds per method")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_cube_writers_") as folder, s3_server(Path(folder)) as (s3, metrics):
        os.environ.update(aws_env(s3, s3.secret_key))
        s3fs.S3FileSystem.clear_instance_cache()
        setup()
        rows, floor = one_writer(args.appends, metrics)
        more, commits = two_writers(args.steps, args.rounds, floor, metrics)
        parents = {snapshot.id: snapshot.parent_id for snapshot in ice_repo().ancestry(branch="main")}
        lengths = tile_lengths()
    rebased = sum(1 for c in commits if c is not None and parents.get(c[1]) != c[0])
    failed = sum(1 for c in commits if c is None)
    load = os.getloadavg()[0]
    print(f"\nicechunk {icechunk.__version__}, zarr {zarr.__version__}, load {load:.1f} on {os.cpu_count()} cores\n")
    print("| scenario | method | median s/append | ÷ A0 median | wall s (total; per round) | S3 requests/append |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows + more))
    expected = args.rounds * (args.steps + 1)  # warm-ups included
    print(f"\nicechunk, 2 writers: {len(commits)} timed commits, {rebased} rebased on the other's, {failed} failed")
    print(f"writers' tile lengths (expected {expected}): {lengths}")


if __name__ == "__main__":
    main()
