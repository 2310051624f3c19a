"""Round checkpoints of a federated run: everything needed to resume with nothing lost.

Each round writes ``checkpoints/round_NNNN.npz`` (global weights, the selected round's weights
and strategy arrays such as FedAdam's moments) and ``round_NNNN.json`` (round, preprocessing,
class counts, metrics history, the model selection's state),
each atomically, then points ``checkpoints/latest.json`` at them. An existing round file is never
overwritten: resuming continues from the last complete round.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from safn_core.errors import DataError
from safn_core.federation.event_text import checkpoint_text
from safn_core.io import write_atomic, write_json


@dataclass
class RunState:
    round: int
    weights: dict[str, np.ndarray]
    preprocessing: dict
    class_counts: list[int]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    sites: dict[str, str] = field(default_factory=dict)  # site index -> name
    # the model selection (`safn_core.training.selection.RoundSelection.state_dict`) and the
    # weights of its selected round (None: the selected round is this one, or none yet)
    selection: dict = field(default_factory=dict)
    best_weights: dict[str, np.ndarray] | None = None

    def selected_weights(self) -> dict[str, np.ndarray]:
        """The weights of the selected round (the last round's when nothing else is)."""
        return self.weights if self.best_weights is None else self.best_weights


def save_checkpoint(run_dir: Path, state: RunState) -> Path:
    folder = Path(run_dir) / "checkpoints"
    stem = folder / f"round_{state.round:04d}"
    if stem.with_suffix(".json").exists():
        raise DataError(f"{stem}.json exists: a checkpoint is never overwritten")
    arrays = {f"w::{k}": v for k, v in state.weights.items()}
    arrays.update({f"b::{k}": v for k, v in (state.best_weights or {}).items()})
    for group, values in state.strategy_state.items():
        arrays.update({f"s::{group}::{k}": v for k, v in values.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(stem.with_suffix(".npz"), buf.getvalue())
    write_json(stem.with_suffix(".json"), {
        "round": state.round, "preprocessing": state.preprocessing,
        "class_counts": state.class_counts, "history": state.history, "sites": state.sites,
        "selection": state.selection,
    })
    write_json(folder / "latest.json", {"round": state.round, "stem": stem.name})
    return stem


def checkpointed_round(run_dir: Path) -> int | None:
    """The round of ``run_dir``'s last checkpoint, or None when it has none (without loading it)."""
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    try:
        return int(json.loads(latest.read_text())["stem"].rsplit("_", 1)[1])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def checkpoint_note(run_dir: Path) -> str:
    """What a stopped run keeps, in words: its checkpoint, or that it has none."""
    return checkpoint_text(checkpointed_round(run_dir), Path(run_dir) / "checkpoints")


def load_checkpoint(run_dir: Path) -> RunState | None:
    """The last complete round of ``run_dir``, or None when it has no checkpoint."""
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    if not latest.is_file():
        return None
    try:
        stem = latest.parent / json.loads(latest.read_text())["stem"]
        meta = json.loads(stem.with_suffix(".json").read_text())
        with np.load(stem.with_suffix(".npz")) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{latest.parent}: the checkpoint is damaged ({exc})") from None
    weights = {k[3:]: v for k, v in arrays.items() if k.startswith("w::")}
    best = {k[3:]: v for k, v in arrays.items() if k.startswith("b::")} or None
    strategy: dict[str, dict[str, np.ndarray]] = {}
    for k, v in arrays.items():
        if k.startswith("s::"):
            _, group, name = k.split("::", 2)
            strategy.setdefault(group, {})[name] = v
    return RunState(meta["round"], weights, meta["preprocessing"], meta["class_counts"],
                    strategy, meta["history"], meta.get("sites", {}),
                    meta.get("selection", {}), best)
