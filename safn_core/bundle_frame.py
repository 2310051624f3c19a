"""A model bundle's predictions for a DataFrame, one row per participant: `predict_frame`, what
the MLflow pyfunc model (`safn_core.mlflow_pyfunc`) answers. No MLflow here.

The frame has the bundle's feature columns under the names of the training data (a table's
mapping, `Cohort.export`); ``participant_id`` and ``site`` where it has them. A frame without a
feature is refused with one line naming the columns (`check_columns`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.bundle import Bundle
from safn_core.data.cohort import ID, LABEL, SITE
from safn_core.errors import DataError


def input_columns(bundle: Bundle) -> list[str]:
    """The columns the bundle needs: its features, then what its harmonisation needs."""
    harmonised = bundle.harmonisation.columns if bundle.harmonisation is not None else ()
    return list(dict.fromkeys([*bundle.preprocessor.features, *harmonised]))


def check_columns(bundle: Bundle, frame: pd.DataFrame, source: str = "the DataFrame") -> None:
    """One line naming the columns the bundle needs and ``frame`` lacks."""
    missing = [c for c in input_columns(bundle) if c not in frame.columns]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{source} lacks {len(missing)} feature column(s) the model was trained "
                        f"on: {', '.join(missing[:10])}{more}; give one row per participant with "
                        "the same column names as the training data (e.g. a cohort export)")


def predict_frame(bundle: Bundle, frame: pd.DataFrame) -> pd.DataFrame:
    """The bundle's predictions for one row per participant: ``participant_id`` (where the frame
    has it), ``p_<class>`` (binary: the positive class only; K > 2: every class) and
    ``predicted`` (the class by the bundle's threshold, argmax or cut points). As
    safn-validate: harmonised (each site of ``frame``, or the frame as one site, adjusted from
    its own rows), preprocessed and calibrated by the bundle."""
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"the model takes a pandas DataFrame, one row per participant, not a "
                        f"{type(frame).__name__}")
    check_columns(bundle, frame)
    cols = input_columns(bundle)
    table = frame[[SITE, *cols] if SITE in frame.columns else cols].copy()
    if SITE in table.columns:  # as the data loaders give it: a string (a CSV's 12 is "12")
        table[SITE] = table[SITE].astype(str)
    for f in bundle.preprocessor.features:
        table[f] = pd.to_numeric(table[f], errors="coerce").astype(np.float64)
    table[LABEL] = 0  # the arrays carry a label; no prediction reads it
    p, _ = bundle.predict(bundle.arrays(table))
    decided = bundle.decide(p)
    names = bundle.label_names
    out = {} if ID not in frame.columns else {ID: frame[ID].astype(str).to_numpy()}
    if p.ndim == 1:
        out[f"p_{names[1]}"] = np.asarray(p, dtype=np.float64)
    else:
        out.update({f"p_{c}": np.asarray(p[:, k], dtype=np.float64) for k, c in enumerate(names)})
    out["predicted"] = [names[int(k)] for k in decided]
    return pd.DataFrame(out, index=frame.index)
