"""The reported metrics against scikit-learn and hand computations."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, matthews_corrcoef, roc_auc_score

from safn_core.metrics import (auc_from_histogram, binary_metrics, choose_threshold,
                               score_histogram, summarise)


@pytest.fixture
def scores():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.8).astype(int)
    p = np.clip(rng.normal(0.45 + 0.25 * y, 0.2), 0, 1)
    return y, p


def test_binary_metrics_match_definitions(scores):
    y, p = scores
    m = binary_metrics(y, p, threshold=0.5)
    pred = p >= 0.5
    tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    assert m["sensitivity"] == pytest.approx(tp / (y == 1).sum())
    assert m["specificity"] == pytest.approx(tn / (y == 0).sum())
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc_pd"] == pytest.approx(average_precision_score(y, p))
    assert m["pr_auc_hc"] == pytest.approx(average_precision_score(1 - y, 1 - p))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_majority_baseline_figures():
    y = np.array([1] * 81 + [0] * 19)
    m = binary_metrics(y, np.full(100, 0.81), threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.81)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["pr_auc_pd"] == pytest.approx(0.81)
    assert m["roc_auc"] == pytest.approx(0.5)


def test_threshold_maximises_balanced_accuracy(scores):
    y, p = scores
    t = choose_threshold(y, p)
    best = binary_metrics(y, p, t)["balanced_accuracy"]
    for other in np.linspace(0.05, 0.95, 19):
        assert best >= binary_metrics(y, p, other)["balanced_accuracy"] - 1e-12


def test_single_class_is_nan_not_crash():
    m = binary_metrics(np.ones(10, int), np.linspace(0, 1, 10))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["balanced_accuracy"])


def test_histogram_auc_matches_sklearn_within_bin_error(scores):
    y, p = scores
    halves = [slice(0, 200), slice(200, 500)]
    hist = sum(score_histogram(y[s], p[s], bins=1000) for s in halves)
    assert hist.sum() == len(y)
    pooled = auc_from_histogram(hist)
    assert pooled["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert pooled["pr_auc_pd"] == pytest.approx(average_precision_score(y, p), abs=5e-3)
    assert pooled["pr_auc_hc"] == pytest.approx(average_precision_score(1 - y, 1 - p), abs=5e-3)
    # coarse bins lose precision: the bin error is real, not hidden
    coarse = auc_from_histogram(score_histogram(y, p, bins=4))["roc_auc"]
    assert abs(coarse - roc_auc_score(y, p)) > abs(pooled["roc_auc"] - roc_auc_score(y, p))


def test_summarise_mean_and_sd():
    rows = [{"roc_auc": 0.8}, {"roc_auc": 0.9}, {"roc_auc": float("nan")}]
    s = summarise(rows, ["roc_auc"])["roc_auc"]
    assert s["mean"] == pytest.approx(0.85) and s["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["n"] == 2


def test_bootstrap_ci_brackets_point_estimate(scores):
    from safn_core.metrics import bootstrap_ci
    y, p = scores
    ci = bootstrap_ci(y, p, 0.5, n_boot=200, seed=1)
    point = binary_metrics(y, p, 0.5)
    for k in ("roc_auc", "balanced_accuracy", "brier"):
        lo, hi = ci[k]
        assert lo < point[k] < hi and hi - lo < 0.2
    assert bootstrap_ci(y, p, 0.5, n_boot=200, seed=1) == ci


def test_calibration_of_calibrated_and_overconfident_scores():
    from safn_core.metrics import calibration
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.random(p.size) < p).astype(int)
    good = calibration(y, p)
    assert good["ece"] < 0.02
    assert good["slope"] == pytest.approx(1.0, abs=0.08)
    assert good["intercept"] == pytest.approx(0.0, abs=0.08)
    logit = np.log(p / (1 - p))
    over = 1 / (1 + np.exp(-3 * logit))  # same ranking, overconfident
    bad = calibration(y, over)
    assert bad["ece"] > 0.05 and bad["slope"] < 0.5
    assert sum(b["n"] for b in bad["curve"]) == p.size


@pytest.mark.parametrize("seed,n,prevalence,sharpness,shift", [
    (0, 400, 0.5, 1.0, 0.0),    # calibrated
    (1, 150, 0.7, 2.5, 0.4),    # overconfident, shifted, PD-heavy
    (2, 90, 0.3, 0.4, -0.8),    # underconfident, small
    (3, 1000, 0.5, 2.5, 0.0),   # very overconfident, well separated but overlapping
])
def test_calibration_slope_is_the_unpenalised_glm(seed, n, prevalence, sharpness, shift):
    """Slope and intercept equal statsmodels' maximum-likelihood GLM of y on logit(p)."""
    import statsmodels.api as sm

    from safn_core.metrics import calibration
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    true_logit = rng.normal(0, 1, n) + 2.0 * (y - 0.5)
    p = 1 / (1 + np.exp(-(sharpness * true_logit + shift)))
    assert 1e-6 < p.min() and p.max() < 1 - 1e-6  # inside calibration's clipping
    cal = calibration(y, p)
    logit = np.log(p / (1 - p))
    ref = sm.GLM(y, sm.add_constant(logit), family=sm.families.Binomial()).fit(tol=1e-12)
    assert ref.converged
    assert cal["slope_estimable"] and cal["slope_note"] is None
    assert cal["intercept"] == pytest.approx(ref.params[0], rel=1e-6, abs=1e-6)
    assert cal["slope"] == pytest.approx(ref.params[1], rel=1e-6, abs=1e-6)


def test_separated_scores_report_no_slope_instead_of_a_huge_number():
    from sklearn.linear_model import LogisticRegression

    from safn_core.metrics import calibration, calibration_text
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 60)
    p = np.where(y == 1, rng.uniform(0.55, 0.99, 120), rng.uniform(0.01, 0.45, 120))
    # what the old penalised fit printed for such scores: a large, arbitrary slope
    logit = np.log(p / (1 - p)).reshape(-1, 1)
    assert LogisticRegression(C=1e6, max_iter=1000).fit(logit, y).coef_[0, 0] > 10
    sep = calibration(y, p)
    assert sep["slope"] is None and sep["intercept"] is None and not sep["slope_estimable"]
    assert "separate the classes completely" in sep["slope_note"]
    assert sep["ece"] > 0 and sum(b["n"] for b in sep["curve"]) == 120
    text = calibration_text(sep)
    assert "not reported" in text and "separate" in text and "slope 1" not in text
    # near separation: the top-scored HC just above the lowest-scored PD; the maximum-
    # likelihood slope is finite but set by these two participants
    near_p = p.copy()
    near_p[np.argmax(np.where(y == 0, p, -1))] = p[y == 1].min() + 0.01
    near = calibration(y, near_p)
    assert near["slope"] is None and "almost perfectly" in near["slope_note"]
    one = calibration(np.ones(10, int), np.linspace(0.1, 0.9, 10))
    assert one["slope"] is None and "one class" in one["slope_note"]


def test_calibration_text_of_an_estimable_slope():
    from safn_core.metrics import calibration_text
    cal = {"ece": 0.0412, "slope": 0.934, "intercept": -0.118, "slope_estimable": True,
           "slope_note": None}
    assert calibration_text(cal) == "slope 0.93, intercept -0.12, ECE 0.041"


def test_histogram_bootstrap_matches_the_participant_bootstrap_on_binned_scores():
    from safn_core.metrics import bootstrap_ci, bootstrap_histogram_ci, score_histogram

    rng = np.random.default_rng(3)
    y = (rng.random(150) < 0.7).astype(int)
    p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, 150), 0, 1)
    hist = score_histogram(y, p, 1000)
    binned = (np.minimum(np.floor(p * 1000), 999) + 0.5) / 1000
    a = bootstrap_histogram_ci(hist, 0.5, n_boot=1500, seed=1)
    b = bootstrap_ci(y, binned, 0.5, n_boot=1500, seed=2)
    for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity"):
        assert a[k][0] < a[k][1]
        assert abs(a[k][0] - b[k][0]) < 0.03 and abs(a[k][1] - b[k][1]) < 0.03, (k, a[k], b[k])
