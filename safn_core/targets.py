"""What a model predicts: the target, its K classes, their order and the features that define it.

``data.target`` names one of the built-in targets of a PPMI download (or of the synthetic cohort,
read through the same loader):

* ``pd_vs_hc`` (the default): HC = 0, PD = 1, from the enrolment cohort.
* ``hc_prodromal_pd``: HC = 0, prodromal = 1, PD = 2 (ordered: on the way into the disease), from
  the enrolment cohort (``COHORT`` 4 / ``ENROLL_CAT`` PRODROMA is prodromal).
* ``hy_stage``: HC = 0, PD at Hoehn & Yahr 1 = 1, PD at H&Y ≥ 2 = 2 (ordered). Stages 3 and above
  are under 1 % of PPMI's de novo PD, so they join stage 2. H&Y (``NHY``) defines the label and is
  removed from the inputs.

A generic table declares its own target in its mapping (``label.values``: K values, in order when
``label.ordered``); its `Target` is named ``label``. Labels are always the integers 0..K-1 in the
order of ``classes``; with K = 2 everything is the binary model of before (scores are P(class 1)),
with K > 2 scores are the (n, K) class probabilities.

The enrolment category never is a feature (`safn_core.data.ppmi_catalog.FORBIDDEN_FEATURE_PATTERNS`);
`check_inputs` refuses any feature a target is defined by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from safn_core.errors import DataError

BUILT_IN = ("pd_vs_hc", "hc_prodromal_pd", "hy_stage")
"""The targets of a PPMI download (``data.target``)."""


@dataclass(frozen=True)
class Target:
    """A prediction target: K class names (label k = ``classes[k]``), whether they are ordered,
    and the features that define the label (never an input)."""

    name: str
    classes: tuple[str, ...]
    ordered: bool = False
    defined_by: tuple[str, ...] = ()
    description: str = ""
    cohorts: tuple[str, ...] = field(default=())  # PPMI enrolment cohorts the target keeps

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"target {self.name!r} needs at least 2 classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"target {self.name!r}: class names repeat: {self.classes}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "ordered": self.ordered,
                "defined_by": list(self.defined_by)}

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        return cls(str(d["name"]), tuple(map(str, d["classes"])), bool(d.get("ordered", False)),
                   tuple(map(str, d.get("defined_by", ()))))


PD_VS_HC = Target("pd_vs_hc", ("HC", "PD"), ordered=False, cohorts=("HC", "PD"),
                  description="Parkinson's disease vs healthy controls (enrolment cohort)")
HC_PRODROMAL_PD = Target(
    "hc_prodromal_pd", ("HC", "Prodromal", "PD"), ordered=True, cohorts=("HC", "Prodromal", "PD"),
    description="healthy, prodromal (hyposmia or REM sleep behaviour disorder, no motor "
                "diagnosis) or PD (enrolment cohort)")
HY_STAGE = Target(
    "hy_stage", ("HC", "H&Y 1", "H&Y >=2"), ordered=True, defined_by=("NHY",),
    cohorts=("HC", "PD"),
    description="healthy, PD at Hoehn & Yahr stage 1, PD at stage 2 or above (stages 3+ are "
                "under 1 % of de novo PD and join stage 2)")
TARGETS = {t.name: t for t in (PD_VS_HC, HC_PRODROMAL_PD, HY_STAGE)}


def target_for(name: str) -> Target:
    """The built-in target called ``name`` (a `DataError` naming the choices otherwise)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise DataError(f"data.target {name!r} is not a target; choose one of "
                        f"{', '.join(BUILT_IN)}") from None


def hy_class(nhy: float) -> float:
    """The ``hy_stage`` class of a PD participant's H&Y stage: 1 → 1, ≥ 2 → 2; NaN for a
    missing stage or stage 0 (a PD participant not staged is excluded, not guessed)."""
    if math.isnan(nhy) or nhy < 1:
        return float("nan")
    return 1.0 if nhy < 2 else 2.0


def check_inputs(target: Target, features: Iterable[str], where: str = "the inputs") -> None:
    """Refuse a feature that defines ``target``'s label (a `DataError` naming it)."""
    bad = sorted(set(features) & set(target.defined_by))
    if bad:
        raise DataError(f"{where}: feature(s) {', '.join(bad)} define the target "
                        f"{target.name!r} and cannot be inputs (label leakage); remove them")
