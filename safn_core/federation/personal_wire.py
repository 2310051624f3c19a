"""What of a site's personal comparison (`personal_comparison.Comparison`) goes on the wire,
and the coordinator's reading of it (`protocol.Metric`). No Flower here.

Every site's reply has the same keys; the metrics only where its test split passes
``min_cell`` (else `WITHHELD`); the confusion counts beside them only in plain runs (under
secure aggregation they are masked, `secure_records.personalise_values`).
"""

from __future__ import annotations

import numpy as np

from safn_core.federation.personal_comparison import (COMPARED, COMPARED_K, Comparison,
                                                       compared, confusion_size)
from safn_core.federation.protocol import WITHHELD, Metric, is_withheld


def _key(prefix: str, metric: str) -> str:
    return prefix + metric.replace("_", "-")


def comparison_to_metrics(c: Comparison, secure: bool) -> dict:
    """What the site's reply carries (see the module docstring); a K-class target's metrics
    are `COMPARED_K` and its confusion counts the K × K matrix, flat."""
    sent = c.reported and c.refusal is None
    n_classes = len(c.class_counts)
    zeros = [0] * confusion_size(n_classes)
    out = {Metric.PERSONAL_REPORTED: int(sent), Metric.PERSONAL_REFUSED: int(c.refusal is not None),
           Metric.PERSONAL_N: int(sum(c.class_counts)) if sent else WITHHELD,
           Metric.PERSONAL_SELECTED: int(c.selected.get("epoch", c.selected.get("round", -1))
                                         if c.selected else -1),
           Metric.PERSONAL_IS_GLOBAL: int(c.kept_global)}
    for which, prefix in (("global", Metric.GLOBAL_PREFIX), ("personal", Metric.PERSONAL_PREFIX)):
        for k in compared(n_classes):
            value = c.metrics.get(which, {}).get(k) if sent else None
            out[_key(prefix, k)] = (float(value) if value is not None and np.isfinite(value)
                                    else WITHHELD)
    if not secure:
        out[Metric.GLOBAL_CONFUSION] = list(c.confusion["global"]) if sent else zeros
        out[Metric.PERSONAL_CONFUSION] = list(c.confusion["personal"]) if sent else zeros
    return out


def comparison_from_metrics(m) -> dict:
    """The coordinator's reading of one site's reply: ``reported``, ``refused``, ``n``,
    ``selected``, ``kept_global``, ``global`` / ``personal`` metrics (None where withheld)
    and, in plain runs, the confusion counts."""
    out = {"reported": bool(m[Metric.PERSONAL_REPORTED]),
           "refused": bool(m[Metric.PERSONAL_REFUSED]),
           "n": None if is_withheld(m[Metric.PERSONAL_N]) else int(m[Metric.PERSONAL_N]),
           "selected": None if int(m[Metric.PERSONAL_SELECTED]) < 0
           else int(m[Metric.PERSONAL_SELECTED]),
           "kept_global": bool(m.get(Metric.PERSONAL_IS_GLOBAL, 0))}
    keys = COMPARED if _key(Metric.GLOBAL_PREFIX, "sensitivity") in m else COMPARED_K
    for which, prefix in (("global", Metric.GLOBAL_PREFIX), ("personal", Metric.PERSONAL_PREFIX)):
        values = {k: m[_key(prefix, k)] for k in keys}
        out[which] = (None if not out["reported"] else
                      {k: (None if is_withheld(v) else float(v)) for k, v in values.items()})
    if Metric.GLOBAL_CONFUSION in m:
        out["confusion"] = {"global": [int(x) for x in m[Metric.GLOBAL_CONFUSION]],
                            "personal": [int(x) for x in m[Metric.PERSONAL_CONFUSION]]}
    return out
