"""The site data contract: is a loaded cohort fit to train on?

Checked before a site trains anything (`safn-check`, `safn-client`): features numeric, values within
plausible ranges, one row per participant, at least ``min_cell`` participants of each of the K
classes, missing rates, modalities entirely absent. With several sites in one cohort (a pooled
download, the synthetic cohort) the class counts per site are reported too, a site below
``min_cell`` in a class as a warning naming site and class. Fatal problems stop the site with a message naming the column
and rows; warnings are reported and training may go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from safn_core.data.cohort import LABEL, SITE, Cohort

HIGH_MISSING = 0.5
"""Missing rate above which a feature is flagged (a warning, not fatal)."""


@dataclass
class Problem:
    severity: str  # "fatal" or "warning"
    message: str
    column: str | None = None
    rows: list[str] = field(default_factory=list)

    def describe(self) -> str:
        rows = ""
        if self.rows:
            shown = ", ".join(self.rows[:8]) + (" …" if len(self.rows) > 8 else "")
            rows = f" (participants {shown})"
        return f"{self.message}{rows}"


@dataclass
class ContractReport:
    source: str
    n_participants: int
    class_counts: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    site_class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # ≥ 2 sites only

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fatal"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.fatal

    def raise_if_failed(self, hint: str = "") -> None:
        """Stop with one line naming the first fatal problem (a `DataError`), if there is one."""
        if self.ok:
            return
        from safn_core.errors import DataError

        raise DataError(f"{self.source}: the data fails the site data contract "
                        f"({len(self.fatal)} fatal problem(s); first: {self.fatal[0].describe()})"
                        + (f"; {hint}" if hint else ""))

    def to_dict(self) -> dict:
        return {
            "source": self.source, "ok": self.ok, "n_participants": self.n_participants,
            "class_counts": self.class_counts,
            **({"site_class_counts": self.site_class_counts} if self.site_class_counts else {}),
            "problems": [{"severity": p.severity, "message": p.message, "column": p.column,
                          "rows": p.rows} for p in self.problems],
        }


def check_cohort(cohort: Cohort, min_cell: int = 5) -> ContractReport:
    """Run every contract check on ``cohort`` and return the findings (raises nothing)."""
    table = cohort.table
    counts = {name: int((table[LABEL] == k).sum()) for k, name in enumerate(cohort.label_names)}
    report = ContractReport(cohort.report.source, len(table), counts)
    add = report.problems.append
    report.site_class_counts = site_class_counts(cohort)

    dup = table.index[table.index.duplicated(keep=False)]
    if len(dup):
        add(Problem("fatal", f"{len(set(dup))} participant id(s) appear more than once; "
                    "keep one baseline row per participant", rows=sorted(map(str, set(dup)))))

    for mod in cohort.modalities:
        block = table[list(mod.features)]
        if block.notna().sum().sum() == 0:
            add(Problem("fatal", f"modality '{mod.name}' is entirely absent: none of its "
                        f"{len(mod.features)} feature(s) has a value (e.g. "
                        f"{', '.join(mod.features[:3])}); provide its table or remove the "
                        "modality from the configuration"))

    for name, n in counts.items():
        if n < min_cell:
            add(Problem("fatal", f"class {name} has {n} participant(s), fewer than min_cell = "
                        f"{min_cell}; a site needs at least min_cell people of each class"))

    for site, per in report.site_class_counts.items():
        small = [f"{name} {n}" for name, n in per.items() if n < min_cell]
        if small:
            add(Problem("warning", f"site {site} has fewer than min_cell = {min_cell} "
                        f"participants of class(es) {', '.join(small)}; in a federation that "
                        "site cannot report statistics of those classes"))

    for col in cohort.features:
        values = table[col]
        if not pd.api.types.is_numeric_dtype(values):
            add(Problem("fatal", f"column '{col}' is not numeric", column=col))
            continue
        finite = values.dropna()
        inf = finite.index[~np.isfinite(finite.to_numpy(dtype=float))]
        if len(inf):
            add(Problem("fatal", f"column '{col}' holds infinite values", column=col,
                        rows=list(map(str, inf))))
        lo_hi = cohort.plausible_ranges.get(col)
        if lo_hi is not None:
            lo, hi = lo_hi
            out = finite[(finite < lo) | (finite > hi)]
            if len(out):
                add(Problem("fatal", f"column '{col}' has {len(out)} value(s) outside the "
                            f"plausible range [{lo:g}, {hi:g}] (e.g. {out.iloc[0]:g}); check "
                            "units and coding", column=col, rows=list(map(str, out.index))))
        rate = float(values.isna().mean()) if len(values) else 1.0
        if rate == 1.0:
            add(Problem("warning", f"column '{col}' is missing for every participant", column=col))
        elif rate > HIGH_MISSING:
            add(Problem("warning", f"column '{col}' is missing for {rate:.0%} of participants",
                        column=col))
        elif len(finite) > 1 and finite.nunique() == 1:
            add(Problem("warning", f"column '{col}' has the same value for everyone", column=col))
    return report


def site_class_counts(cohort: Cohort) -> dict[str, dict[str, int]]:
    """Participants per class at each site (empty for a cohort of one site)."""
    table = cohort.table
    site = table[SITE].astype(str)
    if site.nunique() < 2:
        return {}
    return {str(s): {name: int(((site == s) & (table[LABEL] == k)).sum())
                     for k, name in enumerate(cohort.label_names)}
            for s in sorted(site.unique(), key=lambda v: (len(v), v))}
