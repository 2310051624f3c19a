"""The simulation's comparison rows for a K-class target (K > 2; `safn.simulations.compare`).

Every model (pooled, federated, local-only SAFN; the logistic regressions) is scored on the
pooled test set by `safn_core.multiclass.multiclass_metrics` at the argmax rule (the rule of a
federation's confusion counts), with 95 % intervals of macro ROC-AUC, balanced accuracy and (for
an ordered target) quadratic weighted kappa from the stratified participant bootstrap
(`bootstrap_ci_multiclass`, the same participants for every model). A binary target never comes
here: its rows are `safn.simulations.compare`'s, unchanged.
"""

from __future__ import annotations

import numpy as np

from safn_core.targets import Target

SHOWN = ("roc_auc", "pr_auc", "balanced_accuracy", "macro_f1", "qwk", "mae", "log_loss", "brier")
"""The K-class comparison's columns, in the console's and the report's order."""


def kclass_row(y_test: np.ndarray, p_test: np.ndarray, target: Target, n_boot: int,
               seed: int) -> dict:
    """A model's K-class metrics on the test set and their intervals (``{metric}_ci``)."""
    from safn_core.metrics import interval_lists
    from safn_core.multiclass import bootstrap_ci_multiclass, multiclass_metrics

    m = multiclass_metrics(y_test, p_test, target.ordered, target.classes)
    ci = bootstrap_ci_multiclass(y_test, p_test, target.ordered, n_boot=n_boot, seed=seed)
    row = {k: m.get(k) for k in SHOWN}
    row.update({"accuracy": m.get("accuracy"), "confusion": m.get("confusion"),
                "per_class": m.get("per_class")})
    row.update({f"{k}_ci": v for k, v in interval_lists(ci).items()})
    return row


def logistic_kind(target: Target, head: str) -> str:
    """The logistic regression rows' kind for ``target`` (multinomial or ordinal)."""
    from safn_core.logistic.family import kind_for

    return kind_for(target.n_classes, target.ordered, head)


def fit_logistic(target: Target, head: str, tr, va):
    """The pooled K-class logistic regression of ``tr`` (penalty chosen on ``va``)."""
    from safn_core.logistic.family import fit_pooled

    return fit_pooled(logistic_kind(target, head), tr.x.astype(np.float64), tr.y,
                      va.x.astype(np.float64), va.y, target.n_classes)
