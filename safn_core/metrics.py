"""The metrics every safn evaluation reports, and their summary over folds or sites.

`binary_metrics` is the full set reported everywhere (docs/model.md): accuracy, balanced
accuracy, sensitivity, specificity, ROC-AUC, PR-AUC with the positive class (PD) and with the
negative class (HC) as positive, F1, MCC and Brier score. Score histograms let a federation
compute pooled ROC/PR curves from per-site counts, without any participant-level score leaving a
site.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, brier_score_loss,
                             f1_score, matthews_corrcoef, roc_auc_score)

METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc",
           "pr_auc_pd", "pr_auc_hc", "f1", "mcc", "brier")
"""Metric keys in report order."""

HEADLINE = ("balanced_accuracy", "roc_auc", "pr_auc_pd", "pr_auc_hc", "mcc")


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold maximising balanced accuracy (Youden's J) on validation data."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if y.min() == y.max():
        return 0.5
    candidates = np.unique(p)
    best_t, best = 0.5, -np.inf
    pos, neg = y == 1, y == 0
    for t in candidates:
        pred = p >= t
        j = pred[pos].mean() + (~pred[neg]).mean()
        if j > best + 1e-12:
            best, best_t = j, float(t)
    return best_t


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The full metric set for labels ``y`` (1 = PD) and predicted P(PD) ``p``."""
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    pred = (p >= threshold).astype(int)
    pos, neg = y == 1, y == 0
    both = pos.any() and neg.any()
    out = {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else np.nan,
        "sensitivity": float(pred[pos].mean()) if pos.any() else np.nan,
        "specificity": float((1 - pred[neg]).mean()) if neg.any() else np.nan,
        "roc_auc": float(roc_auc_score(y, p)) if both else np.nan,
        "pr_auc_pd": float(average_precision_score(y, p)) if both else np.nan,
        "pr_auc_hc": float(average_precision_score(1 - y, 1 - p)) if both else np.nan,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)) if both else np.nan,
        "brier": float(brier_score_loss(y, p)) if both else float(np.mean((p - y) ** 2)),
    }
    return out


def summarise(rows: list[dict[str, float]], keys=METRICS) -> dict[str, dict[str, float]]:
    """Mean and sample SD of each metric over folds/repeats (NaNs ignored)."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = {"mean": float(vals.mean()) if len(vals) else np.nan,
                  "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                  "n": int(len(vals))}
    return out


# -------------------------------------------------------------------------------- histograms

DEFAULT_BINS = 1000


def cross_entropy_sum(y: np.ndarray, p: np.ndarray) -> float:
    """Summed binary cross-entropy of P(positive) ``p`` against ``y`` (p clipped to
    [1e-7, 1 − 1e-7]): the validation loss a federation's sites sum and its comparators use."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y)
    return float(-np.sum(y * np.log(q) + (1 - y) * np.log(1 - q)))


def score_histogram(y: np.ndarray, p: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Counts of scores per class in ``bins`` equal bins on [0, 1]: shape (2, bins), row = label."""
    y = np.asarray(y).astype(int)
    idx = np.clip((np.asarray(p, dtype=float) * bins).astype(int), 0, bins - 1)
    hist = np.zeros((2, bins), dtype=np.int64)
    np.add.at(hist, (y, idx), 1)
    return hist


def auc_from_histogram(hist: np.ndarray) -> dict[str, float]:
    """ROC-AUC and PR-AUC (both classes) from summed per-class score histograms.

    Ties within a bin count one half (the trapezoid rule), so the error against the exact AUC is
    bounded by the share of positive/negative pairs that fall in the same bin.
    """
    neg, pos = hist[0].astype(float), hist[1].astype(float)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return {"roc_auc": np.nan, "pr_auc_pd": np.nan, "pr_auc_hc": np.nan}
    neg_below = np.cumsum(neg) - neg  # negatives in lower bins
    roc = float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def ap(pos_counts, neg_counts):
        # thresholds from the top bin down; average precision = Σ ΔR · P
        tp = np.cumsum(pos_counts[::-1])
        fp = np.cumsum(neg_counts[::-1])
        recall = tp / pos_counts.sum()
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
        d_recall = np.diff(np.concatenate([[0.0], recall]))
        return float((d_recall * precision).sum())

    return {"roc_auc": roc, "pr_auc_pd": ap(pos, neg), "pr_auc_hc": ap(neg[::-1], pos[::-1])}


# -------------------------------------------------------------------------------- uncertainty


def _percentile_intervals(draws: dict[str, list[float]],
                          level: float) -> dict[str, tuple[float, float]]:
    """Percentile interval of each metric's bootstrap draws (undefined draws left out)."""
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, vals in draws.items():
        vals = np.asarray(vals, dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = (float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))) \
            if len(vals) else (np.nan, np.nan)
    return out


def bootstrap_ci(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 keys=METRICS) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of each metric (participants resampled,
    stratified by class so that every resample holds both classes)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = {k: [] for k in keys}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) \
            if len(pos) and len(neg) else rng.choice(len(y), len(y))
        m = binary_metrics(y[idx], p[idx], threshold)
        for k in keys:
            draws[k].append(m[k])
    return _percentile_intervals(draws, level)


MIN_OVERLAP = 3
"""Participants of each class that must lie where the two classes' logit(p) ranges overlap for
a calibration slope to be reported: with none the maximum-likelihood slope is infinite
(separation); with one or two it is finite but set by those few, and its standard error is of
the order of the slope itself."""


def _logistic_mle(x: np.ndarray, y: np.ndarray, max_iter: int = 100,
                  tol: float = 1e-10) -> tuple[float, float] | None:
    """Unpenalised maximum-likelihood fit of logit P(y=1) = a + b·x by Newton's method (IRLS)
    with step halving: (a, b), or None when it does not converge to a finite optimum."""
    X = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)

    def deviance(b):
        eta = X @ b
        return float(2 * np.sum(np.logaddexp(0.0, eta) - y * eta))

    dev = deviance(beta)
    for _ in range(max_iter):
        mu = expit(X @ beta)
        hess = X.T @ (X * (mu * (1 - mu))[:, None])
        try:
            step = np.linalg.solve(hess, X.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        for _ in range(30):  # halve the step until the deviance does not grow
            new_dev = deviance(beta + step)
            if new_dev <= dev + 1e-12 * max(1.0, dev):
                break
            step /= 2
        beta, dev = beta + step, new_dev
        if not np.all(np.isfinite(beta)):
            return None
        if np.max(np.abs(step)) < tol * max(1.0, np.max(np.abs(beta))):
            return float(beta[0]), float(beta[1])
    return None


def _overlap(x: np.ndarray, y: np.ndarray) -> int:
    """Participants of the less represented class inside the overlap of the two classes'
    ranges of ``x`` (0: the classes are separated, possibly touching at one value)."""
    lo = max(x[y == 1].min(), x[y == 0].min())
    hi = min(x[y == 1].max(), x[y == 0].max())
    if lo >= hi:
        return 0
    inside = (x >= lo) & (x <= hi)
    return int(min((inside & (y == 1)).sum(), (inside & (y == 0)).sum()))


def calibration_slope(y: np.ndarray, p: np.ndarray) -> dict:
    """Calibration slope and intercept: the unpenalised maximum-likelihood logistic
    recalibration of y on logit(p) (slope 1 and intercept 0 are ideal; a slope below 1 means
    overconfident scores, above 1 underconfident ones).

    When the scores (almost) separate the classes the maximum-likelihood slope is infinite or
    set by a handful of participants, and a penalised fit would report an arbitrary large
    number; then ``slope`` and ``intercept`` are None, ``slope_estimable`` is False and
    ``slope_note`` says why.
    """
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    out = {"slope": None, "intercept": None, "slope_estimable": False, "slope_note": None}
    if len(y) == 0 or y.min() == y.max():
        out["slope_note"] = "one class only: no calibration slope"
        return out
    logit = np.log(p / (1 - p))
    overlap = _overlap(logit, y)
    if overlap == 0:
        out["slope_note"] = ("scores separate the classes completely: no finite calibration "
                             "slope")
        return out
    if overlap < MIN_OVERLAP:
        out["slope_note"] = (f"scores separate the classes almost perfectly ({overlap} "
                             "participant(s) of a class where the classes' scores overlap): no "
                             "meaningful calibration slope")
        return out
    fit = _logistic_mle(logit, y.astype(float))
    if fit is None:
        out["slope_note"] = ("the maximum-likelihood fit did not converge: no finite "
                             "calibration slope")
        return out
    out.update(intercept=fit[0], slope=fit[1], slope_estimable=True)
    return out


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    """Reliability curve (equal-width bins), expected calibration error, and the calibration
    slope and intercept of `calibration_slope` (None, with ``slope_note`` saying why, when the
    scores separate the classes)."""
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        if not sel.any():
            continue
        mean_p, frac = float(p[sel].mean()), float(y[sel].mean())
        curve.append({"bin": b, "lower": float(edges[b]), "upper": float(edges[b + 1]),
                      "n": int(sel.sum()), "mean_predicted": mean_p, "observed": frac})
        ece += sel.mean() * abs(mean_p - frac)
    return {"curve": curve, "ece": float(ece), **calibration_slope(y, p)}


def calibration_text(calib: dict) -> str:
    """One line for consoles, reports and figure titles: slope, intercept and ECE, or why
    there is no slope."""
    ece = f"ECE {calib['ece']:.3f}"
    if not calib.get("slope_estimable", calib.get("slope") is not None):
        return f"slope and intercept not reported ({calib.get('slope_note')}); {ece}"
    return f"slope {calib['slope']:.2f}, intercept {calib['intercept']:.2f}, {ece}"


def threshold_from_histogram(hist: np.ndarray) -> float:
    """The bin edge that maximises balanced accuracy on (pooled) validation histograms."""
    neg, pos = hist[0].astype(float), hist[1].astype(float)
    if neg.sum() == 0 or pos.sum() == 0:
        return 0.5
    bins = hist.shape[1]
    # predicting positive from bin b upwards: sensitivity = pos[b:]/P, specificity = neg[:b]/N
    sens = np.cumsum(pos[::-1])[::-1] / pos.sum()
    spec = (np.cumsum(neg) - neg) / neg.sum()
    best = int(np.argmax(sens + spec))
    return best / bins


def metrics_from_histogram(hist: np.ndarray, threshold: float) -> dict[str, float]:
    """The metric set from per-class score histograms (pooled over sites).

    Threshold metrics are exact for thresholds on bin edges; the Brier score uses bin centres
    (error below half a bin width); ROC/PR-AUC as in `auc_from_histogram`.
    """
    bins = hist.shape[1]
    neg, pos = hist[0].astype(float), hist[1].astype(float)
    n_neg, n_pos = neg.sum(), pos.sum()
    cut = int(round(threshold * bins))
    tp, fn = pos[cut:].sum(), pos[:cut].sum()
    tn, fp = neg[:cut].sum(), neg[cut:].sum()
    n = n_neg + n_pos
    sens = tp / n_pos if n_pos else np.nan
    spec = tn / n_neg if n_neg else np.nan
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    centres = (np.arange(bins) + 0.5) / bins
    out = {
        "accuracy": float((tp + tn) / n) if n else np.nan,
        "balanced_accuracy": float((sens + spec) / 2),
        "sensitivity": float(sens), "specificity": float(spec),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "mcc": float((tp * tn - fp * fn) / denom) if denom else 0.0,
        "brier": float(((centres - 1) ** 2 * pos).sum() + (centres ** 2 * neg).sum()) / n
        if n else np.nan,
        **auc_from_histogram(hist),
    }
    return {k: out[k] for k in METRICS}


def bootstrap_histogram_ci(hist: np.ndarray, threshold: float, n_boot: int = 500,
                           seed: int = 0, level: float = 0.95,
                           keys=METRICS) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs from per-class score histograms alone (a held-out site's
    evaluation reply): resampling participants with replacement within each class is drawing
    each class's histogram from a multinomial over its bins, so no participant's score is needed.
    Agrees with `bootstrap_ci` on the binned scores."""
    hist = np.asarray(hist, dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in keys}
    probs = [h / h.sum() if h.sum() else None for h in hist]
    for _ in range(n_boot):
        sample = np.stack([rng.multinomial(int(h.sum()), pr) if pr is not None else h
                           for h, pr in zip(hist, probs)])
        m = metrics_from_histogram(sample, threshold)
        for k in keys:
            draws[k].append(m[k])
    return _percentile_intervals(draws, level)
