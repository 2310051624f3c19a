"""A fitted harmonisation as a model carries it: the global `CombatFit` and how sites adjust.

A `HarmonisationRecord` is what every producer of a model bundle hands to
`safn_core.bundle.save_bundle` (``harmonisation=``): ``safn-train`` (fitted on its final fit's
training part) and the coordinator (fitted from the training sites' sums). It holds no site's
adjustment: whoever applies the model, a training site, a held-out site or a new hospital,
estimates its own γ*, δ* from its own participants with the record's fit and settings
(`adjust_sites`), without labels, and then harmonises (`harmonise`). The bundle stores it as
``harmonisation.json`` (`to_dict` / `from_dict`).

Only complete cases (every harmonised feature and covariate observed) estimate a site's
adjustment, as in the fit; every row is then harmonised on its own, a missing feature value
staying missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from safn_core.config import HarmonisationConfig
from safn_core.data.cohort import SITE
from safn_core.errors import DataError
from safn_core.harmonisation.combat import SiteAdjustment, harmonise_sites, site_adjustment
from safn_core.harmonisation.design import CombatSpec
from safn_core.harmonisation.fit import CombatFit

FORMAT = "safn-harmonisation"
VERSION = 1
ONE_SITE = "all"
"""The site name a table without site information is harmonised under (one site)."""

# site values that name no site (as `safn_core.validation_scope.NO_SITE`): a table loaded
# without a site column ("all"), a participant whose site is unknown
_NO_SITE = {"all", "nan", "none", ""}


def no_site(value) -> bool:
    """A site value that names no site (no site column, an unknown site)."""
    return value is None or (isinstance(value, float) and value != value) \
        or str(value).strip().lower() in _NO_SITE


def complete_cases(frame: pd.DataFrame, spec: CombatSpec) -> pd.DataFrame:
    """The rows of ``frame`` with every harmonised feature and covariate observed: the rows a
    fit or a site's adjustment is estimated from (the federation's fit part, too)."""
    cols = [c for c in (*spec.features, *spec.covariates) if c in frame.columns]
    return frame[frame[cols].notna().all(axis=1)] if cols else frame


def with_site_column(table: pd.DataFrame, site_col: str = SITE) -> tuple[pd.DataFrame, bool]:
    """``table`` with a usable site column, and whether one was added: a table without site
    information (no column, or only values that name no site) is one site, `ONE_SITE`."""
    if site_col in table.columns and not table[site_col].map(no_site).all():
        return table, False
    out = table.copy()
    out[site_col] = ONE_SITE
    return out, site_col not in table.columns


@dataclass(frozen=True)
class HarmonisationRecord:
    """A fitted ComBat harmonisation with the settings its sites adjust by.

    ``fit``: the global α̂, β̂, σ̂² (the same for every site); ``empirical_bayes`` and
    ``parametric``: how a site estimates its own γ*, δ* (``harmonisation.empirical_bayes`` and
    ``harmonisation.parametric`` of the run that fitted it); ``fitted_on``: in words, which
    participants the fit was estimated from (e.g. "the training sites' training splits"), for
    the model card.
    """

    fit: CombatFit
    empirical_bayes: bool = True
    parametric: bool = True
    fitted_on: str = ""

    method = "combat"

    @classmethod
    def from_config(cls, fit: CombatFit, cfg: HarmonisationConfig,
                    fitted_on: str) -> "HarmonisationRecord":
        return cls(fit, bool(cfg.empirical_bayes), bool(cfg.parametric), str(fitted_on))

    @property
    def spec(self) -> CombatSpec:
        return self.fit.spec

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column harmonising a table needs: the harmonised features and covariates."""
        return (*self.spec.features, *self.spec.covariates)

    @property
    def adjustment_method(self) -> str:
        """How a site's γ*, δ* are estimated: "parametric" or "non-parametric" empirical Bayes,
        or "none" (the site's plain location and scale)."""
        if not self.empirical_bayes:
            return "none"
        return "parametric" if self.parametric else "non-parametric"

    # -- applying ----------------------------------------------------------------------------

    def adjust(self, frame: pd.DataFrame, site: str, min_cell: int = 5) -> SiteAdjustment:
        """One site's adjustment from its own participants in ``frame`` (complete cases), with
        this record's fit and settings; no labels."""
        return site_adjustment(self.fit, complete_cases(frame, self.spec), str(site),
                               empirical_bayes=self.empirical_bayes, parametric=self.parametric,
                               min_cell=min_cell)

    def adjust_sites(self, table: pd.DataFrame, *, site_col: str = SITE,
                     min_cell: int = 5) -> dict[str, SiteAdjustment]:
        """Every site of ``table`` adjusted from its own participants (a table without site
        information is one site); a site with fewer than ``min_cell`` complete participants is
        refused, named, with what to do."""
        table, _ = with_site_column(table, site_col)
        _known_sites(table, site_col)
        out = {}
        for site, part in table.groupby(table[site_col].astype(str), sort=True):
            n = len(complete_cases(part, self.spec))
            need = max(int(min_cell), 2)
            if n < need:
                raise DataError(
                    f"site {site}: {n} participant(s) with every harmonised feature and "
                    f"covariate, fewer than {need} (min_cell = {min_cell}); the model harmonises "
                    f"its {len(self.spec.features)} MRI features and each site adjusts itself "
                    "from its own participants: use at least that many of the site's "
                    "participants, or pool the site with one of the same scanner and protocol")
            out[str(site)] = self.adjust(part, str(site), min_cell)
        return out

    def harmonise(self, table: pd.DataFrame, adjustments: dict[str, SiteAdjustment] | None
                  = None, *, site_col: str = SITE, min_cell: int = 5) -> pd.DataFrame:
        """``table`` (same rows, same order, same columns) with its harmonised features
        adjusted per site: by ``adjustments``, or (None) each site's own from its rows."""
        work, added = with_site_column(table, site_col)
        _known_sites(work, site_col)
        if adjustments is None:
            adjustments = self.adjust_sites(work, site_col=site_col, min_cell=min_cell)
        out = harmonise_sites(self.fit, adjustments, work, site_col=site_col)
        if added:
            out = out.drop(columns=[site_col])
        elif site_col in table.columns:
            out[site_col] = table[site_col]
        return out

    # -- state -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe: the fit's own record plus the settings (``harmonisation.json``)."""
        return {"format": FORMAT, "version": VERSION, "method": self.method,
                "empirical_bayes": self.empirical_bayes, "parametric": self.parametric,
                "adjustment": self.adjustment_method, "fitted_on": self.fitted_on,
                "fit_id": self.fit.fit_id, "fit": self.fit.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, what: str = "harmonisation record") -> "HarmonisationRecord":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"{what}: not a {FORMAT} record (its 'format' key)")
        if d.get("version") != VERSION:
            raise DataError(f"{what}: version {d.get('version')!r}, this safn reads version "
                            f"{VERSION}")
        if d.get("method") != cls.method:
            raise DataError(f"{what}: method {d.get('method')!r}, this safn applies "
                            f"'{cls.method}'")
        flags = {k: d.get(k) for k in ("empirical_bayes", "parametric")}
        bad = [k for k, v in flags.items() if not isinstance(v, bool)]
        if bad:
            raise DataError(f"{what}: {bad} must be true or false")
        fit = CombatFit.from_dict(d.get("fit"))
        if d.get("fit_id") is not None and d["fit_id"] != fit.fit_id:
            raise DataError(f"{what}: its fit does not match the fit_id it records "
                            f"({d['fit_id']}, the fit is {fit.fit_id}): the file was altered")
        return cls(fit, flags["empirical_bayes"], flags["parametric"],
                   str(d.get("fitted_on") or ""))


def _known_sites(table: pd.DataFrame, site_col: str) -> None:
    """Refuse a table where some participants' site is unknown and others' is known."""
    unknown = table[site_col].map(no_site).to_numpy()
    if unknown.any() and not unknown.all():  # all: a table without sites, one site
        ids = ", ".join(repr(str(i)) for i in table.index[unknown][:3])
        raise DataError(
            f"harmonisation: the site is unknown for {int(unknown.sum())} participant(s) "
            f"({ids}{' …' if unknown.sum() > 3 else ''}) while others have one; each site "
            "adjusts itself from its own participants, so every participant needs its site: "
            "fill it in, or leave these participants out")
