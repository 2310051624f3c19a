"""The coordinator's solves: the mean model from round 1's total, the pooled variance from
round 2's total. Each solve receives only the summed arrays (and the public spec).

With D = [site indicators, covariates X] (no intercept, as neuroCombat builds it) the least
squares coefficients are B̂ = (DᵀD)⁻¹DᵀY. Eliminating the site indicators (Frisch-Waugh-Lovell)
gives the same B̂ in two pieces:

- β̂ = (Σᵢ X̃ᵢᵀX̃ᵢ)⁻¹ Σᵢ X̃ᵢᵀỸᵢ, where X̃ᵢ, Ỹᵢ are site i's covariates and features centred on
  site i's own means: pooled within-site cross-products, which add over sites;
- site i's coefficient bᵢ = ȳᵢ − x̄ᵢβ̂, which site i can compute itself once β̂ is known.

The grand mean α̂ = Σᵢ (nᵢ/n)·bᵢ = (Σ y − (Σ x)·β̂)/n needs only federation totals. So β̂ and
α̂ follow from sums alone and no site's own means, counts or coefficients reach the
coordinator; neuroCombat's values are reproduced exactly (tests/test_harmonisation.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from safn_core.errors import DataError
from safn_core.harmonisation.design import CombatSpec
from safn_core.harmonisation.sums import MeanSums, ResidualSums

FORMAT = "safn-combat-fit"
VERSION = 1
_COLLINEAR = 1e-10  # smallest eigenvalue of the scaled within-site covariate cross-products
_NO_SPREAD = 1e-10  # residual SD below this fraction of the feature's scale counts as none


@dataclass(frozen=True)
class CombatMeans:
    """The mean model after round 1, sent back to the sites for round 2.

    ``alpha`` (v,): grand mean α̂; ``beta`` (p, v): covariate coefficients β̂; ``y_mean`` (v,):
    the federation-wide feature means (to tell a constant feature from a small one); ``n``:
    participants in the fit.
    """

    spec: CombatSpec
    n: int
    alpha: np.ndarray
    beta: np.ndarray
    y_mean: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"n": np.array([float(self.n)]), "alpha": self.alpha, "beta": self.beta,
                "y_mean": self.y_mean}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], spec: CombatSpec) -> "CombatMeans":
        p, v = len(spec.design_columns), len(spec.features)
        a = _checked(arrays, {"n": (1,), "alpha": (v,), "beta": (p, v), "y_mean": (v,)},
                     "harmonisation mean model")
        return cls(spec, int(round(a["n"][0])), a["alpha"], a["beta"], a["y_mean"])


@dataclass(frozen=True)
class CombatFit:
    """A fitted global harmonisation: what every site applies, the same for all of them.

    ``alpha`` (v,), ``beta`` (p, v) and ``sigma2`` (v,) are α̂, β̂ and σ̂² of the ComBat model
    ``y = α + xβ + γᵢ + δᵢε``, ε ~ N(0, σ²); ``n`` is the number of participants fitted on.
    Site effects are not part of it: each site estimates its own (`SiteAdjustment`).
    """

    spec: CombatSpec
    n: int
    alpha: np.ndarray
    beta: np.ndarray
    sigma2: np.ndarray

    @property
    def features(self) -> tuple[str, ...]:
        return self.spec.features

    def mean(self, x: np.ndarray) -> np.ndarray:
        """α̂ + xβ̂ for the participants × design-columns matrix ``x``."""
        return self.alpha + x @ self.beta

    def standardise(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """z = (y − α̂ − xβ̂)/σ̂."""
        return (y - self.mean(x)) / np.sqrt(self.sigma2)

    @property
    def fit_id(self) -> str:
        """A short digest of the fit: an adjustment records the fit it was estimated with."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """JSON-safe state (floats written with full precision)."""
        return {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(),
                "n": int(self.n), "alpha": [float(a) for a in self.alpha],
                "beta": [[float(b) for b in row] for row in self.beta],
                "sigma2": [float(s) for s in self.sigma2]}

    @classmethod
    def from_dict(cls, d: dict) -> "CombatFit":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"harmonisation fit: not a {FORMAT} record (its 'format' key)")
        if d.get("version") != VERSION:
            raise DataError(f"harmonisation fit: version {d.get('version')!r}, this safn reads "
                            f"version {VERSION}")
        if "spec" not in d or "n" not in d:
            raise DataError("harmonisation fit: the keys 'spec' and 'n' are required")
        spec = CombatSpec.from_dict(d["spec"])
        p, v = len(spec.design_columns), len(spec.features)
        a = _checked({k: d.get(k) for k in ("alpha", "beta", "sigma2")},
                     {"alpha": (v,), "beta": (p, v), "sigma2": (v,)}, "harmonisation fit")
        if (a["sigma2"] <= 0).any():
            raise DataError("harmonisation fit: 'sigma2' must be positive")
        return cls(spec, int(d["n"]), a["alpha"], a["beta"], a["sigma2"])


def _checked(arrays: dict, shapes: dict[str, tuple[int, ...]], what: str) -> dict:
    out = {}
    for name, shape in shapes.items():
        if arrays.get(name) is None:
            raise DataError(f"{what}: '{name}' is missing")
        try:
            a = np.asarray(arrays[name], dtype=np.float64).reshape(shape)
        except (TypeError, ValueError):
            raise DataError(f"{what}: '{name}' is not {shape} numbers") from None
        if not np.isfinite(a).all():
            raise DataError(f"{what}: '{name}' holds non-finite values")
        out[name] = a
    return out


def _singular(spec: CombatSpec, total: MeanSums, d: np.ndarray, n: int) -> str | None:
    """Why the within-site covariate cross-products cannot be inverted, or None."""
    cols = spec.design_columns
    xbar = total.x_sum / n
    flat = (d == 0) | (d <= 1e-20 * n * xbar**2)
    if flat.any():
        j = int(np.flatnonzero(flat)[0])
        name = cols[j]
        if j >= len(spec.continuous) and total.x_sum[j] == 0:
            col, level = name.split("=", 1)
            return (f"categorical covariate '{col}': no participant in the fit has the level "
                    f"{level}, so its design column is empty; remove the level from the "
                    "declaration")
        return (f"covariate column '{name}' does not vary within any site (each site's "
                "participants share one value), so it cannot be told apart from the site "
                "effects; drop the covariate or its level")
    scaled = total.xx / np.sqrt(np.outer(d, d))
    values, vectors = np.linalg.eigh(scaled)
    if values[0] < _COLLINEAR:
        v = np.abs(vectors[:, 0])
        involved = [cols[j] for j in np.flatnonzero(v > 0.1 * v.max())]
        return (f"covariate columns {involved} are collinear within sites (one is a "
                "combination of the others and the site indicators); drop one of them")
    return None


def solve_means(spec: CombatSpec, total: MeanSums) -> CombatMeans:
    """α̂ and β̂ from the federation-wide round-1 sums (the coordinator's first solve)."""
    n = total.count
    if n <= 0:
        raise DataError("harmonisation: the fit has no participants")
    p, v = len(spec.design_columns), len(spec.features)
    if p == 0:
        beta = np.zeros((0, v))
    else:
        d = np.diag(total.xx).copy()
        why = _singular(spec, total, d, n)
        if why:
            raise DataError(f"harmonisation: the design is singular: {why}")
        s = np.sqrt(d)
        beta = np.linalg.solve(total.xx / np.outer(s, s), total.xy / s[:, None]) / s[:, None]
    alpha = (total.y_sum - total.x_sum @ beta) / n
    return CombatMeans(spec, n, alpha, beta, total.y_sum / n)


def solve_variance(means: CombatMeans, total: ResidualSums) -> CombatFit:
    """σ̂² = (pooled sum of squared residuals)/n, as neuroCombat (the coordinator's second
    solve); refuses a feature with no residual variance."""
    if total.count != means.n:
        raise DataError(f"harmonisation: round 2 counted {total.count} participants, round 1 "
                        f"{means.n}; every site must use the same participants in both rounds")
    sigma2 = total.rss / means.n
    scale = np.maximum(np.abs(means.y_mean), np.abs(means.alpha))
    flat = (sigma2 <= 0) | (np.sqrt(np.maximum(sigma2, 0)) <= _NO_SPREAD * scale)
    if flat.any():
        name = means.spec.features[int(np.flatnonzero(flat)[0])]
        raise DataError(f"harmonisation: feature '{name}' has no residual variance across the "
                        "fit (it is constant, or exactly determined by site and covariates): "
                        "ComBat cannot standardise it; leave it out of the harmonised features")
    return CombatFit(means.spec, means.n, means.alpha, means.beta, sigma2)
