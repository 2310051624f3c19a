"""Metrics for K > 2 classes (issue #32): decision rules, the pooled metric set, summaries.

Conventions (``safn_core.targets``): labels are the integers 0..K-1 in the order of the target's
classes; scores ``P`` are the (n, K) class probabilities, rows summing to 1. A binary target
(K = 2) keeps `safn_core.metrics` (scores P(class 1)); nothing here changes it.

Decision rules (`predict_classes`):

* ``argmax`` (the default, and the rule of a federation's confusion counts): the most probable
  class; ties go to the lower class index (NumPy's argmax).
* ordinal cutpoints: K - 1 increasing thresholds c_1 < … < c_{K-1} on the expected class index
  E[k] = Σ_k k·P_k ∈ [0, K-1]; class k when c_k ≤ E < c_{k+1} (c_0 = -∞, c_K = +∞). Fitted on
  validation data by `fit_cutpoints` (maximum quadratic weighted kappa), never on test data.

Classes absent from ``y`` (a fold or site without prodromal participants): that class's
one-vs-rest ROC-AUC / PR-AUC and recall are None, and every macro average (ROC-AUC, PR-AUC,
balanced accuracy, F1) is over the classes present in ``y`` only, as scikit-learn's
``balanced_accuracy_score`` does. Undefined values are None (never NaN) in the dicts returned.

This module is the one to import: it re-exports the decision rules and confusion-count formulas
(`safn_core.multiclass_counts`), the bootstrap (`safn_core.multiclass_bootstrap`) and the
federated side, per-class score histograms, confusion counts and ``min_cell`` per class
(`safn_core.multiclass_federated`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (average_precision_score, balanced_accuracy_score,
                             cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score)

from safn_core.multiclass_bootstrap import bootstrap_ci_multiclass
from safn_core.multiclass_counts import (EPS, _none, _probs, confusion_metrics, expected_index,
                                         majority_baseline, predict_classes, qwk_from_confusion)
from safn_core.multiclass_federated import (class_counts_from_histogram, class_score_histogram,
                                            confusion_counts, metrics_from_class_histograms,
                                            roc_auc_from_class_histogram, small_classes,
                                            withhold_small_classes)

SCALARS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "macro_f1", "qwk", "mae",
           "log_loss", "brier")
"""The scalar keys of `multiclass_metrics`, in report order."""


# ------------------------------------------------------------------ pooled metric set


def _ovr(y: np.ndarray, P: np.ndarray, j: int) -> tuple[float | None, float | None]:
    """Class j's one-vs-rest ROC-AUC and average precision (None if j or the rest is absent)."""
    pos = y == j
    if not pos.any() or pos.all():
        return None, None
    return float(roc_auc_score(pos, P[:, j])), float(average_precision_score(pos, P[:, j]))


def macro_roc_auc(y, P) -> float | None:
    """`multiclass_metrics`' ``roc_auc`` alone: the mean one-vs-rest ROC-AUC over the classes
    present in ``y`` (None with fewer than two)."""
    y, P = np.asarray(y).astype(int), _probs(P)
    aucs = [a for a, _ in (_ovr(y, P, j) for j in range(P.shape[1])) if a is not None]
    return float(np.mean(aucs)) if aucs else None


def multiclass_metrics(y, P, ordered: bool, class_names: Sequence[str], rule: str = "argmax",
                       cutpoints: Sequence[float] | None = None,
                       majority_class: int | None = None) -> dict:
    """The K-class metric set of labels ``y`` (0..K-1) and probabilities ``P`` (n, K).

    ``roc_auc`` / ``pr_auc``: macro one-vs-rest (scikit-learn's ``roc_auc_score(multi_class=
    "ovr", average="macro")`` when every class is present; over the present classes otherwise);
    ``balanced_accuracy``, ``accuracy``, ``macro_f1`` (over the present classes), ``qwk``
    (quadratic weighted kappa) and ``mae`` (mean absolute class error) for ordered targets (None
    otherwise), at the decision rule (`predict_classes`); ``log_loss`` (mean -log P[y], P clipped
    at `EPS`), ``brier`` (mean Σ_k (P_k - [y = k])²); ``confusion`` (K × K, rows = true);
    ``per_class`` {name: roc_auc, pr_auc, recall, precision, n}; ``majority``
    (`majority_baseline` of ``majority_class``, default the most frequent class in ``y``)."""
    y = np.asarray(y).astype(int)
    P = _probs(P)
    K = P.shape[1]
    if len(class_names) != K:
        raise ValueError(f"{len(class_names)} class names for {K} columns of scores")
    pred = predict_classes(P, rule, cutpoints)
    C = confusion_matrix(y, pred, labels=list(range(K)))
    counts = C.sum(1)
    present = [j for j in range(K) if counts[j] > 0]
    ovr = [_ovr(y, P, j) for j in range(K)]
    aucs = [a for a, _ in ovr if a is not None]
    aps = [b for _, b in ovr if b is not None]
    cols = C.sum(0)
    with warnings.catch_warnings():  # a predicted class absent from y: documented above
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        ba = float(balanced_accuracy_score(y, pred)) if len(y) else None
    out = {
        "roc_auc": float(np.mean(aucs)) if aucs else None,
        "pr_auc": float(np.mean(aps)) if aps else None,
        "balanced_accuracy": ba,
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0))
        if len(y) else None,
        "qwk": _none(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(K))))
        if ordered and qwk_from_confusion(C) is not None else None,
        "mae": float(np.abs(pred - y).mean()) if ordered and len(y) else None,
        "log_loss": float(-np.log(np.clip(P[np.arange(len(y)), y], EPS, 1)).mean())
        if len(y) else None,
        "brier": float(((P - np.eye(K)[y]) ** 2).sum(1).mean()) if len(y) else None,
        "confusion": C.astype(int).tolist(),
        "per_class": {str(name): {"roc_auc": ovr[j][0], "pr_auc": ovr[j][1],
                                  "recall": float(C[j, j] / counts[j]) if counts[j] else None,
                                  "precision": float(C[j, j] / cols[j]) if cols[j] else None,
                                  "n": int(counts[j])}
                      for j, name in enumerate(class_names)},
        "majority": majority_baseline(counts, ordered, majority_class),
    }
    return out


def cross_entropy_sum_multiclass(y, P) -> float:
    """Summed K-class cross-entropy -Σ log P[i, y_i] (P clipped at `EPS`): what a federation's
    sites sum for the pooled validation loss, as `metrics.cross_entropy_sum` for K = 2."""
    y = np.asarray(y).astype(int)
    P = np.asarray(P, dtype=np.float64)
    return float(-np.log(np.clip(P[np.arange(len(y)), y], EPS, 1.0)).sum())


# ------------------------------------------------------------------ ordinal cutpoints


def fit_cutpoints(y, P, grid: int = 200, max_sweeps: int = 20) -> list[float]:
    """K - 1 cutpoints on E[k] (`expected_index`) maximising the quadratic weighted kappa of
    ``y`` (validation labels) against `predict_classes` with them.

    Coordinate search: start at the midpoints 0.5, 1.5, …, K - 1.5 (the rule closest to
    rounding E[k]); sweep the cutpoints in turn, moving each to the value of a grid of ``grid`` + 1
    equally spaced points on [0, K - 1] strictly between its neighbours that raises the kappa
    most (moves only on a strict gain, so a flat kappa keeps the midpoint); stop after a sweep
    without gain or ``max_sweeps`` sweeps. Kappa is not smooth in the cutpoints, so this is a
    local optimum on the grid; the midpoints are returned when ``y`` has one class only."""
    y = np.asarray(y).astype(int)
    P = _probs(P)
    K = P.shape[1]
    e = expected_index(P)
    cut = np.arange(K - 1, dtype=float) + 0.5
    if len(np.unique(y)) < 2:
        return cut.tolist()
    points = np.linspace(0.0, K - 1.0, grid + 1)

    def kappa(c):
        cells = y * K + np.searchsorted(c, e, side="right")
        q = qwk_from_confusion(np.bincount(cells, minlength=K * K).reshape(K, K))
        return -np.inf if q is None else q

    best = kappa(cut)
    for _ in range(max_sweeps):
        gained = False
        for i in range(K - 1):
            lo = cut[i - 1] if i > 0 else -np.inf
            hi = cut[i + 1] if i < K - 2 else np.inf
            for v in points[(points > lo) & (points < hi)]:
                trial = cut.copy()
                trial[i] = v
                q = kappa(trial)
                if q > best + 1e-12:
                    best, cut, gained = q, trial, True
        if not gained:
            break
    return [float(c) for c in cut]


# ------------------------------------------------------------------ over folds


def summarise_multiclass(rows: list[dict], keys: Sequence[str] = SCALARS) -> dict:
    """Mean and sample SD of each scalar metric over folds / repeats (None and NaN ignored),
    as `safn_core.metrics.summarise`; ``majority_<key>`` summarises the majority baseline's."""
    out = {}
    flat = [{**r, **{f"majority_{k}": v for k, v in (r.get("majority") or {}).items()}}
            for r in rows]
    for k in (*keys, *(f"majority_{k}" for k in ("balanced_accuracy", "accuracy", "qwk",
                                                  "mae"))):
        vals = np.array([r[k] for r in flat if r.get(k) is not None], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = {"mean": float(vals.mean()) if len(vals) else np.nan,
                  "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": int(len(vals))}
    return out


__all__ = ["SCALARS", "bootstrap_ci_multiclass", "macro_roc_auc", "class_counts_from_histogram",
           "class_score_histogram", "confusion_counts", "confusion_metrics",
           "cross_entropy_sum_multiclass", "expected_index", "fit_cutpoints",
           "majority_baseline", "metrics_from_class_histograms", "multiclass_metrics",
           "predict_classes", "qwk_from_confusion", "roc_auc_from_class_histogram",
           "small_classes", "summarise_multiclass", "withhold_small_classes"]
