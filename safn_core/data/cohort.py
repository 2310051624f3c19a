"""The loaded cohort: one row per participant, its label, site and modality groups.

Every data source (a PPMI download, a generic table) produces a `Cohort`. Downstream code
(preprocessing, models, federated sites) only ever sees this structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from safn_core.targets import PD_VS_HC, Target

ID = "participant_id"
SITE = "site"
LABEL = "label"


@dataclass(frozen=True)
class Modality:
    """A named group of feature columns; ``side`` is its side of the SAFN cross-attention."""

    name: str
    features: tuple[str, ...]
    side: str = "clinical"  # "imaging" or "clinical"


@dataclass
class LoadReport:
    """What a loader found: participants per cohort, exclusions and why, missingness."""

    source: str
    cohorts: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)  # logical table -> file used
    notes: list[str] = field(default_factory=list)
    missing_rate: dict[str, float] = field(default_factory=dict)
    modality_present: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "cohorts": dict(self.cohorts), "excluded": dict(self.excluded),
            "tables": dict(self.tables), "notes": list(self.notes),
            "missing_rate": {k: round(float(v), 4) for k, v in self.missing_rate.items()},
            "modality_present": dict(self.modality_present),
        }


@dataclass
class Cohort:
    """Participants × features with label and site.

    ``table`` is indexed by participant id (string) and has the columns ``site`` (string, may be
    missing), ``label`` (0..K-1, the classes of ``target``; binary: 1 = positive class, e.g. PD,
    0 = negative, e.g. HC) and every feature of
    every modality, as floats with NaN for missing.
    """

    table: pd.DataFrame
    modalities: tuple[Modality, ...]
    report: LoadReport
    label_names: tuple[str, ...] = ("HC", "PD")  # names of labels 0..K-1 (= target.classes)
    plausible_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    # a categorical column -> its declared categories; its features are the indicators
    # "column=category" (safn_core.data.table_loader)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    target: Target = PD_VS_HC

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    @property
    def features(self) -> list[str]:
        return [f for m in self.modalities for f in m.features]

    @property
    def y(self) -> np.ndarray:
        return self.table[LABEL].to_numpy(dtype=np.int64)

    @property
    def ids(self) -> np.ndarray:
        return self.table.index.to_numpy()

    @property
    def sites(self) -> np.ndarray:
        return self.table[SITE].astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.table)

    def modality_present(self) -> pd.DataFrame:
        """Boolean participants × modalities: does the participant have any value of it."""
        return pd.DataFrame(
            {m.name: self.table[list(m.features)].notna().any(axis=1) for m in self.modalities},
            index=self.table.index,
        )

    def subset(self, index) -> "Cohort":
        """The cohort restricted to the given participant ids (same modalities and report)."""
        return Cohort(self.table.loc[index], self.modalities, self.report, self.label_names,
                      self.plausible_ranges, self.categories, self.target)

    def export(self) -> pd.DataFrame:
        """One row per participant: id, site, label, every feature under its column name."""
        return self.table.reset_index()[[ID, SITE, LABEL] + self.features]


def drop_incomplete(cohort: Cohort) -> Cohort:
    """Keep participants with every modality; count the others in the load report by reason.

    A participant missing several modalities is counted under the first missing one, in model
    order, so that the counts add up to the number excluded.
    """
    present = cohort.modality_present()
    keep = present.all(axis=1)
    for pid in present.index[~keep]:
        first = next(m for m in present.columns if not present.at[pid, m])
        reason = f"missing modality {first}"
        cohort.report.excluded[reason] = cohort.report.excluded.get(reason, 0) + 1
    if not keep.any():
        from safn_core.errors import DataError

        reasons = ", ".join(f"{n} {r}" for r, n in cohort.report.excluded.items())
        raise DataError(f"{cohort.report.source}: no participant has every modality ({reasons}); "
                        "provide the missing data or set data.require_all_modalities=false")
    kept = cohort.subset(present.index[keep])
    kept.report.missing_rate = kept.table[kept.features].isna().mean().to_dict()
    kept.report.modality_present = {m: int(present.loc[keep, m].sum()) for m in present.columns}
    return kept
