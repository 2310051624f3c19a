"""Exact logistic regression from summed statistics (`safn_core.logistic`): the pooled fit equals
scikit-learn's for every penalty of the grid, sites' sums add up to the pooled fit, plainly and
through the fixed-point packing of a secure sum, the penalty is chosen on validation only, and
Newton's step halving brings a bad start home."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from safn_core.logistic import (PENALTIES, LogisticFit, add_sums, class_weights, fit_pooled,
                                site_sums, solve)
from safn_core.logistic.newton import NewtonState
from safn_core.logistic.packing import clipped_features, newton_packing


def cohort(n: int, n_features: int = 6, seed: int = 0, positive: float = 0.7):
    """A learnable, not separable binary problem with unbalanced classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    w = np.linspace(1.0, -0.5, n_features)
    logit = x @ w + np.log(positive / (1 - positive))
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return x, y


X, Y = cohort(160, seed=0)
XV, YV = cohort(70, seed=1)


def sklearn_fit(x, y, penalty: float):
    return LogisticRegression(C=1 / penalty, class_weight="balanced", solver="newton-cholesky",
                              tol=1e-12, max_iter=1000).fit(x, y)


def test_pooled_equals_sklearn_for_every_penalty_of_the_grid():
    fit = fit_pooled(X, Y, XV, YV)
    assert fit.converged and fit.penalties == PENALTIES and fit.coefs_all.shape == (9, 7)
    for k, lam in enumerate(PENALTIES):
        sk = sklearn_fit(X, Y, lam)
        np.testing.assert_allclose(fit.coefs_all[k, 1:], sk.coef_[0], atol=1e-6, rtol=0)
        assert fit.coefs_all[k, 0] == pytest.approx(sk.intercept_[0], abs=1e-6)
    # the selected candidate is the fit's coef/intercept, and it predicts like sklearn's
    best = PENALTIES.index(fit.penalty)
    sk = sklearn_fit(X, Y, fit.penalty)
    np.testing.assert_allclose(fit.coef, fit.coefs_all[best, 1:])
    np.testing.assert_allclose(fit.predict_proba(XV), sk.predict_proba(XV)[:, 1], atol=1e-6)
    assert fit.n_train == tuple(np.bincount(Y).tolist())
    assert fit.class_weight == pytest.approx(class_weights(np.bincount(Y)))


def test_the_penalty_is_the_lowest_balanced_validation_log_loss():
    fit = fit_pooled(X, Y, XV, YV)
    losses = []
    for k in range(len(PENALTIES)):
        p = np.clip(1 / (1 + np.exp(-(XV @ fit.coefs_all[k, 1:] + fit.coefs_all[k, 0]))),
                    1e-300, 1)
        loss = np.where(YV == 1, -np.log(p), -np.log1p(-np.minimum(p, 1 - 1e-16)))
        losses.append(np.mean([loss[YV == c].mean() for c in (0, 1)]))
    np.testing.assert_allclose(fit.val_loss, losses, rtol=1e-9)
    assert fit.penalty == PENALTIES[int(np.argmin(losses))]


def test_penalty_choice_sees_validation_only():
    """Leakage spy: the validation labels choose among candidates that only the training split
    shaped; changing validation labels can change the choice but never a candidate."""
    fit = fit_pooled(X, Y, XV, YV)
    flipped = fit_pooled(X, Y, XV, 1 - YV)
    np.testing.assert_array_equal(fit.coefs_all, flipped.coefs_all)
    assert flipped.penalty != fit.penalty
    # a validation split that is the training split chooses the smallest penalty here
    assert fit_pooled(X, Y, X, Y).penalty == min(PENALTIES) != fit.penalty


def test_sites_sums_add_up_to_the_pooled_fit():
    pooled = fit_pooled(X, Y, XV, YV)
    weights = class_weights(np.bincount(Y))  # the federation's training counts
    cuts, vcuts = [0, 30, 95, 160], [0, 20, 41, 70]
    sites = [(X[a:b], Y[a:b], XV[c:d], YV[c:d])
             for a, b, c, d in zip(cuts, cuts[1:], vcuts, vcuts[1:])]
    fed = solve(lambda betas: add_sums(site_sums(*s, betas, weights) for s in sites),
                X.shape[1], weights)
    assert fed.penalty == pooled.penalty and fed.iterations == pooled.iterations
    np.testing.assert_allclose(fed.coefs_all, pooled.coefs_all, atol=1e-10)
    assert fed.val_loss == pytest.approx(pooled.val_loss, rel=1e-10)
    assert fed.n_train == pooled.n_train
    with pytest.raises(ValueError, match="no site"):
        add_sums([])


def test_secure_sums_through_the_packing_equal_the_pooled_fit():
    """Every site encodes its round in `newton_packing`'s fixed point, the coordinator adds the
    vectors (uint64, wrapping) and decodes: the solution is the pooled one to 1e-6."""
    pooled = fit_pooled(X, Y, XV, YV)
    weights = class_weights(np.bincount(Y))
    sites = [(X[a:b], Y[a:b], XV[c:d], YV[c:d])
             for a, b, c, d in [(0, 50, 0, 25), (50, 110, 25, 45), (110, 160, 45, 70)]]
    packing = newton_packing(X.shape[1], len(PENALTIES), weights, max_site_examples=200,
                             parties=len(sites))
    clips = []

    def secure(betas):
        vectors = []
        for x, y, xv, yv in sites:
            x, n_clipped = clipped_features(x)
            values = site_sums(x, y, xv, yv, betas, weights)
            if "clipped" in packing.names:  # the feature values a site clipped, summed too
                values["clipped"] = np.array([n_clipped])
            encoded = packing.encode(values)
            clips.append(encoded.clipped)
            vectors.append(encoded.vector)
        total = np.zeros(packing.size, dtype=np.uint64)
        for v in vectors:
            total = total + v  # modular, as the masked sum is
        return packing.decode(total)

    fed = solve(secure, X.shape[1], weights)
    assert fed.penalty == pooled.penalty and fed.converged
    np.testing.assert_allclose(fed.coefs_all, pooled.coefs_all, atol=1e-6)
    assert fed.n_train == pooled.n_train
    assert all(v == 0 for c in clips for v in c.values())  # nothing clipped
    # the gradient's fixed-point error, propagated through the Hessian, is what bounds it
    assert packing.error_bound("grad") < 1e-6


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # far out: p is 0 or 1
def test_step_halving_brings_a_far_start_on_a_near_separable_problem_home():
    """Two flipped labels away from separable: started far out (tiny curvature), Newton's first
    steps overshoot; halving them makes the iteration converge to sklearn's solution."""
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40), np.ones(40)].astype(np.int64)
    x = (2.0 * y[:, None] - 1) * 3.0 + rng.normal(size=(80, 3))
    y[:2] = 1 - y[:2]
    weights = class_weights(np.bincount(y))
    state = NewtonState.start(3, [0.01])
    state.betas[0] = [0.0, -20.0, 20.0, -20.0]
    rounds, halved = 0, 0
    while not state.converged.all() and rounds < 100:
        previous, current = state.previous.copy(), state.betas.copy()
        state.update(site_sums(x, y, x[:0], y[:0], state.betas.copy(), weights), 1e-10)
        rounds += 1
        halved += int(np.allclose(state.betas, 0.5 * (previous + current))
                      and not np.allclose(previous, current))
    assert state.converged.all() and halved > 0
    sk = sklearn_fit(x, y, 0.01)
    np.testing.assert_allclose(state.betas[0, 1:], sk.coef_[0], atol=1e-6)
    # from the solver's own start (zero) a separable problem converges as well
    sep = fit_pooled(x[2:], y[2:], x[:20], y[:20], penalties=(0.1, 1.0))
    assert sep.converged
    np.testing.assert_allclose(sep.coefs_all[0, 1:], sklearn_fit(x[2:], y[2:], 0.1).coef_[0],
                               atol=1e-6)


def test_class_weights_and_their_errors():
    assert class_weights([30, 90]) == pytest.approx((2.0, 2 / 3))
    with pytest.raises(ValueError, match="both classes"):
        class_weights([0, 12])
    with pytest.raises(ValueError, match="both classes"):
        class_weights([5, 6, 7])
    with pytest.raises(ValueError, match="both classes"):
        fit_pooled(X, np.ones_like(Y), XV, YV)
    with pytest.raises(ValueError, match="positive"):
        fit_pooled(X, Y, XV, YV, penalties=(0.0, 1.0))


def test_validation_with_one_class_falls_back_to_the_middle_of_the_grid():
    fit = fit_pooled(X, Y, XV[YV == 1], YV[YV == 1])
    assert all(v is None for v in fit.val_loss)
    assert fit.penalty == PENALTIES[len(PENALTIES) // 2]


def test_fit_round_trips_through_a_dict():
    fit = fit_pooled(X, Y, XV, YV)
    back = LogisticFit.from_dict(fit.to_dict())
    np.testing.assert_array_equal(back.coef, fit.coef)
    assert (back.intercept, back.penalty, back.val_loss) == (fit.intercept, fit.penalty,
                                                            fit.val_loss)
    np.testing.assert_array_equal(back.predict_proba(XV), fit.predict_proba(XV))
    with pytest.raises(ValueError, match="not a logistic regression fit"):
        LogisticFit.from_dict({"coef": [1.0]})
