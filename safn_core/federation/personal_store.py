"""Where a site keeps its personal model: its own state folder, never the network.

``<state_dir>/personal/<run id>/`` holds, per run (the run's own id, stable across a resume):

- ``current.npz``: Ditto's personal model as the last round left it (the next round continues
  from it);
- ``selected.npz``: the personal model the site keeps (the epoch or round its validation split
  preferred), with ``selected.json`` saying which, its validation metrics and threshold;
- ``selection.json``: Ditto's running model selection (`RoundSelection` state) and the last
  round trained, so that a round the coordinator redoes after a crash is not trained twice;
- ``evaluation.json``: the site's own comparison of the global and the personal model on its
  test split, with every figure (also those below ``min_cell``, which never leave the site).

Every file is written atomically; another run's folder is never touched. In a simulation the
state folder is the virtual site's (`safn.simulations.virtual_sites`), outside the run folder.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from safn_core.io import write_atomic, write_json


def folder(state_dir: Path, run_id: str) -> Path:
    """The run's personal folder under the site's state folder (the run id made file-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(run_id)).strip("._") or "run"
    return Path(state_dir) / "personal" / safe


def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in weights.items()})
    write_atomic(path, buf.getvalue())


def load_weights(path: Path) -> dict[str, np.ndarray] | None:
    if not Path(path).is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class PersonalStore:
    """One site's personal files for one run (see the module docstring)."""

    def __init__(self, state_dir: Path, run_id: str):
        self.path = folder(state_dir, run_id)
        self.run_id = str(run_id)

    # -- Ditto's running state ----------------------------------------------------------------

    def current(self) -> dict[str, np.ndarray] | None:
        return load_weights(self.path / "current.npz")

    def save_current(self, weights: dict[str, np.ndarray]) -> None:
        save_weights(self.path / "current.npz", weights)

    def selection_state(self) -> dict | None:
        return read_json(self.path / "selection.json")

    def save_selection_state(self, state: dict) -> None:
        write_json(self.path / "selection.json", {"run_id": self.run_id, **state})

    # -- the kept personal model --------------------------------------------------------------

    def selected(self) -> tuple[dict[str, np.ndarray] | None, dict | None]:
        return load_weights(self.path / "selected.npz"), read_json(self.path / "selected.json")

    def save_selected(self, weights: dict[str, np.ndarray], record: dict) -> None:
        # weights first: a record never points at weights that are not there
        save_weights(self.path / "selected.npz", weights)
        write_json(self.path / "selected.json", {"run_id": self.run_id, **record})

    def save_evaluation(self, record: dict) -> None:
        write_json(self.path / "evaluation.json", {"run_id": self.run_id, **record})

    def evaluation(self) -> dict | None:
        return read_json(self.path / "evaluation.json")
