"""The run's model bundle as an MLflow model in the tracking run (artifact ``mlflow_model``).

The folder `safn_core.mlflow_model.save_mlflow_model` writes (the pyfunc wrapper, a copy of the
bundle, signature, input example; what ``safn-export-mlflow`` writes), saved in a temporary
folder and logged as the run's artifacts, so that ``mlflow.pyfunc.load_model("runs:/<run
id>/mlflow_model")`` predicts what the bundle predicts.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

ARTIFACT_PATH = "mlflow_model"
QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # a user's own value wins
QUIET_LOGGERS = ("mlflow.pyfunc", "mlflow.models")  # the cloudpickle note, example checks


def log_model(client, run_id: str, bundle_dir: Path, artifact_path: str = ARTIFACT_PATH) -> None:
    """Write the bundle at ``bundle_dir`` as an MLflow model and log it into ``run_id``."""
    from safn_core.mlflow_model import save_mlflow_model

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:  # MLflow's notes on saving are not the run's business
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="safn-mlflow-model-") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = save_mlflow_model(bundle_dir, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(folder), artifact_path)
