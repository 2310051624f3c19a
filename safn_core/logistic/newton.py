"""Exact L2-penalised, class-balanced logistic regression by Newton's method on summed statistics.

The problem, for each candidate penalty λ of a grid (one solve per λ, all at once)::

    minimise  Σ_i s_{y_i} · ℓ(y_i, b + w·x_i)  +  (λ/2)·‖w‖²        (the intercept b is free)

with ℓ the log loss and s_c = n / (2 · n_c) the balanced class weights of the *training*
participants (scikit-learn's ``class_weight="balanced"``; its ``C`` is 1/λ). Everything Newton
needs at the current coefficients — the gradient, the Hessian, the objective — is a sum over
participants, so it is a sum over sites (GLORE; DataSHIELD's ``ds.glm``): `site_sums` computes
one site's part on its own data, and `solve` drives the iterations through any function that
returns the total of those parts at given coefficients. Pooled (one "site"), plain federated
(a sum of replies) and secure federated (a masked secure sum, `safn_core.logistic.packing`)
fits run this same loop, so they agree to the precision of the sums.

The penalty is chosen by the class-balanced log loss of the *validation* participants (the mean
loss of each class, averaged over the classes), summed the same way: training participants
shape the coefficients, validation participants only pick among the candidates.

The loop is Newton's method with step halving: each round returns the objective at the
current coefficients; a candidate whose objective rose goes halfway back instead of taking a
Newton step (logistic regression's Newton iteration is not globally convergent without it).
A candidate has converged when its Newton step is below ``tol`` in every coordinate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

PENALTIES: tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-1.0, 3.01, 0.5))
"""The default grid of λ (0.1 … 1000, half decades): scikit-learn's C from 10 down to 0.001."""
LOSS_CAP = 50.0
"""A participant's log loss is capped here in every sum (a margin beyond ±50 adds nothing the
fit needs and keeps the sums bounded for fixed point); the cap applies pooled and federated
alike."""
FIELDS = ("n", "grad", "hess", "objective", "val_loss", "val_n")


def triangle(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the upper triangle (diagonal included) of a size × size matrix."""
    return np.triu_indices(size)


def class_weights(counts) -> tuple[float, float]:
    """Balanced weights n / (2 · n_c) from the training class counts (HC, PD)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (2,) or counts.min() < 1:
        raise ValueError(f"balanced class weights need participants of both classes; the "
                         f"training counts are {counts.astype(int).tolist()}")
    return tuple(float(w) for w in counts.sum() / (2.0 * counts))


def _design(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


def _log_loss(y: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """ℓ(y, η) = log(1 + e^η) − y·η, capped at `LOSS_CAP`, for margins (K, n)."""
    return np.minimum(np.logaddexp(0.0, margin) - y * margin, LOSS_CAP)


def site_sums(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              betas: np.ndarray, weights) -> dict[str, np.ndarray]:
    """One site's part of a Newton round at the candidates' coefficients ``betas`` (K, 1 + F),
    intercept first: its training class counts ``n`` (2,), the weighted gradient ``grad``
    (K, 1 + F), the upper triangle of the weighted Hessian ``hess`` (K, T), the weighted data
    term of the objective ``objective`` (K,), and its validation split's summed log loss per
    class ``val_loss`` (K, 2) with the class counts ``val_n`` (2,)."""
    betas = np.atleast_2d(np.asarray(betas, dtype=np.float64))
    xt = _design(x)
    y = np.asarray(y, dtype=np.float64)
    s = np.where(y == 1, float(weights[1]), float(weights[0]))
    margin = betas @ xt.T  # (K, n)
    p = 1.0 / (1.0 + np.exp(-margin))
    grad = (s * (p - y)) @ xt
    rows, cols = triangle(xt.shape[1])
    curvature = s * p * (1.0 - p)  # (K, n)
    hess = np.stack([(xt.T * c) @ xt for c in curvature])[:, rows, cols] if len(y) \
        else np.zeros((len(betas), len(rows)))
    objective = (_log_loss(y, margin) * s).sum(axis=1)
    y_val = np.asarray(y_val, dtype=np.float64)
    val_loss = _log_loss(y_val, betas @ _design(x_val).T) if len(y_val) \
        else np.zeros((len(betas), 0))
    per_class = np.stack([val_loss[:, y_val == c].sum(axis=1) for c in (0, 1)], axis=1)
    return {"n": np.bincount(y.astype(np.int64), minlength=2).astype(np.int64),
            "grad": grad, "hess": hess, "objective": objective, "val_loss": per_class,
            "val_n": np.bincount(y_val.astype(np.int64), minlength=2).astype(np.int64)}


def add_sums(parts) -> dict[str, np.ndarray]:
    """The total of several sites' `site_sums` (the plain federation's aggregation)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no site sent its sums")
    return {k: np.sum([np.asarray(p[k]) for p in parts], axis=0) for k in FIELDS}


@dataclass
class LogisticFit:
    """The selected solution and how it was found (state explicit and JSON-serialisable).

    ``coef`` (F,) and ``intercept`` are on the preprocessed (z-scored) features; ``penalty`` is
    the selected λ; ``val_loss`` the class-balanced validation log loss of every candidate (None
    where a class is absent from validation); ``iterations`` the Newton rounds run."""

    coef: np.ndarray
    intercept: float
    penalty: float
    penalties: tuple[float, ...]
    val_loss: tuple[float | None, ...]
    iterations: int
    converged: bool
    class_weight: tuple[float, float]
    n_train: tuple[int, int] = (0, 0)
    coefs_all: np.ndarray | None = field(default=None, repr=False)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(positive) (n,)."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))

    def to_dict(self) -> dict:
        return {"coef": np.asarray(self.coef).tolist(), "intercept": float(self.intercept),
                "penalty": float(self.penalty), "penalties": list(self.penalties),
                "val_loss": list(self.val_loss), "iterations": int(self.iterations),
                "converged": bool(self.converged), "class_weight": list(self.class_weight),
                "n_train": list(self.n_train)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LogisticFit":
        try:
            return cls(np.asarray(d["coef"], dtype=np.float64), float(d["intercept"]),
                       float(d["penalty"]), tuple(float(v) for v in d["penalties"]),
                       tuple(None if v is None else float(v) for v in d["val_loss"]),
                       int(d["iterations"]), bool(d["converged"]),
                       tuple(float(v) for v in d["class_weight"]),
                       tuple(int(v) for v in d.get("n_train", (0, 0))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a logistic regression fit: {exc}") from None


def balanced_val_loss(val_loss: np.ndarray, val_n: np.ndarray) -> list[float | None]:
    """Each candidate's class-balanced validation log loss (None if a class has no one)."""
    val_n = np.asarray(val_n, dtype=np.float64)
    if val_n.min() < 1:
        return [None] * len(val_loss)
    return [float(np.mean(np.asarray(row) / val_n)) for row in val_loss]


def newton_step(hess: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The Newton step H⁻¹g (least squares where H is singular); shared with `engine`."""
    try:
        return np.linalg.solve(hess, grad)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(hess, grad, rcond=None)[0]


@dataclass
class NewtonState:
    """The coordinator's side of the iterations, one row per candidate penalty."""

    penalties: np.ndarray
    betas: np.ndarray  # (K, 1 + F) current coefficients, intercept first
    previous: np.ndarray  # the last accepted coefficients
    previous_objective: np.ndarray  # their penalised objective (inf before the first)
    converged: np.ndarray  # (K,) bool
    last_step: np.ndarray  # (K,) largest |Newton step| of the last accepted round

    @classmethod
    def start(cls, n_features: int, penalties) -> "NewtonState":
        penalties = np.asarray(penalties, dtype=np.float64)
        if penalties.ndim != 1 or len(penalties) == 0 or (penalties <= 0).any():
            raise ValueError("penalties must be a non-empty list of positive numbers")
        betas = np.zeros((len(penalties), n_features + 1))
        return cls(penalties, betas, betas.copy(), np.full(len(penalties), np.inf),
                   np.zeros(len(penalties), dtype=bool), np.full(len(penalties), np.inf))

    def update(self, sums: Mapping[str, np.ndarray], tol: float,
               gradient_floor: float = 0.0) -> None:
        """One round: accept or halve each candidate's step, then take Newton steps. A
        candidate has converged when its step is below ``tol`` in every coordinate, or when
        its gradient is below ``gradient_floor`` in every coordinate (the precision of summed
        gradients in fixed point: below it the sums cannot say which way to go)."""
        size = self.betas.shape[1]
        rows, cols = triangle(size)
        ridge = np.ones(size)
        ridge[0] = 0.0  # the intercept is not penalised
        for k, lam in enumerate(self.penalties):
            if self.converged[k]:
                continue
            beta = self.betas[k]
            objective = float(sums["objective"][k]) + 0.5 * lam * float(beta[1:] @ beta[1:])
            if objective > self.previous_objective[k] * (1 + 1e-12) + 1e-12:
                self.betas[k] = 0.5 * (self.previous[k] + beta)  # halve the step, try again
                continue
            hess = np.zeros((size, size))
            hess[rows, cols] = sums["hess"][k]
            hess = hess + np.triu(hess, 1).T + np.diag(lam * ridge)
            grad = np.asarray(sums["grad"][k], dtype=np.float64) + lam * ridge * beta
            if gradient_floor > 0 and float(np.max(np.abs(grad))) <= gradient_floor:
                self.previous[k], self.previous_objective[k] = beta, objective
                self.converged[k] = True
                continue
            step = newton_step(hess, grad)
            self.previous[k], self.previous_objective[k] = beta, objective
            self.last_step[k] = float(np.max(np.abs(step)))
            self.betas[k] = beta - step
            if self.last_step[k] < tol:
                self.converged[k] = True


def solve(round_sums: Callable[[np.ndarray], Mapping[str, np.ndarray]], n_features: int,
          weights, penalties=PENALTIES, *, tol: float = 1e-10, gradient_floor: float = 0.0,
          max_rounds: int = 100) -> LogisticFit:
    """Newton's method for every candidate through ``round_sums(betas) -> summed site_sums``
    (``gradient_floor``: the gradient's fixed-point precision under secure aggregation, 10 ×
    `Packing.error_bound` of its field; 0 for exact sums).

    Returns the candidate with the lowest class-balanced validation log loss (the smallest
    penalty among ties; the middle of the grid if no validation loss could be computed)."""
    state = NewtonState.start(n_features, penalties)
    sums, rounds = None, 0
    while rounds < max_rounds and not state.converged.all():
        sums = round_sums(state.betas.copy())
        rounds += 1
        state.update(sums, tol, gradient_floor)
    # the validation losses of the last round were taken at coefficients within tol of the final
    val = balanced_val_loss(sums["val_loss"], sums["val_n"]) if sums is not None \
        else [None] * len(state.penalties)
    scored = [(v, k) for k, v in enumerate(val) if v is not None and np.isfinite(v)]
    best = min(scored)[1] if scored else len(state.penalties) // 2
    beta = state.betas[best]
    n = tuple(int(v) for v in sums["n"]) if sums is not None else (0, 0)
    return LogisticFit(beta[1:].copy(), float(beta[0]), float(state.penalties[best]),
                       tuple(float(p) for p in state.penalties), tuple(val), rounds,
                       bool(state.converged[best]), tuple(float(w) for w in weights), n,
                       state.betas.copy())


def fit_pooled(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               penalties=PENALTIES, tol: float = 1e-10) -> LogisticFit:
    """The same solver on one participant set (a centralised fit: safn-train's baseline, the
    simulation's pooled and local-only comparators, a fold's start for SAFN)."""
    weights = class_weights(np.bincount(np.asarray(y, dtype=np.int64), minlength=2))
    return solve(lambda betas: site_sums(x, y, x_val, y_val, betas, weights),
                 np.asarray(x).shape[1], weights, penalties, tol=tol)
