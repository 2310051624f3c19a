"""What is harmonised and what is preserved: the `CombatSpec` and the matrices it builds.

A spec names the harmonised features and the covariates whose effect ComBat must keep
(continuous ones as they are, categorical ones one-hot with the first declared level dropped).
The categorical levels are declared up front, not read from the data, so that every site builds
the same design columns in the same order even when a site lacks a level: the sums the sites
send are then added column by column.

Missing values: a covariate value must be present in every row ComBat sees, and a harmonised
feature in every row ComBat is fitted on (`feature_matrix`, ``allow_missing=False``): both
are refused with the site, column and participants named. neuroCombat drops missing values
only in its regression step and lets them turn its variances into NaN afterwards, so there is no
reference behaviour to follow; imputing before harmonising would fit the site effect to imputed
values. When a fitted harmonisation is applied, a missing feature value stays missing (each
value is adjusted on its own), so imputation can follow harmonisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from safn_core.data.cohort import LABEL, SITE
from safn_core.errors import ConfigError, DataError

_SHOWN = 3  # participant ids quoted in a message before "and N more"


def _ids(frame: pd.DataFrame, rows: np.ndarray) -> str:
    """The participant ids of the rows flagged in ``rows``, the first few quoted."""
    ids = [str(i) for i in frame.index[rows]]
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(repr(i) for i in ids[:_SHOWN]) + more


def _plain(value):
    """A numpy scalar as the Python value it holds (so that a message shows ``2.0``)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_level(value) -> bool:
    """A declared level must survive JSON: a string, a boolean, an integer or a finite float."""
    if isinstance(value, (bool, str, int)):
        return True
    return isinstance(value, float) and math.isfinite(value)


@dataclass(frozen=True)
class CombatSpec:
    """The harmonised features and the preserved covariates, identical at every site.

    ``categorical`` maps a column to its declared levels; the first level is the reference (no
    design column), every other level gets an indicator column ``"column=level"``.
    """

    features: tuple[str, ...]
    continuous: tuple[str, ...] = ()
    categorical: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "continuous", tuple(self.continuous))
        object.__setattr__(self, "categorical",
                           {str(c): tuple(levels) for c, levels in self.categorical.items()})
        self._check()

    def _check(self) -> None:
        if not self.features:
            raise ConfigError("harmonisation: no features to harmonise; name at least one")
        for kind, names in (("features", self.features), ("covariates", self.covariates)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"harmonisation {kind}: {dup} named twice; name each once")
        for col in self.covariates:
            if col == LABEL:
                raise ConfigError(
                    f"harmonisation covariates: '{LABEL}' (the diagnosis) cannot be a ComBat "
                    "covariate: applying the harmonisation would then need every participant's "
                    "diagnosis, including the test participants' (the answer the model is "
                    "asked for), and the diagnosis would shape the very features it is "
                    "evaluated on; leave it out (docs/harmonisation.md says what that costs)")
            if col == SITE:
                raise ConfigError(f"harmonisation covariates: '{SITE}' is the batch ComBat "
                                  "removes, not a covariate to preserve; leave it out")
            if col in self.features:
                raise ConfigError(f"harmonisation: '{col}' is both a harmonised feature and a "
                                  "covariate; a covariate is preserved, not harmonised: drop "
                                  "it from one of the two lists")
        for col, levels in self.categorical.items():
            bad = [v for v in levels if not _is_level(v)]
            if bad:
                raise ConfigError(f"harmonisation categorical covariate '{col}': level {bad[0]!r}"
                                  " is not a string, integer, boolean or finite number")
            if len(set(levels)) != len(levels) or len(levels) < 2:
                raise ConfigError(f"harmonisation categorical covariate '{col}': declare at "
                                  f"least two distinct levels (got {list(levels)})")

    @property
    def covariates(self) -> tuple[str, ...]:
        """The covariate columns of the data, continuous first."""
        return self.continuous + tuple(self.categorical)

    @property
    def design_columns(self) -> tuple[str, ...]:
        """The covariate columns of the design, in order: continuous, then one indicator per
        non-reference level of each categorical covariate."""
        return self.continuous + tuple(f"{c}={lv}" for c, levels in self.categorical.items()
                                       for lv in levels[1:])

    def to_dict(self) -> dict:
        return {"features": list(self.features), "continuous": list(self.continuous),
                "categorical": {c: list(v) for c, v in self.categorical.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "CombatSpec":
        try:
            return cls(tuple(d["features"]), tuple(d.get("continuous", ())),
                       {c: tuple(v) for c, v in d.get("categorical", {}).items()})
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"harmonisation spec: malformed ({e!r}); expected the keys "
                            "'features', 'continuous' and 'categorical'") from None


def _columns_present(spec: CombatSpec, frame: pd.DataFrame, site: str) -> None:
    missing = [c for c in (*spec.features, *spec.covariates) if c not in frame.columns]
    if missing:
        raise DataError(f"site {site}: the harmonisation needs the columns {missing}, which "
                        "its data does not have")


def covariate_matrix(spec: CombatSpec, frame: pd.DataFrame, site: str) -> np.ndarray:
    """The participants × design-columns covariate matrix of one site (no intercept, no site
    indicators: those are implicit, see `safn_core.harmonisation.combat`)."""
    _columns_present(spec, frame, site)
    blocks = []
    for col in spec.covariates:
        values = frame[col]
        gone = values.isna().to_numpy()
        if gone.any():
            raise DataError(
                f"site {site}: covariate '{col}' is missing for {int(gone.sum())} participant(s) "
                f"({_ids(frame, gone)}); ComBat needs it in every row: fill it in or leave "
                "these participants out")
        if col in spec.continuous:
            try:
                blocks.append(values.to_numpy(dtype=np.float64)[:, None])
            except (TypeError, ValueError):
                raise DataError(f"site {site}: continuous covariate '{col}' holds values that "
                                "are not numbers; declare it categorical or fix the "
                                "values") from None
            continue
        levels = spec.categorical[col]
        hits = np.column_stack([values.isin([lv]).to_numpy() for lv in levels])
        stray = ~hits.any(axis=1)
        if stray.any():
            first = int(np.flatnonzero(stray)[0])
            raise DataError(
                f"site {site}: categorical covariate '{col}' of participant "
                f"{str(frame.index[first])!r} is {_plain(values.iloc[first])!r}, not one of the "
                f"declared levels {list(levels)} ({int(stray.sum())} such row(s): "
                f"{_ids(frame, stray)}); declare the level or correct the value")
        blocks.append(hits[:, 1:].astype(np.float64))
    n = len(frame)
    return np.hstack(blocks) if blocks else np.zeros((n, 0))


def feature_matrix(spec: CombatSpec, frame: pd.DataFrame, site: str,
                   allow_missing: bool = False) -> np.ndarray:
    """The participants × features matrix (float64). Missing values are refused unless
    ``allow_missing`` (applying a fit: they stay missing)."""
    _columns_present(spec, frame, site)
    try:
        y = frame[list(spec.features)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"site {site}: a harmonised feature holds values that are not "
                        "numbers") from None
    inf = np.isinf(y)
    if inf.any():
        j = int(np.flatnonzero(inf.any(axis=0))[0])
        raise DataError(f"site {site}: feature '{spec.features[j]}' is infinite for "
                        f"participant(s) {_ids(frame, inf[:, j])}; correct the values")
    gone = np.isnan(y)
    if gone.any() and not allow_missing:
        j = int(np.flatnonzero(gone.any(axis=0))[0])
        raise DataError(
            f"site {site}: feature '{spec.features[j]}' is missing for {int(gone[:, j].sum())} "
            f"participant(s) ({_ids(frame, gone[:, j])}); ComBat is fitted on complete rows: "
            "leave these participants out of the fit, or fill the values in at the source")
    return y
