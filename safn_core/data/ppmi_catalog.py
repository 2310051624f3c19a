"""What a PPMI download contains: table names, column spellings, item lists and scoring rules.

This module is the single description of the PPMI layout. The loader (`ppmi_loader`) reads a
download with it and the synthetic generator (`safn_core.synth`) writes one with it, so a change
of spelling or scoring is made here once. Facts follow `docs/ppmi-data.md`.

Names are *normalised* for matching: lower case, with ``-`` and ``_`` removed, so that
``MDS-UPDRS_Part_III`` and ``MDS_UPDRS_Part_III`` are the same table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from safn_core.data.cohort import Modality

UNABLE_TO_RATE = 101
"""Code used in MDS-UPDRS III items and ``NHY`` for "unable to rate": read as missing."""

DATE_SUFFIX = re.compile(r"_(\d{2})([A-Z][a-z]{2})(\d{4})$")
"""``_DDMonYYYY`` download-date suffix of a table's file stem."""


def normalise_name(name: str) -> str:
    """Lower-case and drop ``-``/``_`` so that PPMI's changing spellings compare equal."""
    return re.sub(r"[-_\s]", "", name).lower()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    """One logical PPMI table and every file name it has had (older first, 2023+ last)."""

    key: str
    names: tuple[str, ...]
    write_name: str  # the 2023+ name the generator writes
    legacy_name: str  # the older name, written by the generator in legacy mode
    folder: str  # folder the generator writes it to


TABLES: dict[str, TableSpec] = {
    t.key: t
    for t in [
        TableSpec("status", ("Patient_Status", "Participant_Status"), "Participant_Status",
                  "Patient_Status", "_Subject_Characteristics"),
        TableSpec("center", ("Center-Subject_List",), "Center-Subject_List",
                  "Center-Subject_List", "_Subject_Characteristics"),
        TableSpec("demographics", ("Screening___Demographics", "Demographics"), "Demographics",
                  "Screening___Demographics", "_Subject_Characteristics"),
        TableSpec("age", ("Age_at_visit",), "Age_at_visit", "Age_at_visit",
                  "_Subject_Characteristics"),
        TableSpec("socio", ("Socio-Economics",), "Socio-Economics", "Socio-Economics",
                  "_Subject_Characteristics"),
        TableSpec("updrs1", ("MDS_UPDRS_Part_I", "MDS-UPDRS_Part_I"), "MDS-UPDRS_Part_I",
                  "MDS_UPDRS_Part_I", "Motor___MDS-UPDRS"),
        TableSpec("updrs1pq", ("MDS_UPDRS_Part_I__Patient_Questionnaire",
                               "MDS-UPDRS_Part_I_Patient_Questionnaire"),
                  "MDS-UPDRS_Part_I_Patient_Questionnaire",
                  "MDS_UPDRS_Part_I__Patient_Questionnaire", "Motor___MDS-UPDRS"),
        TableSpec("updrs2", ("MDS_UPDRS_Part_II__Patient_Questionnaire",
                             "MDS-UPDRS_Part_II_Patient_Questionnaire"),
                  "MDS-UPDRS_Part_II_Patient_Questionnaire",
                  "MDS_UPDRS_Part_II__Patient_Questionnaire", "Motor___MDS-UPDRS"),
        TableSpec("updrs3", ("MDS_UPDRS_Part_III", "MDS-UPDRS_Part_III"), "MDS-UPDRS_Part_III",
                  "MDS_UPDRS_Part_III", "Motor___MDS-UPDRS"),
        TableSpec("moca", ("Montreal_Cognitive_Assessment__MoCA_",),
                  "Montreal_Cognitive_Assessment__MoCA_", "Montreal_Cognitive_Assessment__MoCA_",
                  "Non-motor_Assessments"),
        TableSpec("upsit", ("University_of_Pennsylvania_Smell_ID_Test",
                            "University_of_Pennsylvania_Smell_Identification_Test__UPSIT_"),
                  "University_of_Pennsylvania_Smell_Identification_Test__UPSIT_",
                  "University_of_Pennsylvania_Smell_ID_Test", "Non-motor_Assessments"),
        TableSpec("ess", ("Epworth_Sleepiness_Scale",), "Epworth_Sleepiness_Scale",
                  "Epworth_Sleepiness_Scale", "Non-motor_Assessments"),
        TableSpec("rbdsq", ("REM_Sleep_Behavior_Disorder_Questionnaire",
                            "REM_Sleep_Disorder_Questionnaire"),
                  "REM_Sleep_Behavior_Disorder_Questionnaire",
                  "REM_Sleep_Disorder_Questionnaire", "Non-motor_Assessments"),
        TableSpec("scopa", ("SCOPA-AUT",), "SCOPA-AUT", "SCOPA-AUT", "Non-motor_Assessments"),
        TableSpec("gds", ("Geriatric_Depression_Scale__Short_", "Geriatric_Depression_Scale"),
                  "Geriatric_Depression_Scale__Short_Version_",
                  "Geriatric_Depression_Scale__Short_", "Non-motor_Assessments"),
        TableSpec("stai", ("State-Trait_Anxiety_Inventory",), "State-Trait_Anxiety_Inventory",
                  "State-Trait_Anxiety_Inventory", "Non-motor_Assessments"),
        TableSpec("hvlt", ("Hopkins_Verbal_Learning_Test",), "Hopkins_Verbal_Learning_Test_-_Revised",
                  "Hopkins_Verbal_Learning_Test", "Non-motor_Assessments"),
        TableSpec("lns", ("Letter_-_Number_Sequencing",), "Letter_-_Number_Sequencing",
                  "Letter_-_Number_Sequencing__PD_", "Non-motor_Assessments"),
        TableSpec("fluency", ("Semantic_Fluency", "Modified_Semantic_Fluency"),
                  "Modified_Semantic_Fluency", "Semantic_Fluency", "Non-motor_Assessments"),
        TableSpec("sdmt", ("Symbol_Digit_Modalities",), "Symbol_Digit_Modalities_Test",
                  "Symbol_Digit_Modalities", "Non-motor_Assessments"),
        TableSpec("benton", ("Benton_Judgement_of_Line_Orientation",
                             "Benton_Judgment_of_Line_Orientation"),
                  "Benton_Judgment_of_Line_Orientation", "Benton_Judgement_of_Line_Orientation",
                  "Non-motor_Assessments"),
        TableSpec("cth", ("FS7_APARC_CTH",), "FS7_APARC_CTH", "FS7_APARC_CTH", "Imaging"),
        TableSpec("aseg", ("FS7_ASEG_VOL",), "FS7_ASEG_VOL", "FS7_ASEG_VOL", "Imaging"),
    ]
}

VISIT_COLUMNS = ("REC_ID", "PATNO", "EVENT_ID", "PAG_NAME", "INFODT")
VISIT_TRAILER = ("ORIG_ENTRY", "LAST_UPDATE")

BASELINE_EVENTS = ("BL", "SC")
"""Baseline row preference: BL, falling back to SC (MoCA, DaTscan and some MRI are at SC)."""

# --------------------------------------------------------------------------------------------
# Cohort coding and leakage guards
# --------------------------------------------------------------------------------------------

COHORT_CODES = {1: "PD", 2: "HC", 3: "SWEDD", 4: "Prodromal"}
"""2023+ ``Participant_Status.COHORT`` codes."""

LEGACY_COHORT_LABELS = {"PD": "PD", "HC": "HC", "SWEDD": "SWEDD", "PRODROMA": "Prodromal",
                        "PRODROMAL": "Prodromal", "GENPD": "GenPD", "GENUN": "GenUnaffected",
                        "REGPD": "RegPD", "REGUN": "RegUnaffected"}
"""Older ``Patient_Status.ENROLL_CAT`` strings, mapped to the cohort names of the load report."""

LABELS = {"PD": 1, "HC": 0}

FORBIDDEN_FEATURE_PATTERNS = (
    r"^COHORT", r"^ENROLL_CAT", r"^APPRDX", r"^CURRENT_APPRDX", r"DX", r"^PDDX", r"^DXDT",
    r"DURATION", r"LEDD", r"^PDMED", r"^NP4", r"DATSCAN", r"^DATSCAN", r"SBR", r"^CAUDATE_",
    r"^PUTAMEN_", r"^PDSTATE", r"^PDTRTMNT", r"^ONOFF",
)
"""Label-defining and PD-only fields (cohort, diagnosis dates, disease duration, medication/LEDD,
MDS-UPDRS IV, DaTscan-derived values, treatment state). None of them may ever be a feature."""


def is_forbidden_feature(column: str) -> bool:
    """True for a column that defines the label or exists only for PD (see the leakage guards)."""
    up = column.upper()
    return any(re.search(p, up) for p in FORBIDDEN_FEATURE_PATTERNS)


# --------------------------------------------------------------------------------------------
# Imaging
# --------------------------------------------------------------------------------------------

DK_REGIONS = (
    "bankssts", "caudalanteriorcingulate", "caudalmiddlefrontal", "cuneus", "entorhinal",
    "fusiform", "inferiorparietal", "inferiortemporal", "isthmuscingulate", "lateraloccipital",
    "lateralorbitofrontal", "lingual", "medialorbitofrontal", "middletemporal", "parahippocampal",
    "paracentral", "parsopercularis", "parsorbitalis", "parstriangularis", "pericalcarine",
    "postcentral", "posteriorcingulate", "precentral", "precuneus", "rostralanteriorcingulate",
    "rostralmiddlefrontal", "superiorfrontal", "superiorparietal", "superiortemporal",
    "supramarginal", "frontalpole", "temporalpole", "transversetemporal", "insula",
)
HEMISPHERES = ("lh", "rh")
THICKNESS_FEATURES = tuple(f"{h}_{r}" for h in HEMISPHERES for r in DK_REGIONS)


def thickness_spellings(feature: str) -> tuple[str, ...]:
    """Column spellings of one thickness region: FS7 table, aparcstats2table, ENIGMA."""
    hemi, region = feature.split("_", 1)
    enigma = {"lh": "L", "rh": "R"}[hemi]
    return (feature, f"{feature}_thickness", f"{enigma}_{region}_thickavg")


ASEG_BILATERAL = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala",
                  "Accumbens_area", "VentralDC", "Lateral_Ventricle")
ASEG_MIDLINE = ("3rd_Ventricle", "4th_Ventricle", "Brain_Stem")
ETIV = "EstimatedTotalIntraCranialVol"
VOLUME_FEATURES = tuple(
    [f"{s}_{x}" for x in ASEG_BILATERAL for s in ("Left", "Right")] + list(ASEG_MIDLINE) + [ETIV]
)
VOLUME_REGIONS = VOLUME_FEATURES[:-1]
"""Volumes that can be divided by eTIV (eTIV itself stays a feature)."""


def volume_spellings(feature: str) -> tuple[str, ...]:
    """Column spellings of one aseg volume: ``-`` or ``_``, FS5/6 ``Thalamus_Proper``, eTIV."""
    out = [feature, feature.replace("_", "-")]
    if "Thalamus" in feature:
        out += [feature + "_Proper", (feature + "_Proper").replace("_", "-")]
    if feature == ETIV:
        out += ["eTIV", "IntraCranialVol"]
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------
# Clinical instruments
# --------------------------------------------------------------------------------------------

NP1_ITEMS = ("NP1COG", "NP1HALL", "NP1DPRS", "NP1ANXS", "NP1APAT", "NP1DDS")
NP1P_ITEMS = ("NP1SLPN", "NP1SLPD", "NP1PAIN", "NP1URIN", "NP1CNST", "NP1LTHD", "NP1FATG")
NP2_ITEMS = ("NP2SPCH", "NP2SALV", "NP2SWAL", "NP2EAT", "NP2DRES", "NP2HYGN", "NP2HWRT",
             "NP2HOBB", "NP2TURN", "NP2TRMR", "NP2RISE", "NP2WALK", "NP2FREZ")
NP3_ITEMS = ("NP3SPCH", "NP3FACXP", "NP3RIGN", "NP3RIGRU", "NP3RIGLU", "NP3RIGRL", "NP3RIGLL",
             "NP3FTAPR", "NP3FTAPL", "NP3HMOVR", "NP3HMOVL", "NP3PRSPR", "NP3PRSPL", "NP3TTAPR",
             "NP3TTAPL", "NP3LGAGR", "NP3LGAGL", "NP3RISNG", "NP3GAIT", "NP3FRZGT", "NP3PSTBL",
             "NP3POSTR", "NP3BRADY", "NP3PTRMR", "NP3PTRML", "NP3KTRMR", "NP3KTRML", "NP3RTARU",
             "NP3RTALU", "NP3RTARL", "NP3RTALL", "NP3RTALJ", "NP3RTCON")
COLUMN_ALIASES = {"PN3RIGRL": "NP3RIGRL"}
"""Old column spellings (left) of current names (right); applied to every table on read."""

UPDRS3_PAG_PREFERENCE = ("NUPDRS3", "NUPDR3OF", "NUPDRS3A", "NUPDR3ON")
"""Part III row choice when several exist for one visit: untreated, OFF, then ON last."""
UPDRS3_PDSTATE_PREFERENCE = ("", "OFF", "ON")

ESS_ITEMS = tuple(f"ESS{i}" for i in range(1, 9))
SCOPA_ITEMS = tuple(f"SCAU{i}" for i in range(1, 26))
RBDSQ_CORE = ("DRMVIVID", "DRMAGRAC", "DRMNOCTB", "SLPLMBMV", "SLPINJUR", "DRMVERBL", "DRMFIGHT",
              "DRMUMV", "DRMOBJFL", "MVAWAKEN", "DRMREMEM", "SLPDSTRB")
RBDSQ_NEURO = ("STROKE", "HETRA", "PARKISM", "RLS", "NARCLPSY", "DEPRS", "EPILEPSY", "BRNINFM",
               "CNSOTH")
GDS_ITEMS = ("GDSSATIS", "GDSDROPD", "GDSEMPTY", "GDSBORED", "GDSGSPIR", "GDSAFRAD", "GDSHAPPY",
             "GDSHLPLS", "GDSHOME", "GDSMEMRY", "GDSALIVE", "GDSWRTLS", "GDSENRGY", "GDSHOPLS",
             "GDSBETER")
GDS_POSITIVE = ("GDSSATIS", "GDSGSPIR", "GDSHAPPY", "GDSALIVE", "GDSENRGY")
"""GDS items scored 1 for "no" (0); all others score 1 for "yes" (1)."""
STAI_ITEMS = tuple(f"STAIAD{i}" for i in range(1, 41))
STAI_REVERSED = tuple(f"STAIAD{i}" for i in (1, 2, 5, 8, 10, 11, 15, 16, 19, 20,
                                              21, 23, 26, 27, 30, 33, 34, 36, 39))
UPSIT_BOOKLETS = ("UPSITBK1", "UPSITBK2", "UPSITBK3", "UPSITBK4")
HVLT_TRIALS = ("HVLTRT1", "HVLTRT2", "HVLTRT3")
FLUENCY_ITEMS = ("VLTANIM", "VLTVEG", "VLTFRUIT")
BENTON_ITEMS = tuple(f"BJLOT{i}" for i in range(1, 31))


def _sum_items(df: pd.DataFrame, items: tuple[str, ...]) -> pd.Series:
    """Sum of items, missing when any item is missing (a partial sum is not the scale's total)."""
    block = df.reindex(columns=list(items)).apply(pd.to_numeric, errors="coerce")
    return block.sum(axis=1, min_count=len(items)).where(block.notna().all(axis=1))


def score_scopa(df: pd.DataFrame) -> pd.Series:
    """SCOPA-AUT total: items 1-21 with 9 ("uses catheter"/n.a.) → 3; items 22-25 with 9 → 0."""
    block = df.reindex(columns=list(SCOPA_ITEMS)).apply(pd.to_numeric, errors="coerce")
    core = block[list(SCOPA_ITEMS[:21])].replace(9, 3)
    sex = block[list(SCOPA_ITEMS[21:])].replace(9, 0).fillna(0)  # sex-specific: one set blank
    total = core.sum(axis=1, min_count=21) + sex.sum(axis=1)
    return total.where(core.notna().all(axis=1))


def score_rbdsq(df: pd.DataFrame) -> pd.Series:
    """RBDSQ total (0-13): 12 yes/no items plus one point for any listed neurological disease."""
    core = _sum_items(df, RBDSQ_CORE)
    neuro = df.reindex(columns=list(RBDSQ_NEURO)).apply(pd.to_numeric, errors="coerce")
    return core + (neuro.fillna(0).max(axis=1) > 0).astype(float)


def score_gds(df: pd.DataFrame) -> pd.Series:
    """GDS-15: one point per depressive answer (reversed for the five positive items)."""
    block = df.reindex(columns=list(GDS_ITEMS)).apply(pd.to_numeric, errors="coerce")
    for c in GDS_POSITIVE:
        block[c] = 1 - block[c]
    return block.sum(axis=1, min_count=15).where(block.notna().all(axis=1))


def score_stai(df: pd.DataFrame) -> pd.Series:
    """STAI state + trait (40-160): items 1-4, the anxiety-absent items reversed (5 - x)."""
    block = df.reindex(columns=list(STAI_ITEMS)).apply(pd.to_numeric, errors="coerce")
    for c in STAI_REVERSED:
        block[c] = 5 - block[c]
    return block.sum(axis=1, min_count=40).where(block.notna().all(axis=1))


def _shipped_or_sum(total: str, items: tuple[str, ...]):
    def score(df: pd.DataFrame) -> pd.Series:
        summed = _sum_items(df, items)
        if total in df.columns:
            shipped = pd.to_numeric(df[total], errors="coerce")
            return shipped.fillna(summed)
        return summed
    score.__doc__ = f"``{total}`` where shipped, else the sum of its {len(items)} items."
    return score


@dataclass(frozen=True)
class ClinicalFeature:
    """One clinical feature: the table it comes from and how it is scored from that table."""

    name: str
    table: str
    score: object  # Callable[[pd.DataFrame], pd.Series]
    events: tuple[str, ...] = BASELINE_EVENTS
    motor: bool = False  # MDS-UPDRS / H&Y: excluded by ``data.exclude_motor``
    plausible: tuple[float, float] = (0, np.inf)
    description: str = ""


def _column(col: str):
    def score(df: pd.DataFrame) -> pd.Series:
        return pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(
            np.nan, index=df.index)
    score.__doc__ = f"Column ``{col}``."
    return score


CLINICAL_FEATURES: tuple[ClinicalFeature, ...] = (
    ClinicalFeature("NP1RTOT", "updrs1", _shipped_or_sum("NP1RTOT", NP1_ITEMS), motor=True,
                    plausible=(0, 24), description="MDS-UPDRS I, rater part"),
    ClinicalFeature("NP1PTOT", "updrs1pq", _shipped_or_sum("NP1PTOT", NP1P_ITEMS), motor=True,
                    plausible=(0, 28), description="MDS-UPDRS I, patient questionnaire"),
    ClinicalFeature("NP2PTOT", "updrs2", _shipped_or_sum("NP2PTOT", NP2_ITEMS), motor=True,
                    plausible=(0, 52), description="MDS-UPDRS II"),
    ClinicalFeature("NP3TOT", "updrs3", _shipped_or_sum("NP3TOT", NP3_ITEMS), motor=True,
                    plausible=(0, 132), description="MDS-UPDRS III (untreated/OFF)"),
    ClinicalFeature("NHY", "updrs3", _column("NHY"), motor=True, plausible=(0, 5),
                    description="Hoehn & Yahr stage"),
    ClinicalFeature("MCATOT", "moca", _column("MCATOT"), plausible=(0, 30),
                    description="MoCA total (collected at SC)", events=("SC", "BL")),
    ClinicalFeature("UPSIT", "upsit", _shipped_or_sum("TOTAL_CORRECT", UPSIT_BOOKLETS),
                    plausible=(0, 40), description="UPSIT total correct"),
    ClinicalFeature("ESS", "ess", _shipped_or_sum("ESS_TOT", ESS_ITEMS), plausible=(0, 24),
                    description="Epworth Sleepiness Scale"),
    ClinicalFeature("RBDSQ", "rbdsq", score_rbdsq, plausible=(0, 13), description="RBDSQ"),
    ClinicalFeature("SCOPA_AUT", "scopa", score_scopa, plausible=(0, 75),
                    description="SCOPA-AUT total"),
    ClinicalFeature("GDS", "gds", score_gds, plausible=(0, 15), description="GDS-15"),
    ClinicalFeature("STAI", "stai", score_stai, plausible=(40, 160),
                    description="STAI state + trait"),
    ClinicalFeature("HVLT_IMMEDIATE", "hvlt", _shipped_or_sum("HVLT_IMM_TOT", HVLT_TRIALS),
                    plausible=(0, 36), description="HVLT-R immediate recall"),
    ClinicalFeature("LNS", "lns", _column("LNS_TOTRAW"), plausible=(0, 21),
                    description="Letter-number sequencing raw"),
    ClinicalFeature("SEMANTIC_FLUENCY", "fluency", _shipped_or_sum("SFT_TOT", FLUENCY_ITEMS),
                    plausible=(0, 150), description="Semantic fluency (animals+vegetables+fruit)"),
    ClinicalFeature("SDMT", "sdmt", _column("SDMTOTAL"), plausible=(0, 110),
                    description="Symbol Digit Modalities Test"),
    ClinicalFeature("BENTON", "benton", _shipped_or_sum("JLO_TOTRAW", BENTON_ITEMS),
                    plausible=(0, 30), description="Benton Judgment of Line Orientation"),
)
MOTOR_FEATURES = tuple(f.name for f in CLINICAL_FEATURES if f.motor)

DEMOGRAPHIC_FEATURES = ("AGE", "SEX", "EDUCYRS", "HANDED_LEFT", "HANDED_MIXED")
"""Demographics: age (years), sex (1 male), education (years), handedness one-hot (right = 0,0)."""

PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    **{f.name: f.plausible for f in CLINICAL_FEATURES},
    **{f: (0.5, 5.5) for f in THICKNESS_FEATURES},
    **{f: (1.0, 2.5e6) for f in VOLUME_FEATURES},
    "AGE": (18, 110), "SEX": (0, 1), "EDUCYRS": (0, 30), "HANDED_LEFT": (0, 1),
    "HANDED_MIXED": (0, 1),
}
"""Plausible value range per feature; values outside are flagged by the data contract."""


def ppmi_modalities(exclude_motor: bool = False) -> tuple[Modality, ...]:
    """The four SAFN modalities of a PPMI download, in model order."""
    clinical = tuple(f.name for f in CLINICAL_FEATURES if not (exclude_motor and f.motor))
    return (
        Modality("thickness", THICKNESS_FEATURES, "imaging"),
        Modality("volume", VOLUME_FEATURES, "imaging"),
        Modality("clinical", clinical, "clinical"),
        Modality("demographics", DEMOGRAPHIC_FEATURES, "clinical"),
    )
