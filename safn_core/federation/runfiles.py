"""Where a federated run keeps its files, and how each side finds its configuration and data.

A run folder holds ``config.yaml`` (the resolved configuration), ``checkpoints/`` and, in
simulation, ``sim/sites.json`` plus one Parquet table per virtual site. The ServerApp and the
ClientApp find the run folder from the Flower run config key ``run-dir`` or, under
`run_simulation` (whose run config is empty), the ``SAFN_RUN_DIR`` environment variable.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

from safn_core.config import SafnConfig
from safn_core.data.cohort import Cohort, LoadReport, Modality
from safn_core.io import write_atomic, write_json

ENV = "SAFN_RUN_DIR"


def run_dir_from(run_config: dict) -> Path:
    value = run_config.get("run-dir") or os.environ.get(ENV)
    if not value:
        raise RuntimeError("no run folder: set run config 'run-dir' or SAFN_RUN_DIR")
    return Path(str(value))


@lru_cache(maxsize=8)
def load_run_config(run_dir: Path) -> SafnConfig:
    return SafnConfig.model_validate(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))


def write_sim_sites(run_dir: Path, cohort: Cohort, sites: dict) -> None:
    """Write each virtual site's participants (simulation only: they stand for sites' disks)."""
    folder = Path(run_dir) / "sim"
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for i, (name, ids) in enumerate(sites.items()):
        path = folder / f"{name}.parquet"
        cohort.table.loc[ids].to_parquet(path)
        index[str(i)] = {"name": name, "table": path.name}
    write_json(folder / "sites.json", {
        "sites": index, "label_names": list(cohort.label_names),
        "modalities": [{"name": m.name, "features": list(m.features), "side": m.side}
                       for m in cohort.modalities]})


def expected_sites(run_dir: Path) -> int | None:
    """How many sites a simulation has (all must join); None outside simulation."""
    meta = Path(run_dir) / "sim" / "sites.json"
    if not meta.is_file():
        return None
    return len(json.loads(meta.read_text())["sites"])


@lru_cache(maxsize=256)
def load_sim_site(run_dir: Path, partition_id: int) -> tuple[str, Cohort]:
    meta = json.loads((Path(run_dir) / "sim" / "sites.json").read_text())
    entry = meta["sites"][str(partition_id)]
    table = pd.read_parquet(Path(run_dir) / "sim" / entry["table"])
    mods = tuple(Modality(m["name"], tuple(m["features"]), m["side"]) for m in meta["modalities"])
    cohort = Cohort(table, mods, LoadReport(f"virtual site {entry['name']}"),
                    tuple(meta["label_names"]))
    return entry["name"], cohort


def write_config(run_dir: Path, text: str) -> None:
    write_atomic(Path(run_dir) / "config.yaml", text)
