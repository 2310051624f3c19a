"""ComBat in a pooled training (``safn-train``): fitted on a training part, applied to the rest.

Inside each cross-validation fold, and for the final model, ComBat is fitted on the training
participants only, with the site column as the batch (`combat_pooled`: the same per-site steps
a federation runs). The fold's validation and test participants are then harmonised without
touching the fit:

- a site with training participants uses the adjustment estimated from those;
- a site absent from the training part adjusts itself with the fold's global fit from its own
  participants in that part (the validation part from its validation rows, the test part from
  its test rows), without labels, as a new hospital would (`HarmonisationRecord.adjust`).

So no validation or test value shapes the fit or any training site's adjustment, and no test
value shapes a validation value. Preprocessing is fitted afterwards on the harmonised training
part. Sizes are checked first (`check_split`): every error names the fold and the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from safn_core.config import HarmonisationConfig
from safn_core.data.cohort import SITE
from safn_core.errors import DataError, SafnError
from safn_core.harmonisation.combat import SiteAdjustment, combat_pooled, harmonise_sites
from safn_core.harmonisation.design import CombatSpec
from safn_core.harmonisation.record import HarmonisationRecord, complete_cases, no_site

FOLD_HINT = ("use fewer folds (train.folds) or a smaller train.val_fraction, pool the site with "
             "another of the same scanner and protocol, or set harmonisation.method: none")


def require_sites(table: pd.DataFrame, source: str) -> None:
    """ComBat's batch is the site: refuse a cohort without site information, or with some
    participants' site unknown, in one line saying what to do."""
    if SITE not in table.columns or table[SITE].map(no_site).all():
        raise DataError(
            f"harmonisation.method: combat removes site (scanner) effects and needs every "
            f"participant's site, but {source} has no site column (no participant has a "
            "site); map the site column (the mapping's 'site:' key) or set "
            "harmonisation.method: none")
    unknown = table[SITE].map(no_site).to_numpy()
    if unknown.any():
        ids = ", ".join(repr(str(i)) for i in table.index[unknown][:3])
        raise DataError(
            f"harmonisation.method: combat needs every participant's site, but {source} has "
            f"no site for {int(unknown.sum())} participant(s) ({ids}"
            f"{' …' if unknown.sum() > 3 else ''}); fill the sites in, leave these "
            "participants out, or set harmonisation.method: none")


def _site_counts(frame: pd.DataFrame, spec: CombatSpec) -> dict[str, int]:
    rows = complete_cases(frame, spec)
    return {str(s): int(n) for s, n in rows[SITE].astype(str).value_counts().sort_index().items()}


def check_split(table: pd.DataFrame, spec: CombatSpec, train_ids, parts: dict[str, np.ndarray],
                *, min_cell: int, where: str, hint: str = FOLD_HINT) -> None:
    """Every site of the training part has at least ``min_cell`` (and two) complete training
    participants, and every site of another part that is absent from the training part has as
    many of its own in that part; otherwise one line naming ``where``, the site and the count."""
    need = max(int(min_cell), 2)
    trained = _site_counts(table.loc[train_ids], spec)
    for site, n in trained.items():
        if n < need:
            raise DataError(
                f"harmonisation in {where}: site {site} has {n} training participant(s) with "
                f"every harmonised feature and covariate, fewer than {need} (data.min_cell = "
                f"{min_cell}), too few to estimate its scanner effects from; {hint}")
    for part, ids in parts.items():
        for site, n in _site_counts(table.loc[ids], spec).items():
            if site not in trained and n < need:
                raise DataError(
                    f"harmonisation in {where}: site {site} has no training participant and "
                    f"{n} in the {part} part, fewer than {need} (data.min_cell = {min_cell}) "
                    f"to adjust itself from; {hint}")


@dataclass
class FittedSplit:
    """A harmonisation fitted on one training part and applied to it and the other parts.

    ``table``: the training and other parts' rows, harmonised; ``record``: the fit and its
    settings (what a bundle carries); ``adjustments``: the training sites' own;
    ``self_adjusted``: per other part, the adjustments of its sites absent from training.
    """

    table: pd.DataFrame
    record: HarmonisationRecord
    adjustments: dict[str, SiteAdjustment]
    self_adjusted: dict[str, dict[str, SiteAdjustment]] = field(default_factory=dict)


def fit_split(table: pd.DataFrame, spec: CombatSpec, cfg: HarmonisationConfig, train_ids,
              parts: dict[str, np.ndarray], *, min_cell: int, where: str, fitted_on: str,
              hint: str = FOLD_HINT) -> FittedSplit:
    """Fit ComBat on ``table``'s ``train_ids`` rows (complete cases, the site column as the
    batch) and harmonise those rows and every part of ``parts`` (name → participant ids) with
    it. Errors name ``where`` (e.g. "repeat 1, fold 2")."""
    check_split(table, spec, train_ids, parts, min_cell=min_cell, where=where, hint=hint)
    try:
        train = table.loc[train_ids]
        fit, adjustments = combat_pooled(
            complete_cases(train, spec), spec, site_col=SITE,
            empirical_bayes=cfg.empirical_bayes, parametric=cfg.parametric, min_cell=min_cell)
        record = HarmonisationRecord.from_config(fit, cfg, fitted_on)
        out = [harmonise_sites(fit, adjustments, train)]
        self_adjusted = {}
        for part, ids in parts.items():
            rows = table.loc[ids]
            own = {}
            for site, site_rows in rows.groupby(rows[SITE].astype(str), sort=True):
                if site not in adjustments:
                    own[site] = record.adjust(site_rows, site, min_cell)
            self_adjusted[part] = own
            out.append(harmonise_sites(fit, {**adjustments, **own}, rows))
    except SafnError as exc:
        raise type(exc)(f"harmonisation in {where}: {exc}") from None
    return FittedSplit(pd.concat(out), record, adjustments, self_adjusted)
