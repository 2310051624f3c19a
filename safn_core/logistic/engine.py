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
from dataclasses import dataclass, field

import numpy as np

from safn_core.logistic.newton import FIELDS, balanced_val_loss, newton_step, triangle

__all__ = ["FIELDS", "KClassFit", "KState", "run_newton", "select", "balanced_weights", "solve",
           "fit_pooled"]


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
            step = newton_step(hess, grad)
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


def solve(round_sums: Callable[[np.ndarray], Mapping[str, np.ndarray]], state: KState, weights,
          *, tol: float, gradient_floor: float, max_rounds: int) -> tuple[np.ndarray, dict]:
    """A K-class fit's iterations and choice: the chosen candidate's parameters and the
    `KClassFit` fields after the fit's own two (penalty … coefs_all), as keywords."""
    sums, rounds = run_newton(round_sums, state, tol=tol, gradient_floor=gradient_floor,
                              max_rounds=max_rounds)
    best, val = select(sums, state)
    n = tuple(int(v) for v in sums["n"]) if sums is not None else (0,) * len(weights)
    return state.betas[best], {
        "penalty": float(state.penalties[best]),
        "penalties": tuple(float(p) for p in state.penalties), "val_loss": tuple(val),
        "iterations": rounds, "converged": bool(state.converged[best]),
        "class_weight": tuple(float(w) for w in weights), "n_train": n,
        "coefs_all": state.betas.copy()}


def fit_pooled(solve_kind, site_sums, x, y, x_val, y_val, n_classes: int | None, penalties,
               tol: float, weights):
    """A K-class kind's pooled fit through its ``solve`` and ``site_sums`` on one participant set
    (K: ``n_classes``, else the largest label + 1; ``weights``: balanced from ``y`` unless
    given)."""
    y = np.asarray(y, dtype=np.int64)
    k = int(n_classes) if n_classes is not None else int(max(y.max(), np.max(y_val)) + 1)
    if weights is None:
        weights = balanced_weights(np.bincount(y, minlength=k), k)
    return solve_kind(lambda betas: site_sums(x, y, x_val, y_val, betas, weights),
                      np.asarray(x).shape[1], weights, penalties, tol=tol)


@dataclass
class KClassFit:
    """What the multinomial and ordinal fits share: the fields after their own leading two
    (``coef_`` and ``intercept_`` / ``thresholds_``), ``coef`` and the ``to_dict`` /
    ``from_dict`` JSON. A fit class lists a dataclass of its two leading fields after this one
    among its bases (the fields of the last base come first) and ends with its ``kind`` field;
    ``KIND``, ``SECOND`` (the second field's JSON name, the field being ``SECOND + "_"``) and
    ``WHAT`` (for errors) are its class constants."""

    KIND = SECOND = WHAT = ""

    penalty: float
    penalties: tuple[float, ...]
    val_loss: tuple[float | None, ...]
    iterations: int
    converged: bool
    class_weight: tuple[float, ...]
    n_train: tuple[int, ...] = ()
    coefs_all: np.ndarray | None = field(default=None, repr=False)

    @property
    def coef(self) -> np.ndarray:
        return self.coef_

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "coef": np.asarray(self.coef_).tolist(),
                self.SECOND: np.asarray(getattr(self, self.SECOND + "_")).tolist(),
                "penalty": self.penalty,
                "penalties": list(self.penalties), "val_loss": list(self.val_loss),
                "iterations": int(self.iterations), "converged": bool(self.converged),
                "class_weight": list(self.class_weight), "n_train": list(self.n_train)}

    @classmethod
    def from_dict(cls, d: Mapping):
        try:
            if d.get("kind") != cls.KIND:
                raise ValueError(f"kind is {d.get('kind')!r}")
            return cls(np.asarray(d["coef"], dtype=np.float64),
                       np.asarray(d[cls.SECOND], dtype=np.float64), float(d["penalty"]),
                       tuple(float(v) for v in d["penalties"]),
                       tuple(None if v is None else float(v) for v in d["val_loss"]),
                       int(d["iterations"]), bool(d["converged"]),
                       tuple(float(v) for v in d["class_weight"]),
                       tuple(int(v) for v in d.get("n_train", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not {cls.WHAT}: {exc}") from None


def per_class(loss: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Summed loss (C, n) per class of ``y``: (C, K)."""
    return np.stack([loss[:, y == c].sum(axis=1) for c in range(n_classes)], axis=1)


def counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.int64)


def site_statistics(y: np.ndarray, y_val: np.ndarray, grads, hesses, objectives, val: np.ndarray,
                    n_classes: int) -> dict[str, np.ndarray]:
    """A K-class ``site_sums``' result from its per-candidate lists and validation losses
    ``val`` (C, n_val): ``n``, ``grad``, ``hess``, ``objective``, ``val_loss``, ``val_n``."""
    return {"n": counts(y, n_classes), "grad": np.asarray(grads), "hess": np.asarray(hesses),
            "objective": np.asarray(objectives), "val_loss": per_class(val, y_val, n_classes),
            "val_n": counts(y_val, n_classes)}


def upper(h: np.ndarray) -> np.ndarray:
    """The upper triangle (row-major, diagonal included) of a square matrix."""
    return h[triangle(h.shape[0])]
