"""Load a real PPMI download folder into a `Cohort`: one row per PD/HC participant at baseline.

The folder is the user's own PPMI download (tables as ``<Table>_<DDMonYYYY>.csv``, any folder
layout, older or 2023+ names; see ``docs/ppmi-data.md``). Every table name, column spelling,
item list and scoring rule comes from `ppmi_catalog`; finding and reading files is `ppmi_files`.

Rules (each decision is also written to the `LoadReport`):

* **Participants and label.** ``Participant_Status.COHORT`` (1 PD, 2 HC, 3 SWEDD, 4 Prodromal)
  or the older ``Patient_Status.ENROLL_CAT`` strings; PD → label 1, HC → label 0, every other
  cohort (and a missing/unknown one) is excluded and counted as ``"cohort <name>"``. Participants
  whose ``ENROLL_STATUS`` says screen-failed, declined or excluded are excluded too
  (``"enrolment status <value>"``).
* **Baseline row, per table.** The BL row, else the SC row (MoCA: SC, else BL). A table without
  ``EVENT_ID`` is taken as one row per participant. Tables with no visit (demographics,
  socio-economics, centre list) prefer BL, then SC, then any row.
* **Duplicates.** Several rows of one participant at the chosen visit: the latest ``LAST_UPDATE``
  (``MM/YYYY`` or a timestamp; unparsable = oldest), then the highest ``REC_ID``, then the last row
  of the file — deterministic, and noted. MDS-UPDRS III is chosen first by state: never an ON row
  (``PDSTATE`` ON or ``PAG_NAME`` NUPDR3ON) if another exists; blank ``PDSTATE`` (untreated) before
  OFF; then ``PAG_NAME`` by `UPDRS3_PAG_PREFERENCE`.
* **101 ("unable to rate")** in MDS-UPDRS III items and ``NHY`` is missing. ``NP3TOT``: the shipped
  total is kept when no item of the row is 101; when any item is 101 the total is recomputed from
  the items, which makes it missing (a partial sum is not a Part III total). Without a shipped
  total it is the item sum (missing when any item is missing).
* **Numbers.** Everything is read as text; a column is converted to numbers where most of its values
  are numbers, and the other values (junk) become missing, counted per file and column in the notes.
* **Age.** ``Age_at_visit.AGE_AT_VISIT`` at BL/SC, else ``ENROLL_AGE``, else ``ENROLL_DATE`` −
  ``BIRTHDT`` (``MM/YYYY``; a bare year counts as mid-year). **Sex** 1 = male from ``SEX`` (0 F,
  1 M) or the older ``GENDER`` (0/1 female, 2 male). **Handedness** 1 R, 2 L, 3 mixed as the
  one-hot ``HANDED_LEFT``/``HANDED_MIXED`` (right = 0, 0).
* **Modalities.** A participant has a modality when any of its features is non-missing. With
  ``require_all_modalities`` a participant missing one is dropped, counted under the first missing
  modality (``"missing modality thickness"``), so that the per-reason counts add up; without it, a
  participant with no feature at all is still dropped (``"no feature data"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.data.cohort import ID, LABEL, SITE, Cohort, LoadReport
from safn_core.data.ppmi_catalog import (
    BASELINE_EVENTS, CLINICAL_FEATURES, COHORT_CODES, DEMOGRAPHIC_FEATURES, ETIV, LABELS,
    LEGACY_COHORT_LABELS, NP3_ITEMS, TABLES, UNABLE_TO_RATE, UPDRS3_PAG_PREFERENCE,
    UPDRS3_PDSTATE_PREFERENCE, VOLUME_REGIONS, is_forbidden_feature, ppmi_modalities,
    thickness_spellings, volume_spellings,
)
from safn_core.data.ppmi_files import (
    TableFile, display_path, find_tables, numeric_columns, read_table,
)
from safn_core.errors import DataError

PATNO = "PATNO"
IMAGING_TABLES = ("cth", "aseg")
STATIC_EVENTS = ("BL", "SC")  # preferred rows of tables without visits; any other row after them
_TEXT_COLUMNS = ("CNO", "SITE", "CENTER", "PDSTATE", "BIRTHDT", "ENROLL_DATE", "ENROLL_CAT",
                 "ENROLL_STATUS")  # codes and dates: kept as text
_EXCLUDED_ENROLL_STATUS = re.compile(r"screen|declin|exclud", re.IGNORECASE)


def load_ppmi(path, *, exclude_motor: bool = False, require_all_modalities: bool = True,
              normalise_volumes_by_etiv: bool = False) -> Cohort:
    """Read a PPMI download folder into a baseline PD-vs-HC `Cohort` (see the module doc).

    ``exclude_motor`` drops MDS-UPDRS I-III totals and H&Y; ``require_all_modalities`` keeps only
    participants with every modality; ``normalise_volumes_by_etiv`` divides the aseg volumes (not
    eTIV itself) by eTIV. Raises `DataError` for a missing folder, missing tables or unreadable
    files.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"PPMI folder {root} does not exist; set data.path to the folder of your "
                        "PPMI download")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; data.path must be the folder that holds "
                        "the PPMI CSV tables")
    return _Loader(root, exclude_motor, require_all_modalities,
                   normalise_volumes_by_etiv).load()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _norm_ids(s: pd.Series) -> pd.Series:
    """PATNO / CNO as clean strings: stripped, ``"3001.0"`` → ``"3001"``."""
    s = s.astype(object)
    out = s.where(s.isna(), s.astype(str).str.strip().str.replace(r"^(\d+)\.0*$", r"\1",
                                                                   regex=True))
    return out.where(out != "", np.nan)


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


def _pick(df: pd.DataFrame, prefer: list[str] | None = None) -> pd.DataFrame:
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------


class _Loader:
    def __init__(self, root: Path, exclude_motor: bool, require_all: bool, norm_etiv: bool):
        self.root = root
        self.exclude_motor = exclude_motor
        self.require_all = require_all
        self.norm_etiv = norm_etiv
        self.report = LoadReport(source=str(root))
        self.found: dict[str, TableFile] = find_tables(root)
        self.modalities = ppmi_modalities(exclude_motor)
        self._raw: dict[str, pd.DataFrame] = {}

    # ---- files -------------------------------------------------------------------------------

    def shown(self, key: str) -> str:
        return display_path(self.found[key].path, self.root)

    def raw(self, key: str) -> pd.DataFrame | None:
        """The chosen file of a table, read as strings, with a clean PATNO; None when absent."""
        if key not in self.found:
            return None
        if key in self._raw:
            return self._raw[key]
        tf = self.found[key]
        shown = self.shown(key)
        df = read_table(tf.path, root=self.root, uppercase=key not in IMAGING_TABLES)
        if PATNO not in df.columns:
            cols = ", ".join(map(str, df.columns[:8])) + (" …" if df.shape[1] > 8 else "")
            raise DataError(f"{shown}: has no PATNO column (columns: {cols}); every PPMI table "
                            "identifies participants by PATNO")
        df[PATNO] = _norm_ids(df[PATNO])
        blank = int(df[PATNO].isna().sum())
        if blank:
            self.note(f"{shown}: {_plural(blank, 'row')} without PATNO ignored")
            df = df[df[PATNO].notna()]
        if "EVENT_ID" in df.columns:
            ev = df["EVENT_ID"].astype(object)
            df["EVENT_ID"] = ev.where(ev.isna(), ev.astype(str).str.strip().str.upper())
        self.report.tables[key] = shown
        if tf.ignored:
            self.note(f"{TABLES[key].names[-1]}: used {shown}; ignored older "
                      f"cop{'y' if len(tf.ignored) == 1 else 'ies'} "
                      + ", ".join(display_path(p, self.root) for p in tf.ignored))
        if tf.same_date:
            self.note(f"{TABLES[key].names[-1]}: used {shown}; ignored other file(s) of the same "
                      "date " + ", ".join(display_path(p, self.root) for p in tf.same_date))
        self._raw[key] = df
        return df

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def numeric(self, key: str, df: pd.DataFrame) -> pd.DataFrame:
        """Numeric conversion of a table's chosen rows, with junk values noted."""
        out, junk = numeric_columns(df, exclude=_TEXT_COLUMNS)
        for col, (n, example) in junk.items():
            self.note(f"{self.shown(key)}: column {col}: {_plural(n, 'non-numeric value')} "
                      f"(e.g. {example!r}) read as missing")
        return out

    # ---- row choice --------------------------------------------------------------------------

    def baseline(self, key: str, events: tuple[str, ...] = BASELINE_EVENTS, *,
                 any_event: bool = False) -> pd.DataFrame | None:
        """One row per participant at the first available event of ``events`` (numeric columns
        converted), indexed by PATNO; with ``any_event`` other events come after them."""
        df = self.raw(key)
        if df is None:
            return None
        shown = self.shown(key)
        if "EVENT_ID" not in df.columns:
            if not any_event:
                self.note(f"{shown}: no EVENT_ID column; each participant's row taken as baseline")
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
                    self.note(f"{shown}: {_plural(n_fb, 'participant')} without a {events[0]} row: "
                              f"{'/'.join(events[1:])} row used")
        chosen = self.numeric(key, chosen)
        if key == "updrs3":
            return self._pick_updrs3(chosen)
        n_dup = int(chosen[PATNO].duplicated().sum())
        if n_dup:
            n_pat = int(chosen[PATNO][chosen[PATNO].duplicated()].nunique())
            self.note(f"{shown}: {_plural(n_pat, 'participant')} with several rows at the chosen "
                      f"visit ({_plural(n_dup, 'extra row')}): kept the latest LAST_UPDATE/REC_ID")
        return _pick(chosen)

    def _pick_updrs3(self, df: pd.DataFrame) -> pd.DataFrame:
        """Part III: untreated/OFF before ON (see the module doc), then the latest update."""
        shown = self.shown("updrs3")
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
        chosen = _pick(work, ["_on", "_state", "_pag"])
        if several.any():
            n = int(work.loc[several, PATNO].nunique())
            self.note(f"{shown}: {_plural(n, 'participant')} with several Part III rows at the "
                      "chosen visit: chose by PDSTATE (untreated, OFF, never ON if another "
                      "exists), then PAG_NAME, then latest update")
        n_on = int(chosen["_on"].sum())
        if n_on:
            self.note(f"{shown}: {_plural(n_on, 'participant')} with only an ON-state Part III "
                      "row at baseline: that row used")
        return chosen.drop(columns=["_on", "_state", "_pag"])

    # ---- participants ------------------------------------------------------------------------

    def status(self) -> pd.DataFrame:
        """The status table, one row per participant, with ``cohort`` and ``label`` columns."""
        if "status" not in self.found:
            names = " or ".join(TABLES["status"].names)
            raise DataError(f"no participant status table under {self.root}: searched all "
                            f"subfolders for {names}_<DDMonYYYY>.csv (any case, '-'/'_' ignored); "
                            "point data.path at the complete PPMI download folder")
        df = self.raw("status")
        shown = self.shown("status")
        if df.empty:
            raise DataError(f"{shown}: the status table has no participant rows; re-download it")
        n_dup = int(df[PATNO].duplicated().sum())
        st = _pick(df)
        if n_dup:
            self.note(f"{shown}: {_plural(n_dup, 'duplicate row')}: kept the latest "
                      "LAST_UPDATE/REC_ID per participant")
        if "COHORT" in st.columns:
            code = pd.to_numeric(st["COHORT"], errors="coerce")
            cohort = code.map(lambda c: COHORT_CODES.get(int(c), f"unknown ({int(c)})")
                              if pd.notna(c) and float(c).is_integer() else np.nan)
            junk = st["COHORT"].notna() & code.isna()
            if junk.any():
                self.note(f"{shown}: column COHORT: {_plural(int(junk.sum()), 'non-numeric value')}"
                          f" (e.g. {st['COHORT'][junk].iloc[0]!r}) read as missing")
            if "ENROLL_CAT" in st.columns:  # both present: COHORT first, ENROLL_CAT fills gaps
                cohort = cohort.fillna(self._legacy_cohort(st["ENROLL_CAT"]))
        elif "ENROLL_CAT" in st.columns:
            cohort = self._legacy_cohort(st["ENROLL_CAT"])
        else:
            raise DataError(f"{shown}: has neither a COHORT nor an ENROLL_CAT column; the label "
                            "(PD or HC) comes from one of them")
        st["cohort"] = cohort.fillna("missing")
        st["label"] = st["cohort"].map(LABELS)
        return st

    @staticmethod
    def _legacy_cohort(s: pd.Series) -> pd.Series:
        text = s.astype(object).where(s.notna(), "").astype(str).str.strip().str.upper()
        return text.map(lambda t: LEGACY_COHORT_LABELS.get(t, t) if t else np.nan)

    def sites(self, ids: pd.Index, status: pd.DataFrame) -> pd.Series:
        site = pd.Series(np.nan, index=ids, dtype=object)
        center = self.baseline("center", STATIC_EVENTS, any_event=True) \
            if "center" in self.found else None
        for src, name in ((center, "center"), (status, "status")):
            if src is None:
                continue
            col = next((c for c in ("CNO", "SITE", "CENTER") if c in src.columns), None)
            if col is None:
                if name == "center":
                    self.note(f"{self.shown('center')}: no CNO column; site not read from it")
                continue
            site = site.fillna(_norm_ids(src[col].astype(object)).reindex(ids))
        n_missing = int(site.isna().sum())
        if n_missing:
            self.note(f"site unknown for {_plural(n_missing, 'participant')}")
        return site

    # ---- modalities --------------------------------------------------------------------------

    def clinical(self, ids: pd.Index, names: tuple[str, ...]) -> pd.DataFrame:
        out = pd.DataFrame(index=ids)
        groups: dict[tuple[str, tuple[str, ...]], list] = {}
        for f in CLINICAL_FEATURES:
            if f.name in names:
                groups.setdefault((f.table, f.events), []).append(f)
        for (table, events), feats in groups.items():
            rows = self.baseline(table, events)
            if rows is None:
                self.note(f"table {TABLES[table].names[-1]} not found: "
                          f"{', '.join(f.name for f in feats)} missing for everyone")
                for f in feats:
                    out[f.name] = np.nan
                continue
            if table == "updrs3":
                rows = self._updrs3_unable_to_rate(rows)
            for f in feats:
                out[f.name] = pd.to_numeric(f.score(rows), errors="coerce").reindex(ids)
        return out[[n for n in names]]

    def _updrs3_unable_to_rate(self, rows: pd.DataFrame) -> pd.DataFrame:
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
            self.note(f"{self.shown('updrs3')}: code 101 (unable to rate) read as missing: "
                      f"{_plural(n_items, 'Part III item')} in {_plural(int(any101.sum()), 'row')} "
                      f"(NP3TOT of those rows missing), {n_nhy} NHY")
        return rows

    def imaging(self, key: str, ids: pd.Index, features: tuple[str, ...], spellings,
                what: str) -> pd.DataFrame:
        rows = self.baseline(key)
        out = pd.DataFrame(np.nan, index=ids, columns=list(features))
        if rows is None:
            self.note(f"table {TABLES[key].names[-1]} not found: {what} missing for everyone")
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
            raise DataError(f"{self.shown(key)}: none of the {len(features)} {what} columns found "
                            f"(expected e.g. {', '.join(spellings(features[0]))}); is this a "
                            "FreeSurfer table of PPMI?")
        if missing:
            self.note(f"{self.shown(key)}: {_plural(len(missing), 'column')} not found, missing "
                      f"for everyone: {', '.join(missing)}")
        return out

    def demographics(self, ids: pd.Index, status: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(np.nan, index=ids, columns=list(DEMOGRAPHIC_FEATURES))
        demo = self.baseline("demographics", STATIC_EVENTS, any_event=True)
        socio = self.baseline("socio", STATIC_EVENTS, any_event=True)
        agev = self.baseline("age")

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
                self.note(f"AGE from ENROLL_DATE - BIRTHDT for {_plural(n_dates, 'participant')}")
        if n_enrol:
            self.note(f"AGE from ENROLL_AGE for {_plural(n_enrol, 'participant')}")
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

    # ---- assembly ----------------------------------------------------------------------------

    def _check_tables(self) -> None:
        needed = set()
        for m in self.modalities:
            if m.name == "thickness":
                needed.add("cth")
            elif m.name == "volume":
                needed.add("aseg")
            elif m.name == "clinical":
                needed |= {f.table for f in CLINICAL_FEATURES if f.name in m.features}
            elif m.name == "demographics":
                needed |= {"demographics", "age", "socio"}
        if not needed & set(self.found):
            names = sorted({n for k in needed for n in TABLES[k].names})
            raise DataError(f"no feature table found under {self.root} (searched all subfolders "
                            f"for <Table>_<DDMonYYYY>.csv named {', '.join(names)}); point "
                            "data.path at the complete PPMI download folder")

    def load(self) -> Cohort:
        report = self.report
        status = self.status()
        self._check_tables()

        report.cohorts = {str(k): int(v) for k, v in status["cohort"].value_counts().items()}
        excluded: dict[str, int] = {}
        not_pdhc = status["label"].isna()
        for name, n in status.loc[not_pdhc, "cohort"].value_counts().items():
            excluded[f"cohort {name}"] = int(n)
        keep = status[~not_pdhc]
        if "ENROLL_STATUS" in keep.columns:
            es = keep["ENROLL_STATUS"].astype(object).fillna("").astype(str)
            bad = es.str.contains(_EXCLUDED_ENROLL_STATUS)
            for name, n in es[bad].value_counts().items():
                excluded[f"enrolment status {name}"] = int(n)
            keep = keep[~bad]
        ids = pd.Index(sorted(keep.index, key=lambda s: (len(s), s)), name=ID)

        parts = []
        for m in self.modalities:
            if m.name == "thickness":
                parts.append(self.imaging("cth", ids, m.features, thickness_spellings,
                                          "cortical thickness"))
            elif m.name == "volume":
                vol = self.imaging("aseg", ids, m.features, volume_spellings, "aseg volume")
                if self.norm_etiv and ETIV in vol.columns:
                    etiv = vol[ETIV].where(vol[ETIV] > 0)
                    regions = [c for c in VOLUME_REGIONS if c in vol.columns]
                    vol[regions] = vol[regions].div(etiv, axis=0)
                    self.note("volumes divided by eTIV (EstimatedTotalIntraCranialVol kept as is)")
                parts.append(vol)
            elif m.name == "clinical":
                parts.append(self.clinical(ids, m.features))
            elif m.name == "demographics":
                parts.append(self.demographics(ids, status))
            else:  # pragma: no cover - the catalog defines exactly these four
                raise RuntimeError(f"bug: unknown PPMI modality {m.name!r}")
        features = pd.concat(parts, axis=1)
        names = [f for m in self.modalities for f in m.features]
        bad = [f for f in names if is_forbidden_feature(f)]
        if bad or list(features.columns) != names:
            raise RuntimeError(f"bug in safn: leakage guard — feature list {bad or 'mismatch'}")
        features = features[names].astype("float64")

        present = pd.DataFrame({m.name: features[list(m.features)].notna().any(axis=1)
                                for m in self.modalities}, index=ids)
        missing_counts = {m: int((~present[m]).sum()) for m in present.columns}
        if any(missing_counts.values()):
            self.note("PD/HC participants missing each modality: "
                      + ", ".join(f"{m} {n}" for m, n in missing_counts.items()))
        none = ~present.any(axis=1)
        drop = none.copy()
        if none.any():
            excluded["no feature data"] = int(none.sum())
        if self.require_all:
            for m in present.columns:
                miss = ~present[m] & ~drop
                if miss.any():
                    excluded[f"missing modality {m}"] = int(miss.sum())
                drop |= miss
        kept = ids[~drop.to_numpy()]

        table = pd.DataFrame(index=kept)
        table[SITE] = self.sites(kept, status)
        table[LABEL] = keep["label"].reindex(kept).astype("int64")
        table = pd.concat([table, features.loc[kept]], axis=1)
        table.index.name = ID

        all_ids = set()
        for key in self._raw:
            if key != "status":
                all_ids |= set(self._raw[key][PATNO].dropna())
        orphans = len(all_ids - set(status.index))
        if orphans:
            self.note(f"{_plural(orphans, 'participant')} in feature tables without a status row: "
                      "ignored")

        report.excluded = excluded
        report.missing_rate = {f: float(table[f].isna().mean()) if len(table) else 1.0
                               for f in names}
        report.modality_present = {m: int(present.loc[kept, m].sum()) for m in present.columns}
        if len(table) == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in excluded.items()) or "none"
            raise DataError(f"{self.root}: no PD or HC participant left after exclusions "
                            f"({reasons}); check the download, or set "
                            "data.require_all_modalities: false")
        for lab, name in ((1, "PD"), (0, "HC")):
            if not (table[LABEL] == lab).any():
                self.note(f"no {name} participant in the cohort")
        return Cohort(table, self.modalities, report, label_names=("HC", "PD"))
