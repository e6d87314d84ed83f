"""Keep every test's records out of the user's project folder and off any configured server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fixtures shared by several test modules, each defined once (a session fixture imported into a test module
# would get one instance per importing module). Imported after the environment below is set.
pytest_plugins = ["data_fixtures", "s3_fixtures"]

# Set before Prefect or MLflow is imported by any test module: both read these at import/first use.
_HOME = Path(tempfile.mkdtemp(prefix="softcon-tests-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["SOFTCON_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_HOME / 'mlflow.db'}"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Prefect's temporary API starts slowly on a busy 2-core machine (configure_runtime does the same for the CLI).
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.pop("PREFECT_API_URL", None)
for name in [key for key in os.environ if key.startswith("SOFTCON_") and key != "SOFTCON_HOME"]:
    os.environ.pop(name)


@pytest.fixture(scope="module", autouse=True)
def _drop_mlflow_artifacts() -> Iterator[None]:
    """Delete the MLflow artifacts a test module logged, and the checkpoints evaluate downloaded, once it has
    finished.

    Each training run logs a checkpoint of about 180 MB; kept for the whole session they filled CI's disk.
    """
    yield
    for folder in ("mlartifacts", "checkpoints"):
        shutil.rmtree(_HOME / folder, ignore_errors=True)
