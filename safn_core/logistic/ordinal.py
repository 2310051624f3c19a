"""Exact L2-penalised, class-balanced ordinal logistic regression (proportional odds, cumulative
logit) over summed statistics: pooled, federated and under secure aggregation, driven by
`safn_core.logistic.engine`.

The model, for K ordered classes 0 < 1 < … < K − 1::

    P(y ≤ k) = σ(θ_k − x·β),  k = 0 … K − 2,   θ_0 < θ_1 < … < θ_{K−2}

(statsmodels' ``OrderedModel(distr="logit")`` convention). Parameters, thresholds first:
``[θ_0 … θ_{K−2}, β_1 … β_F]`` (P = K − 1 + F). The objective, for each candidate λ::

    Σ_i s_{y_i} · (−log P(y_i))  +  (λ/2)·‖β‖²          (thresholds free)

with ``s_c = n / (K · n_c)``, the binary fit's balanced weights for K classes. The negative
log-likelihood is convex in (θ, β) on the ordered set (Pratt 1981), so Newton's method on the
plain thresholds converges; the coordinator keeps them ordered by halving any step that would
not (`engine.KState.feasible`), and starts every candidate at β = 0 with θ_k = logit((k+1)/K),
the maximum of the balanced likelihood without features (under balanced weights every class has
the same total weight). The penalty is chosen on the class-balanced validation log loss, as in
the binary and multinomial fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit

from safn_core.logistic import engine
from safn_core.logistic.engine import KClassFit, KState, site_statistics, upper
from safn_core.logistic.newton import LOSS_CAP, PENALTIES

KIND = "ordinal"
MIN_GAP = 1e-6  # the thresholds' smallest allowed increment during the iterations


def n_params(n_features: int, n_classes: int) -> int:
    return n_classes - 1 + n_features


def penalty_matrix(n_features: int, n_classes: int) -> np.ndarray:
    return np.diag(np.r_[np.zeros(n_classes - 1), np.ones(n_features)])


def start(n_features: int, n_classes: int) -> np.ndarray:
    k = np.arange(1, n_classes)
    return np.r_[np.log(k / (n_classes - k)), np.zeros(n_features)]


def feasible_for(n_classes: int) -> Callable[[np.ndarray], bool]:
    def feasible(beta: np.ndarray) -> bool:
        theta = beta[:n_classes - 1]
        return bool(np.isfinite(beta).all() and (np.diff(theta) > MIN_GAP).all())
    return feasible


def _bounds(x: np.ndarray, y: np.ndarray, beta: np.ndarray, n_classes: int):
    """The upper and lower cumulative arguments a = θ_y − η, b = θ_{y−1} − η (±∞ at the ends)."""
    theta = np.r_[-np.inf, beta[:n_classes - 1], np.inf]
    eta = x @ beta[n_classes - 1:]
    return theta[y + 1] - eta, theta[y] - eta


def _neg_log_proba(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """−log(σ(a) − σ(b)) for a > b, stably: σ(a) − σ(b) = σ(a)·σ(−b)·(1 − e^{b−a})."""
    with np.errstate(invalid="ignore"):
        gap = np.where(np.isinf(a) | np.isinf(b), np.inf, a - b)
    return -(log_expit(a) + log_expit(-b) + np.log(-np.expm1(-gap)))


def _derivatives(a: np.ndarray, b: np.ndarray):
    """ℓ = −log(σ(a) − σ(b)): (∂ℓ/∂a, ∂ℓ/∂b, ∂²ℓ/∂a², ∂²ℓ/∂b², ∂²ℓ/∂a∂b), 0 at an infinite end."""
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(np.isinf(a) | np.isinf(b), np.inf, a - b)
        d = -np.expm1(-gap)  # 1 − e^{b−a}
        ga = np.where(np.isinf(a), 0.0, expit(-a) / (expit(-b) * d))  # f(a)/D
        gb = np.where(np.isinf(b), 0.0, expit(b) / (expit(a) * d))  # f(b)/D
    fa, fb = expit(a), expit(b)
    return -ga, gb, -ga * (1 - 2 * fa) + ga ** 2, gb * (1 - 2 * fb) + gb ** 2, -ga * gb


def site_sums(x, y, x_val, y_val, betas, weights) -> dict[str, np.ndarray]:
    """One site's part of a Newton round at the candidates' parameters ``betas`` (C, P) with the
    federation's balanced weights (K,): ``n`` (K,), ``grad`` (C, P), ``hess`` (C, P(P+1)/2),
    ``objective`` (C,), ``val_loss`` (C, K), ``val_n`` (K,). Only sums leave the site."""
    weights = np.asarray(weights, dtype=np.float64)
    k_classes = len(weights)
    betas = np.atleast_2d(np.asarray(betas, dtype=np.float64))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
    s = weights[y]
    eye = np.eye(k_classes - 1)
    upper_rows = np.vstack([eye, np.zeros((1, k_classes - 1))])[y]  # θ_y (none for the top)
    lower_rows = np.vstack([np.zeros((1, k_classes - 1)), eye])[y]  # θ_{y−1} (none for 0)
    za = np.concatenate([upper_rows, -x], axis=1)  # ∂a/∂params
    zb = np.concatenate([lower_rows, -x], axis=1)
    grads, hesses, objectives = [], [], []
    for beta in betas:
        a, b = _bounds(x, y, beta, k_classes)
        objectives.append(float((np.minimum(_neg_log_proba(a, b), LOSS_CAP) * s).sum()))
        da, db, haa, hbb, hab = _derivatives(a, b)
        grads.append(za.T @ (s * da) + zb.T @ (s * db))
        cross = (za.T * (s * hab)) @ zb
        h = (za.T * (s * haa)) @ za + (zb.T * (s * hbb)) @ zb + cross + cross.T
        hesses.append(upper(h))
    x_val, y_val = np.asarray(x_val, dtype=np.float64), np.asarray(y_val, dtype=np.int64)
    val = np.stack([np.minimum(_neg_log_proba(*_bounds(x_val, y_val, b, k_classes)), LOSS_CAP)
                    for b in betas]) if len(y_val) else np.zeros((len(betas), 0))
    return site_statistics(y, y_val, grads, hesses, objectives, val, k_classes)


@dataclass
class _Parameters:
    coef_: np.ndarray
    thresholds_: np.ndarray


@dataclass
class OrdinalFit(KClassFit, _Parameters):
    """The selected ordinal solution on the preprocessed features: ``coef_`` (F,),
    ``thresholds_`` (K − 1,) increasing; the score is ``x @ coef_`` and P(y ≤ k) =
    σ(thresholds_[k] − score). ``coefs_all`` (C, P): every candidate, thresholds first. Fields
    (in order): ``coef_``, ``thresholds_``, then `engine.KClassFit`'s, then ``kind``."""

    KIND, SECOND, WHAT = KIND, "thresholds", "an ordinal logistic regression fit"

    kind: str = KIND

    @property
    def n_classes(self) -> int:
        return len(self.thresholds_) + 1

    def decision_function(self, x) -> np.ndarray:
        """The ordinal score x·β (n,): higher is further up the scale."""
        return np.asarray(x, dtype=np.float64) @ self.coef_

    def cumulative(self, x) -> np.ndarray:
        """P(y ≤ k) for k = 0 … K − 2 (n, K − 1)."""
        return expit(self.thresholds_[None, :] - self.decision_function(x)[:, None])

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (n, K)."""
        c = self.cumulative(x)
        full = np.concatenate([np.zeros((len(c), 1)), c, np.ones((len(c), 1))], axis=1)
        return np.diff(full, axis=1)


def solve(round_sums: Callable[[np.ndarray], Mapping[str, np.ndarray]], n_features: int,
          weights, penalties=PENALTIES, *, tol: float = 1e-10, gradient_floor: float = 0.0,
          max_rounds: int = 100) -> OrdinalFit:
    """Newton's method for every candidate through ``round_sums(betas) -> summed site_sums``;
    K = len(weights). Returns the candidate chosen on validation (`engine.select`)."""
    k_classes = len(weights)
    state = KState.start(start(n_features, k_classes), penalties,
                         penalty_matrix(n_features, k_classes), feasible_for(k_classes))
    beta, chosen = engine.solve(round_sums, state, weights, tol=tol,
                                gradient_floor=gradient_floor, max_rounds=max_rounds)
    return OrdinalFit(beta[k_classes - 1:].copy(), beta[:k_classes - 1].copy(), **chosen)


def fit_pooled(x, y, x_val, y_val, n_classes: int | None = None, penalties=PENALTIES,
               tol: float = 1e-10, weights=None) -> OrdinalFit:
    """The same solver on one participant set (K: ``n_classes``, else the largest label + 1;
    ``weights``: balanced from ``y`` unless given, e.g. all 1 for an unweighted fit)."""
    return engine.fit_pooled(solve, site_sums, x, y, x_val, y_val, n_classes, penalties, tol,
                             weights)
