"""The site's side of distributed ComBat, the site-local adjustment, and the pooled shortcut.

Per site, on the participants the harmonisation is fitted on (its training split):

1. `site_mean_sums` → `MeanSums` (round 1), summed over sites → `fit.solve_means`;
2. `site_residual_sums` with the coordinator's `CombatMeans` → `ResidualSums` (round 2),
   summed → `fit.solve_variance` → the global `CombatFit`;
3. `site_adjustment`: the site's own γ*, δ* from its own rows and the global fit
   (empirical Bayes or not) → `SiteAdjustment`, kept at the site;
4. `harmonise` applies fit + adjustment to any split of that site, row by row.

A site that was not in the fit (held out, a new hospital) runs only steps 3 and 4 on its own
participants: no labels, nobody refits. `combat_pooled` runs steps 1-3 over a pooled frame split
by its site column, by the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from safn_core.data.cohort import SITE
from safn_core.errors import DataError
from safn_core.harmonisation import bayes
from safn_core.harmonisation.design import CombatSpec, _ids, covariate_matrix, feature_matrix
from safn_core.harmonisation.fit import CombatFit, CombatMeans, solve_means, solve_variance
from safn_core.harmonisation.sums import MeanSums, ResidualSums

METHODS = ("parametric", "non-parametric", "none")
ADJUSTMENT_FORMAT = "safn-combat-site-adjustment"
_FLAT = 1e-10  # within-site SD below this fraction of the feature's scale counts as none


def _fit_part(spec: CombatSpec, frame: pd.DataFrame, site: str,
              min_cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked (X, Y) of the participants a site's estimates are computed from."""
    x, y = covariate_matrix(spec, frame, site), feature_matrix(spec, frame, site)
    need = max(int(min_cell), 2)
    if len(y) < need:
        raise DataError(
            f"site {site}: {len(y)} participant(s) to estimate its scanner effects from, fewer "
            f"than {need} (min_cell = {min_cell}); ComBat's site estimates would describe too "
            "few people and be unstable: pool the site with another of the same scanner and "
            "protocol, or leave it out of harmonisation")
    centred = y - y.mean(axis=0)
    spread = np.sqrt((centred**2).mean(axis=0))
    flat = spread <= _FLAT * np.abs(y.mean(axis=0))
    if flat.any():
        j = int(np.flatnonzero(flat)[0])
        raise DataError(
            f"site {site}: feature '{spec.features[j]}' has the same value for all {len(y)} "
            "participants (no variance within the site), so ComBat cannot estimate the site's "
            "scale for it; check how the site derives it, or leave the feature out of the "
            "harmonised features")
    return x, y


def site_mean_sums(spec: CombatSpec, frame: pd.DataFrame, site: str,
                   min_cell: int = 5) -> MeanSums:
    """Round 1 of a site: count, sums and within-site cross-products of its fit part.

    All of it may go through a secure aggregation (only the total is used); the site's own
    means, which these are centred on, stay at the site.
    """
    x, y = _fit_part(spec, frame, site, min_cell)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    return MeanSums(n=np.array([float(len(y))]), x_sum=x.sum(axis=0), y_sum=y.sum(axis=0),
                    xx=xc.T @ xc, xy=xc.T @ yc)


def site_residual_sums(means: CombatMeans, frame: pd.DataFrame, site: str,
                       min_cell: int = 5) -> ResidualSums:
    """Round 2 of a site: per feature, the sum of squared residuals y − bᵢ − xβ̂ over the same
    participants as round 1, where bᵢ = ȳᵢ − x̄ᵢβ̂ is the site's own coefficient (neuroCombat's
    residual of the full design [site indicators, covariates])."""
    x, y = _fit_part(means.spec, frame, site, min_cell)
    residual = (y - y.mean(axis=0)) - (x - x.mean(axis=0)) @ means.beta
    return ResidualSums(n=np.array([float(len(y))]), rss=(residual**2).sum(axis=0))


@dataclass(frozen=True)
class SiteAdjustment:
    """One site's scanner effects: ``gamma`` (γ*, location) and ``delta2`` (δ*², squared
    scale) per feature, estimated from ``n`` of its participants with the fit ``fit_id``;
    ``method``: "parametric" or "non-parametric" empirical Bayes, or "none" (plain γ̂, δ̂²)."""

    site: str
    features: tuple[str, ...]
    fit_id: str
    n: int
    method: str
    gamma: np.ndarray
    delta2: np.ndarray

    def to_dict(self) -> dict:
        return {"format": ADJUSTMENT_FORMAT, "site": self.site, "features": list(self.features),
                "fit_id": self.fit_id, "n": int(self.n), "method": self.method,
                "gamma": [float(g) for g in self.gamma],
                "delta2": [float(d) for d in self.delta2]}

    @classmethod
    def from_dict(cls, d: dict) -> "SiteAdjustment":
        if not isinstance(d, dict) or d.get("format") != ADJUSTMENT_FORMAT:
            raise DataError(f"site adjustment: not a {ADJUSTMENT_FORMAT} record (its 'format' "
                            "key)")
        missing = [k for k in ("site", "features", "fit_id", "n", "method", "gamma", "delta2")
                   if k not in d]
        if missing:
            raise DataError(f"site adjustment: the keys {missing} are missing")
        if d["method"] not in METHODS:
            raise DataError(f"site adjustment: method {d['method']!r}, expected one of "
                            f"{list(METHODS)}")
        v = len(d["features"])
        gamma, delta2 = (np.asarray(d[k], dtype=np.float64) for k in ("gamma", "delta2"))
        if gamma.shape != (v,) or delta2.shape != (v,):
            raise DataError(f"site adjustment: 'gamma' and 'delta2' need {v} values, one per "
                            "feature")
        if not (np.isfinite(gamma).all() and np.isfinite(delta2).all() and (delta2 > 0).all()):
            raise DataError("site adjustment: 'gamma' must be finite and 'delta2' positive")
        return cls(str(d["site"]), tuple(d["features"]), str(d["fit_id"]), int(d["n"]),
                   d["method"], gamma, delta2)


def site_adjustment(fit: CombatFit, frame: pd.DataFrame, site: str, *,
                    empirical_bayes: bool = True, parametric: bool = True,
                    min_cell: int = 5) -> SiteAdjustment:
    """The site's γ*, δ*² from its own participants (its training split, or all of a site that
    was not in the fit) and the global fit; no labels, nothing leaves the site."""
    x, y = _fit_part(fit.spec, frame, site, min_cell)
    z = fit.standardise(x, y)
    gamma_hat, delta2_hat = bayes.location_scale(z)
    if not empirical_bayes:
        return SiteAdjustment(str(site), fit.features, fit.fit_id, len(y), "none",
                              gamma_hat, delta2_hat)
    if len(fit.features) < 2:
        raise DataError(f"site {site}: empirical Bayes pools the site's estimates across "
                        "features and needs at least two; harmonise more features or turn "
                        "empirical Bayes off")
    if not parametric:
        gamma, delta2 = bayes.nonparametric(z, gamma_hat, delta2_hat)
        return SiteAdjustment(str(site), fit.features, fit.fit_id, len(y), "non-parametric",
                              gamma, delta2)
    if not (np.var(gamma_hat, ddof=1) > 0 and np.var(delta2_hat, ddof=1) > 0):
        raise DataError(f"site {site}: its site effects are identical across features, so the "
                        "parametric priors are undefined; use the non-parametric variant or "
                        "turn empirical Bayes off")
    pr = bayes.priors(gamma_hat, delta2_hat)
    gamma, delta2, iterations = bayes.parametric(z, gamma_hat, delta2_hat, pr)
    if iterations < 0:
        raise DataError(f"site {site}: the parametric empirical-Bayes iteration did not "
                        f"converge in {bayes.MAX_ITER} steps; use the non-parametric variant "
                        "or turn empirical Bayes off")
    return SiteAdjustment(str(site), fit.features, fit.fit_id, len(y), "parametric",
                          gamma, delta2)


def harmonise(fit: CombatFit, adjustment: SiteAdjustment, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (participants of the adjustment's site, any split) with its features
    harmonised: y* = σ̂·(z − γ*)/δ* + α̂ + xβ̂, z = (y − α̂ − xβ̂)/σ̂.

    Every row is adjusted on its own with the fitted estimates, so the result for a participant
    does not depend on which other rows are in ``frame``. A missing feature value stays missing;
    covariates must be present. Other columns are returned unchanged.
    """
    site = adjustment.site
    if adjustment.fit_id != fit.fit_id or tuple(adjustment.features) != fit.features:
        raise DataError(f"site {site}: its adjustment was estimated with another harmonisation "
                        f"fit ({adjustment.fit_id}, this fit is {fit.fit_id}); estimate it again "
                        "with this fit")
    x = covariate_matrix(fit.spec, frame, site)
    y = feature_matrix(fit.spec, frame, site, allow_missing=True)
    mean, sd = fit.mean(x), np.sqrt(fit.sigma2)
    z = (y - mean) / sd
    out = frame.copy()
    out[list(fit.features)] = sd * (z - adjustment.gamma) / np.sqrt(adjustment.delta2) + mean
    return out


def _by_site(frame: pd.DataFrame, site_col: str) -> dict[str, pd.DataFrame]:
    if site_col not in frame.columns:
        raise DataError(f"harmonisation: the data has no site column '{site_col}'")
    gone = frame[site_col].isna().to_numpy()
    if gone.any():
        raise DataError(f"harmonisation: the site is missing for {int(gone.sum())} "
                        f"participant(s) ({_ids(frame, gone)}); ComBat needs every "
                        "participant's site")
    sites = frame[site_col].astype(str)
    return {s: frame[(sites == s).to_numpy()] for s in sorted(sites.unique())}


def combat_pooled(frame: pd.DataFrame, spec: CombatSpec, *, site_col: str = SITE,
                  empirical_bayes: bool = True, parametric: bool = True,
                  min_cell: int = 5) -> tuple[CombatFit, dict[str, SiteAdjustment]]:
    """Distributed ComBat run over one pooled frame (e.g. a training fold) split by its site
    column, through exactly the functions a federation runs: the global fit and every site's
    adjustment. Apply them with `harmonise_sites` (or `harmonise` per site)."""
    parts = _by_site(frame, site_col)
    means = solve_means(spec, MeanSums.total(
        site_mean_sums(spec, part, s, min_cell) for s, part in parts.items()))
    fit = solve_variance(means, ResidualSums.total(
        site_residual_sums(means, part, s, min_cell) for s, part in parts.items()))
    adjustments = {s: site_adjustment(fit, part, s, empirical_bayes=empirical_bayes,
                                      parametric=parametric, min_cell=min_cell)
                   for s, part in parts.items()}
    return fit, adjustments


def harmonise_sites(fit: CombatFit, adjustments: dict[str, SiteAdjustment],
                    frame: pd.DataFrame, *, site_col: str = SITE) -> pd.DataFrame:
    """``frame`` with every site's rows harmonised by that site's adjustment (same row order).
    A site without an adjustment is refused: estimate one with `site_adjustment`."""
    out = []
    for s, part in _by_site(frame, site_col).items():
        if s not in adjustments:
            raise DataError(f"site {s}: no harmonisation adjustment for it (it was not in the "
                            "fit); estimate one from its own participants with "
                            "site_adjustment(fit, ...)")
        out.append(harmonise(fit, adjustments[s], part))
    return pd.concat(out).loc[frame.index] if out else frame.copy()
