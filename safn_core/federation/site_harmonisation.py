"""A site's part of federated ComBat (``harmonisation.method: combat``), on its own data; and
the coordinator's conversions. No Flower here; the maths is `safn_core.harmonisation`.

The fit part of a training site is its training split, complete cases only (participants with
every harmonised feature and covariate observed); a site outside the fit (held-out) estimates its
own location and scale from all its complete cases. Validation and test rows are only ever
harmonised with the estimates from the fit part, so they shape nothing.

Under secure aggregation the sums travel in fixed point (`safn_core.secagg`), one scale per
field: features of very different magnitudes (thickness in mm, volumes in mm³) would lose
precision in one field. So each site divides every harmonised feature and every continuous
covariate by its federation-wide mean absolute value (the statistics round's scales, sent with
the request) before it sums; ComBat is equivariant under such per-column scaling, and the
coordinator turns the fit back into the data's units (`unscale_fit`). Without secure
aggregation the scales are 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from safn_core.config import HarmonisationConfig
from safn_core.data.cohort import Cohort
from safn_core.harmonisation import (CombatFit, CombatMeans, CombatSpec, MeanSums,
                                     ResidualSums, harmonise, site_adjustment, site_mean_sums,
                                     site_residual_sums)
from safn_core.harmonisation.combat import SiteAdjustment
from safn_core.harmonisation.record import complete_cases
from safn_core.secagg import Field, Packing

SUM_BOUND = 1e3
"""A scaled value (the value over its feature's federation-wide mean |value|) is at most this in
magnitude; sums are bounded by it times the largest site, products by its square."""


def scaled(frame: pd.DataFrame, spec: CombatSpec, scales: dict[str, float] | None
           ) -> pd.DataFrame:
    """The features and continuous covariates divided by their scales (None: unchanged)."""
    if not scales:
        return frame
    out = frame.copy()
    for col in (*spec.features, *spec.continuous):
        out[col] = out[col] / float(scales[col])
    return out


def mean_sums(site, spec: CombatSpec, scales: dict[str, float] | None) -> MeanSums:
    """Round 1 of this (training) site, from its training split's complete cases."""
    rows = complete_cases(site.cohort.table.loc[site.split.train], spec)
    return site_mean_sums(spec, scaled(rows, spec, scales), site.name, site.min_cell)


def residual_sums(site, means: CombatMeans, scales: dict[str, float] | None) -> ResidualSums:
    """Round 2 of this site, over the same participants as round 1."""
    rows = complete_cases(site.cohort.table.loc[site.split.train], means.spec)
    return site_residual_sums(means, scaled(rows, means.spec, scales), site.name,
                              site.min_cell)


def fit_from_sites(sites, spec: CombatSpec, scales: dict[str, float] | None = None
                   ) -> CombatFit:
    """The fit the coordinator reaches from these training sites' sums (plain sums: the same
    functions, in one process), e.g. for the simulation's centralised comparators."""
    from safn_core.harmonisation import solve_means, solve_variance

    sites = list(sites)
    means = solve_means(spec, MeanSums.total(mean_sums(s, spec, scales) for s in sites))
    return unscale_fit(solve_variance(means, ResidualSums.total(
        residual_sums(s, means, scales) for s in sites)), scales)


def means_packing(spec: CombatSpec, max_site_examples: int, parties: int) -> Packing:
    p, v = len(spec.design_columns), len(spec.features)
    n = float(max_site_examples)
    return Packing((Field.count("n", (1,)), Field.real("x_sum", (p,), clip=n * SUM_BOUND),
                    Field.real("y_sum", (v,), clip=n * SUM_BOUND),
                    Field.real("xx", (p, p), clip=n * SUM_BOUND ** 2),
                    Field.real("xy", (p, v), clip=n * SUM_BOUND ** 2)), max_parties=parties)


def residuals_packing(spec: CombatSpec, max_site_examples: int, parties: int) -> Packing:
    v = len(spec.features)
    return Packing((Field.count("n", (1,)),
                    Field.real("rss", (v,), clip=float(max_site_examples) * SUM_BOUND ** 2)),
                   max_parties=parties)


def sums_from_decoded(cls, values: dict, spec: CombatSpec):
    """A decoded secure sum as `MeanSums` / `ResidualSums` (counts as floats)."""
    return cls.from_arrays({k: np.asarray(v, dtype=np.float64) for k, v in values.items()},
                           spec)


def unscale_fit(fit: CombatFit, scales: dict[str, float] | None) -> CombatFit:
    """A fit made on scaled data (`scaled`) in the data's own units: α̂ and σ̂ scale with each
    feature, β̂ with the feature over its continuous covariate (categorical indicators are not
    scaled)."""
    if not scales:
        return fit
    spec = fit.spec
    s_y = np.array([float(scales[f]) for f in spec.features])
    s_x = np.array([float(scales[c]) if c in spec.continuous else 1.0
                    for c in spec.design_columns])
    return CombatFit(spec, fit.n, fit.alpha * s_y, fit.beta * s_y[None, :] / s_x[:, None],
                     fit.sigma2 * s_y ** 2)


@dataclass(frozen=True)
class HarmonisedSite:
    """What a site did with the global fit: its adjustment and the rows it estimated it from."""

    adjustment: SiteAdjustment
    cohort: Cohort
    fit_rows: int


def harmonise_site(site, fit: CombatFit, cfg: HarmonisationConfig, held_out: bool
                   ) -> HarmonisedSite:
    """The site's own adjustment (from its training split's complete cases; all its complete
    cases when held out) and its whole cohort harmonised with it (every split; missing values
    stay missing)."""
    table = site.cohort.table
    rows = complete_cases(table if held_out else table.loc[site.split.train], fit.spec)
    adjustment = site_adjustment(fit, rows, site.name, empirical_bayes=cfg.empirical_bayes,
                                 parametric=cfg.parametric, min_cell=site.min_cell)
    harmonised = harmonise(fit, adjustment, table)
    return HarmonisedSite(adjustment, replace(site.cohort, table=harmonised), len(rows))


def training_split_frame(site, spec: CombatSpec) -> pd.DataFrame:
    """A harmonised site's training split as researchers compare it with pooled tools:
    participant id, site, covariates and harmonised features (no label)."""
    from safn_core.data.cohort import ID, SITE

    part = site.cohort.table.loc[site.split.train, [*spec.covariates, *spec.features]]
    part.insert(0, SITE, site.name)
    part.index.name = ID
    return part.reset_index()
