"""Exact L2-penalised, class-balanced multinomial (softmax) logistic regression over summed
statistics: pooled, federated (a sum of sites' `site_sums`) and under secure aggregation
(`safn_core.logistic.packing.kclass_packing`), driven by `safn_core.logistic.engine`.

Parameters: class 0 is the reference, class k ≥ 1 has an intercept and F coefficients,
``B`` (K − 1, 1 + F), flattened row by row (P = (K − 1)(1 + F)); ``η_k = B_k · (1, x)``,
``η_0 = 0``, ``P(y = k) = softmax(η)_k``. The objective, for each candidate λ::

    Σ_i s_{y_i} · (−log P(y_i))  +  (λ/2) · Σ_{k=0..K−1} ‖w_k − w̄‖²

with ``s_c = n / (K · n_c)`` (scikit-learn's ``class_weight="balanced"``) and the coefficients
``w_0 = 0, w_k = B_k[1:]``. The penalty is the symmetric one of scikit-learn's multinomial
``LogisticRegression(C=1/λ)`` (its ``Σ_k ‖W_k‖²`` at its own gauge, where the coefficients sum to
zero over the classes), written in reference coordinates: the fits agree in every probability,
and the solution does not depend on which class is the reference. Intercepts are free. The
penalty is chosen as in the binary fit: the lowest class-balanced validation log loss (the mean
over classes of each class's mean loss), summed over sites the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from safn_core.logistic import engine
from safn_core.logistic.engine import KClassFit, KState, site_statistics, upper
from safn_core.logistic.newton import LOSS_CAP, PENALTIES

KIND = "multinomial"


def n_params(n_features: int, n_classes: int) -> int:
    return (n_classes - 1) * (n_features + 1)


def penalty_matrix(n_features: int, n_classes: int) -> np.ndarray:
    """R (P, P) with βᵀRβ = Σ_k ‖w_k − w̄‖² (w_0 = 0): (I − J/K) across classes, feature by
    feature; intercepts unpenalised."""
    m = np.eye(n_classes - 1) - 1.0 / n_classes
    mask = np.ones(n_features + 1)
    mask[0] = 0.0
    return np.kron(m, np.diag(mask))


def _design(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


def _log_proba(xt: np.ndarray, beta: np.ndarray, n_classes: int) -> np.ndarray:
    eta = xt @ beta.reshape(n_classes - 1, -1).T
    full = np.concatenate([np.zeros((len(xt), 1)), eta], axis=1)
    return full - logsumexp(full, axis=1, keepdims=True)


def site_sums(x, y, x_val, y_val, betas, weights) -> dict[str, np.ndarray]:
    """One site's part of a Newton round at the candidates' parameters ``betas`` (C, P), with
    the federation's balanced weights (K,): ``n`` (K,), ``grad`` (C, P), ``hess`` (C, P(P+1)/2),
    ``objective`` (C,), ``val_loss`` (C, K) and ``val_n`` (K,). Only sums leave the site."""
    weights = np.asarray(weights, dtype=np.float64)
    k_classes = len(weights)
    betas = np.atleast_2d(np.asarray(betas, dtype=np.float64))
    xt, y = _design(x), np.asarray(y, dtype=np.int64)
    s = weights[y]
    onehot = np.eye(k_classes)[y][:, 1:]
    size = betas.shape[1]
    grads, hesses, objectives = [], [], []
    for beta in betas:
        logp = _log_proba(xt, beta, k_classes)
        p = np.exp(logp)[:, 1:]  # (n, K − 1)
        objectives.append(float((np.minimum(-logp[np.arange(len(y)), y], LOSS_CAP) * s).sum()))
        grads.append(((s[:, None] * (p - onehot)).T @ xt).ravel())
        h = np.zeros((size, size))
        blk = xt.shape[1]
        for a in range(k_classes - 1):
            for b in range(a, k_classes - 1):
                c = s * p[:, a] * ((a == b) - p[:, b])
                block = (xt.T * c) @ xt
                h[a * blk:(a + 1) * blk, b * blk:(b + 1) * blk] = block
                h[b * blk:(b + 1) * blk, a * blk:(a + 1) * blk] = block.T
        hesses.append(upper(h))
    y_val = np.asarray(y_val, dtype=np.int64)
    xv = _design(x_val)
    val = np.stack([np.minimum(-_log_proba(xv, b, k_classes)[np.arange(len(y_val)), y_val],
                               LOSS_CAP) for b in betas]) if len(y_val) \
        else np.zeros((len(betas), 0))
    return site_statistics(y, y_val, grads, hesses, objectives, val, k_classes)


@dataclass
class _Parameters:
    coef_: np.ndarray
    intercept_: np.ndarray


@dataclass
class MultinomialFit(KClassFit, _Parameters):
    """The selected multinomial solution: ``coef_`` (K, F) with row 0 = 0, ``intercept_`` (K,)
    with entry 0 = 0, on the preprocessed features; logits are ``x @ coef_.T + intercept_``.
    ``coefs_all`` (C, P): every candidate's parameters (reference layout). Fields (in order):
    ``coef_``, ``intercept_``, then `engine.KClassFit`'s, then ``kind``."""

    KIND, SECOND, WHAT = KIND, "intercept", "a multinomial logistic regression fit"

    kind: str = KIND

    @property
    def n_classes(self) -> int:
        return len(self.intercept_)

    @property
    def intercept(self) -> np.ndarray:
        return self.intercept_

    def decision_function(self, x) -> np.ndarray:
        """Logits (n, K), class 0's being 0."""
        return np.asarray(x, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (n, K)."""
        z = self.decision_function(x)
        return np.exp(z - logsumexp(z, axis=1, keepdims=True))


def solve(round_sums: Callable[[np.ndarray], Mapping[str, np.ndarray]], n_features: int,
          weights, penalties=PENALTIES, *, tol: float = 1e-10, gradient_floor: float = 0.0,
          max_rounds: int = 100) -> MultinomialFit:
    """Newton's method for every candidate through ``round_sums(betas) -> summed site_sums``;
    K = len(weights). Returns the candidate chosen on validation (`engine.select`)."""
    k_classes = len(weights)
    state = KState.start(np.zeros(n_params(n_features, k_classes)), penalties,
                         penalty_matrix(n_features, k_classes))
    beta, chosen = engine.solve(round_sums, state, weights, tol=tol,
                                gradient_floor=gradient_floor, max_rounds=max_rounds)
    b = beta.reshape(k_classes - 1, n_features + 1)
    return MultinomialFit(np.vstack([np.zeros(n_features), b[:, 1:]]), np.r_[0.0, b[:, 0]],
                          **chosen)


def fit_pooled(x, y, x_val, y_val, n_classes: int | None = None, penalties=PENALTIES,
               tol: float = 1e-10, weights=None) -> MultinomialFit:
    """The same solver on one participant set (K: ``n_classes``, else the largest label + 1;
    ``weights``: balanced from ``y`` unless given, e.g. all 1 for an unweighted fit)."""
    return engine.fit_pooled(solve, site_sums, x, y, x_val, y_val, n_classes, penalties, tol,
                             weights)
