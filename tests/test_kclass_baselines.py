"""Baselines for K classes (`safn_core.baselines`): every baseline returns valid (n, K) class
probabilities, the exact ones are the K-class solvers of `safn_core.logistic`, early-stopped
boosting keeps the multi-class validation optimum, and the ordinal baseline is offered only for
ordered targets; binary outputs stay P(class 1)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from safn_core import baselines
from safn_core.baselines import BASELINES, baselines_for, fit_predict, make_baseline
from safn_core.logistic import multinomial, ordinal


def data(n, seed):
    """Three ordered classes from a noisy latent score (unbalanced)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    score = x[:, 0] - 0.7 * x[:, 1] + 0.4 * x[:, 2] ** 2 + rng.logistic(size=n)
    return x, np.digitize(score, [-0.2, 1.5]).astype(np.int64)


X, Y = data(240, 0)
XV, YV = data(90, 1)


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_returns_class_probabilities(name):
    p_val, p_few = fit_predict(name, X, Y, [XV, X[:7]], 0, val=(XV, YV), n_classes=3)
    assert p_val.shape == (len(XV), 3) and p_few.shape == (7, 3)
    assert (p_val >= 0).all()
    np.testing.assert_allclose(p_val.sum(axis=1), 1.0, atol=1e-9)
    if name != "majority":  # they learn something: better than chance on validation
        assert roc_auc_score(YV, p_val, multi_class="ovr", average="macro") > 0.65


def test_the_exact_baselines_are_safn_s_solvers():
    p = fit_predict("exact_logistic_regression", X, Y, [XV], 0, val=(XV, YV))[0]
    np.testing.assert_allclose(p, multinomial.fit_pooled(X, Y, XV, YV).predict_proba(XV))
    p = fit_predict("ordinal_logistic", X, Y, [XV], 0, val=(XV, YV))[0]
    np.testing.assert_allclose(p, ordinal.fit_pooled(X, Y, XV, YV).predict_proba(XV))


def test_a_class_absent_from_training_gets_a_zero_column():
    keep = Y != 2
    p = fit_predict("random_forest", X[keep], Y[keep], [XV], 0, n_classes=3)[0]
    assert p.shape == (len(XV), 3) and not p[:, 2].any()
    with pytest.raises(ValueError, match="every class"):
        fit_predict("exact_logistic_regression", X[keep], Y[keep], [XV], 0, val=(XV, YV),
                    n_classes=3)


def test_multiclass_early_stopping_keeps_the_validation_best_iteration():
    model = make_baseline("hist_gradient_boosting_es", 0)
    best = baselines._boost_until_validation_stops(model, X, Y, XV, YV)
    losses = [baselines._balanced_log_loss(YV, p) for p in model.staged_predict_proba(XV)]
    assert best == int(np.argmin(losses)) + 1
    p = fit_predict("hist_gradient_boosting_es", X, Y, [XV], 0, val=(XV, YV))[0]
    assert baselines._balanced_log_loss(YV, p) == pytest.approx(min(losses))


def test_ordinal_baseline_only_for_ordered_targets_and_binary_outputs_unchanged():
    assert "ordinal_logistic" in baselines_for(True)
    assert "ordinal_logistic" not in baselines_for(False)
    assert set(baselines_for(False)) | {"ordinal_logistic"} == set(BASELINES)
    yb, yvb = (Y > 0).astype(int), (YV > 0).astype(int)
    for name in ("logistic_regression", "exact_logistic_regression", "mlp"):
        p = fit_predict(name, X, yb, [XV], 0, val=(XV, yvb))[0]
        assert p.shape == (len(XV),)
    # a binary ordinal fit is the balanced logistic regression (P(y = 1) = σ(x·β − θ))
    p_ord = fit_predict("ordinal_logistic", X, yb, [XV], 0, val=(XV, yvb))[0]
    p_lr = fit_predict("exact_logistic_regression", X, yb, [XV], 0, val=(XV, yvb))[0]
    np.testing.assert_allclose(p_ord, p_lr, atol=1e-6)
