"""The files of a synthetic download: a `Simulation` rendered as PPMI-style text tables.

Layout (names from `ppmi_catalog.TABLES`; ``legacy`` naming uses each table's ``legacy_name``)::

    _Subject_Characteristics/  Participant_Status, Center-Subject_List, Demographics,
                               Age_at_visit (2023 naming only), Socio-Economics
    Motor___MDS-UPDRS/         MDS-UPDRS_Part_I, ..._Part_I_Patient_Questionnaire,
                               ..._Part_II_Patient_Questionnaire, MDS-UPDRS_Part_III,
                               MDS-UPDRS_Part_IV__Motor_Complications (not a catalog table)
    Non-motor_Assessments/     MoCA, UPSIT, Epworth, RBDSQ, SCOPA-AUT, GDS, STAI, HVLT-R, LNS,
                               semantic fluency, SDMT, Benton JLO
    Imaging/                   FS7_APARC_CTH, FS7_ASEG_VOL

Every file is ``<name>_<DDMonYYYY>.csv`` with the download date derived from the seed. Beside the
newest ``Participant_Status`` and ``MDS-UPDRS_Part_III`` lies an older dated copy with fewer
rows and some different values, so a reader must pick the newest. About 40 % of the files start with
a UTF-8 BOM and about 25 % end lines with CRLF. Missing values are empty fields; dates are
``MM/YYYY``; ``LAST_UPDATE`` is a timestamp ``YYYY-MM-DD HH:MM:SS.0``.

Conventions by naming:

* ``2023``: ``Participant_Status`` (``COHORT`` 1-4, ``COHORT_DEFINITION``, ``ENROLL_DATE``,
  ``ENROLL_AGE``, ``ENROLL_STATUS``), ``Demographics`` (``SEX`` 0 F / 1 M, ``CHLDBEAR``),
  ``Age_at_visit`` (SC, BL, V04), UPSIT ``TOTAL_CORRECT``.
* ``legacy``: ``Patient_Status`` (``ENROLL_CAT`` PD/HC/SWEDD/PRODROMA, no ``ENROLL_AGE``),
  ``Screening___Demographics`` (``GENDER`` 0/1 female, 2 male), no ``Age_at_visit`` (age =
  ``ENROLL_DATE`` − ``BIRTHDT``), Part III item ``PN3RIGRL`` (the old typo of ``NP3RIGRL``), UPSIT
  booklets only.

MDS-UPDRS totals ``NP1RTOT``, ``NP1PTOT``, ``NP2PTOT``, ``NP3TOT`` are shipped in both namings and
equal the sums of their items; a row with a blank item has a blank total. In Part III a 101 ("unable
to rate") item is excluded from ``NP3TOT`` (the total of the *rated* items, as PPMI computes it); a
reader must treat such a total as missing (the ground truth does).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from safn_core.data import ppmi_catalog as cat
from safn_core.synth.population import COHORT_CODE, COHORT_DEFINITION, LEGACY_ENROLL_CAT
from safn_core.synth.simulation import Simulation

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
BASE_DATE = dt.date(2023, 1, 16)
BOM = b"\xef\xbb\xbf"
BOM_FRACTION = 0.4
CRLF_FRACTION = 0.25
OLD_COPY_TABLES = ("status", "updrs3")
PART_IV = {"2023": "MDS-UPDRS_Part_IV__Motor_Complications", "legacy": "MDS_UPDRS_Part_IV"}
STRING_COLUMNS = {"EVENT_ID", "PAG_NAME", "PDSTATE", "COHORT_DEFINITION", "ENROLL_STATUS",
                  "ENROLL_CAT", "RECRUITMENT_CAT"}
MONTH_COLUMNS = {"INFODT", "ENROLL_DATE", "BIRTHDT"}


def date_suffix(d: dt.date) -> str:
    """``_DDMonYYYY`` suffix text (English month names, independent of the locale)."""
    return f"{d.day:02d}{MONTHS[d.month - 1]}{d.year}"


def _months_to_str(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.int64)
    return np.array([f"{x % 12 + 1:02d}/{x // 12}" for x in m], dtype=object)


def _fmt(values: pd.Series, decimals: int | None) -> np.ndarray:
    """Numbers as PPMI writes them: integers without ``.0``, fixed decimals where asked, blank
    for missing."""
    if not pd.api.types.is_numeric_dtype(values):
        v = values.astype(object)
        return np.where(pd.isna(v), "", v.astype(str)).astype(object)
    a = values.to_numpy(dtype=float)
    miss = np.isnan(a)
    if decimals is None:
        txt = np.where(miss, 0, a).astype(np.int64).astype(str).astype(object)
    else:
        txt = np.char.mod(f"%.{decimals}f", np.where(miss, 0.0, a)).astype(object)
    txt[miss] = ""
    return txt


@dataclass
class DownloadFile:
    """One CSV file of the download, as text columns; ``payload`` gives its bytes."""

    rel: str  # path relative to the download folder
    frame: pd.DataFrame  # every column as text
    patno: np.ndarray  # PATNO of each row (for per-site subsets)
    bom: bool = False
    crlf: bool = False

    def payload(self, keep: np.ndarray | None = None) -> bytes:
        frame = self.frame if keep is None else self.frame[keep]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n" if self.crlf else "\n")
        w.writerow(list(frame.columns))
        w.writerows(frame.itertuples(index=False, name=None))
        data = buf.getvalue().encode("utf-8")
        return BOM + data if self.bom else data


class _Renderer:
    """Turns the numeric tables of a `Simulation` into text tables with PPMI's bookkeeping."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.cfg = sim.cfg
        self.legacy = sim.cfg.naming == "legacy"
        self.date = BASE_DATE + dt.timedelta(days=sim.download_day)
        self.old_date = self.date - dt.timedelta(days=sim.old_copy_days)
        self.limit_month = self.date.year * 12 + self.date.month - 2  # updates end a month before
        self.old_limit_month = self.old_date.year * 12 + self.old_date.month - 2
        seed = int(sim.cfg.seed)
        seq = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, 0xF11E])
        self._seeds = iter(seq.spawn(64))
        self.P = sim.participants

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(next(self._seeds))

    # ---- formatting ------------------------------------------------------------------------

    def text(self, df: pd.DataFrame, decimals: dict[str, int] | None = None,
             default: int | None = None) -> pd.DataFrame:
        decimals = decimals or {}
        out = {}
        for c in df.columns:
            if c.startswith("_"):
                continue
            if c in MONTH_COLUMNS and pd.api.types.is_numeric_dtype(df[c]):
                v = df[c].to_numpy(dtype=float)
                txt = np.full(len(v), "", dtype=object)
                ok = ~np.isnan(v)
                txt[ok] = _months_to_str(v[ok])
                out[c] = txt
            elif c in STRING_COLUMNS or not pd.api.types.is_numeric_dtype(df[c]):
                out[c] = _fmt(df[c].astype(object), None)
            elif c == "PATNO":
                out[c] = df[c].to_numpy(dtype=np.int64).astype(str).astype(object)
            else:
                out[c] = _fmt(df[c], decimals.get(c, default))
        return pd.DataFrame(out, index=range(len(df)))

    def bookkeeping(self, df: pd.DataFrame, rng: np.random.Generator,
                    old: bool = False) -> pd.DataFrame:
        """Add REC_ID (front), ORIG_ENTRY and LAST_UPDATE (end) to a visit table (numeric);
        ``old``: an earlier download, updated no later than its date."""
        n = len(df)
        limit = self.old_limit_month if old else self.limit_month
        month = df["_month"].to_numpy(dtype=np.int64)
        df = df.copy()
        if "_rec" not in df.columns:
            df["_rec"] = rng.choice(np.arange(100000, 1000000), n, replace=False)
        orig = np.minimum(month + rng.integers(0, 2, n), limit)
        upd = np.minimum(month + rng.integers(0, 40, n), limit)
        upd = np.maximum(upd, orig)
        day = rng.integers(1, 29, n)
        hh, mm, ss = rng.integers(7, 19, n), rng.integers(0, 60, n), rng.integers(0, 60, n)
        stamps = [f"{u // 12}-{u % 12 + 1:02d}-{d:02d} {h:02d}:{m:02d}:{s:02d}.0"
                  for u, d, h, m, s in zip(upd, day, hh, mm, ss)]
        df["ORIG_ENTRY"] = _months_to_str(orig)
        df["LAST_UPDATE"] = np.array(stamps, dtype=object)
        df["REC_ID"] = df["_rec"]
        body = [c for c in df.columns if c not in ("REC_ID", "ORIG_ENTRY", "LAST_UPDATE")]
        return df[["REC_ID"] + body + ["ORIG_ENTRY", "LAST_UPDATE"]]

    def name(self, key: str) -> str:
        spec = cat.TABLES[key]
        return spec.legacy_name if self.legacy else spec.write_name

    def path(self, folder: str, name: str, date: dt.date) -> str:
        return f"{folder}/{name}_{date_suffix(date)}.csv"

    # ---- tables ------------------------------------------------------------------------------

    def status(self, P: pd.DataFrame) -> pd.DataFrame:
        coh = P["cohort"].to_numpy()
        if self.legacy:
            cat_ = np.array([LEGACY_ENROLL_CAT[c] for c in coh], dtype=object)
            df = pd.DataFrame({"PATNO": P["PATNO"], "RECRUITMENT_CAT": cat_,
                               "ENROLL_DATE": P["enroll_month"], "ENROLL_CAT": cat_,
                               "ENROLL_STATUS": P["ENROLL_STATUS"].astype(object)})
        else:
            df = pd.DataFrame({
                "PATNO": P["PATNO"], "COHORT": [float(COHORT_CODE[c]) for c in coh],
                "COHORT_DEFINITION": np.array([COHORT_DEFINITION[c] for c in coh], dtype=object),
                "ENROLL_DATE": P["enroll_month"],
                "ENROLL_AGE": np.round(P["age_months"].to_numpy() / 12.0, 1),
                "ENROLL_STATUS": P["ENROLL_STATUS"].astype(object)})
        return self.text(df, {"ENROLL_AGE": 1})

    def old_status(self, rng: np.random.Generator) -> pd.DataFrame:
        P = self.P
        keep = rng.random(len(P)) > 0.06  # participants added since
        old = P[keep].copy()
        changed = rng.random(len(old)) < 0.3
        old["ENROLL_STATUS"] = np.where(changed, "Enrolled", old["ENROLL_STATUS"].to_numpy())
        return self.status(old.reset_index(drop=True))

    def center(self) -> pd.DataFrame:
        sites = self.sim.sites
        df = pd.DataFrame({"PATNO": self.P["PATNO"],
                           "CNO": sites["CNO"].to_numpy()[self.P["site_idx"].to_numpy()]})
        return self.text(df)

    def demographics(self, rng: np.random.Generator) -> pd.DataFrame:
        P = self.P
        base = pd.DataFrame({"PATNO": P["PATNO"], "EVENT_ID": "SC", "PAG_NAME": "SCREEN",
                             "INFODT": P["sc_month"], "BIRTHDT": P["birth_month"]})
        male = P["male"].to_numpy()
        if self.legacy:
            chld = P["CHLDBEAR"].to_numpy()
            base["GENDER"] = np.where(male == 1, 2.0, np.where(chld == 1, 0.0, 1.0))
        else:
            base["SEX"] = male.astype(float)
            base["CHLDBEAR"] = P["CHLDBEAR"].to_numpy()
        base["HANDED"] = np.where(P["handed_missing"], np.nan, P["HANDED_raw"]).astype(float)
        for c in ("HISPLAT", "RAINDALS", "RAASIAN", "RABLACK", "RAHAWOPI", "RAWHITE", "RANOS"):
            base[c] = P[c].to_numpy(dtype=float)
        base["_month"] = P["sc_month"].to_numpy()
        return self.text(self.bookkeeping(base, rng))

    def age(self) -> pd.DataFrame:
        P = self.P
        parts = []
        for ev, col, sel in (("SC", "sc_month", np.ones(len(P), bool)),
                             ("BL", "enroll_month", np.ones(len(P), bool)),
                             ("V04", "fu_month", P["fu"].to_numpy())):
            months = (P[col] - P["birth_month"]).to_numpy()[sel]
            if ev == "BL":
                months = P["age_months"].to_numpy()[sel]
            parts.append(pd.DataFrame({"PATNO": P["PATNO"].to_numpy()[sel], "EVENT_ID": ev,
                                       "AGE_AT_VISIT": np.round(months / 12.0, 1),
                                       "_o": {"SC": 0, "BL": 1, "V04": 2}[ev]}))
        df = pd.concat(parts, ignore_index=True).sort_values(["PATNO", "_o"], kind="stable")
        return self.text(df.reset_index(drop=True), {"AGE_AT_VISIT": 1})

    def socio(self, rng: np.random.Generator) -> pd.DataFrame:
        P = self.P
        df = pd.DataFrame({"PATNO": P["PATNO"], "EVENT_ID": "SC", "PAG_NAME": "SOCIOECO",
                           "INFODT": P["sc_month"],
                           "EDUCYRS": np.where(P["edu_missing"], np.nan, P["EDUCYRS_raw"])})
        df["_month"] = P["sc_month"].to_numpy()
        return self.text(self.bookkeeping(df, rng))

    def visit(self, key: str, df: pd.DataFrame, rng: np.random.Generator,
              old: bool = False) -> pd.DataFrame:
        df = df.copy()
        if key == "updrs3" and self.legacy:
            df = df.rename(columns={"NP3RIGRL": "PN3RIGRL"})
        if key == "upsit" and self.legacy:
            df = df.drop(columns="TOTAL_CORRECT")
        return self.text(self.bookkeeping(df, rng, old))

    def old_updrs3(self, df: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
        """An earlier download of Part III: no V04 rows yet, some rows missing, and some values
        that were corrected since (items and NP3TOT changed together)."""
        old = df[(df["EVENT_ID"] != "V04") & (rng.random(len(df)) > 0.05)].copy()
        old = old.reset_index(drop=True)
        items = list(cat.NP3_ITEMS)
        for r in np.flatnonzero(rng.random(len(old)) < 0.12):
            c = items[rng.integers(len(items))]
            v = old.at[r, c]
            if v == cat.UNABLE_TO_RATE or np.isnan(v):
                continue
            new = v + 1 if v < 4 else v - 1
            old.at[r, c] = new
            old.at[r, "NP3TOT"] = old.at[r, "NP3TOT"] + (new - v)
        return old

    def part_iv(self, u3: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
        off = u3[u3["PDSTATE"] == "OFF"]
        n = len(off)
        df = pd.DataFrame({"PATNO": off["PATNO"].to_numpy(), "EVENT_ID": off["EVENT_ID"].to_numpy(),
                           "PAG_NAME": "NUPDRS4", "INFODT": off["_month"].to_numpy()})
        items = {"NP4WDYSK": 0.03, "NP4DYSKI": 0.03, "NP4OFF": 0.3, "NP4FLCTI": 0.15,
                 "NP4FLCTX": 0.08, "NP4DYSTN": 0.05}
        for c, p in items.items():
            df[c] = (rng.random(n) < p).astype(float)
        df["NP4TOT"] = df[list(items)].sum(axis=1)
        df["_month"] = off["_month"].to_numpy()
        return self.text(self.bookkeeping(df, rng))

    # ---- all files ---------------------------------------------------------------------------

    def files(self) -> list[DownloadFile]:
        sim = self.sim
        out: list[DownloadFile] = []
        old: list[DownloadFile] = []

        def add(key_or_name: str, folder: str, frame: pd.DataFrame, date=None, into=out):
            name = self.name(key_or_name) if key_or_name in cat.TABLES else key_or_name
            into.append(DownloadFile(self.path(folder, name, date or self.date), frame,
                              frame["PATNO"].astype(np.int64).to_numpy()))

        subj = cat.TABLES["status"].folder
        add("status", subj, self.status(self.P))
        add("status", subj, self.old_status(self.rng()), self.old_date, old)
        add("center", subj, self.center())
        add("demographics", subj, self.demographics(self.rng()))
        if not self.legacy:
            add("age", subj, self.age())
        add("socio", subj, self.socio(self.rng()))
        visit_keys = ("updrs1", "updrs1pq", "updrs2", "updrs3", "moca", "upsit", "ess", "rbdsq",
                      "scopa", "gds", "stai", "hvlt", "lns", "fluency", "sdmt", "benton")
        for key in visit_keys:
            df = sim.tables[key]
            rng = self.rng()
            if key == "updrs3":
                df = df.copy()
                df["_rec"] = rng.choice(np.arange(100000, 1000000), len(df), replace=False)
                add(key, cat.TABLES[key].folder, self.visit(key, df, rng))
                add(key, cat.TABLES[key].folder,
                    self.visit(key, self.old_updrs3(df, rng), rng, old=True), self.old_date, old)
                add(PART_IV[self.cfg.naming], cat.TABLES[key].folder,
                    self.part_iv(sim.tables[key], rng))
            else:
                add(key, cat.TABLES[key].folder, self.visit(key, df, rng))
        for key, decimals in (("cth", {"lh_MeanThickness": 5, "rh_MeanThickness": 5}),
                              ("aseg", {cat.ETIV: 6, "BrainSegVol_to_eTIV": 6,
                                        "MaskVol_to_eTIV": 6})):
            default = 3 if key == "cth" else 1
            add(key, cat.TABLES[key].folder, self.text(sim.tables[key], decimals, default))
        files = out + old
        rng = self.rng()
        n = len(files)
        bom = set(rng.permutation(n)[: max(1, math.ceil(BOM_FRACTION * n))].tolist())
        crlf = set(rng.permutation(n)[: max(1, math.ceil(CRLF_FRACTION * n))].tolist())
        for i, f in enumerate(files):
            f.bom, f.crlf = i in bom, i in crlf
        return sorted(files, key=lambda f: f.rel)


def render_files(sim: Simulation) -> list[DownloadFile]:
    """Every file of the download of ``sim`` (dated copies included), sorted by path."""
    return _Renderer(sim).files()
