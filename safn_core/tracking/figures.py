"""A results table's figures as metrics: ``<prefix>.<row label>.<column>``."""

from __future__ import annotations

import math
import numbers
import re


def metric_key(*parts) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces)."""
    return ".".join(" ".join(re.sub(r"[^\w\-/: ]+", " ", str(p)).split()) for p in parts)


def table_metrics(rows, label_columns, value_columns, prefix: str) -> dict[str, float]:
    """``rows`` (a DataFrame); each finite number of ``value_columns`` under its row's labels."""
    out: dict[str, float] = {}
    for row in rows.to_dict("records"):
        labels = [row[c] for c in label_columns]
        for col in value_columns:
            value = row.get(col)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(value):
                out[metric_key(prefix, *labels, col)] = float(value)
    return out
