"""Finding and reading the CSV tables of a PPMI download folder.

A download is a folder tree of ``<Table_Name>_<DDMonYYYY>.csv`` files whose folder layout and
table names vary between users and releases (see ``docs/ppmi-data.md`` §1). This module

* finds every table of the catalog (`ppmi_catalog.TABLES`) anywhere under the folder, matching the
  file stem (minus its date suffix) by *name prefix*, ignoring case, ``-`` and ``_``; when several
  known names are prefixes of a stem, the longest one wins, so ``MDS_UPDRS_Part_I`` does not swallow
  ``MDS_UPDRS_Part_III`` or ``MDS_UPDRS_Part_I__Patient_Questionnaire``;
* picks the newest copy of a table by its parsed ``_DDMonYYYY`` date (a file without a date ranks
  oldest) and keeps the older copies' names for the load report;
* reads a table as UTF-8 text (with or without BOM), every column as strings, applies the catalog's
  `COLUMN_ALIASES`, and turns every read problem into a one-line `DataError` naming the file.

Numeric conversion is separate (`numeric_columns`), so that non-numeric junk in a numeric column is
counted and reported rather than silently lost or crashing the load.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.data.ppmi_catalog import COLUMN_ALIASES, DATE_SUFFIX, TABLES, normalise_name
from safn_core.errors import DataError

_DATE_SUFFIX = re.compile(DATE_SUFFIX.pattern, re.IGNORECASE)
_COPY_SUFFIX = re.compile(r"\s*\(\d+\)$")  # "Participant_Status_05Jan2024 (1).csv" (browser copy)
_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}

IGNORED_TABLE_NAMES = (
    "MDS_UPDRS_Part_IV", "MDS-UPDRS_Part_IV", "MDS_UPDRS_Part_III_ON_OFF_Determination",
    "MDS_UPDRS_Part_III__Post_Dose", "MDS-UPDRS_Part_III_Post_Dose",
)
"""Real PPMI tables whose names start with a catalog table's name but are other tables (Part IV
would otherwise prefix-match Part I; the ON/OFF dosing and post-dose tables would match Part III).
They are never read."""

KEY_COLUMNS = ("REC_ID", "PATNO", "EVENT_ID", "PAG_NAME", "INFODT", "ORIG_ENTRY", "LAST_UPDATE")
"""Bookkeeping columns: kept as strings, never converted to numbers."""

_TEXT_SAMPLE = 64 * 1024


@dataclass(frozen=True)
class TableFile:
    """The file chosen for one logical table, and the older copies that were ignored."""

    key: str
    path: Path
    date: dt.date | None
    ignored: tuple[Path, ...] = ()
    same_date: tuple[Path, ...] = field(default=())  # other copies with the very same date


def split_date_suffix(stem: str) -> tuple[str, dt.date | None]:
    """``"Participant_Status_05Jan2024"`` → ``("Participant_Status", date(2024, 1, 5))``.

    A stem without a valid ``_DDMonYYYY`` suffix is returned whole, with ``None`` as its date. A
    browser's `` (1)`` copy marker is dropped first.
    """
    stem = _COPY_SUFFIX.sub("", stem)
    m = _DATE_SUFFIX.search(stem)
    if not m:
        return stem, None
    day, mon, year = int(m.group(1)), _MONTHS.get(m.group(2).lower()), int(m.group(3))
    if mon is None:
        return stem, None
    try:
        date = dt.date(year, mon, day)
    except ValueError:  # 31Feb2024: not a date, so not a date suffix
        return stem, None
    return stem[: m.start()], date


def _known_names() -> list[tuple[str, str | None]]:
    """(normalised name, table key or None for an ignored table), longest name first."""
    names: list[tuple[str, str | None]] = []
    for spec in TABLES.values():
        for name in dict.fromkeys((*spec.names, spec.write_name, spec.legacy_name)):
            names.append((normalise_name(name), spec.key))
    names += [(normalise_name(n), None) for n in IGNORED_TABLE_NAMES]
    return sorted(names, key=lambda x: -len(x[0]))


_KNOWN = _known_names()


def match_table(stem: str) -> tuple[str | None, bool]:
    """The catalog key of a file stem (date suffix included or not), and whether it matched a
    known name exactly (rather than as a prefix). ``(None, False)`` when it is no catalog table."""
    name, _ = split_date_suffix(stem)
    norm = normalise_name(name)
    for known, key in _KNOWN:  # longest first: the longest matching known name wins
        if norm.startswith(known):
            return key, norm == known
    return None, False


def _csv_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden folders and macOS archive debris (__MACOSX/._X.csv are binary resource forks)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        out += [Path(dirpath) / f for f in sorted(filenames)
                if f.lower().endswith(".csv") and not f.startswith(".")]
    return out


def find_tables(root: Path) -> dict[str, TableFile]:
    """Every catalog table found under ``root`` (recursively): key → the newest copy.

    Ranking among the copies of one table: newest date suffix first (no date = oldest); at the same
    date a file whose name is exactly a known name beats a prefix match, then the shorter, then the
    alphabetically first path, so the choice never depends on the file system's listing order.
    """
    root = Path(root)
    candidates: dict[str, list[tuple[tuple, Path, dt.date | None]]] = {}
    for path in _csv_files(root):
        key, exact = match_table(path.stem)
        if key is None:
            continue
        _, date = split_date_suffix(path.stem)
        rank = (-(date or dt.date.min).toordinal(), not exact, len(str(path)), str(path))
        candidates.setdefault(key, []).append((rank, path, date))
    found = {}
    for key, cands in candidates.items():
        cands.sort(key=lambda c: c[0])
        _, best, date = cands[0]
        found[key] = TableFile(
            key, best, date,
            ignored=tuple(p for _, p, d in cands[1:] if d != date),
            same_date=tuple(p for _, p, d in cands[1:] if d == date),
        )
    return found


def display_path(path: Path, root: Path) -> str:
    """``path`` relative to the download folder where possible (for messages and the report)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def read_table(path: Path, *, root: Path | None = None, uppercase: bool = True) -> pd.DataFrame:
    """Read one PPMI CSV: UTF-8 (BOM or not), every column as stripped strings, empty = missing.

    Column names are stripped; with ``uppercase`` they are upper-cased (PPMI's clinical columns are
    upper case; FreeSurfer region columns are not, so imaging tables are read with
    ``uppercase=False`` and only their bookkeeping columns are upper-cased). `COLUMN_ALIASES` are
    applied. Any read problem is a `DataError` naming the file.
    """
    path = Path(path)
    shown = display_path(path, root) if root is not None else str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_TEXT_SAMPLE)
    except OSError as e:
        raise DataError(f"{shown}: cannot read the file ({e.strerror or e}); check that it exists "
                        "and is readable") from None
    if b"\x00" in head:
        raise DataError(f"{shown}: is not a UTF-8 CSV text file (it contains NUL bytes: binary, "
                        "or UTF-16 text); re-download the table or export it as UTF-8 CSV")
    try:
        df = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skipinitialspace=False,
                         keep_default_na=False, na_values=[""])
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: is not UTF-8 text (undecodable byte at position {e.start}); "
                        "re-download the table or export it as UTF-8 CSV") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{shown}: the file is empty (no header line); re-download the table") \
            from None
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        detail = " ".join(str(e).split())
        raise DataError(f"{shown}: malformed CSV ({detail}); re-download the table or repair "
                        "the file") from None
    except OSError as e:
        raise DataError(f"{shown}: cannot read the file ({e.strerror or e})") from None

    cols = [str(c).strip() for c in df.columns]
    if uppercase:
        cols = [c.upper() for c in cols]
    else:
        cols = [c.upper() if c.upper() in KEY_COLUMNS else c for c in cols]
    df.columns = cols
    if df.columns.duplicated().any():
        dup = sorted(set(df.columns[df.columns.duplicated()]))
        raise DataError(f"{shown}: duplicate column name(s) {', '.join(dup)}; each column must "
                        "appear once")
    for old, new in COLUMN_ALIASES.items():
        if old in df.columns:
            if new in df.columns:
                df[new] = df[new].fillna(df[old])
                df = df.drop(columns=[old])
            else:
                df = df.rename(columns={old: new})
    # stripped strings, blank = missing; done on one object array (column-wise pandas is slow)
    arr = df.to_numpy(dtype=object)
    clean = [(v.strip() or np.nan) if isinstance(v, str) else np.nan for v in arr.ravel()]
    arr = np.array(clean, dtype=object).reshape(arr.shape)
    return pd.DataFrame({c: arr[:, i] for i, c in enumerate(df.columns)}, index=df.index,
                        dtype=object)


def numeric_columns(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> tuple[pd.DataFrame,
                                                                             dict[str, tuple]]:
    """Convert every column (but the bookkeeping ones and ``exclude``) to float where it is numeric.

    A column is *numeric* when at least half of its non-missing values parse as numbers; its other
    non-missing values are junk, read as missing and returned as ``{column: (count, example)}``.
    Other columns (free text, dates, codes such as ``PDSTATE``) are left as strings.
    """
    cols: dict = {}
    junk: dict[str, tuple] = {}
    skip = set(KEY_COLUMNS) | set(exclude)
    for c in df.columns:
        raw = df[c].to_numpy(dtype=object)
        cols[c] = raw
        if c in skip:
            continue
        num = np.asarray(pd.to_numeric(raw, errors="coerce"), dtype="float64")
        num[~np.isfinite(num)] = np.nan  # "inf" is junk too
        given = ~pd.isna(raw)
        bad = given & np.isnan(num)
        n_ok = int((~np.isnan(num)).sum())
        if n_ok and n_ok >= int(bad.sum()):
            if bad.any():
                junk[c] = (int(bad.sum()), str(raw[bad][0]))
            cols[c] = num
    return pd.DataFrame(cols, index=df.index), junk
