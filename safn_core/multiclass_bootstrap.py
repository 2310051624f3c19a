"""Percentile bootstrap intervals of K-class metrics: participants resampled within each true
class (every resample keeps each class's size), counted per distinct score so that 1000
resamples of a few hundred participants take well under a second.

Macro ROC-AUC per resample is the mean of the one-vs-rest AUCs of the classes present, each
with ties counting one half (scikit-learn's formula); balanced accuracy and QWK come from the
resample's confusion counts at the decision rule (`safn_core.multiclass_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from safn_core.metrics import _percentile_intervals
from safn_core.multiclass_counts import _probs, predict_classes

KEYS = ("roc_auc", "balanced_accuracy", "qwk")
_CELLS_PER_CHUNK = 2_000_000


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of per-value counts (values in ascending score order)."""
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.cumsum(neg, axis=1) - neg
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _confusion_rows(C: np.ndarray, ordered: bool) -> dict[str, np.ndarray]:
    """Balanced accuracy and QWK of each (draws, K, K) confusion matrix."""
    K = C.shape[1]
    rows, cols = C.sum(2), C.sum(1)
    diag = np.diagonal(C, axis1=1, axis2=2)
    n = rows.sum(1)
    present = rows > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ba = np.where(present, diag / rows, 0.0).sum(1) / present.sum(1)
        i = np.arange(K)
        W = (i[:, None] - i[None, :]) ** 2 / (K - 1) ** 2
        E = rows[:, :, None] * cols[:, None, :] / n[:, None, None]
        den = (W * E).sum((1, 2))
        qwk = np.where(den > 0, 1 - (W * C).sum((1, 2)) / den, np.nan)
    return {"balanced_accuracy": ba, "qwk": qwk if ordered else np.full(len(C), np.nan)}


def bootstrap_ci_multiclass(y, P, ordered: bool = True, rule: str = "argmax",
                            cutpoints: Sequence[float] | None = None, n_boot: int = 1000,
                            seed: int = 0, level: float = 0.95,
                            keys: Sequence[str] = KEYS) -> dict[str, tuple[float, float]]:
    """Stratified percentile bootstrap intervals of macro ROC-AUC, balanced accuracy and QWK
    (NaN bounds where no resample defines the metric, e.g. QWK of an unordered target). The
    participants drawn depend only on the labels, ``n_boot`` and ``seed``, so models scored on
    the same test set with the same seed are resampled on the same participants."""
    y = np.asarray(y).astype(int)
    P = _probs(P)
    n, K = P.shape
    if n == 0:
        return {k: (np.nan, np.nan) for k in keys}
    pred = predict_classes(P, rule, cutpoints)
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(y == k) for k in range(K)]
    scores = [np.unique(P[:, j], return_inverse=True) for j in range(K)]
    draws: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    chunk = max(1, _CELLS_PER_CHUNK // max(n * K, 1))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        # columns of a draw: class 0's block, class 1's, … (each class keeps its size)
        drawn = np.concatenate([m[rng.integers(0, len(m), (size, len(m)))] for m in strata
                                if len(m)], axis=1)
        flat_draw = np.arange(size)[:, None]
        aucs = []
        for j, (values, inv) in enumerate(scores):
            v = len(values)
            cell = (flat_draw * v + inv[drawn]).ravel()
            is_pos = (y[drawn] == j).ravel()
            pos = np.bincount(cell[is_pos], minlength=size * v).reshape(size, v)
            neg = np.bincount(cell[~is_pos], minlength=size * v).reshape(size, v)
            aucs.append(_auc_rows(pos, neg))
        a = np.stack(aucs, axis=1)
        defined = (~np.isnan(a)).sum(1)
        macro = np.where(defined > 0, np.nansum(a, axis=1) / np.maximum(defined, 1), np.nan)
        cells = (flat_draw * K * K + y[drawn] * K + pred[drawn]).ravel()
        C = np.bincount(cells, minlength=size * K * K).reshape(size, K, K).astype(float)
        found = {"roc_auc": macro, **_confusion_rows(C, ordered)}
        for k in keys:
            draws[k].append(found[k])
    return _percentile_intervals({k: np.concatenate(v) for k, v in draws.items()}, level)
