"""The features of a PPMI cohort, one modality at a time, read at each participant's baseline.

Clinical scores are scored by `ppmi_catalog` (shipped totals, or totals computed from items);
MDS-UPDRS III's 101 ("unable to rate") is missing in its items and ``NHY``, and a shipped
``NP3TOT`` over a 101 item is recomputed (so missing). Imaging columns are found under any of
their FreeSurfer spellings; aseg volumes may be divided by eTIV. Demographics: age (visit age,
enrolment age, or enrolment date − birth date), sex, education, handedness one-hot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data.ppmi_catalog import (
    CLINICAL_FEATURES, DEMOGRAPHIC_FEATURES, ETIV, NP3_ITEMS, TABLES, UNABLE_TO_RATE,
    VOLUME_REGIONS, thickness_spellings, volume_spellings,
)
from safn_core.data.ppmi_download import PpmiDownload, plural
from safn_core.data.ppmi_visits import STATIC_EVENTS, baseline
from safn_core.errors import DataError


def tables_needed(modalities) -> set[str]:
    """The tables the features of ``modalities`` are read from."""
    needed = set()
    for m in modalities:
        if m.name == "thickness":
            needed.add("cth")
        elif m.name == "volume":
            needed.add("aseg")
        elif m.name == "clinical":
            needed |= {f.table for f in CLINICAL_FEATURES if f.name in m.features}
        elif m.name == "demographics":
            needed |= {"demographics", "age", "socio"}
    return needed


def modality_features(dl: PpmiDownload, modality, ids: pd.Index, status: pd.DataFrame, *,
                      norm_etiv: bool) -> pd.DataFrame:
    """The features of one modality for ``ids`` (missing where a participant has none)."""
    m = modality
    if m.name == "thickness":
        return imaging(dl, "cth", ids, m.features, thickness_spellings, "cortical thickness")
    if m.name == "volume":
        vol = imaging(dl, "aseg", ids, m.features, volume_spellings, "aseg volume")
        if norm_etiv and ETIV in vol.columns:
            etiv = vol[ETIV].where(vol[ETIV] > 0)
            regions = [c for c in VOLUME_REGIONS if c in vol.columns]
            vol[regions] = vol[regions].div(etiv, axis=0)
            dl.note("volumes divided by eTIV (EstimatedTotalIntraCranialVol kept as is)")
        return vol
    if m.name == "clinical":
        return clinical(dl, ids, m.features)
    if m.name == "demographics":
        return demographics(dl, ids, status)
    # the catalog defines exactly these four
    raise RuntimeError(f"bug: unknown PPMI modality {m.name!r}")  # pragma: no cover


def clinical(dl: PpmiDownload, ids: pd.Index, names: tuple[str, ...]) -> pd.DataFrame:
    out = pd.DataFrame(index=ids)
    groups: dict[tuple[str, tuple[str, ...]], list] = {}
    for f in CLINICAL_FEATURES:
        if f.name in names:
            groups.setdefault((f.table, f.events), []).append(f)
    for (table, events), feats in groups.items():
        rows = baseline(dl, table, events)
        if rows is None:
            dl.note(f"table {TABLES[table].names[-1]} not found: "
                    f"{', '.join(f.name for f in feats)} missing for everyone")
            for f in feats:
                out[f.name] = np.nan
            continue
        if table == "updrs3":
            rows = updrs3_unable_to_rate(dl, rows)
        for f in feats:
            out[f.name] = pd.to_numeric(f.score(rows), errors="coerce").reindex(ids)
    return out[[n for n in names]]


def updrs3_unable_to_rate(dl: PpmiDownload, rows: pd.DataFrame) -> pd.DataFrame:
    """101 → missing in Part III items and NHY; NP3TOT recomputed (→ missing) where an item
    was 101."""
    rows = rows.copy()
    items = [c for c in NP3_ITEMS if c in rows.columns]
    is101 = (rows[items] == UNABLE_TO_RATE) if items else pd.DataFrame(index=rows.index)
    any101 = is101.any(axis=1) if items else pd.Series(False, index=rows.index)
    n_items = int(is101.to_numpy().sum()) if items else 0
    if items:
        rows[items] = rows[items].mask(is101)
    if "NP3TOT" in rows.columns:
        rows.loc[any101, "NP3TOT"] = np.nan
    n_nhy = 0
    if "NHY" in rows.columns:
        nhy101 = rows["NHY"] == UNABLE_TO_RATE
        n_nhy = int(nhy101.sum())
        rows["NHY"] = rows["NHY"].mask(nhy101)
    if n_items or n_nhy:
        dl.note(f"{dl.shown('updrs3')}: code 101 (unable to rate) read as missing: "
                f"{plural(n_items, 'Part III item')} in {plural(int(any101.sum()), 'row')} "
                f"(NP3TOT of those rows missing), {n_nhy} NHY")
    return rows


def imaging(dl: PpmiDownload, key: str, ids: pd.Index, features: tuple[str, ...], spellings,
            what: str) -> pd.DataFrame:
    rows = baseline(dl, key)
    out = pd.DataFrame(np.nan, index=ids, columns=list(features))
    if rows is None:
        dl.note(f"table {TABLES[key].names[-1]} not found: {what} missing for everyone")
        return out
    lower = {}
    for c in rows.columns:
        lower.setdefault(str(c).lower(), c)
    missing = []
    for feat in features:
        col = next((lower[s.lower()] for s in spellings(feat) if s.lower() in lower), None)
        if col is None:
            missing.append(feat)
            continue
        out[feat] = pd.to_numeric(rows[col], errors="coerce").astype(float).reindex(ids)
    if len(missing) == len(features):
        raise DataError(f"{dl.shown(key)}: none of the {len(features)} {what} columns found "
                        f"(expected e.g. {', '.join(spellings(features[0]))}); is this a "
                        "FreeSurfer table of PPMI?")
    if missing:
        dl.note(f"{dl.shown(key)}: {plural(len(missing), 'column')} not found, missing "
                f"for everyone: {', '.join(missing)}")
    return out


def _months(s: pd.Series) -> pd.Series:
    """A date column (``MM/YYYY``, ``MM/DD/YYYY``, ``YYYY-MM[-DD]`` or ``YYYY``) → months since
    year 0, as float; a bare year counts as mid-year; anything else is NaN."""
    text = s.astype(object).where(s.notna(), "").astype(str).str.strip()
    out = pd.Series(np.nan, index=s.index)
    patterns = (
        (r"(?P<m>\d{1,2})/(?P<y>\d{4})", None),
        (r"(?P<m>\d{1,2})/\d{1,2}/(?P<y>\d{4})", None),
        (r"(?P<y>\d{4})-(?P<m>\d{1,2})(?:-\d{1,2})?(?:[ T].*)?", None),
        (r"(?P<y>\d{4})(?:\.0)?", 6.5),
    )
    for pattern, mid in patterns:
        parts = text.str.extract(f"^{pattern}$")
        ok = parts["y"].notna() & out.isna()
        if not ok.any():
            continue
        year = parts.loc[ok, "y"].astype(float)
        month = (parts.loc[ok, "m"].astype(float) if mid is None
                 else pd.Series(mid, index=year.index))
        month = month.where((month >= 1) & (month <= 12))
        out[ok] = year * 12 + month - 1
    return out


def demographics(dl: PpmiDownload, ids: pd.Index, status: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(np.nan, index=ids, columns=list(DEMOGRAPHIC_FEATURES))
    demo = baseline(dl, "demographics", STATIC_EVENTS, any_event=True)
    socio = baseline(dl, "socio", STATIC_EVENTS, any_event=True)
    agev = baseline(dl, "age")

    def col(df, name) -> pd.Series:
        if df is None or name not in df.columns:
            return pd.Series(np.nan, index=ids)
        return pd.to_numeric(df[name], errors="coerce").reindex(ids)

    # age: visit age, else enrolment age, else enrolment date - birth date
    age = col(agev, "AGE_AT_VISIT")
    n_visit = int(age.notna().sum())
    age = age.fillna(col(status, "ENROLL_AGE"))
    n_enrol = int(age.notna().sum()) - n_visit
    if demo is not None and "BIRTHDT" in demo.columns and "ENROLL_DATE" in status.columns:
        born = _months(demo["BIRTHDT"]).reindex(ids)
        enrolled = _months(status["ENROLL_DATE"]).reindex(ids)
        before = int(age.notna().sum())
        age = age.fillna((enrolled - born) / 12.0)
        n_dates = int(age.notna().sum()) - before
        if n_dates:
            dl.note(f"AGE from ENROLL_DATE - BIRTHDT for {plural(n_dates, 'participant')}")
    if n_enrol:
        dl.note(f"AGE from ENROLL_AGE for {plural(n_enrol, 'participant')}")
    out["AGE"] = age

    # sex: SEX 0 F / 1 M; older GENDER 0/1 female, 2 male
    sex = col(demo, "SEX").where(lambda s: s.isin([0, 1]))
    gender = col(demo, "GENDER").map({0: 0.0, 1: 0.0, 2: 1.0})
    out["SEX"] = sex.fillna(gender)

    out["EDUCYRS"] = col(socio, "EDUCYRS").fillna(col(demo, "EDUCYRS"))

    handed = col(demo, "HANDED")
    known = handed.isin([1, 2, 3])
    out["HANDED_LEFT"] = (handed == 2).astype(float).where(known)
    out["HANDED_MIXED"] = (handed == 3).astype(float).where(known)
    return out
