"""Which row of a PPMI table is a participant's baseline (rules in `ppmi_loader`'s module doc).

`baseline` keeps one row per participant: the first available visit of the table's events (BL,
else SC; tables without visits: BL, SC, then any row), then among several rows of that visit the
latest ``LAST_UPDATE``, the highest ``REC_ID``, the last row of the file. MDS-UPDRS III rows are
chosen by state first (`pick_updrs3`): untreated, then OFF, ON only when it is the only row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data.ppmi_catalog import (
    BASELINE_EVENTS, UPDRS3_PAG_PREFERENCE, UPDRS3_PDSTATE_PREFERENCE,
)
from safn_core.data.ppmi_download import PATNO, PpmiDownload, plural

STATIC_EVENTS = ("BL", "SC")  # preferred rows of tables without visits; any other row after them


def _parse_when(s: pd.Series) -> pd.Series:
    """``LAST_UPDATE``-style values → timestamps: ``MM/YYYY`` or any date/time text; else NaT."""
    s = s.astype(object)
    out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
    text = s.where(s.notna(), "").astype(str)
    mmyyyy = text.str.fullmatch(r"\d{1,2}/\d{4}")
    if mmyyyy.any():
        out[mmyyyy] = pd.to_datetime(text[mmyyyy], format="%m/%Y", errors="coerce")
    rest = ~mmyyyy & (text != "")
    if rest.any():
        out[rest] = pd.to_datetime(text[rest], format="mixed", errors="coerce")
    return out


def pick(df: pd.DataFrame, prefer: list[str] | None = None) -> pd.DataFrame:
    """One row per PATNO: lowest ``prefer`` ranks first, then the latest LAST_UPDATE, highest
    REC_ID, last row of the file. Returns the chosen rows indexed by PATNO."""
    if not df[PATNO].duplicated().any():
        return df.set_index(PATNO, drop=False).rename_axis(None)
    work = df.copy()
    work["_order"] = np.arange(len(work))
    upd = _parse_when(work["LAST_UPDATE"]) if "LAST_UPDATE" in work else pd.Series(
        pd.NaT, index=work.index, dtype="datetime64[ns]")
    work["_upd"] = upd
    rec = work["REC_ID"] if "REC_ID" in work else pd.Series(np.nan, index=work.index)
    work["_recn"] = pd.to_numeric(rec, errors="coerce")
    work["_recs"] = rec.astype(object).where(rec.notna(), "").astype(str)
    prefer = list(prefer or [])
    keys = prefer + ["_upd", "_recn", "_recs", "_order"]
    work = work.sort_values(keys, ascending=[True] * len(prefer) + [False] * 4,
                            na_position="last", kind="stable")
    work = work.drop_duplicates(PATNO, keep="first")
    work = work.drop(columns=["_order", "_upd", "_recn", "_recs"])
    return work.set_index(PATNO, drop=False).rename_axis(None)


def baseline(dl: PpmiDownload, key: str, events: tuple[str, ...] = BASELINE_EVENTS, *,
             any_event: bool = False) -> pd.DataFrame | None:
    """One row per participant at the first available event of ``events`` (numeric columns
    converted), indexed by PATNO; with ``any_event`` other events come after them."""
    df = dl.raw(key)
    if df is None:
        return None
    shown = dl.shown(key)
    if "EVENT_ID" not in df.columns:
        if not any_event:
            dl.note(f"{shown}: no EVENT_ID column; each participant's row taken as baseline")
        chosen = df
    else:
        rank = df["EVENT_ID"].map({e: i for i, e in enumerate(events)})
        if any_event:
            rank = rank.fillna(len(events))
        chosen = df[rank.notna()].assign(_event_rank=rank[rank.notna()])
        best = chosen.groupby(PATNO)["_event_rank"].transform("min")
        chosen = chosen[chosen["_event_rank"] == best].drop(columns="_event_rank")
        if not any_event and len(events) > 1:
            first = chosen.groupby(PATNO)["EVENT_ID"].first()
            n_fb = int((first != events[0]).sum())
            if n_fb:
                dl.note(f"{shown}: {plural(n_fb, 'participant')} without a {events[0]} row: "
                        f"{'/'.join(events[1:])} row used")
    chosen = dl.numeric(key, chosen)
    if key == "updrs3":
        return pick_updrs3(dl, chosen)
    n_dup = int(chosen[PATNO].duplicated().sum())
    if n_dup:
        n_pat = int(chosen[PATNO][chosen[PATNO].duplicated()].nunique())
        dl.note(f"{shown}: {plural(n_pat, 'participant')} with several rows at the chosen "
                f"visit ({plural(n_dup, 'extra row')}): kept the latest LAST_UPDATE/REC_ID")
    return pick(chosen)


def pick_updrs3(dl: PpmiDownload, df: pd.DataFrame) -> pd.DataFrame:
    """Part III: untreated/OFF before ON (see the module doc), then the latest update."""
    shown = dl.shown("updrs3")
    state = (df["PDSTATE"].astype(object).fillna("").astype(str).str.strip().str.upper()
             if "PDSTATE" in df.columns else pd.Series("", index=df.index))
    pag = (df["PAG_NAME"].astype(object).fillna("").astype(str).str.strip().str.upper()
           if "PAG_NAME" in df.columns else pd.Series("", index=df.index))
    pd_pref = {s: i for i, s in enumerate(UPDRS3_PDSTATE_PREFERENCE)}
    pag_pref = {p: i for i, p in enumerate(UPDRS3_PAG_PREFERENCE)}
    is_on = (state == "ON") | (pag == "NUPDR3ON")
    work = df.assign(
        _on=is_on.astype(int),
        _state=state.map(pd_pref).fillna(pd_pref.get("OFF", 1)).astype(float),
        _pag=pag.map(pag_pref).fillna(len(pag_pref)).astype(float),
    )
    several = work[PATNO].duplicated(keep=False)
    chosen = pick(work, ["_on", "_state", "_pag"])
    if several.any():
        n = int(work.loc[several, PATNO].nunique())
        dl.note(f"{shown}: {plural(n, 'participant')} with several Part III rows at the "
                "chosen visit: chose by PDSTATE (untreated, OFF, never ON if another "
                "exists), then PAG_NAME, then latest update")
    n_on = int(chosen["_on"].sum())
    if n_on:
        dl.note(f"{shown}: {plural(n_on, 'participant')} with only an ON-state Part III "
                "row at baseline: that row used")
    return chosen.drop(columns=["_on", "_state", "_pag"])
