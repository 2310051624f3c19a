"""The fixed-point layout of a Newton round's sums under secure aggregation (`safn_core.secagg`).

Every field's clip bound follows from what a site can hold: at most ``max_site_examples``
training participants, class weights at most ``max(weights)``, preprocessed features at most
`FEATURE_BOUND` in magnitude (z-scores: a training value of n participants is within
(n − 1)/√n standard deviations of their mean, so 100 covers 10,000 of them; a value beyond it
is clipped in the sum, counted, and the coordinator says the fit is then not exact), a
participant's log loss at most `safn_core.logistic.newton.LOSS_CAP`. Counts are exact.

The precision that matters is the gradient's: Newton's fixed point is where the gradient is
zero, so the error of the solution is the Hessian's inverse times the gradient's fixed-point
error (`Packing.error_bound`), far below 1e-6 for the federation sizes safn is for; the
Hessian's error only slows convergence.
"""

from __future__ import annotations

from safn_core.logistic.newton import LOSS_CAP
from safn_core.secagg import Field, Packing

FEATURE_BOUND = 100.0


def newton_packing(n_features: int, n_candidates: int, weights, max_site_examples: int,
                   parties: int) -> Packing:
    size = n_features + 1
    n = float(max_site_examples)
    s = max(float(w) for w in weights)
    return Packing((
        Field.count("n", (2,)),
        Field.real("grad", (n_candidates, size), clip=n * s * FEATURE_BOUND),
        Field.real("hess", (n_candidates, size * (size + 1) // 2),
                   clip=0.25 * n * s * FEATURE_BOUND ** 2),
        Field.real("objective", (n_candidates,), clip=n * s * LOSS_CAP),
        Field.real("val_loss", (n_candidates, 2), clip=n * LOSS_CAP),
        Field.count("val_n", (2,)),
        Field.count("clipped", (1,)),  # feature values clipped to FEATURE_BOUND (`clipped_features`)
    ), int(parties))


def kclass_packing(n_params: int, n_candidates: int, weights, max_site_examples: int,
                   parties: int) -> Packing:
    """The layout of a K-class Newton round (`safn_core.logistic.multinomial` or `ordinal`):
    K = len(weights) class counts, P = ``n_params`` parameters. Per participant the gradient is
    at most s·`FEATURE_BOUND` in a coefficient (|∂ℓ/∂η| ≤ 1 for softmax and cumulative logit
    alike) and a Hessian entry at most s·`FEATURE_BOUND`²/2; an ordinal threshold's terms grow
    as its neighbours close in (1/(1 − e^{−gap})), far inside these bounds unless two
    thresholds are within 0.01 (a sum beyond a bound is reported clipped, and the floor is then
    skipped)."""
    k = len(weights)
    n = float(max_site_examples)
    s = max(float(w) for w in weights)
    return Packing((
        Field.count("n", (k,)),
        Field.real("grad", (n_candidates, n_params), clip=n * s * FEATURE_BOUND),
        Field.real("hess", (n_candidates, n_params * (n_params + 1) // 2),
                   clip=0.5 * n * s * FEATURE_BOUND ** 2),
        Field.real("objective", (n_candidates,), clip=n * s * LOSS_CAP),
        Field.real("val_loss", (n_candidates, k), clip=n * LOSS_CAP),
        Field.count("val_n", (k,)),
        Field.count("clipped", (1,)),
    ), int(parties))


def clipped_features(x, bound: float = FEATURE_BOUND):
    """``x`` with every value clipped to ±``bound`` and how many were: a site applies it before
    `site_sums` under secure aggregation (so that the sums it sends are the sums of what it
    clipped), and reports the count inside the secure sum."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    return np.clip(x, -bound, bound), int(np.count_nonzero(np.abs(x) > bound))
