"""Where the embedded defaults live: one project-local folder for every record the pipeline keeps.

Nothing needs a server on one machine: MLflow tracks to SQLite with local artifacts, Prefect uses its
temporary local API with its database under the same folder, Dask starts a LocalCluster and Zarr stores
sit on local disk. Every value can be overridden with a ``SOFTCON_*`` environment variable, which is how
the same code points at a Prefect server, an MLflow server or a Dask cluster when it scales out.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Runtime locations, read from ``SOFTCON_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SOFTCON_", frozen=True, extra="ignore")

    home: Path = Path(".softcon")
    """Project-local folder for data, MLflow records, Prefect state and checkpoints."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; default: SQLite in ``<home>/mlflow.db``."""
    mlflow_artifact_root: str | None = None
    """Artifact location for new experiments; default: ``<home>/mlartifacts``."""
    experiment: str = "softcon"
    """MLflow experiment for stages run on their own (the pipeline uses its own name)."""
    dask_address: str | None = None
    """Address of an existing Dask scheduler; default: a LocalCluster per stage."""
    results_url: str | None = None
    """Object storage for the stage tasks' cached results (``s3://bucket/prefix``), shared by every process that
    names it, so a pod finds what an earlier pod computed; default: ``<home>/prefect/results``, one machine's.
    Credentials come from the environment (``AWS_*`` …), never from here: ``flows/result_storage.py``."""

    @property
    def root(self) -> Path:
        """The home folder as an absolute path."""
        return self.home.expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or (self.root / "mlartifacts").as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()


def configure_runtime(settings: Settings | None = None) -> Settings:
    """Point Prefect and MLflow at the project folder unless the environment already points elsewhere.

    Must run before Prefect is imported: Prefect reads ``PREFECT_HOME`` when its settings load.
    """
    settings = settings or get_settings()
    settings.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(settings.root / "prefect"))
    # Cached task results (flows/caching.py) persist here, so a later run in another process finds them.
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(settings.root / "prefect" / "results"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    # The temporary local Prefect API starts on demand; give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Dask's per-worker INFO lines drown the stage logs; warnings and errors still show.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    return settings
