"""Where a federated run keeps its files, and how each side finds its configuration and data.

A run folder (on the coordinator) holds ``config.yaml`` (the resolved configuration),
``checkpoints/`` and, in simulation, ``sim/sites.json`` plus one Parquet table per virtual site.
The ServerApp finds the run folder from the Flower run config key ``run-dir`` or, under
`run_simulation` (whose run config is empty), the ``SAFN_RUN_DIR`` environment variable.

Sites never read the coordinator's run folder for their settings: every message carries the
run's shared settings (`shared_config_text`: model, local training, federation, privacy request,
min_cell) and a site combines them with its own file (`site_run_config`). Only a simulation's
virtual sites read their data from the run folder, standing in for the sites' disks.
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


SHARED_SECTIONS = ("model", "train", "federation", "privacy")
"""What the coordinator decides for everyone; ``data`` and ``site`` stay each site's own."""


def shared_config_text(cfg: SafnConfig) -> str:
    """The run's shared settings as the YAML text every message carries."""
    tree = cfg.model_dump(mode="json", include=set(SHARED_SECTIONS))
    tree["data"] = {"min_cell": cfg.data.min_cell}
    return yaml.safe_dump(tree, sort_keys=True)


@lru_cache(maxsize=16)
def shared_config(text: str) -> SafnConfig:
    """Parse what `shared_config_text` wrote (cached: one parse per run and process)."""
    return SafnConfig.model_validate(yaml.safe_load(text))


def site_run_config(shared: SafnConfig, own: SafnConfig) -> SafnConfig:
    """A deployed site's settings for one run: the coordinator's model, training and federation
    settings; the site's own data, site section, split seed and privacy settings; ``min_cell``
    the larger of the two (a coordinator can tighten a site's small-cell rule, never relax it)."""
    cfg = shared.model_copy(deep=True)
    cfg.data = own.data.model_copy(update={"min_cell": max(own.data.min_cell,
                                                           shared.data.min_cell)})
    cfg.site = own.site
    if own.site is not None:
        cfg.federation = cfg.federation.model_copy(update={"split_seed": own.site.split_seed})
    cfg.privacy = own.privacy
    return cfg


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
