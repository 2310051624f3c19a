"""safn-train's experiment tracking: the run, its folds as nested runs, the CV table, artifacts.

Read from what the run folder holds when the command has written it (``folds.csv``,
``results.csv``), so nothing is logged that the folder does not hold. One nested run per
repeat × fold, with each (feature set, model)'s test-fold metrics; the parent run has the mean
and SD over folds (the summary table) and the artifacts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from safn_core.tracking.figures import table_metrics
from safn_core.tracking.params import run_params
from safn_core.tracking.tracker import Tracker

ARTIFACTS = ("report.html", "model/model_card.md", "results.csv", "folds.csv")
LABELS = ["feature_set", "model"]


def start(tracker: Tracker, cfg, out: Path) -> None:
    tracker.start(Path(out).name, run_params(cfg), {
        "safn.run_folder": str(Path(out).resolve()), "safn.mode": "centralised",
        "safn.target": str(cfg.data.target), "safn.command": "safn-train"})


def finish(tracker: Tracker, out: Path) -> dict | None:
    """Folds, summary and artifacts from ``out``; the note for ``results.json``."""
    if not tracker.enabled:
        return None
    out = Path(out)
    if (out / "results.csv").is_file():
        summary = pd.read_csv(out / "results.csv")
        values = [c for c in summary.columns if c.endswith(("_mean", "_sd"))]
        tracker.log_metrics(table_metrics(summary, LABELS, values, "cv"),
                            what="the cross-validation table")
    if (out / "folds.csv").is_file():
        folds = pd.read_csv(out / "folds.csv")
        values = [c for c in folds.columns if c not in ("repeat", "fold", *LABELS)]
        for (repeat, fold), group in folds.groupby(["repeat", "fold"], sort=True):
            name = f"repeat {int(repeat) + 1} fold {int(fold) + 1}"
            child = tracker.child(name, {"safn.repeat": str(int(repeat) + 1),
                                         "safn.fold": str(int(fold) + 1),
                                         "safn.mode": "centralised"})
            if child is not None:
                tracker.log_metrics(table_metrics(group, LABELS, values, "test"), run_id=child,
                                    what=f"{name}'s metrics")
                tracker.end(child)
    tracker.log_artifacts(ARTIFACTS)
    tracker.log_model()
    return tracker.finish()
