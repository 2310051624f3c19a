"""A PPMI download folder being loaded: its tables, each read once, and the load report's notes.

`PpmiDownload` is what the steps of `ppmi_loader` share: the tables `ppmi_files` found under the
folder, each read (as text, PATNO cleaned, ``EVENT_ID`` upper-cased) the first time a step asks
for it, the numeric conversion of chosen rows with junk values counted, and the `LoadReport` every
decision is written to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.data.cohort import LoadReport
from safn_core.data.ppmi_catalog import TABLES
from safn_core.data.ppmi_files import (
    TableFile, display_path, find_tables, numeric_columns, read_table,
)
from safn_core.errors import DataError

PATNO = "PATNO"
IMAGING_TABLES = ("cth", "aseg")
_TEXT_COLUMNS = ("CNO", "SITE", "CENTER", "PDSTATE", "BIRTHDT", "ENROLL_DATE", "ENROLL_CAT",
                 "ENROLL_STATUS")  # codes and dates: kept as text


def norm_ids(s: pd.Series) -> pd.Series:
    """PATNO / CNO as clean strings: stripped, ``"3001.0"`` → ``"3001"``."""
    s = s.astype(object)
    out = s.where(s.isna(), s.astype(str).str.strip().str.replace(r"^(\d+)\.0*$", r"\1",
                                                                   regex=True))
    return out.where(out != "", np.nan)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class PpmiDownload:
    """The tables of one download folder and the report of loading it."""

    def __init__(self, root: Path):
        self.root = root
        self.report = LoadReport(source=str(root))
        self.found: dict[str, TableFile] = find_tables(root)
        self._raw: dict[str, pd.DataFrame] = {}

    def shown(self, key: str) -> str:
        return display_path(self.found[key].path, self.root)

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def read_keys(self) -> list[str]:
        """The tables read so far, in the order they were first read."""
        return list(self._raw)

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
        df[PATNO] = norm_ids(df[PATNO])
        blank = int(df[PATNO].isna().sum())
        if blank:
            self.note(f"{shown}: {plural(blank, 'row')} without PATNO ignored")
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

    def numeric(self, key: str, df: pd.DataFrame) -> pd.DataFrame:
        """Numeric conversion of a table's chosen rows, with junk values noted."""
        out, junk = numeric_columns(df, exclude=_TEXT_COLUMNS)
        for col, (n, example) in junk.items():
            self.note(f"{self.shown(key)}: column {col}: {plural(n, 'non-numeric value')} "
                      f"(e.g. {example!r}) read as missing")
        return out
