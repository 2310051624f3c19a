"""Who is in a PPMI cohort: label, exclusions and site of each participant.

The enrolment cohort comes from the status table (``Participant_Status.COHORT`` or the older
``Patient_Status.ENROLL_CAT``). The target (`safn_core.targets`) keeps the cohorts it needs
(``target.cohorts``); a kept cohort that is one of its classes is labelled by its place in
``target.classes`` (pd_vs_hc: HC → 0, PD → 1; hc_prodromal_pd: HC 0, Prodromal 1, PD 2). For
hy_stage PD is labelled by its baseline H&Y (`hy_labels`: 1 → 1, ≥ 2 → 2; missing, 101 or 0 →
excluded and counted). Every other cohort and every screen-failed, declined or excluded enrolment
is left out and counted by reason. The site is the centre number (``CNO``) of the centre list,
else of the status table.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from safn_core.data.cohort import ID
from safn_core.data.ppmi_catalog import COHORT_CODES, LEGACY_COHORT_LABELS, TABLES
from safn_core.data.ppmi_download import PATNO, PpmiDownload, norm_ids, plural
from safn_core.data.ppmi_visits import STATIC_EVENTS, baseline, pick
from safn_core.errors import DataError
from safn_core.targets import PD_VS_HC, Target, hy_class

_EXCLUDED_ENROLL_STATUS = re.compile(r"screen|declin|exclud", re.IGNORECASE)


def read_status(dl: PpmiDownload) -> pd.DataFrame:
    """The status table, one row per participant, with a ``cohort`` column (PD, HC, SWEDD,
    Prodromal, …, ``missing``)."""
    if "status" not in dl.found:
        names = " or ".join(TABLES["status"].names)
        raise DataError(f"no participant status table under {dl.root}: searched all "
                        f"subfolders for {names}_<DDMonYYYY>.csv (any case, '-'/'_' ignored); "
                        "point data.path at the complete PPMI download folder")
    df = dl.raw("status")
    shown = dl.shown("status")
    if df.empty:
        raise DataError(f"{shown}: the status table has no participant rows; re-download it")
    n_dup = int(df[PATNO].duplicated().sum())
    st = pick(df)
    if n_dup:
        dl.note(f"{shown}: {plural(n_dup, 'duplicate row')}: kept the latest "
                "LAST_UPDATE/REC_ID per participant")
    if "COHORT" in st.columns:
        code = pd.to_numeric(st["COHORT"], errors="coerce")
        cohort = code.map(lambda c: COHORT_CODES.get(int(c), f"unknown ({int(c)})")
                          if pd.notna(c) and float(c).is_integer() else np.nan)
        junk = st["COHORT"].notna() & code.isna()
        if junk.any():
            dl.note(f"{shown}: column COHORT: {plural(int(junk.sum()), 'non-numeric value')}"
                    f" (e.g. {st['COHORT'][junk].iloc[0]!r}) read as missing")
        if "ENROLL_CAT" in st.columns:  # both present: COHORT first, ENROLL_CAT fills gaps
            cohort = cohort.fillna(_legacy_cohort(st["ENROLL_CAT"]))
    elif "ENROLL_CAT" in st.columns:
        cohort = _legacy_cohort(st["ENROLL_CAT"])
    else:
        raise DataError(f"{shown}: has neither a COHORT nor an ENROLL_CAT column; the label "
                        "(PD or HC) comes from one of them")
    st["cohort"] = cohort.fillna("missing")
    return st


def _legacy_cohort(s: pd.Series) -> pd.Series:
    text = s.astype(object).where(s.notna(), "").astype(str).str.strip().str.upper()
    return text.map(lambda t: LEGACY_COHORT_LABELS.get(t, t) if t else np.nan)


def target_participants(status: pd.DataFrame, target: Target = PD_VS_HC
                        ) -> tuple[pd.DataFrame, pd.Index, dict[str, int]]:
    """The participants of ``target``'s cohorts whose enrolment stands: their status rows (with
    ``label``: the class index of the cohort, NaN for a cohort the label of which comes from
    elsewhere, e.g. PD for hy_stage), their ids (sorted by length, then text) and the count of
    everyone left out, by reason."""
    excluded: dict[str, int] = {}
    status = status.assign(label=status["cohort"].map(
        {c: float(target.classes.index(c)) if c in target.classes else np.nan
         for c in target.cohorts}))
    other = ~status["cohort"].isin(target.cohorts)
    for name, n in status.loc[other, "cohort"].value_counts().items():
        excluded[f"cohort {name}"] = int(n)
    keep = status[~other]
    if "ENROLL_STATUS" in keep.columns:
        es = keep["ENROLL_STATUS"].astype(object).fillna("").astype(str)
        bad = es.str.contains(_EXCLUDED_ENROLL_STATUS)
        for name, n in es[bad].value_counts().items():
            excluded[f"enrolment status {name}"] = int(n)
        keep = keep[~bad]
    ids = pd.Index(sorted(keep.index, key=lambda s: (len(s), s)), name=ID)
    return keep, ids, excluded


def pd_hc_participants(status: pd.DataFrame) -> tuple[pd.DataFrame, pd.Index, dict[str, int]]:
    """`target_participants` of pd_vs_hc."""
    return target_participants(status, PD_VS_HC)


def hy_labels(dl: PpmiDownload, keep: pd.DataFrame, ids: pd.Index, excluded: dict[str, int],
              nhy: pd.Series) -> tuple[pd.DataFrame, pd.Index]:
    """hy_stage: PD labelled by baseline H&Y (``nhy``, 101 already missing): 1 → 1, ≥ 2 → 2
    (stages 3+ join 2); PD without a stage (missing, 101) or at stage 0 are excluded and counted
    (``"H&Y not recorded"``, ``"H&Y 0 (PD)"``). Adds the class counts of PD to the report."""
    is_pd = keep["cohort"].reindex(ids) == "PD"
    stage = pd.to_numeric(nhy.reindex(ids), errors="coerce")
    cls = stage.map(hy_class)
    label = keep["label"].reindex(ids).where(~is_pd, cls)
    for reason, mask in (("H&Y not recorded", is_pd & stage.isna()),
                         ("H&Y 0 (PD)", is_pd & stage.notna() & cls.isna())):
        if mask.any():
            excluded[reason] = int(mask.sum())
    n3 = int((is_pd & (stage >= 3)).sum())
    if n3:
        dl.note(f"{plural(n3, 'PD participant')} at H&Y stage 3 or above: class H&Y >=2")
    for k, name in ((1, "H&Y 1"), (2, "H&Y >=2")):
        dl.report.cohorts[name] = int((is_pd & (cls == k)).sum())
    keep = keep.assign(label=label.reindex(keep.index))
    ids = ids[label.notna().to_numpy()]
    return keep, ids


def sites(dl: PpmiDownload, ids: pd.Index, status: pd.DataFrame) -> pd.Series:
    """Each participant's centre: ``CNO`` (or ``SITE``/``CENTER``) of the centre list, else of
    the status table; an unknown site is noted."""
    site = pd.Series(np.nan, index=ids, dtype=object)
    center = baseline(dl, "center", STATIC_EVENTS, any_event=True) \
        if "center" in dl.found else None
    for src, name in ((center, "center"), (status, "status")):
        if src is None:
            continue
        col = next((c for c in ("CNO", "SITE", "CENTER") if c in src.columns), None)
        if col is None:
            if name == "center":
                dl.note(f"{dl.shown('center')}: no CNO column; site not read from it")
            continue
        site = site.fillna(norm_ids(src[col].astype(object)).reindex(ids))
    n_missing = int(site.isna().sum())
    if n_missing:
        dl.note(f"site unknown for {plural(n_missing, 'participant')}")
    return site
