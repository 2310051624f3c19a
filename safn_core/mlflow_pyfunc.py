"""The pyfunc wrapper of a model bundle (`safn_core.mlflow_model.save_mlflow_model` saves it).

This module imports mlflow: only `save_mlflow_model` and MLflow's own loader import it."""

from __future__ import annotations

import pandas as pd
from mlflow.pyfunc import PythonModel


class SafnBundleModel(PythonModel):
    """A safn model bundle (artifact ``bundle``) behind MLflow's pyfunc interface."""

    def load_context(self, context):
        from safn_core.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per participant with the bundle's feature columns → ``participant_id``
        (where given), ``p_<class>`` and ``predicted`` (`bundle_frame.predict_frame`)."""
        from safn_core.bundle_frame import predict_frame

        return predict_frame(self.bundle, model_input)
