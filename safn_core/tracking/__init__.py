"""Experiment tracking with MLflow for the coordinator's or the researcher's process.

`Tracker` (``tracker``) logs a run: parameters, tags, metrics per round, the final comparison,
artifacts, nested runs. It is a no-op when tracking is off, imports MLflow only when it is on
(``store``: the store, the embedded default and why SQLite), and never fails or stalls the run
(``guard``). ``rounds``: what of a round's history entry is logged, and the follower that logs
each round as the coordinator appends it. Sites never log. docs/tracking.md.
"""

from safn_core.tracking.store import TrackingUnavailable, require_mlflow
from safn_core.tracking.tracker import Tracker

__all__ = ["Tracker", "TrackingUnavailable", "require_mlflow"]
