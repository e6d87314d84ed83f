"""Keep every test's records out of the user's project folder and off any configured server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before Prefect or MLflow is imported by any test module: both read these at import/first use.
_HOME = Path(tempfile.mkdtemp(prefix="softcon-tests-"))
os.environ["SOFTCON_HOME"] = str(_HOME)
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_HOME / 'mlflow.db'}"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Prefect's temporary API starts slowly on a busy 2-core machine (configure_runtime does the same for the CLI).
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.pop("PREFECT_API_URL", None)
for name in [key for key in os.environ if key.startswith("SOFTCON_") and key != "SOFTCON_HOME"]:
    os.environ.pop(name)
