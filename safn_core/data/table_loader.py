"""Any heterogeneous tabular cohort: a CSV or Parquet table plus a YAML column mapping.

SAFN is a model of named groups of columns, so a table with one row per participant can be used
directly. The mapping names the participant id column, the label column and its positive value,
an optional site column, and the modalities as lists of column names or glob patterns::

    id: subject
    site: centre                    # optional
    label: {column: diagnosis, positive: PD, negative: HC}
    modalities:
      imaging:  {side: imaging,  columns: ["ct_*", "vol_*"]}
      clinical: {side: clinical, columns: [updrs3, moca]}
    ranges: {moca: [0, 30]}         # optional plausible ranges for the data contract
    categorical:                    # optional: text columns with their declared categories
      apoe: [E2E2, E2E3, E2E4, E3E3, E3E4, E4E4]

Rows whose label is neither value are excluded and counted in the load report, as PPMI's other
cohorts are. Instead of ``positive``/``negative`` the label may declare K values, in class order
(label k = ``values[k]``)::

    label: {column: stage, values: [HC, early, late], ordered: true,
            names: [healthy, early PD, late PD],  # optional display names
            defined_by: [hy]}                      # optional: columns the label is derived from

Rows with any other value are excluded and counted. A column in ``defined_by`` can never be a
feature (label leakage: an error naming it). The cohort's `Target` is named ``label``; its
classes are ``names`` (or the values as text; binary: negative, positive).

A categorical column (listed in a modality like any other) becomes one indicator feature per
declared category, ``apoe=E3E4`` (1 where the participant has that category, else 0; NaN in every
indicator where the cell is missing), in the declared order. The categories are declared, not
discovered, so every site that loads its table with the same mapping encodes it identically, also
a site that never sees some category; a value outside the declared list is an error naming the
column, the file line and the value. The baselines see the indicators (one-hot); in SAFN the
modality encoder's first layer maps each indicator to a learned vector, i.e. an embedding of the
category (`safn_core.model.safn`). `Cohort.categories` keeps the declaration.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safn_core.data.cohort import ID, LABEL, SITE, Cohort, LoadReport, Modality
from safn_core.errors import DataError
from safn_core.targets import Target, check_inputs

MISSING_TOKENS = {"", "na", "nan", "n/a", "null", "none", "."}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelMapping(_Strict):
    column: str
    positive: str | int | float | bool | None = None
    negative: str | int | float | bool | None = Field(
        None, description="the negative class value; absent = every other non-empty value")
    values: list[str | int | float | bool] | None = Field(
        None, description="K label values in class order (instead of positive/negative)")
    ordered: bool = Field(False, description="the values are ordered (an ordinal target)")
    names: tuple[str, ...] | None = Field(
        None, description="display names of (negative, positive), or of each of ``values``")
    defined_by: list[str] = Field(default_factory=list,
                                  description="columns the label is derived from: never inputs")

    @model_validator(mode="after")
    def _one_kind(self) -> "LabelMapping":
        if (self.positive is None) == (self.values is None):
            raise ValueError("give either 'positive' (and optionally 'negative') or 'values' "
                             "(K label values in class order)")
        if self.values is not None:
            if self.negative is not None:
                raise ValueError("'negative' belongs to a positive/negative label; with "
                                 "'values' list every class there")
            names = [category_name(v) for v in self.values]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError(f"'values' needs at least two distinct values, got {names}")
        k = 2 if self.values is None else len(self.values)
        if self.names is not None and len(self.names) != k:
            raise ValueError(f"'names' needs {k} display names (one per class), got "
                             f"{len(self.names)}")
        return self

    def target(self) -> Target:
        """The `Target` of this label: named ``label``, classes = names, else the values."""
        if self.values is not None:
            classes = self.names or tuple(category_name(v) for v in self.values)
        else:
            classes = self.names or (
                str(self.negative) if self.negative is not None else "negative",
                str(self.positive))
        return Target("label", tuple(classes), self.ordered, tuple(self.defined_by))


class ModalityMapping(_Strict):
    side: Literal["imaging", "clinical"] = "clinical"
    columns: list[str] = Field(min_length=1)


class TableMapping(_Strict):
    id: str
    label: LabelMapping
    site: str | None = None
    modalities: dict[str, ModalityMapping] = Field(min_length=1)
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    categorical: dict[str, list[str | int | float | bool]] = Field(
        default_factory=dict, description="column -> its declared categories, in order")

    @field_validator("categorical")
    @classmethod
    def _categories(cls, v: dict) -> dict:
        for column, cats in v.items():
            names = [category_name(c) for c in cats]
            if len(names) < 2:
                raise ValueError(f"column '{column}' needs at least two declared categories")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"column '{column}' declares {dup} more than once")
            if any(n.lower() in MISSING_TOKENS for n in names):
                raise ValueError(f"column '{column}': a missing-value token "
                                 f"({', '.join(repr(t) for t in sorted(MISSING_TOKENS))}) cannot "
                                 f"be a category; missing cells stay missing")
        return v

    @field_validator("modalities")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not str(name).strip():
                raise ValueError("a modality needs a non-empty name")
        return v


def read_mapping(path: Path) -> TableMapping:
    """Read and validate a mapping YAML; errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mapping file not found; write a YAML mapping (see docs/data.md)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}: mapping is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: mapping must be a YAML mapping with keys id, label, modalities")
    try:
        return TableMapping.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(f"unknown key '{key}'")
            elif err["type"] == "missing":
                parts.append(f"missing required key '{key}'")
            else:
                parts.append(f"'{key}': {err['msg']}")
        raise DataError(f"{path}: " + "; ".join(parts)) from None


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (UTF-8, BOM allowed) or Parquet table with every column as text or native."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: table not found; point data.path / --data at a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                               encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; export the table as UTF-8 CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be read as a table ({first})") from None
    raise DataError(f"{path}: unsupported table format '{suffix}'; use .csv, .tsv or .parquet")


def _resolve_columns(patterns: list[str], columns: list[str], where: str, path: Path) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = [c for c in columns if fnmatch.fnmatchcase(c, pat)]
            if not hits:
                raise DataError(f"{path}: pattern '{pat}' of {where} matches no column")
        else:
            if pat not in columns:
                raise DataError(f"{path}: column '{pat}' of {where} is not in the table "
                                f"(columns are: {', '.join(columns[:12])}{' …' if len(columns) > 12 else ''})")
            hits = [pat]
        out.extend(h for h in hits if h not in out)
    return out


def _is_missing(values: pd.Series) -> pd.Series:
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        return values.isna() | values.astype(str).str.strip().str.lower().isin(MISSING_TOKENS)
    return values.isna()


def _to_numeric(values: pd.Series, column: str, path: Path, line_numbers: pd.Series) -> pd.Series:
    """Numbers, with empty/NA tokens as missing; any other text is an error naming the rows."""
    if pd.api.types.is_bool_dtype(values):
        return values.astype(float)
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(float)
    missing = _is_missing(values)
    numbers = pd.to_numeric(values.where(~missing), errors="coerce")
    bad = numbers.isna() & ~missing
    if bad.any():
        rows = line_numbers[bad].tolist()
        examples = values[bad].astype(str).head(3).tolist()
        raise DataError(
            f"{path}: column '{column}' must be numeric but has text in {int(bad.sum())} row(s) "
            f"(file lines {', '.join(map(str, rows[:8]))}{' …' if len(rows) > 8 else ''}; "
            f"e.g. {examples}); encode it as numbers, leave the cell empty for missing, or, if "
            f"it is categorical, declare its categories under mapping key 'categorical.{column}'")
    return numbers.astype(float)


def category_name(value) -> str:
    """The text of a category as declared or as found in a cell (``34.0`` reads as ``34``)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def indicator(column: str, category: str) -> str:
    """The feature name of one category's indicator column."""
    return f"{column}={category}"


def _one_hot(values: pd.Series, column: str, categories: list[str], path: Path,
             line_numbers: pd.Series) -> dict[str, np.ndarray]:
    """One float indicator per declared category; NaN in all of them where the cell is missing."""
    missing = _is_missing(values)
    text = values.map(category_name).where(~missing)
    bad = ~missing & ~text.isin(categories)
    if bad.any():
        rows = line_numbers[bad].tolist()
        found = sorted(text[bad].unique())
        raise DataError(
            f"{path}: column '{column}' has value {found[0]!r} in file line {rows[0]}"
            f"{f' ({int(bad.sum())} rows, values {found[:6]})' if len(rows) > 1 else ''}, not "
            f"among its declared categories {categories}; add it to mapping key "
            f"'categorical.{column}' (every site must declare the same list) or correct the cell")
    out = {}
    for cat in categories:
        out[indicator(column, cat)] = np.where(missing, np.nan, (text == cat).astype(float))
    return out


def _value_matches(values: pd.Series, target) -> pd.Series:
    text = values.astype(str).str.strip()
    candidates = {str(target).strip()}
    if isinstance(target, bool):
        candidates |= {str(int(target)), str(target).lower()}
    elif isinstance(target, (int, float)):
        candidates |= {str(int(target)) if float(target).is_integer() else str(target),
                       f"{float(target)}"}
    return text.isin(candidates)


def _labels(raw: pd.Series, lab: LabelMapping, path: Path) -> pd.Series:
    """Class index of each row (0..K-1), -1 for a row of no class."""
    if lab.values is not None:
        label = pd.Series(-1, index=raw.index)
        for k, value in enumerate(lab.values):
            label[(label < 0) & _value_matches(raw, value)] = k
        declared = f"values {[category_name(v) for v in lab.values]}"
    else:
        is_pos = _value_matches(raw, lab.positive)
        is_neg = (_value_matches(raw, lab.negative) if lab.negative is not None
                  else ~is_pos & ~_is_missing(raw))
        label = pd.Series(np.where(is_pos, 1, np.where(is_neg, 0, -1)), index=raw.index)
        declared = f"positive {lab.positive!r}, negative {lab.negative!r}"
    if not (label >= 0).any():
        found = ", ".join(map(str, raw.astype(str).str.strip().unique()[:6]))
        raise DataError(f"{path}: no row of column '{lab.column}' holds the label values "
                        f"of the mapping ({declared}); values found: {found}")
    return label


def load_table(path: Path, mapping: TableMapping | Path) -> Cohort:
    """Load a generic table into a `Cohort` following its mapping."""
    path = Path(path)
    if not isinstance(mapping, TableMapping):
        mapping = read_mapping(Path(mapping))
    df = read_table(path)
    if df.empty:
        raise DataError(f"{path}: the table has no rows")
    columns = [str(c) for c in df.columns]
    df.columns = columns
    # CSV line of each row: header is line 1.
    lines = pd.Series(np.arange(2, len(df) + 2), index=df.index)
    report = LoadReport(source=str(path), tables={"table": str(path)})

    categories = {str(c): [category_name(v) for v in cats]
                  for c, cats in mapping.categorical.items()}
    named = [("id", mapping.id), ("label.column", mapping.label.column), ("site", mapping.site),
             *(("label.defined_by", c) for c in mapping.label.defined_by),
             *((f"categorical.{c}", c) for c in categories),
             *((f"ranges.{c}", c) for c in mapping.ranges)]
    for key, col in named:
        if col is not None and col not in columns:
            raise DataError(f"{path}: column '{col}' named by mapping key '{key}' is not in the table")

    for col in mapping.ranges:
        if col in categories:
            raise DataError(f"{path}: mapping key 'ranges.{col}': '{col}' is categorical; "
                            f"ranges apply to numeric columns only")

    modalities = []
    used: dict[str, str] = {}
    for name, mod in mapping.modalities.items():
        cols = _resolve_columns(mod.columns, columns, f"modality '{name}'", path)
        for c in cols:
            if c in (mapping.id, mapping.label.column, mapping.site):
                raise DataError(f"{path}: column '{c}' is the id, label or site column and cannot "
                                f"be a feature of modality '{name}'")
            if c in used:
                raise DataError(f"{path}: column '{c}' is in both modality '{used[c]}' and "
                                f"'{name}'; a column belongs to one modality")
            used[c] = name
        features = [f for c in cols for f in ([indicator(c, k) for k in categories[c]]
                                              if c in categories else [c])]
        check_inputs(mapping.label.target(), cols,
                     f"{path}: modality '{name}' (mapping key 'label.defined_by')")
        modalities.append(Modality(str(name), tuple(features), mod.side))
    for col in categories:
        if col not in used:
            raise DataError(f"{path}: mapping key 'categorical.{col}': column '{col}' is in no "
                            f"modality; list it under a modality's columns or remove the key")

    ids = df[mapping.id]
    id_missing = _is_missing(ids)
    if id_missing.any():
        rows = lines[id_missing].tolist()
        raise DataError(f"{path}: column '{mapping.id}' (participant id) is empty in file lines "
                        f"{', '.join(map(str, rows[:8]))}; every row needs an id")
    ids = ids.astype(str).str.strip()
    dup = ids.duplicated(keep=False)
    if dup.any():
        first = ids[dup].iloc[0]
        rows = lines[ids == first].tolist()
        raise DataError(f"{path}: duplicate participant ids in column '{mapping.id}' "
                        f"({int(ids[dup].nunique())} ids repeated; e.g. '{first}' in file lines "
                        f"{', '.join(map(str, rows))}); keep one row per participant")

    target = mapping.label.target()
    label = _labels(df[mapping.label.column], mapping.label, path)
    keep = label >= 0
    label_raw = df[mapping.label.column]
    for value, count in label_raw[~keep].astype(str).str.strip().replace("", "(empty)") \
            .value_counts().items():
        report.excluded[f"label {value}"] = int(count)
    counts = {name: int((label == k).sum()) for k, name in enumerate(target.classes)}
    if target.binary:  # as before: positive first
        counts = dict(reversed(counts.items()))
    report.cohorts = {**counts, **{k.removeprefix("label "): v
                                   for k, v in report.excluded.items()}}

    table = pd.DataFrame(index=pd.Index(ids[keep].to_numpy(), name=ID))
    table[SITE] = (df.loc[keep, mapping.site].astype(str).str.strip().to_numpy()
                   if mapping.site else "all")
    table[LABEL] = label[keep].astype(np.int64).to_numpy()
    feats = {}
    for c in used:
        if c in categories:
            feats.update(_one_hot(df.loc[keep, c], c, categories[c], path, lines[keep]))
        else:
            feats[c] = _to_numeric(df.loc[keep, c], c, path, lines[keep]).to_numpy()
    table = pd.concat([table, pd.DataFrame(feats, index=table.index)], axis=1)

    cohort = Cohort(table, tuple(modalities), report, label_names=target.classes, target=target,
                    plausible_ranges={**{k: tuple(v) for k, v in mapping.ranges.items()},
                                      **{indicator(c, k): (0.0, 1.0) for c, cats in
                                         categories.items() for k in cats}},
                    categories={c: tuple(v) for c, v in categories.items()})
    present = cohort.modality_present()
    report.modality_present = {m: int(present[m].sum()) for m in present.columns}
    report.missing_rate = table[cohort.features].isna().mean().to_dict()
    return cohort
