"""A site's part of the logistic regression floor (`safn_core.logistic`), on its own data; no
Flower here.

The coordinator sends every candidate's coefficients (on the federation's preprocessed
features) and the balanced class weights; the site returns the sums of a Newton round over its
training split and the validation log loss per class (`safn_core.logistic.newton.site_sums`).
These sums are a release of the training split like a model update:

- a site under DP-SGD never sends them (they are exact): it refuses with its reason, and the
  run goes without the floor (the coordinator says so);
- without secure aggregation the coordinator sees each site's sums, so a site whose training
  split has fewer than ``min_cell`` people of a class refuses, and one whose validation split
  does sends zeros for the validation loss (its validation participants then do not take part
  in choosing the penalty); under secure aggregation only the federation-wide sum is revealed
  and ``min_cell`` applies to it at the coordinator.

With K > 2 classes the coordinator names the regression's kind in the message (``KIND``:
multinomial or ordinal, `safn_core.logistic.family`), K is the number of class weights it sends,
and the sums have the same fields with K class counts and the kind's P parameters; ``min_cell``
applies to every class.

Preprocessed values beyond `safn_core.logistic.packing.FEATURE_BOUND` are clipped
(`clipped_features`) before
summing (and counted) so that the fixed-point sums are sums of what the site clipped.
"""

from __future__ import annotations

import numpy as np

from safn_core.data.cohort import LABEL
from safn_core.logistic import family
from safn_core.logistic.packing import clipped_features

KIND = "logistic-kind"
"""The message's key naming the regression's kind (absent: binary, as before K classes)."""

REFUSAL_DP = ("this site trains under DP-SGD, and the logistic regression's sums are exact "
              "statistics of its training split")


def betas_from(flat, n_features: int, kind: str = "binary", n_classes: int = 2) -> np.ndarray:
    """The candidates' parameters from the message's flat list (C × P, P the kind's
    `family.n_params`: 1 + F for binary)."""
    flat = np.asarray(flat, dtype=np.float64)
    size = family.n_params(kind, n_features, n_classes)
    if flat.size == 0 or flat.size % size:
        raise ValueError(f"the logistic regression's coefficients have {flat.size} values, "
                         f"not a multiple of {size} (the {kind} regression's parameters for "
                         f"this site's {n_features} features and {n_classes} classes)")
    return flat.reshape(-1, size)


def refusal(site, secure: bool, n_classes: int = 2) -> str | None:
    """Why this site does not send the floor's sums (None: it does)."""
    if site.cfg.privacy.dp:
        return REFUSAL_DP
    if not secure:
        counts = np.bincount(site.cohort.table.loc[site.split.train, LABEL].to_numpy(),
                             minlength=n_classes)
        if counts.min() < site.min_cell:
            return (f"its training split has {' / '.join(str(c) for c in counts)} participants "
                    f"per class, fewer than min_cell = {site.min_cell}")
    return None


def logistic_values(site, pre, betas: np.ndarray, weights, secure: bool,
                    kind: str = "binary") -> dict:
    """The site's Newton-round sums (the kind's ``site_sums``; K = len(weights)) plus
    ``clipped``: how many of its feature values were clipped to the fixed-point bound."""
    train, val = site.arrays(pre, "train"), site.arrays(pre, "val")
    x, clipped = clipped_features(train.x)
    x_val, y_val = np.asarray(val.x, dtype=np.float64), val.y
    if not secure and np.bincount(y_val, minlength=len(weights)).min() < site.min_cell:
        x_val, y_val = x_val[:0], y_val[:0]  # too few validation people of a class to say
    values = family.site_sums(kind, x, train.y, x_val, y_val, betas, weights)
    values["clipped"] = np.array([clipped], dtype=np.int64)
    return values


def zero_values(n_candidates: int, n_features: int, kind: str = "binary",
                n_classes: int = 2) -> dict:
    """Zeros of the right shapes: a refusing site's contribution to a secure sum."""
    size = family.n_params(kind, n_features, n_classes)
    return {"n": np.zeros(n_classes, dtype=np.int64), "grad": np.zeros((n_candidates, size)),
            "hess": np.zeros((n_candidates, size * (size + 1) // 2)),
            "objective": np.zeros(n_candidates),
            "val_loss": np.zeros((n_candidates, n_classes)),
            "val_n": np.zeros(n_classes, dtype=np.int64), "clipped": np.zeros(1, dtype=np.int64)}
