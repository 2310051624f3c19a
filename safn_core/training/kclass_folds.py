"""Cross-validation fold scoring for a target with K > 2 classes (`safn_core.targets`).

The binary path of `safn_core.training.crossval` picks a threshold on validation and reports
the binary metric set. With K > 2 classes every model's scores are its (n, K) class
probabilities and the fold row holds the K-class metric set of `safn_core.multiclass`
(``roc_auc`` = macro one-vs-rest ROC-AUC, ``pr_auc``, ``balanced_accuracy``, ``qwk`` and
``mae`` for ordered targets, …) under the decision rule:

* ``argmax`` for an unordered target;
* for an ordered target, ``argmax`` too, and beside it the ordinal rule's figures
  (``*_cut`` keys): cut points on the expected class index fitted on the *validation* split only
  (`safn_core.multiclass.fit_cutpoints`), which trade the classes' recalls off along the order.

Predictions keep one probability column per class (``p_<class>``), and SAFN's gate weights α are
also reported per class (the mean α of each true class's test participants).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.targets import Target

SCALAR_KEYS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "macro_f1", "qwk", "mae",
               "log_loss", "brier")
"""The K-class metrics a fold row holds (None/NaN where a target has no such metric)."""


def score_fold(target: Target, p_val: np.ndarray, y_val: np.ndarray, p_test: np.ndarray,
               y_test: np.ndarray, majority_class: int) -> dict:
    """The fold row's K-class metrics of one model (see the module docstring)."""
    from safn_core.multiclass import fit_cutpoints, multiclass_metrics

    m = multiclass_metrics(y_test, p_test, target.ordered, target.classes,
                           majority_class=majority_class)
    row = {k: _num(m.get(k)) for k in SCALAR_KEYS}
    for name, per in (m.get("per_class") or {}).items():
        row[f"roc_auc[{name}]"] = _num(per.get("roc_auc"))
        row[f"recall[{name}]"] = _num(per.get("recall"))
    maj = m.get("majority") or {}
    for k in ("balanced_accuracy", "accuracy", "qwk", "mae"):
        row[f"majority_{k}"] = _num(maj.get(k))
    row["confusion"] = m.get("confusion")
    if target.ordered:
        cuts = fit_cutpoints(y_val, p_val)
        mc = multiclass_metrics(y_test, p_test, True, target.classes, rule="cutpoints",
                                cutpoints=cuts, majority_class=majority_class)
        for k in ("balanced_accuracy", "qwk", "mae", "macro_f1"):
            row[f"{k}_cut"] = _num(mc.get(k))
    return row


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def prediction_frame(target: Target, meta: dict, ids, y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Out-of-fold predictions: the fold's columns, id, y and ``p_<class>`` per class."""
    frame = pd.DataFrame({**meta, "participant_id": ids, "y": y})
    for k, name in enumerate(target.classes):
        frame[f"p_{name}"] = p[:, k]
    return frame


def weights_by_class(alpha: np.ndarray, y: np.ndarray, target: Target,
                     modality_names: list[str]) -> list[dict]:
    """One row per class: the mean gate weight α of each modality over that class's
    participants (classes without a participant in ``y`` are left out)."""
    rows = []
    for k, name in enumerate(target.classes):
        sel = y == k
        if sel.any():
            rows.append({"class": name, **{m: float(a) for m, a in
                                           zip(modality_names, alpha[sel].mean(0))}})
    return rows

