"""Which exact logistic regression a target gets, and one interface to the three of them.

* ``binary`` (K = 2): `safn_core.logistic.newton` (unchanged: scores are P(class 1));
* ``multinomial`` (K > 2, unordered, or ``model.head: softmax``): `safn_core.logistic.multinomial`;
* ``ordinal`` (K > 2, ordered, or ``model.head: ordinal``): `safn_core.logistic.ordinal`.

The kind follows SAFN's head (``model.head``: softmax or ordinal), so the
regression its wide path starts from has the head's form. Every kind's sites send the same
fields (``n``, ``grad``, ``hess``, ``objective``, ``val_loss``, ``val_n``), so the federation
(`safn_core.federation.site_logistic`, ``server/logistic_floor.py``) is the same for all.
"""

from __future__ import annotations

from collections.abc import Mapping

from safn_core.logistic import multinomial, newton, ordinal
from safn_core.logistic.engine import balanced_weights
from safn_core.logistic.packing import kclass_packing, newton_packing

KINDS = ("binary", "multinomial", "ordinal")


def kind_for(n_classes: int, ordered: bool = False, head: str = "softmax") -> str:
    """``binary`` for K = 2; otherwise ``ordinal`` for ``head`` ordinal, else
    ``multinomial``."""
    if n_classes == 2:
        return "binary"
    if n_classes < 2:
        raise ValueError(f"a logistic regression needs 2 classes or more, not {n_classes}")
    return "ordinal" if head == "ordinal" else "multinomial"


def _module(kind: str):
    try:
        return {"binary": newton, "multinomial": multinomial, "ordinal": ordinal}[kind]
    except KeyError:
        raise ValueError(f"logistic regression kind {kind!r}; choose one of {KINDS}") from None


def n_params(kind: str, n_features: int, n_classes: int) -> int:
    """Parameters per candidate: 1 + F, (K − 1)(1 + F) or K − 1 + F."""
    if kind == "binary":
        return n_features + 1
    return _module(kind).n_params(n_features, n_classes)


def class_weights(kind: str, counts) -> tuple[float, ...]:
    """The balanced weights n / (K · n_c) (binary: `newton.class_weights`, the same formula)."""
    return newton.class_weights(counts) if kind == "binary" else balanced_weights(counts)


def site_sums(kind: str, x, y, x_val, y_val, betas, weights) -> dict:
    return _module(kind).site_sums(x, y, x_val, y_val, betas, weights)


def solve(kind: str, round_sums, n_features: int, weights, penalties=newton.PENALTIES,
          **options):
    """The kind's Newton solver (``options``: tol, gradient_floor, max_rounds)."""
    return _module(kind).solve(round_sums, n_features, weights, penalties, **options)


def fit_pooled(kind: str, x, y, x_val, y_val, n_classes: int | None = None,
               penalties=newton.PENALTIES):
    """The kind's pooled fit (binary: `newton.fit_pooled`)."""
    if kind == "binary":
        return newton.fit_pooled(x, y, x_val, y_val, penalties)
    return _module(kind).fit_pooled(x, y, x_val, y_val, n_classes, penalties)


def packing(kind: str, n_features: int, n_candidates: int, weights, max_site_examples: int,
            parties: int):
    """The fixed-point layout of one Newton round's secure sum."""
    if kind == "binary":
        return newton_packing(n_features, n_candidates, weights, max_site_examples, parties)
    return kclass_packing(n_params(kind, n_features, len(weights)), n_candidates, weights,
                          max_site_examples, parties)


def fit_from_dict(d: Mapping):
    """A fit from its ``to_dict`` (no ``kind``: a binary `newton.LogisticFit`)."""
    kind = str(d.get("kind", "binary"))
    classes = {"binary": newton.LogisticFit, "multinomial": multinomial.MultinomialFit,
               "ordinal": ordinal.OrdinalFit}
    if kind not in classes:
        raise ValueError(f"logistic regression kind {kind!r}; choose one of {KINDS}")
    return classes[kind].from_dict(d)
