"""Where a run is logged, and MLflow imported only when tracking is on.

The embedded default (tracking on without a URI) is SQLite: ``sqlite:///<parent of the run
folder>/mlflow.db``, with artifacts in ``<parent of the run folder>/mlartifacts``. Why not a file
store (``./mlruns``): in MLflow 3.x the file backend is in maintenance mode and the default
tracking URI is ``sqlite:///mlflow.db``; MLflow 3.18 raises an error when a file store is opened
unless ``MLFLOW_ALLOW_FILE_STORE=true`` (mlflow/store/tracking/file_store.py). SQLite is one
file, holds every run of the folder's runs side by side, and ``mlflow ui --backend-store-uri``
reads it as is.

HTTP stores get short timeouts and no retries (MLflow's ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``; a user's own values in the environment win), so a tracking
server that is down costs the run at most a few seconds once (`safn_core.tracking.guard`).
"""

from __future__ import annotations

import os
from pathlib import Path

from safn_core.errors import SafnError

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
INSTALL = "pip install -e '.[tracking]'"


class TrackingUnavailable(SafnError):
    """Tracking is switched on but MLflow is not installed."""


def require_mlflow():
    """The ``mlflow`` module; one clear error when it is not installed."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import mlflow
    except ImportError:
        raise TrackingUnavailable(
            f"tracking is on (--tracking or tracking.enabled) but MLflow is not installed: "
            f"{INSTALL}, or run without --tracking") from None
    return mlflow


def embedded(run_dir: Path) -> tuple[str, str]:
    """The embedded store next to the run folders: (tracking URI, artifact location)."""
    parent = Path(run_dir).resolve().parent
    return f"sqlite:///{parent / DB_FILE}", (parent / ARTIFACTS_DIR).as_uri()


def resolve(uri: str | None, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment; None: the store's default)."""
    if uri:
        return uri, None
    return embedded(run_dir)
