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


def _structure(cohort: Cohort) -> dict:
    """A cohort's label names and modalities, as the JSON next to its Parquet table keeps them."""
    return {"label_names": list(cohort.label_names),
            "modalities": [{"name": m.name, "features": list(m.features), "side": m.side}
                           for m in cohort.modalities]}


def _cohort(table: pd.DataFrame, meta: dict, source: str) -> Cohort:
    """A cohort from its table and what `_structure` wrote."""
    mods = tuple(Modality(m["name"], tuple(m["features"]), m["side"]) for m in meta["modalities"])
    return Cohort(table, mods, LoadReport(source), tuple(meta["label_names"]))


def write_sim_sites(run_dir: Path, cohort: Cohort, sites: dict) -> None:
    """Write each virtual site's participants (simulation only: they stand for sites' disks)."""
    folder = Path(run_dir) / "sim"
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for i, (name, ids) in enumerate(sites.items()):
        path = folder / f"{name}.parquet"
        cohort.table.loc[ids].to_parquet(path)
        index[str(i)] = {"name": name, "table": path.name}
    write_json(folder / "sites.json", {"sites": index, **_structure(cohort)})


def save_site_cohort(folder: Path, cohort: Cohort) -> Path:
    """A deployed site's checked cohort, prepared once by safn-client for its ClientApp (which
    runs in a fresh process per message and must not re-read a PPMI download each time)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "cohort.parquet"
    tmp = table.with_suffix(".parquet.tmp")
    cohort.table.to_parquet(tmp)
    tmp.replace(table)
    write_json(folder / "cohort.json", {"source": cohort.report.source, "table": table.name,
                                        **_structure(cohort)})
    return folder / "cohort.json"


@lru_cache(maxsize=4)
def load_site_cohort(meta_path: Path) -> Cohort:
    meta = json.loads(Path(meta_path).read_text())
    table = pd.read_parquet(Path(meta_path).parent / meta["table"])
    return _cohort(table, meta, meta["source"])


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
    cohort = _cohort(table, meta, f"virtual site {entry['name']}")
    return entry["name"], cohort


def write_config(run_dir: Path, text: str) -> None:
    write_atomic(Path(run_dir) / "config.yaml", text)


RUN_ID_FILE = "run_id"


def run_identity(run_dir: Path) -> str:
    """The run's identity for the sites' privacy ledgers: made once per run folder, kept there.

    A DP site stores its noise plan (σ for all planned rounds) under this id, so every round and
    every restarted process of the run reuses it. It must survive a coordinator resume, which
    Flower's own run id does not (a resume is a new Flower run); it must differ between two runs
    (each calibrates on what earlier runs left). Hence a random id written into the run folder
    the first time (``<run folder>/run_id``, created exclusively) and read back on resume.
    """
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        import secrets

        value = f"{Path(run_dir).resolve().name}-{secrets.token_hex(6)}"
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(value + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except FileExistsError:  # another process made it first: use theirs
            pass
    return path.read_text(encoding="utf-8").strip()


SIM_SITE_STATE = "sim-site-state"


def sim_site_state_dir(run_dir: Path, site_name: str) -> Path:
    """A virtual site's own state folder (its privacy ledger): ``simulation.site_state_dir``
    (safn-sim writes it into config.yaml as an absolute path), by default
    ``<parent of the run folder>/sim-site-state``; one subfolder per site. Outside the run
    folder, so that a later run on the same virtual sites finds the budget already spent."""
    run_dir = Path(run_dir).resolve()
    base = load_run_config(run_dir).simulation.site_state_dir
    if base is None:
        base = run_dir.parent / SIM_SITE_STATE
    return Path(base) / site_name
