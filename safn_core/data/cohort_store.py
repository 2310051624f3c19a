"""A checked cohort on a site's disk: one Parquet table and the JSON of its structure.

safn-client prepares a deployed site's cohort once (its ClientApp runs in a fresh process per
message and must not re-read a PPMI download each time); a simulation writes each virtual site
in the same format (`safn.simulations.virtual_sites`). Both are read back by `read_cohort`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pandas as pd

from safn_core.data.cohort import Cohort, LoadReport, Modality
from safn_core.io import write_json
from safn_core.targets import PD_VS_HC, TARGETS, Target

META = "cohort.json"
TABLE = "cohort.parquet"


def write_cohort(folder: Path, cohort: Cohort, source: str | None = None) -> Path:
    """Write ``cohort`` into ``folder`` (table first, atomically; then its structure); returns
    the path of its ``cohort.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / TABLE
    tmp = table.with_suffix(".parquet.tmp")
    cohort.table.to_parquet(tmp)
    tmp.replace(table)
    write_json(folder / META, {
        "source": source or cohort.report.source, "table": table.name,
        "label_names": list(cohort.label_names),
        "target": cohort.target.to_dict(),
        "modalities": [{"name": m.name, "features": list(m.features), "side": m.side}
                       for m in cohort.modalities],
        # public plausible ranges (the data contract's; `privacy.statistics: gaussian` needs them)
        "plausible_ranges": {k: [float(lo), float(hi)]
                             for k, (lo, hi) in cohort.plausible_ranges.items()},
        "categories": {c: list(v) for c, v in cohort.categories.items()}})
    return folder / META


@lru_cache(maxsize=256)
def read_cohort(meta_path: Path) -> Cohort:
    """The cohort `write_cohort` wrote (cached per process: a Ray actor or warm SuperExec
    reads each site once)."""
    meta = json.loads(Path(meta_path).read_text())
    table = pd.read_parquet(Path(meta_path).parent / meta["table"])
    mods = tuple(Modality(m["name"], tuple(m["features"]), m["side"]) for m in meta["modalities"])
    ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in
              meta.get("plausible_ranges", {}).items()}
    categories = {c: tuple(v) for c, v in meta.get("categories", {}).items()}
    return Cohort(table, mods, LoadReport(meta["source"]), tuple(meta["label_names"]), ranges,
                  categories, stored_target(meta.get("target")))


def stored_target(d: dict | None) -> Target:
    """The target of a stored cohort: a built-in one by name (with its cohorts and description)
    when the classes match, else as stored; a file from before targets is pd_vs_hc."""
    if d is None:
        return PD_VS_HC
    target = Target.from_dict(d)
    known = TARGETS.get(target.name)
    return known if known is not None and known.to_dict() == target.to_dict() else target
