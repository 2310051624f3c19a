"""safn-server's experiment tracking (`safn_core.tracking`; docs/tracking.md).

The coordinator's process logs: parameters and tags when the session starts, each round as the
ServerApp books it (the tracker follows the run folder's ``events.jsonl``, like the progress
lines), and at the end the artifacts, the Flower run ids and the note in ``results.json``. The
sites never log: they have no tracking settings at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from safn_core.config import SafnConfig
from safn_core.federation.run_folder import RUN_ID_FILE, data_sources
from safn_core.io import write_json
from safn_core.tracking import Tracker
from safn_core.tracking.params import run_params

ARTIFACTS = ("report.html", "model/model_card.md", "history.json")


def start(tracker: Tracker, cfg: SafnConfig, run_dir: Path) -> None:
    tracker.start(Path(run_dir).name, run_params(cfg), {
        "safn.run_folder": str(Path(run_dir).resolve()), "safn.mode": "deployment",
        "safn.target": str(cfg.data.target), "safn.command": "safn-server"})
    tracker.follow_rounds()


def finish(tracker: Tracker, run_dir: Path, code: int) -> None:
    """The rest of the run, its end, and the note under ``tracking`` in ``results.json``."""
    if not tracker.enabled:
        return
    run_dir = Path(run_dir)
    tracker.stop_following()
    tracker.log_params({f"data_source.{site}": kind
                        for site, kind in data_sources(run_dir).items()})
    tracker.log_artifacts(ARTIFACTS)
    tracker.log_model()
    tags = {}
    if (run_dir / RUN_ID_FILE).is_file():
        tags["safn.run_id"] = (run_dir / RUN_ID_FILE).read_text().strip()
    runs_file = run_dir / "flower_runs.json"
    if runs_file.is_file():
        runs = json.loads(runs_file.read_text()).get("runs", [])
        tags["safn.flower_runs"] = ", ".join(str(r["run_id"]) for r in runs)
    note = tracker.finish("FINISHED" if code == 0 else "FAILED", tags)
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    write_json(results_file, {**results, "tracking": note})
