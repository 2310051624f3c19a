"""A federated run's folder on the coordinator, and how the apps find it.

A run folder holds ``config.yaml`` (the resolved configuration), ``run_id``, ``checkpoints/``,
``expected_sites.json`` (the sites a run waits for, when its starter knows them),
``data_sources.json`` (the kind of data each site said it has, from the statistics round) and
the results.
The ServerApp finds the folder from the Flower run config key ``run-dir`` (deployment:
``flwr run --run-config``) or, under `run_simulation` (whose run config is empty), the
``SAFN_RUN_DIR`` environment variable.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import yaml

from safn_core.config import SafnConfig
from safn_core.io import write_atomic, write_json

RUN_DIR_ENV = "SAFN_RUN_DIR"
RUN_ID_FILE = "run_id"
EXPECTED_SITES_FILE = "expected_sites.json"
DATA_SOURCES_FILE = "data_sources.json"


def run_dir_from(run_config: dict) -> Path:
    value = run_config.get("run-dir") or os.environ.get(RUN_DIR_ENV)
    if not value:
        raise RuntimeError(f"no run folder: set run config 'run-dir' or {RUN_DIR_ENV}")
    return Path(str(value))


@lru_cache(maxsize=8)
def load_run_config(run_dir: Path) -> SafnConfig:
    return SafnConfig.model_validate(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))


def write_config(run_dir: Path, text: str) -> None:
    write_atomic(Path(run_dir) / "config.yaml", text)


def write_expected_sites(run_dir: Path, names: list[str]) -> None:
    """The sites a run waits for at its start (a simulation's virtual sites)."""
    write_json(Path(run_dir) / EXPECTED_SITES_FILE, {"sites": list(names)})


def expected_sites(run_dir: Path) -> list[str] | None:
    """What `write_expected_sites` wrote; None when the run's starter did not say."""
    path = Path(run_dir) / EXPECTED_SITES_FILE
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["sites"])


def write_data_sources(run_dir: Path, sources: dict[str, str]) -> None:
    """The kind of data (``data.source``) each site said it has in the statistics round."""
    write_json(Path(run_dir) / DATA_SOURCES_FILE, {"sites": dict(sorted(sources.items()))})


def data_sources(run_dir: Path) -> dict[str, str]:
    """What `write_data_sources` wrote; empty when the run has not had its statistics round."""
    path = Path(run_dir) / DATA_SOURCES_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text())["sites"])


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
