"""A simulation's virtual sites on disk, standing in for the hospitals' own disks.

Each virtual site is written into the run folder in the format of a deployed site's prepared
cohort (`safn_core.data.cohort_store`: ``sim/<site>/cohort.json`` + ``cohort.parquet``), with
``sim/sites.json`` mapping Flower's ``partition-id`` to the site's name. A virtual site's own
state (its privacy ledger) lives outside the run folder (`virtual_site_state_dir`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from safn_core.data.cohort import Cohort
from safn_core.data.cohort_store import META, read_cohort, write_cohort
from safn_core.federation.run_folder import load_run_config, write_expected_sites
from safn_core.io import write_json

INDEX = Path("sim") / "sites.json"
SIM_SITE_STATE = "sim-site-state"


def write_virtual_sites(run_dir: Path, cohort: Cohort, sites: dict) -> None:
    """Write each virtual site's participants, its index, and the sites the run waits for."""
    run_dir = Path(run_dir)
    index = {}
    for i, (name, ids) in enumerate(sites.items()):
        write_cohort(run_dir / "sim" / name, cohort.subset(ids), f"virtual site {name}")
        index[str(i)] = name
    write_json(run_dir / INDEX, {"sites": index})
    write_expected_sites(run_dir, list(sites))


def virtual_site_names(run_dir: Path) -> list[str]:
    """The virtual sites in partition-id order."""
    index = json.loads((Path(run_dir) / INDEX).read_text())["sites"]
    return [index[k] for k in sorted(index, key=int)]


@lru_cache(maxsize=256)
def load_virtual_site(run_dir: Path, partition_id: int) -> tuple[str, Cohort]:
    """The name and cohort of the virtual site with Flower's ``partition-id``."""
    name = json.loads((Path(run_dir) / INDEX).read_text())["sites"][str(partition_id)]
    return name, read_cohort(Path(run_dir) / "sim" / name / META)


def virtual_site_state_dir(run_dir: Path, site_name: str) -> Path:
    """A virtual site's own state folder (its privacy ledger): one subfolder per site of
    `virtual_sites_state_root`."""
    return virtual_sites_state_root(run_dir) / site_name


def virtual_sites_state_root(run_dir: Path) -> Path:
    """Where the virtual sites keep their own state: ``simulation.site_state_dir`` (safn-sim
    writes it into config.yaml as an absolute path), by default
    ``<parent of the run folder>/sim-site-state``. Outside the run folder, so that a later run
    on the same virtual sites finds the budget already spent."""
    run_dir = Path(run_dir).resolve()
    base = load_run_config(run_dir).simulation.site_state_dir
    return Path(base) if base is not None else run_dir.parent / SIM_SITE_STATE
