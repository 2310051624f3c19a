"""The count side of K-class metrics: decision rules, and the metrics of a confusion matrix.

Shared by the pooled metrics (`safn_core.multiclass`), their bootstrap and the federated metrics
from per-class score histograms and confusion counts (`safn_core.multiclass_federated`), so that
all three compute the same formulas. Decision rules are described in `safn_core.multiclass`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-7
"""Probabilities are clipped to [EPS, 1] in the log loss (as `metrics.cross_entropy_sum`)."""


def _probs(P) -> np.ndarray:
    P = np.asarray(P, dtype=float)
    if P.ndim != 2:
        raise ValueError(f"K-class scores must be (n, K) probabilities, got shape {P.shape}")
    return np.clip(P, 0.0, 1.0)


def _none(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def expected_index(P) -> np.ndarray:
    """E[k] = Σ_k k·P_k per participant: the position on the ordinal scale, in [0, K-1]."""
    P = _probs(P)
    return P @ np.arange(P.shape[1], dtype=float)


def predict_classes(P, rule: str = "argmax", cutpoints: Sequence[float] | None = None
                    ) -> np.ndarray:
    """Predicted classes (n,) int: ``rule="argmax"`` or, when ``cutpoints`` (K - 1 increasing
    thresholds on `expected_index`) are given (``rule`` then may be ``"cutpoints"``), the ordinal
    class they cut E[k] into. ``rule="cutpoints"`` without cutpoints is an error."""
    P = _probs(P)
    if cutpoints is not None:
        cut = np.asarray(cutpoints, dtype=float)
        if len(cut) != P.shape[1] - 1 or np.any(np.diff(cut) <= 0):
            raise ValueError(f"cutpoints must be {P.shape[1] - 1} increasing values, got {cut}")
        return np.searchsorted(cut, expected_index(P), side="right").astype(int)
    if rule != "argmax":
        raise ValueError(f"decision rule {rule!r}: 'argmax', or 'cutpoints' with cutpoints")
    return P.argmax(axis=1).astype(int)


# ------------------------------------------------------------------ from confusion counts


def qwk_from_confusion(C) -> float | None:
    """Quadratic weighted kappa of a K × K confusion matrix (rows = true): 1 - Σ W·O / Σ W·E,
    W_ij = (i - j)² / (K - 1)², E the product of the margins; None when Σ W·E = 0 (every
    participant and every prediction in one class). Equals scikit-learn's
    ``cohen_kappa_score(weights="quadratic")``."""
    C = np.asarray(C, dtype=float)
    K, n = C.shape[0], C.sum()
    if n == 0:
        return None
    i = np.arange(K)
    W = (i[:, None] - i[None, :]) ** 2 / (K - 1) ** 2
    E = np.outer(C.sum(1), C.sum(0)) / n
    denom = (W * E).sum()
    return None if denom <= 0 else float(1 - (W * C).sum() / denom)


def confusion_metrics(C, ordered: bool) -> dict:
    """Accuracy, balanced accuracy, macro F1, QWK and MAE (ordered only) from a confusion matrix
    (rows = true class, columns = predicted); macro averages over the classes present (rows with
    anyone). Exactly the pooled values of `multiclass_metrics` for the same predictions."""
    C = np.asarray(C, dtype=float)
    K, n = C.shape[0], C.sum()
    rows, cols, diag = C.sum(1), C.sum(0), np.diag(C)
    present = rows > 0
    if n == 0:
        return {"accuracy": None, "balanced_accuracy": None, "macro_f1": None, "qwk": None,
                "mae": None}
    dist = np.abs(np.arange(K)[:, None] - np.arange(K)[None, :])
    return {"accuracy": float(diag.sum() / n),
            "balanced_accuracy": float(np.mean(diag[present] / rows[present])),
            "macro_f1": float(np.mean(2 * diag[present] / (rows + cols)[present])),
            "qwk": qwk_from_confusion(C) if ordered else None,
            "mae": float((dist * C).sum() / n) if ordered else None}


def majority_baseline(counts, ordered: bool, majority_class: int | None = None) -> dict:
    """What predicting one class for everyone scores on a set with class ``counts``: the
    training-majority class (``majority_class``; default the most frequent of ``counts``, ties to
    the lower index). ROC-AUC is 0.5 (a constant score ranks no one)."""
    counts = np.asarray(counts, dtype=float)
    K = len(counts)
    m = int(np.argmax(counts)) if majority_class is None else int(majority_class)
    C = np.zeros((K, K))
    C[:, m] = counts
    out = confusion_metrics(C, ordered)
    return {"class": m, "balanced_accuracy": out["balanced_accuracy"],
            "accuracy": out["accuracy"], "qwk": out["qwk"], "mae": out["mae"], "roc_auc": 0.5}
