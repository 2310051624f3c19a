"""The clinical instruments as a table: one `Instrument` spec per scale.

A spec says how the instrument's baseline total depends on latent severity (per-cohort target
`Marginal` and loadings on the latent factors of `safn_core.synth.severity`), which visit rows it
has (`VisitPlan`), how the total moves at a retest and at V04, and how a row's total is split into
items: every item offers ``caps`` score units, unit ``j`` of an item has weight
``weight * decay**j`` (higher levels less likely), optionally jittered per row; the units are drawn
without replacement (`safn_core.synth.allocation.allocate`), so totals are exact sums of items.
`safn_core.synth.scales` draws an instrument from its spec. Targets: ``docs/ppmi-data.md`` §3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from safn_core.data import ppmi_catalog as cat
from safn_core.synth.fixed_constants import BENTON_WEIGHTS, STAI_WEIGHTS
from safn_core.synth.marginals import Marginal, deficit, symptom_count


@dataclass(frozen=True)
class VisitPlan:
    """Which visit rows an instrument has: missing BL row, BL moved to SC, SC retest, V04."""

    p_missing: float
    p_item_blank: float
    p_moved: float = 0.02
    p_sc_repeat: float = 0.03
    p_fu: float = 0.85
    sc_only: bool = False  # MoCA: collected at SC, not BL


@dataclass(frozen=True)
class Instrument:
    """One clinical instrument (``key``: its table in `ppmi_catalog.TABLES`)."""

    key: str
    page: str  # PAG_NAME of its rows
    marginals: Mapping[str, Marginal] | None  # baseline total per cohort (None: no total)
    loadings: Mapping[str, float]  # latent z on the factors (age, edu, M, N, C, O, A, S)
    plan: VisitPlan
    sd: float  # spread of the total: retest noise 0.3 sd, V04 noise 0.5 sd
    progression: float  # PD's mean change of the total at V04
    score_range: tuple[int, int]
    items: tuple[str, ...] = ()  # what the total is split into (empty: the total only)
    caps: int | tuple[int, ...] = 1  # most score units an item takes
    weights: Sequence[float] = ()  # how readily an item takes a unit
    jitter: float = 0.0  # SD of a per-row lognormal factor on the weights (0: none)
    decay: float = 1.0  # relative weight of each further level of an item
    top: int | None = None  # deficit scales (MoCA): the units are the points lost from ``top``
    floor: int = 0  # lowest total (STAI: 40 items scored 1-4): units = total - floor
    answer: Callable[[str, np.ndarray, int], np.ndarray] | None = None  # item code from its units
    source: Callable[[int, np.random.Generator], dict] | None = None  # columns before the items
    blanks: bool = True  # a row flagged blank loses one of its items
    total: str | None = None  # the shipped total column


def _points_kept(item: str, lost: np.ndarray, cap: int) -> np.ndarray:
    return cap - lost


def _gds_answer(item: str, depressive: np.ndarray, cap: int) -> np.ndarray:
    """The five positive items are answered "no" (0) when depressive."""
    return 1 - depressive if item in cat.GDS_POSITIVE else depressive


def _stai_answer(item: str, anxiety: np.ndarray, cap: int) -> np.ndarray:
    """Items 1-4; anxiety-absent items are reversed (5 - x)."""
    return 4 - anxiety if item in cat.STAI_REVERSED else anxiety + 1


def _updrs2_source(n: int, rng: np.random.Generator) -> dict:
    return {"NUPSOURC": np.where(rng.random(n) < 0.9, 1.0, 3.0)}


NP1_WEIGHTS = {"NP1COG": 0.8, "NP1HALL": 0.15, "NP1DPRS": 0.6, "NP1ANXS": 0.7, "NP1APAT": 0.4,
               "NP1DDS": 0.05, "NP1SLPN": 1.3, "NP1SLPD": 1.3, "NP1PAIN": 1.0, "NP1URIN": 1.2,
               "NP1CNST": 0.9, "NP1LTHD": 0.7, "NP1FATG": 1.0}
NP3_WEIGHTS = {
    "NP3SPCH": 0.5, "NP3FACXP": 1.0, "NP3RIGN": 0.6, "NP3RIGRU": 1.0, "NP3RIGLU": 1.0,
    "NP3RIGRL": 0.7, "NP3RIGLL": 0.7, "NP3FTAPR": 1.2, "NP3FTAPL": 1.2, "NP3HMOVR": 1.0,
    "NP3HMOVL": 1.0, "NP3PRSPR": 1.0, "NP3PRSPL": 1.0, "NP3TTAPR": 0.9, "NP3TTAPL": 0.9,
    "NP3LGAGR": 0.7, "NP3LGAGL": 0.7, "NP3RISNG": 0.2, "NP3GAIT": 0.6, "NP3FRZGT": 0.04,
    "NP3PSTBL": 0.15, "NP3POSTR": 0.5, "NP3BRADY": 0.9, "NP3PTRMR": 0.5, "NP3PTRML": 0.5,
    "NP3KTRMR": 0.45, "NP3KTRML": 0.45, "NP3RTARU": 0.8, "NP3RTALU": 0.8, "NP3RTARL": 0.3,
    "NP3RTALL": 0.3, "NP3RTALJ": 0.15, "NP3RTCON": 0.8,
}
MOCA_ITEMS = {  # item: (max, weight of losing its points)
    "MCAALTTM": (1, 0.6), "MCACUBE": (1, 0.8), "MCACLCKC": (1, 0.3), "MCACLCKN": (1, 0.35),
    "MCACLCKH": (1, 0.6), "MCALION": (1, 0.03), "MCARHINO": (1, 0.2), "MCACAMEL": (1, 0.12),
    "MCAFDS": (1, 0.1), "MCABDS": (1, 0.4), "MCAVIGIL": (1, 0.15), "MCASER7": (3, 0.45),
    "MCASNTNC": (2, 0.6), "MCAVF": (1, 0.7), "MCAABSTR": (2, 0.5), "MCAREC1": (1, 0.9),
    "MCAREC2": (1, 0.9), "MCAREC3": (1, 0.9), "MCAREC4": (1, 0.9), "MCAREC5": (1, 0.9),
    "MCADATE": (1, 0.25), "MCAMONTH": (1, 0.04), "MCAYR": (1, 0.04), "MCADAY": (1, 0.05),
    "MCAPLACE": (1, 0.02), "MCACITY": (1, 0.02),
}
LNS_ITEMS = tuple(f"LNS{lvl}{t}" for lvl in range(1, 8) for t in "ABC")
HVLT_WORD_WEIGHTS = (np.array([0.7] * 12 + [1.0] * 12 + [1.3] * 12)
                     * np.tile(0.93 ** np.arange(12), 3))
"""The 12 words of each of the three learning trials (later trials and earlier words easier)."""


def _per_cohort(pd_, hc, swedd, prodromal) -> dict[str, Marginal]:
    return {"PD": pd_, "HC": hc, "SWEDD": swedd, "Prodromal": prodromal}


def _counts(hi, *mean_sd) -> dict[str, Marginal]:
    return _per_cohort(*(symptom_count(m, s, hi) for m, s in mean_sd))


def _deficits(top, *mean_sd) -> dict[str, Marginal]:
    return _per_cohort(*(deficit(top, m, s) for m, s in mean_sd))


def _normals(lo, hi, *mean_sd) -> dict[str, Marginal]:
    return _per_cohort(*(Marginal("norm", (m, s), lo=lo, hi=hi) for m, s in mean_sd))


HOEHN_YAHR = _per_cohort(Marginal("cat", ((1, 2, 3), (0.44, 0.553, 0.007))),
                         Marginal("cat", ((0, 1), (0.99, 0.01))),
                         Marginal("cat", ((0, 1, 2), (0.10, 0.55, 0.35))),
                         Marginal("cat", ((0, 1), (0.92, 0.08))))
"""H&Y stage per cohort (written with MDS-UPDRS III); its latent follows the Part III latent."""

FLUENCY_MEANS = {"PD": (20.5, 13.3, 15.2), "HC": (21.6, 14.2, 16.0), "SWEDD": (19.8, 13.0, 14.8),
                 "Prodromal": (20.8, 13.6, 15.4)}
FLUENCY_SDS = (5.4, 4.0, 3.9)
RBDSQ_EXTRA_NEURO = {"PD": ("PARKISM", 0.35), "SWEDD": ("PARKISM", 0.25), "HC": ("DEPRS", 0.05),
                     "Prodromal": ("DEPRS", 0.10)}
"""Item 6.2 (a neurological disease) per cohort: which flag, and how often it is set."""
SCOPA_URINARY = tuple(f"SCAU{i}" for i in range(8, 14))

_SPECS = (
    # MDS-UPDRS I, rater + patient questionnaire (13 items, 0-52), two tables
    Instrument("updrs1", "NUPDRS1", _counts(52, (5.6, 4.1), (2.9, 3.0), (7.0, 4.8), (5.5, 4.2)),
               {"N": 0.65, "A": 0.25, "S": 0.15},
               VisitPlan(0.005, 0.006, p_moved=0.0, p_sc_repeat=0.5), 4.0, 1.0, (0, 52),
               items=cat.NP1_ITEMS + cat.NP1P_ITEMS, caps=4, jitter=0.35, decay=0.35,
               weights=tuple(NP1_WEIGHTS[c] for c in cat.NP1_ITEMS + cat.NP1P_ITEMS)),
    Instrument("updrs2", "NUPDRS2P", _counts(52, (5.9, 4.2), (0.5, 1.0), (6.5, 5.0), (2.0, 2.6)),
               {"M": 0.55, "N": 0.35, "age": 0.05},
               VisitPlan(0.005, 0.005, p_moved=0.0, p_sc_repeat=0.5), 4.0, 1.5, (0, 52),
               items=cat.NP2_ITEMS, caps=4, jitter=0.35, decay=0.35, source=_updrs2_source,
               weights=(0.6, 0.7, 0.3, 0.5, 0.7, 0.4, 1.2, 0.8, 0.7, 1.3, 0.6, 0.5, 0.1),
               total="NP2PTOT"),
    # rows with OFF + ON pairs, H&Y and 101 codes: safn_core.synth.updrs3
    Instrument("updrs3", "NUPDRS3", _counts(132, (20.9, 8.9), (1.2, 2.2), (14.0, 8.0), (3.5, 3.6)),
               {"age": 0.22, "M": 0.96},
               VisitPlan(0.005, 0.0, p_moved=0.0, p_sc_repeat=0.6), 8.0, 3.0, (0, 132),
               items=cat.NP3_ITEMS, caps=4, jitter=0.3, decay=0.35,
               weights=tuple(NP3_WEIGHTS[c] for c in cat.NP3_ITEMS), total="NP3TOT"),
    # MoCA: 30 - deficit, at SC; HC with MoCA <= 26 were excluded by PPMI: 27..30 only
    Instrument("moca", "MOCA", _per_cohort(deficit(30, 2.9, 2.3),
                                           Marginal("cat", ((27, 28, 29, 30),
                                                            (0.38, 0.24, 0.23, 0.15))),
                                           deficit(30, 2.8, 2.4), deficit(30, 2.6, 2.3)),
               {"C": 0.95}, VisitPlan(0.01, 0.0, sc_only=True), 2.0, -0.3, (0, 30),
               items=tuple(MOCA_ITEMS), caps=tuple(c for c, _ in MOCA_ITEMS.values()),
               weights=tuple(w for _, w in MOCA_ITEMS.values()), decay=0.7, top=30,
               answer=_points_kept, blanks=False, total="MCATOT"),
    # UPSIT: four booklets of 10 odours
    Instrument("upsit", "UPSIT", _per_cohort(Marginal("bb", (40, 22.4, 8.2)),
                                             Marginal("bb", (40, 34.0, 4.9)),
                                             Marginal("bb", (40, 31.0, 6.5)),
                                             Marginal("bb", (40, 19.0, 8.0))),
               {"age": -0.32, "O": 0.85, "C": 0.1}, VisitPlan(0.035, 0.01, p_moved=0.04), 7.0,
               -0.5, (0, 40), items=cat.UPSIT_BOOKLETS, caps=10,
               weights=(1.0, 0.95, 1.05, 0.9), total="TOTAL_CORRECT"),
    Instrument("ess", "EPWORTH", _counts(24, (5.8, 3.5), (5.6, 3.4), (6.5, 4.0), (6.6, 4.0)),
               {"S": 0.6, "N": 0.25}, VisitPlan(0.015, 0.01), 3.5, 0.3, (0, 24),
               items=cat.ESS_ITEMS, caps=3, jitter=0.3, decay=0.6,
               weights=(1.2, 1.4, 0.6, 1.0, 1.8, 0.1, 0.9, 0.15)),
    # RBDSQ: 12 yes/no items + one point for a neurological disease
    Instrument("rbdsq", "REMSLEEP", _counts(13, (4.1, 2.7), (2.8, 2.3), (4.3, 3.0), (7.0, 3.3)),
               {"S": 0.5, "N": 0.25}, VisitPlan(0.015, 0.01), 2.5, 0.2, (0, 13),
               items=cat.RBDSQ_CORE,
               weights=(1.5, 0.6, 0.8, 1.0, 0.3, 1.0, 0.4, 0.5, 0.3, 1.2, 1.3, 1.2)),
    # SCOPA-AUT: 21 core items + 2 sex-specific items (22-23 men, 24-25 women), 9 codes
    Instrument("scopa", "SCOPAAUT", _counts(69, (9.5, 6.2), (5.8, 3.7), (11.0, 7.0), (11.0, 7.0)),
               {"N": 0.6, "M": 0.15, "age": 0.1}, VisitPlan(0.02, 0.02), 6.0, 1.0, (0, 69),
               items=cat.SCOPA_ITEMS, caps=3, jitter=0.3, decay=0.4,
               weights=(0.4, 0.8, 0.4, 0.5, 1.2, 1.0, 0.1, 1.2, 0.6, 0.8, 0.7, 1.0, 1.5, 0.6, 0.4,
                        0.05, 0.5, 0.6, 0.5, 0.4, 0.6, 0.8, 0.6, 0.7, 0.5)),
    # GDS-15: units are depressive answers
    Instrument("gds", "GDSSHORT", _counts(15, (2.3, 2.4), (1.3, 2.1), (3.0, 3.0), (2.5, 2.6)),
               {"A": 0.75, "N": 0.2}, VisitPlan(0.015, 0.01), 2.3, 0.2, (0, 15),
               items=cat.GDS_ITEMS, answer=_gds_answer,
               weights=(0.4, 1.3, 0.6, 0.8, 0.5, 0.6, 0.3, 0.4, 1.0, 1.2, 0.2, 0.4, 1.1, 0.2,
                        0.5)),
    # STAI: 40 items 1-4 (40 + anxiety units)
    Instrument("stai", "STAI", _per_cohort(*(Marginal("nb", ms, offset=40, hi=160) for ms in (
        (25.1, 18.4), (17.1, 14.1), (30.0, 20.0), (24.0, 17.0)))),
               {"A": 0.8, "N": 0.15}, VisitPlan(0.02, 0.025), 17.0, 0.5, (40, 160),
               items=cat.STAI_ITEMS, caps=3, weights=STAI_WEIGHTS, jitter=0.25, decay=0.55,
               floor=40, answer=_stai_answer),
    # HVLT-R: three learning trials of 12 words, delayed recall, recognition
    Instrument("hvlt", "HVLT", _deficits(36, (11.5, 5.0), (10.0, 4.6), (12.0, 5.2), (11.0, 5.0)),
               {"C": 0.65}, VisitPlan(0.02, 0.005), 5.0, -0.3, (0, 36),
               items=cat.HVLT_TRIALS, weights=HVLT_WORD_WEIGHTS),
    # Letter-number sequencing: 7 levels x 3 trials, 0/1, harder levels later
    Instrument("lns", "LNSPD", _normals(0, 21, (10.6, 2.7), (11.0, 2.6), (10.3, 2.8), (10.8, 2.7)),
               {"C": 0.55}, VisitPlan(0.02, 0.005), 2.7, -0.1, (0, 21), items=LNS_ITEMS,
               weights=np.exp(-0.7 * np.repeat(np.arange(7), 3)), total="LNS_TOTRAW"),
    # Semantic fluency: animals, vegetables, fruit, each from the latent (no shipped total)
    Instrument("fluency", "SFT", None, {"C": 0.55}, VisitPlan(0.02, 0.01), 10.0, -0.5, (0, 150),
               items=cat.FLUENCY_ITEMS),
    # Symbol digit modalities: the total only
    Instrument("sdmt", "SDM", _normals(0, 110, (41.2, 9.7), (46.8, 10.5), (40.0, 10.0),
                                       (42.0, 10.0)),
               {"C": 0.6, "age": -0.25}, VisitPlan(0.03, 0.0), 10.0, -1.0, (0, 110),
               blanks=False, total="SDMTOTAL"),
    # Benton judgment of line orientation: 30 items 0/1
    Instrument("benton", "BENTONOD", _deficits(30, (4.4, 3.8), (3.8, 3.5), (4.8, 4.0),
                                               (4.2, 3.7)),
               {"C": 0.4}, VisitPlan(0.025, 0.01), 3.7, 0.0, (0, 30), items=cat.BENTON_ITEMS,
               weights=BENTON_WEIGHTS, total="JLO_TOTRAW"),
)
INSTRUMENTS: dict[str, Instrument] = {spec.key: spec for spec in _SPECS}
"""Every instrument by key, in the order their visit flags and rows are drawn."""
