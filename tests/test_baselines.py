"""Baselines: gradient boosting early-stopped on the validation split that stops SAFN."""

import numpy as np
import pytest

from safn_core import baselines
from safn_core.baselines import ES_PATIENCE, fit_predict, make_baseline


def data(n, seed, noise=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 + noise * rng.normal(size=n) > 0.5).astype(int)
    return x, y


def balanced_log_loss(y, p):
    return baselines._balanced_log_loss(y, p)


def test_early_stopped_boosting_keeps_the_validation_best_iteration():
    x, y = data(300, 0)
    xv, yv = data(120, 1)
    model = make_baseline("hist_gradient_boosting_es", 0)
    best = baselines._boost_until_validation_stops(model, x, y, xv, yv)
    col = list(model.classes_).index(1)
    losses = [balanced_log_loss(yv, p[:, col]) for p in model.staged_predict_proba(xv)]
    assert best == int(np.argmin(losses)) + 1  # the kept iteration is the validation optimum
    # it stopped after `ES_PATIENCE` trees without improvement (up to scikit-learn's tolerance)
    assert ES_PATIENCE <= model.n_iter_ - best <= ES_PATIENCE + 1
    assert model.n_iter_ < model.max_iter
    # fit_predict returns that iteration's probabilities for each evaluation set
    p_val, p_other = fit_predict("hist_gradient_boosting_es", x, y, [xv, x[:10]], 0,
                                 val=(xv, yv))
    assert balanced_log_loss(yv, p_val) == pytest.approx(min(losses))
    assert p_other.shape == (10,)


def test_the_validation_split_decides_the_budget():
    """Labels of the validation split change the number of trees; the test set cannot."""
    x, y = data(300, 0)
    xv, yv = data(120, 1)
    rng = np.random.default_rng(5)
    informative = baselines._boost_until_validation_stops(
        make_baseline("hist_gradient_boosting_es", 0), x, y, xv, yv)
    shuffled = baselines._boost_until_validation_stops(
        make_baseline("hist_gradient_boosting_es", 0), x, y, xv, rng.permutation(yv))
    assert shuffled < informative
    a = fit_predict("hist_gradient_boosting_es", x, y, [xv, x[:5]], 0, val=(xv, yv))
    b = fit_predict("hist_gradient_boosting_es", x, y, [xv, x[100:140]], 0, val=(xv, yv))
    np.testing.assert_array_equal(a[0], b[0])


def test_early_stopped_boosting_needs_the_validation_split():
    x, y = data(50, 0)
    with pytest.raises(ValueError, match="validation split"):
        fit_predict("hist_gradient_boosting_es", x, y, [x], 0)
