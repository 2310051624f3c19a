"""K-class metrics of a federation, from what sites may send: per-class score histograms and
confusion counts, summed over sites (in the clear or inside the secure sum).

A site sends, per split, ``hist`` (K, K, bins): ``hist[i, j, b]`` = participants of true class
i whose probability of class j falls in bin b (equal bins on [0, 1], the binary histograms'
convention, `safn_core.metrics.score_histogram`), and ``confusion`` (K, K): true class × class
predicted by the decision rule (``argmax``: a federation's sites apply no fitted cutpoints, see
`safn_core.multiclass`). Sums of these are the pooled test set's, so the coordinator's metrics
equal the pooled computation from the same scores: exactly for the confusion-based ones, and up
to binning for ROC-AUC / PR-AUC (exact when the scores in a bin are equal; ties within a bin
count one half, as `safn_core.metrics.auc_from_histogram`, which is reused) and Brier / log loss
(bin centres).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from safn_core.metrics import DEFAULT_BINS, auc_from_histogram
from safn_core.multiclass_counts import (EPS, _probs, confusion_metrics, majority_baseline,
                                         predict_classes)

POOLED_KEYS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "macro_f1", "qwk", "mae",
               "log_loss", "brier", "confusion", "majority")
"""Metrics that describe every class's people (withheld together, `withhold_small_classes`)."""


def class_score_histogram(y, P, K: int, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(K, K, bins) int64 counts: [true class i, class j, bin of P_j] (bin = floor(P_j · bins),
    the top bin closed)."""
    y = np.asarray(y).astype(int)
    P = _probs(P)
    if P.shape[1] != K:
        raise ValueError(f"scores have {P.shape[1]} columns, the target {K} classes")
    idx = np.clip((P * bins).astype(int), 0, bins - 1)
    hist = np.zeros((K, K, bins), dtype=np.int64)
    np.add.at(hist, (y[:, None], np.arange(K)[None, :], idx), 1)
    return hist


def confusion_counts(y, P, K: int, rule: str = "argmax",
                     cutpoints: Sequence[float] | None = None) -> np.ndarray:
    """(K, K) int64 confusion counts (rows = true class) at the decision rule."""
    y = np.asarray(y).astype(int)
    C = np.zeros((K, K), dtype=np.int64)
    np.add.at(C, (y, predict_classes(P, rule, cutpoints)), 1)
    return C


def class_counts_from_histogram(hist) -> np.ndarray:
    """Participants per true class of a (K, K, bins) histogram (every class-j slice counts each
    participant once)."""
    return np.asarray(hist)[:, 0, :].sum(axis=1).astype(np.int64)


def _one_vs_rest(hist: np.ndarray, j: int) -> np.ndarray:
    """Class j's binary (2, bins) histogram of P_j: row 0 the rest, row 1 class j."""
    return np.stack([hist[:, j, :].sum(axis=0) - hist[j, j, :], hist[j, j, :]])


def _ovr_auc(hist: np.ndarray, j: int) -> tuple[float | None, float | None]:
    h = _one_vs_rest(hist, j)
    if h[0].sum() == 0 or h[1].sum() == 0:
        return None, None
    a = auc_from_histogram(h)
    return float(a["roc_auc"]), float(a["pr_auc_pd"])


def roc_auc_from_class_histogram(hist) -> float | None:
    """Macro one-vs-rest ROC-AUC of a (K, K, bins) histogram over the classes present."""
    hist = np.asarray(hist)
    aucs = [a for a, _ in (_ovr_auc(hist, j) for j in range(hist.shape[0])) if a is not None]
    return float(np.mean(aucs)) if aucs else None


def metrics_from_class_histograms(hist, confusion, ordered: bool,
                                  class_names: Sequence[str] | None = None,
                                  majority_class: int | None = None) -> dict:
    """The keys of `safn_core.multiclass.multiclass_metrics` from summed histograms and
    confusion counts: ROC-AUC / PR-AUC per class one-vs-rest (positives ``hist[j, j]``,
    negatives Σ_{i≠j} ``hist[i, j]``) and their macro mean over the classes present; accuracy,
    balanced accuracy, macro F1, QWK and MAE (ordered) from the confusion counts; Brier and log
    loss at bin centres; the majority baseline from the class counts (``majority_class``: the
    training majority where the caller knows it, else the most frequent class here)."""
    hist = np.asarray(hist, dtype=np.int64)
    C = np.asarray(confusion, dtype=np.int64)
    K, bins = hist.shape[0], hist.shape[2]
    names = [str(c) for c in class_names] if class_names is not None else \
        [f"class {k}" for k in range(K)]
    counts = class_counts_from_histogram(hist)
    n = int(counts.sum())
    ovr = [_ovr_auc(hist, j) for j in range(K)]
    aucs = [a for a, _ in ovr if a is not None]
    aps = [b for _, b in ovr if b is not None]
    centres = (np.arange(bins) + 0.5) / bins
    onehot = np.eye(K)[:, :, None]
    rows, cols = C.sum(1), C.sum(0)
    own = np.stack([hist[k, k] for k in range(K)])  # (K, bins) P_y of class-k participants
    out = {"roc_auc": float(np.mean(aucs)) if aucs else None,
           "pr_auc": float(np.mean(aps)) if aps else None,
           **confusion_metrics(C, ordered),
           "log_loss": float(-(own * np.log(np.maximum(centres, EPS))).sum() / n) if n else None,
           "brier": float((hist * (centres[None, None, :] - onehot) ** 2).sum() / n)
           if n else None,
           "confusion": C.astype(int).tolist(),
           "per_class": {names[j]: {"roc_auc": ovr[j][0], "pr_auc": ovr[j][1],
                                    "recall": float(C[j, j] / rows[j]) if rows[j] else None,
                                    "precision": float(C[j, j] / cols[j]) if cols[j] else None,
                                    "n": int(counts[j])} for j in range(K)},
           "majority": majority_baseline(counts, ordered, majority_class)}
    return out


def small_classes(counts, min_cell: int) -> list[int]:
    """Classes with some but fewer than ``min_cell`` people (an absent class describes no one)."""
    return [k for k, c in enumerate(np.asarray(counts)) if 0 < c < min_cell]


def withhold_small_classes(metrics: dict, counts, min_cell: int) -> dict:
    """``metrics`` (`metrics_from_class_histograms`) with what would describe fewer than
    ``min_cell`` people of a class withheld, on federation-wide class ``counts``.

    Withheld (None), when some class has 1..min_cell - 1 people: every metric that pools the
    classes (`POOLED_KEYS`: macro ROC-AUC / PR-AUC, accuracies, F1, QWK, MAE, losses, the
    confusion matrix and the majority baseline), since each carries that class's people; and
    the ``per_class`` entry of the small class. The per-class entries of the other classes stay
    when the rest (their one-vs-rest negatives) has at least ``min_cell`` people, and their
    precision only when at least ``min_cell`` people are predicted in the class. ``withheld``
    names the small classes and ``withheld_note`` says why. Unchanged when no class is small.
    """
    counts = np.asarray(counts)
    small = small_classes(counts, min_cell)
    if not small:
        return metrics
    names = list(metrics.get("per_class") or {})
    out = {**metrics, **{k: None for k in POOLED_KEYS if k in metrics}}
    C = np.asarray(metrics.get("confusion") or np.zeros((len(counts),) * 2))
    per = {}
    for j, name in enumerate(names):
        entry = metrics["per_class"][name]
        if j in small or counts.sum() - counts[j] < min_cell:
            per[name] = None
        else:
            per[name] = {**entry, "precision": entry["precision"]
                         if C[:, j].sum() >= min_cell else None}
    out["per_class"] = per
    out["withheld"] = [names[j] if j < len(names) else str(j) for j in small]
    out["withheld_note"] = (f"fewer than min_cell = {min_cell} people of class(es) "
                            f"{', '.join(out['withheld'])} federation-wide: the metrics over all "
                            "classes and those classes' own are withheld")
    return out
