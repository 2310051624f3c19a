"""A model bundle as an MLflow model (pyfunc flavour): `save_mlflow_model`.

The MLflow model folder holds a copy of the bundle (artifact ``bundle``) and the pyfunc wrapper
`safn_core.mlflow_pyfunc.SafnBundleModel`, so that ``mlflow.pyfunc.load_model(DIR)
.predict(frame)`` gives, for one row per participant with the bundle's feature columns (the
names of a table's mapping / `Cohort.export`), the probabilities ``safn-validate`` computes on
the same participants: the bundle's preprocessing, its harmonisation (each site of the frame
adjusted from its own rows), its calibration map and its decision rule
(`safn_core.bundle_frame.predict_frame`).

MLflow is optional (``pip install -e '.[tracking]'``): this module imports it only when a model
is saved, and safn runs without it. The signature lists the bundle's data contract (every
feature a double; see `signature`), and the input example is a few participants of the
synthetic cohort (`input_example`), never a site's data.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.bundle import Bundle, load_bundle
from safn_core.bundle_frame import input_columns
from safn_core.data.cohort import ID, SITE
from safn_core.errors import SafnError

N_EXAMPLE = 5
"""Rows of the input example."""
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "scikit-learn", "scipy",
                "pyyaml", "pydantic", "rich", "matplotlib")
"""What safn_core needs to predict (pinned at the installed versions; Flower is not needed)."""


def require_mlflow():
    """The mlflow module, or a one-line error saying how to install it."""
    try:
        import mlflow
    except ImportError:
        raise SafnError("MLflow is not installed; install safn's tracking extra: "
                        "pip install -e '.[tracking]'") from None
    return mlflow


def signature(bundle: Bundle):
    """The bundle's data contract as an MLflow signature: every feature a double (optional in
    MLflow's sense, so that a frame without it reaches the bundle's own one-line error, and its
    values may be missing: the preprocessing imputes them); ``participant_id`` and ``site``
    optional, of any type (read as strings); a harmonisation's covariates (double, or string
    for categorical levels that are not numbers). Outputs: ``participant_id``, ``p_<class>``,
    ``predicted``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    cols = [ColSpec("double", f, required=False) for f in bundle.preprocessor.features]
    extra = [c for c in input_columns(bundle) if c not in bundle.preprocessor.features]
    categorical = bundle.harmonisation.spec.categorical if bundle.harmonisation else {}
    for c in extra:
        levels = categorical.get(c, ())
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels)
        cols.append(ColSpec("double" if numeric else "string", c, required=False))
    # any type: a site or id column read from a CSV is often integer, and MLflow does not turn
    # integers into strings; predict_frame reads both as strings
    cols += [ColSpec(AnyType(), ID, required=False), ColSpec(AnyType(), SITE, required=False)]
    names = bundle.label_names
    probs = [names[1]] if bundle.n_classes == 2 else list(names)
    outputs = Schema([ColSpec("string", ID, required=False),
                      *[ColSpec("double", f"p_{c}") for c in probs],
                      ColSpec("string", "predicted")])
    return ModelSignature(inputs=Schema(cols), outputs=outputs)


def input_example(bundle: Bundle, n: int = N_EXAMPLE) -> pd.DataFrame:
    """``n`` participants of the synthetic cohort (default synthetic settings, read with the
    bundle's data settings), in the bundle's columns. A feature the synthetic cohort does not
    have (a table's own columns) is at the bundle's training mean (its preprocessing.json);
    no row comes from a site's data."""
    from safn_core.config import DataConfig
    from safn_core.data.sources import load_cohort

    try:
        data = bundle.config.data.model_copy(update={"source": "synthetic", "path": None,
                                                     "mapping": None})
        cohort = load_cohort(data)
    except SafnError:
        cohort = load_cohort(DataConfig())
    table = cohort.table.iloc[:n]
    means = dict(zip(bundle.preprocessor.features, bundle.preprocessor.mean_))
    example = pd.DataFrame({ID: table.index.astype(str).to_numpy(),
                            SITE: table[SITE].astype(str).to_numpy()})
    for c in input_columns(bundle):
        if c in table.columns:
            example[c] = table[c].to_numpy()
        else:
            example[c] = float(means.get(c, np.nan))
    return example


def _pins() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def save_mlflow_model(bundle_dir: Path, path: Path) -> Path:
    """Write the bundle at ``bundle_dir`` as an MLflow pyfunc model folder at ``path`` (which
    must not exist); returns ``path``. The bundle is loaded first, so a broken bundle is refused
    here with its own error; it is only read."""
    mlflow = require_mlflow()
    bundle_dir, path = Path(bundle_dir), Path(path)
    bundle = load_bundle(bundle_dir)
    if path.exists():
        raise SafnError(f"{path}: exists; the MLflow model was not written. Choose a new folder")
    from safn_core.mlflow_pyfunc import SafnBundleModel

    with tempfile.TemporaryDirectory(prefix="safn-mlflow-") as tmp:
        # the model's code: this safn_core, without compiled caches
        code = Path(tmp) / "safn_core"
        shutil.copytree(Path(__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow.pyfunc.save_model(
            str(path), python_model=SafnBundleModel(),
            artifacts={"bundle": str(bundle_dir.resolve())},
            signature=signature(bundle), input_example=input_example(bundle),
            code_paths=[str(code)], pip_requirements=_pins(),
            metadata={"safn_bundle": {"kind": bundle.meta.get("kind"),
                                      "target": bundle.target.name,
                                      "classes": list(bundle.label_names),
                                      "decision_rule": bundle.decision_rule,
                                      "harmonised": bundle.harmonisation is not None}})
    return path
