"""The SAFN Flower app bundle (FAB): where its source is, and its sha256.

The bundle is ``server/flwr_app/safn/pyproject.toml`` alone (components name the installed
``safn.server.app`` and ``safn.client.app``). Flower builds FABs deterministically (sorted files, fixed zip
timestamps), so the coordinator and every site compute the same hash from the same safn
version; Flower's SuperLink identifies a run's app by exactly this hash.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

APP_SOURCE = Path(__file__).resolve().parent / "flwr_app" / "safn"


def app_dir(run_dir: Path) -> Path:
    """A copy of the app in the run folder (``flwr run`` may write next to the app)."""
    target = Path(run_dir) / "flwr-app" / "safn"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(APP_SOURCE / "pyproject.toml", target / "pyproject.toml")
    return target


def app_hash(folder: Path = APP_SOURCE) -> str:
    """sha256 of the FAB that ``flwr run`` builds from ``folder`` (what a site approves)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(folder))).hexdigest()
