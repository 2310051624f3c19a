"""Which round's model a run keeps, and when it stops: one rule for every engine.

The federation (the coordinator, after each round's pooled validation) and the centralised
comparators of `safn-sim` (`safn_core.training.local.fit_by_rounds`: pooled and local-only
models) keep a model by the same rule, `federation.select`, and stop early after the same
`federation.patience`, so a comparison of them measures federation and not recipes. The rule is
here once, as a small object whose whole state is explicit and JSON-serialisable: the coordinator
checkpoints it with the weights and a resumed run makes the same decisions as an uninterrupted
one.

The rule:

- ``"val_loss"``: keep the round with the lowest validation loss; a round improves only if it
  is lower than the best so far by more than ``tol`` (1e-5, the tolerance of the project's
  epoch-wise early stopping), so noise-level changes neither move the selection nor reset
  patience.
- ``"val_roc_auc"``: keep the round with the highest validation ROC-AUC (higher by more than
  ``tol``).
- ``"last"``: keep the last round; never stop early (``patience`` is ignored).
- Early stopping: once ``patience`` consecutive rounds have not improved on the selected one,
  `should_stop` is true (``patience=None``: never stop early, train every round).

Missing metrics. A round's metric can be absent (``None``) or not a number: validation withheld
(fewer than ``min_cell`` people of a class), a validation split with one class only (no
ROC-AUC), a diverged loss. Such a round never displaces a scored selection, but it does count
toward patience (it is a round without improvement: a run whose validation vanishes does not
train forever on the strength of an old best). Until some round has had a metric there is
nothing to compare with: the selection follows the latest round (``update`` returns true for
each such round, `best_score_` stays ``None``) and patience does not run, so a run that never
has a validation metric keeps its last round, exactly as ``"last"`` would; the first round with
a metric then becomes the selected one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

Select = Literal["val_loss", "val_roc_auc", "last"]
SELECT_RULES: tuple[str, ...] = ("val_loss", "val_roc_auc", "last")
TOLERANCE = 1e-5
"""Smallest change of the selection metric that counts as an improvement."""


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class RoundSelection:
    """The selection rule and its running state (see the module docstring).

    Configuration: ``select`` (``"val_loss"``, ``"val_roc_auc"`` or ``"last"``), ``patience``
    (rounds without improvement before stopping; ``None``: never), ``tol``.
    State (trailing underscore, updated by `update`): ``best_round_`` (the selected round;
    ``None`` before any round), ``best_score_`` (its metric; ``None`` while nothing was scored,
    and always with ``"last"``), ``rounds_since_best_`` (consecutive rounds since the selected
    one without improvement, counted only once a round was scored), ``last_round_`` (the latest
    round seen).

    Usage, once per round after validation::

        if selection.update(r, val_loss=..., val_roc_auc=...):
            keep_weights(r)          # this round is now the one the run keeps
        if selection.should_stop:
            break
    """

    select: Select = "val_loss"
    patience: int | None = None
    tol: float = TOLERANCE
    best_round_: int | None = None
    best_score_: float | None = None
    rounds_since_best_: int = 0
    last_round_: int | None = None

    def __post_init__(self) -> None:
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, not {self.select!r}")
        if self.patience is not None and int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1 or None, not {self.patience!r}")

    def metric(self, val_loss: float | None = None, val_roc_auc: float | None = None
               ) -> float | None:
        """The selection metric of a round (``None``: missing, or rule ``"last"``)."""
        if self.select == "val_loss":
            return _finite(val_loss)
        if self.select == "val_roc_auc":
            return _finite(val_roc_auc)
        return None

    def _improves(self, score: float) -> bool:
        if self.best_score_ is None:
            return True
        if self.select == "val_loss":
            return score < self.best_score_ - self.tol
        return score > self.best_score_ + self.tol

    def update(self, round: int, val_loss: float | None = None,
               val_roc_auc: float | None = None) -> bool:
        """Record round ``round``'s validation metrics; true when it becomes the selected round.

        Only the metric of the rule is read (the other may be omitted). Rounds are expected in
        increasing order; a caller that resumes passes the rounds after the checkpointed one.
        """
        round = int(round)
        self.last_round_ = round
        score = self.metric(val_loss, val_roc_auc)
        if self.select == "last" or (score is None and self.best_score_ is None):
            # "last", or nothing scored yet: the selection follows the latest round
            self.best_round_, self.rounds_since_best_ = round, 0
            return True
        if score is not None and self._improves(score):
            self.best_round_, self.best_score_, self.rounds_since_best_ = round, score, 0
            return True
        self.rounds_since_best_ += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` rounds in a row have not improved on a scored selection."""
        return (self.select != "last" and self.patience is not None
                and self.best_score_ is not None and self.rounds_since_best_ >= self.patience)

    @property
    def selected_round(self) -> int | None:
        """The round whose model the run keeps (``best_round_``)."""
        return self.best_round_

    def state_dict(self) -> dict:
        """Configuration and state as plain JSON values (for a checkpoint)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "RoundSelection":
        """The selection `state_dict` saved: a resumed run continues with the same decisions."""
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})
