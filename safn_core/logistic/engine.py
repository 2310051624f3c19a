"""Newton's method over summed statistics for any parameter layout: the K-class fits'
(`safn_core.logistic.multinomial`, `safn_core.logistic.ordinal`) shared driver.

It is `safn_core.logistic.newton`'s loop (binary, kept as it is) with two generalisations:

* the penalty is ``(λ/2)·βᵀRβ`` for a fixed positive semi-definite ``R`` (P, P) (the binary fit's
  R is the identity without the intercept; the multinomial's couples a feature's coefficients
  across classes, the ordinal's leaves the thresholds free);
* a ``feasible(β)`` test at the coordinator (the ordinal thresholds must stay ordered): a Newton
  step that leaves the feasible set is halved until it does not, before any site sees it.

Each round the caller's ``round_sums(betas)`` returns the summed site statistics at every
candidate's parameters: ``n`` (K,), ``grad`` (C, P), ``hess`` (C, P(P+1)/2, the upper triangle),
``objective`` (C,), ``val_loss`` (C, K) and ``val_n`` (K,). A candidate whose penalised objective
rose goes halfway back; a candidate has converged when its step is below ``tol`` in every
coordinate (or its gradient below ``gradient_floor``, the fixed-point precision of a secure sum).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from safn_core.logistic.newton import FIELDS, balanced_val_loss, triangle

__all__ = ["FIELDS", "KState", "run_newton", "select", "balanced_weights"]


def balanced_weights(counts, n_classes: int | None = None) -> tuple[float, ...]:
    """Balanced class weights n / (K · n_c) from the training class counts (every class needs
    someone)."""
    counts = np.asarray(counts, dtype=np.float64)
    if n_classes is not None and counts.shape != (n_classes,):
        raise ValueError(f"expected {n_classes} class counts, got {counts.tolist()}")
    if counts.ndim != 1 or len(counts) < 2 or counts.min() < 1:
        raise ValueError(f"balanced class weights need participants of every class; the "
                         f"training counts are {counts.astype(int).tolist()}")
    return tuple(float(w) for w in counts.sum() / (len(counts) * counts))


def full_hessian(upper: np.ndarray, size: int) -> np.ndarray:
    """The symmetric matrix from its upper triangle (row-major, diagonal included)."""
    rows, cols = triangle(size)
    h = np.zeros((size, size))
    h[rows, cols] = upper
    return h + np.triu(h, 1).T


@dataclass
class KState:
    """The coordinator's side of the iterations, one row per candidate penalty."""

    penalties: np.ndarray
    betas: np.ndarray  # (C, P)
    previous: np.ndarray
    previous_objective: np.ndarray
    converged: np.ndarray
    last_step: np.ndarray
    penalty_matrix: np.ndarray  # (P, P)
    feasible: Callable[[np.ndarray], bool] | None = None

    @classmethod
    def start(cls, start: np.ndarray, penalties, penalty_matrix: np.ndarray,
              feasible: Callable[[np.ndarray], bool] | None = None) -> "KState":
        penalties = np.asarray(penalties, dtype=np.float64)
        if penalties.ndim != 1 or len(penalties) == 0 or (penalties < 0).any():
            raise ValueError("penalties must be a non-empty list of non-negative numbers")
        betas = np.tile(np.asarray(start, dtype=np.float64), (len(penalties), 1))
        c = len(penalties)
        return cls(penalties, betas, betas.copy(), np.full(c, np.inf), np.zeros(c, dtype=bool),
                   np.full(c, np.inf), np.asarray(penalty_matrix, dtype=np.float64), feasible)

    def update(self, sums: Mapping[str, np.ndarray], tol: float,
               gradient_floor: float = 0.0) -> None:
        """One round: accept or halve each candidate's step, then take (feasible) Newton steps."""
        size = self.betas.shape[1]
        r = self.penalty_matrix
        for k, lam in enumerate(self.penalties):
            if self.converged[k]:
                continue
            beta = self.betas[k]
            objective = float(sums["objective"][k]) + 0.5 * lam * float(beta @ r @ beta)
            prev = self.previous_objective[k]
            if not np.isfinite(objective) or objective > prev * (1 + 1e-12) + 1e-12:
                self.betas[k] = 0.5 * (self.previous[k] + beta)  # halve the step, try again
                continue
            hess = full_hessian(np.asarray(sums["hess"][k], dtype=np.float64), size) + lam * r
            grad = np.asarray(sums["grad"][k], dtype=np.float64) + lam * (r @ beta)
            self.previous[k], self.previous_objective[k] = beta.copy(), objective
            if gradient_floor > 0 and float(np.max(np.abs(grad))) <= gradient_floor:
                self.converged[k] = True
                continue
            try:
                step = np.linalg.solve(hess, grad)
            except np.linalg.LinAlgError:
                step = np.linalg.lstsq(hess, grad, rcond=None)[0]
            if self.feasible is not None:
                for _ in range(60):
                    if self.feasible(beta - step):
                        break
                    step = 0.5 * step
            self.last_step[k] = float(np.max(np.abs(step)))
            self.betas[k] = beta - step
            if self.last_step[k] < tol:
                self.converged[k] = True


def run_newton(round_sums: Callable[[np.ndarray], Mapping[str, np.ndarray]], state: KState, *,
               tol: float = 1e-10, gradient_floor: float = 0.0, max_rounds: int = 100):
    """Iterate until every candidate converged (or ``max_rounds``): ``(last sums, rounds)``."""
    sums, rounds = None, 0
    while rounds < max_rounds and not state.converged.all():
        sums = round_sums(state.betas.copy())
        rounds += 1
        state.update(sums, tol, gradient_floor)
    return sums, rounds


def select(sums, state: KState) -> tuple[int, list[float | None]]:
    """The candidate with the lowest class-balanced validation log loss (the smallest penalty
    among ties, the middle of the grid without validation losses) and every candidate's loss."""
    val = balanced_val_loss(sums["val_loss"], sums["val_n"]) if sums is not None \
        else [None] * len(state.penalties)
    scored = [(v, k) for k, v in enumerate(val) if v is not None and np.isfinite(v)]
    return (min(scored)[1] if scored else len(state.penalties) // 2), val


def per_class(loss: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Summed loss (C, n) per class of ``y``: (C, K)."""
    return np.stack([loss[:, y == c].sum(axis=1) for c in range(n_classes)], axis=1)


def counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.int64)


def upper(h: np.ndarray) -> np.ndarray:
    """The upper triangle (row-major, diagonal included) of a square matrix."""
    return h[triangle(h.shape[0])]
