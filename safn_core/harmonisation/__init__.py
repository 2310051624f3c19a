"""Distributed ComBat: harmonising MRI features across scanners from per-site sums.

The math only (no Flower): `combat` (the site's steps, the site-local adjustment, the pooled
shortcut), `fit` (the coordinator's solves), `sums` (the arrays that travel), `design` (the
spec and the matrices it builds), `bayes` (the site's empirical Bayes). Around it: `setup`
(the spec from the configuration), `record` (`HarmonisationRecord`: the fit as a model bundle
carries it, and how a site applies it), `pooled` (safn-train: fitted inside a training fold).
The estimates equal neuroCombat's on the same participants and covariates
(``tests/test_harmonisation.py``); the model, protocol and its limits are in
``docs/harmonisation.md``.

What crosses the network, per site (its fit part: the training split):

- Round 1, `MeanSums`: the participant count nᵢ, the sums of the covariate columns and of the
  features, and the covariate × covariate and covariate × feature cross-products centred on the
  site's own means. All of it is additive and may go through secure aggregation; the
  coordinator needs only the totals (`fit.solve_means`).
- The coordinator sends back `CombatMeans`: α̂, β̂ and the federation-wide feature means.
- Round 2, `ResidualSums`: nᵢ and, per feature, the sum of squared residuals; additive, may go
  through secure aggregation; the coordinator pools σ̂² = Σ/n (`fit.solve_variance`) and sends
  the `CombatFit` (α̂, β̂, σ̂²) to every site.
- Nothing else: γ*, δ* (`SiteAdjustment`) and the harmonised values are computed and kept at the
  site.

With secure aggregation the coordinator learns n, the federation-wide means of the covariates
and features, the pooled within-site cross-products and the pooled residual variance; nothing
about one site. Without it, it sees each site's parts: that site's nᵢ, covariate means (for a
categorical level: how many of the site's participants have it), feature means, within-site
cross-products and, per feature, its residual sum of squares.
"""

from safn_core.harmonisation.combat import (
    SiteAdjustment,
    combat_pooled,
    harmonise,
    harmonise_sites,
    site_adjustment,
    site_mean_sums,
    site_residual_sums,
)
from safn_core.harmonisation.design import CombatSpec
from safn_core.harmonisation.fit import CombatFit, CombatMeans, solve_means, solve_variance
from safn_core.harmonisation.record import HarmonisationRecord
from safn_core.harmonisation.sums import MeanSums, ResidualSums

__all__ = ["CombatFit", "CombatMeans", "CombatSpec", "HarmonisationRecord", "MeanSums",
           "ResidualSums", "SiteAdjustment", "combat_pooled", "harmonise", "harmonise_sites",
           "site_adjustment", "site_mean_sums", "site_residual_sums", "solve_means",
           "solve_variance"]
