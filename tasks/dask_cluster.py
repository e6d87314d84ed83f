"""The Dask cluster a stage's work runs on: an existing scheduler, or a LocalCluster started for the run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from softcon.config import DaskStageConfig

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

__all__ = ["local_cluster", "open_dask_client"]


def local_cluster(n_workers: int, *, trim_memory: bool = True, profile: bool = True) -> LocalCluster:
    """A LocalCluster of ``n_workers`` single-threaded worker processes, scheduler and dashboard on loopback.

    ``trim_memory=False`` starts the workers without Dask's ``MALLOC_TRIM_THRESHOLD_=65536``, which returns freed
    memory to the system at once: ingest allocates and frees whole tile-dates, and with it a worker computed the
    same tiles about 12 % slower than the same code in the run's own process (``bench/bench_ingest.py``).
    ``profile=False`` turns off the workers' statistical profiler (the dashboard's Profile page), which samples
    the running task's stack every 10 ms: during ingest it took about 4 % of a worker's CPU time.
    """
    import dask
    from distributed import LocalCluster  # imported here: nothing heavy at import time

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if not trim_memory:
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    settings = {"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": profile}
    with dask.config.set(settings):
        # A bare ":0" dashboard listens on every interface.
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )


@contextlib.contextmanager
def open_dask_client(
    config: DaskStageConfig, client: Client | None, *, trim_memory: bool = True, profile: bool = True
) -> Iterator[Client]:
    """The given client, or one to config.dask_address, or a LocalCluster (``local_cluster``, with the options
    given); closes only what it started."""
    if client is not None:
        yield client
        return
    from distributed import Client

    if config.dask_address:
        with Client(config.dask_address) as remote:
            yield remote
        return
    with local_cluster(config.n_workers, trim_memory=trim_memory, profile=profile) as cluster, Client(cluster) as local:
        yield local
