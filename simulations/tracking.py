"""safn-sim's experiment tracking (`safn_core.tracking`; docs/tracking.md).

The run's parameters and tags when it starts; each round of the federation as the ServerApp
books it (it runs in a thread of this process under ``run_simulation``; the tracker follows the
run folder's ``events.jsonl``); at the end the comparison table's figures, each leave-one-site-out
federation as a nested run (its held-out metrics and its rounds, logged from its
``history.json`` once it has run) and the artifacts. Only this process logs: the virtual sites
never do.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from safn_core.config import SafnConfig
from safn_core.federation.run_folder import RUN_ID_FILE, data_sources
from safn_core.tracking import Tracker
from safn_core.tracking.figures import table_metrics
from safn_core.tracking.params import run_params

ARTIFACTS = ("report.html", "model/model_card.md", "comparison.csv", "history.json",
             "loso.csv")


def start(tracker: Tracker, cfg: SafnConfig, run_dir: Path) -> None:
    """The run with its configuration, versions and tags; then follow its rounds."""
    tracker.start(Path(run_dir).name, run_params(cfg), {
        "safn.run_folder": str(Path(run_dir).resolve()), "safn.mode": "simulation",
        "safn.target": str(cfg.data.target), "safn.command": "safn-sim"})
    tracker.follow_rounds()


def _figures(df: pd.DataFrame, prefix: str, labels: list[str]) -> dict[str, float]:
    values = [c for c in df.columns if c not in labels and not c.endswith(("_ci", "_ci_low",
                                                                            "_ci_high"))
              and c not in ("n", "n_train", "n_test", "kind")]
    return table_metrics(df, labels, values, prefix)


def finish(tracker: Tracker, run_dir: Path, comparison: pd.DataFrame | None,
           loso: pd.DataFrame | None) -> dict | None:
    """The comparison, LOSO's nested runs, the artifacts; the note for ``results.json``."""
    if not tracker.enabled:
        return None
    run_dir = Path(run_dir)
    tracker.stop_following()
    tracker.log_params({f"data_source.{site}": kind
                        for site, kind in data_sources(run_dir).items()})
    if comparison is not None:
        rows = comparison.copy()  # a row by its kind (pooled, federated, ...) where unique
        counts = rows.kind.value_counts()
        rows["label"] = [k if counts[k] == 1 else m for k, m in zip(rows.kind, rows.model)]
        tracker.log_metrics(_figures(rows, "comparison", ["label"]),
                            what="the comparison table")
    if loso is not None:
        for row in loso.to_dict("records"):
            held = str(row["held_out"])
            child = tracker.child(f"held-out {held}", {"safn.held_out": held,
                                                       "safn.mode": "simulation"})
            if child is None:
                continue
            tracker.log_metrics(_figures(pd.DataFrame([row]), "held_out", ["held_out"]),
                                run_id=child, what=f"held-out {held}'s metrics")
            tracker.log_history(run_dir / "loso" / held / "history.json", child)
            tracker.end(child)
    tracker.log_artifacts(ARTIFACTS)
    tracker.log_model()
    run_id = (run_dir / RUN_ID_FILE)
    tags = {"safn.run_id": run_id.read_text().strip()} if run_id.is_file() else {}
    return tracker.finish(tags=tags)
