"""The coordinator's book of rounds: state, model selection and checkpoints, round by round.

`RoundBook.open` starts a run's book (a new model, or the run folder's last checkpoint with its
model selection); `RoundBook.close_round` takes the strategy's `RoundRecord` of a round and the
model it ended with, makes the round's history entry (`round_entry`, a pure function of the
record), updates the model selection (`federation.select`: the round with the best pooled
validation loss or ROC-AUC, or the last; early stopping after `federation.patience` rounds
without improvement), writes the checkpoint (which keeps the selected round's weights) and
``history.json``, and emits the round's event. It returns True when the run should stop early.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from safn_core.config import SafnConfig
from safn_core.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from safn_core.federation.events import Event, EventLog
from safn_core.federation.wire import Layout
from safn_core.federation.round_record import RoundRecord, round_entry
from safn_core.federation.site import state_to_numpy
from safn_core.io import write_json
from safn_core.training.local import make_model, regression_parts
from safn_core.training.selection import RoundSelection


class RoundBook:
    """A run's state through its rounds (``state``), its model selection and its checkpoints."""

    def __init__(self, run_dir: Path, cfg: SafnConfig, events: EventLog, state: RunState,
                 selection: RoundSelection, target=None):
        self.run_dir, self.cfg, self.events = Path(run_dir), cfg, events
        self.target = target  # the run's target (`RunSetup.target`): K-class metrics' classes
        self.state, self.selection = state, selection
        self.layout = Layout.of(state.weights)  # the model travels as one vector
        self._t_last = time.perf_counter()

    @classmethod
    def open(cls, run_dir: Path, cfg: SafnConfig, events: EventLog, setup, pre,
             class_counts: list[int], floor=None) -> RoundBook:
        """The book of a new run, or of the run folder's checkpointed one (resumed). ``pre``
        and ``class_counts``: the federation's preprocessing (`global_preprocessing`);
        ``floor``: the logistic regression floor (`safn.server.logistic_floor`) a new model's
        wide path starts from."""
        desc = setup.described
        state = load_checkpoint(run_dir)
        if state is None:
            model = make_model(setup.modalities, cfg.model, cfg.train.seed,
                               target=setup.target)
            if floor is not None and setup.target.binary:
                model.set_wide(floor.coef, floor.intercept)
            elif floor is not None:  # multinomial, or the ordinal head's cut points
                model.set_wide(*regression_parts(floor, model.head_kind))
            events.emit(Event.STATISTICS, participants=sum(class_counts),
                        sites=len(desc.eligible), class_counts=list(class_counts))
            state = RunState(0, state_to_numpy(model), pre.state_dict(), class_counts)
        else:
            events.emit(Event.RESUMED, round=state.round, rounds=cfg.federation.rounds)
            saved = np.asarray(state.preprocessing["mean"])
            if saved.shape != pre.mean_.shape or not np.allclose(pre.mean_, saved):
                events.emit(Event.NOTE, code="data_changed")
        state.sites = {str(k): v for k, v in desc.names.items()}
        return cls(run_dir, cfg, events, state, _selection(state, cfg, events), setup.target)

    @property
    def stopped(self) -> bool:
        """Early stopping has already ended this run (a resume after it)."""
        return self.selection.should_stop

    def close_round(self, record: RoundRecord, vector: np.ndarray,
                    strategy_state: dict[str, dict[str, np.ndarray]]) -> bool:
        """Book round ``record.round`` that ended with the model ``vector`` and the strategy's
        optimiser state (FedAdam/FedYogi's moments); True: stop the run."""
        r, fed = record.round, self.cfg.federation
        entry = round_entry(record, self.state.history, self.cfg.data.min_cell,
                            fed.central_dp.delta, target=self.target)
        now = time.perf_counter()
        entry["seconds"], self._t_last = now - self._t_last, now
        best = (None if self.selection.update(r, entry.get("val_loss"), entry.get("val_roc_auc"))
                else self.state.selected_weights())
        entry["selected_round"] = self.selection.selected_round
        self.state = RunState(r, self.layout.unflatten(vector), self.state.preprocessing,
                              self.state.class_counts, strategy_state,
                              self.state.history + [entry], self.state.sites,
                              self.selection.state_dict(), best)
        save_checkpoint(self.run_dir, self.state)
        write_json(self.run_dir / "history.json", self.state.history)
        self.events.emit(Event.ROUND, entry=entry, rounds=fed.rounds)
        if self.selection.should_stop and r < fed.rounds:
            self.events.emit(Event.STOPPED_EARLY, round=r, patience=self.selection.patience,
                             select=self.selection.select,
                             selected_round=self.selection.selected_round)
            return True
        return False


def _selection(state: RunState, cfg: SafnConfig, events: EventLog) -> RoundSelection:
    """The run's model selection: from the checkpoint when resuming (the same decisions as an
    uninterrupted run), else new from ``federation.select`` / ``patience``."""
    fed = cfg.federation
    if not state.selection:
        return RoundSelection(fed.select, fed.patience)
    saved = RoundSelection.from_state(state.selection)
    if (saved.select, saved.patience) != (fed.select, fed.patience):
        events.emit(Event.NOTE, code="selection_kept", select=saved.select,
                    patience=saved.patience, configured_select=fed.select,
                    configured_patience=fed.patience)
    if saved.should_stop:
        events.emit(Event.NOTE, code="already_stopped", round=state.round,
                    selected_round=saved.selected_round)
    return saved
