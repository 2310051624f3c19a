"""What of a round's history entry is logged, and logging each round as it is booked.

`round_metrics`: the pooled figures only (training loss, pooled validation loss and ROC-AUC,
the selected round, the threshold, the pooled test metrics), each site's ε spent so far where
the site reported one, central DP's ε, and the number of secure sums redone. Never a site's own
metrics (``sites`` in the entry, withheld below ``data.min_cell``): a logged figure is always
one that ``history.json`` holds for the coordinator, under the same dotted path.

`RoundFollower`: the coordinator's book of rounds (`safn.server.round_book`) emits a ``round``
event with each round's entry into the run folder's ``events.jsonl`` as it closes the round;
the follower reads that file in a thread of the tracking process (the ServerApp may run in a
thread of it, as under safn-sim, or elsewhere) and logs each new round at once.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

SCALARS = ("train_loss", "val_loss", "val_roc_auc", "selected_round", "threshold")
POLL_SECONDS = 0.5


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def round_metrics(entry: dict) -> dict[str, float]:
    """Metric name (the entry's dotted path) → value, for one round's history entry."""
    out: dict[str, float] = {}
    for key in SCALARS:
        if (v := _number(entry.get(key))) is not None:
            out[key] = v
    for key, value in (entry.get("pooled") or {}).items():
        if (v := _number(value)) is not None:
            out[f"pooled.{key}"] = v
    for site, record in (entry.get("privacy") or {}).items():
        if isinstance(record, dict) and (v := _number(record.get("epsilon"))) is not None:
            out[f"privacy.{site}.epsilon"] = v
    central = entry.get("central_dp")
    if isinstance(central, dict) and (v := _number(central.get("epsilon"))) is not None:
        out["central_dp.epsilon"] = v
    secure = entry.get("secure_sum")
    if isinstance(secure, dict):
        out["secure_sum.retries"] = float(len(secure.get("retries") or []))
    return out


class RoundFollower:
    """Logs each ``round`` event of ``<run_dir>/events.jsonl`` through ``log(entry)``, from a
    thread, until `stop` (which logs what is left)."""

    def __init__(self, run_dir: Path, log):
        from safn_core.federation.events import EVENTS_FILE, EventFollower

        self._events = EventFollower(Path(run_dir) / EVENTS_FILE)
        self._log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="safn-tracking", daemon=True)

    def start(self) -> RoundFollower:
        self._thread.start()
        return self

    def _drain(self) -> None:
        for event in self._events.events():
            if event.get("event") == "round" and isinstance(event.get("entry"), dict):
                self._log(event["entry"])

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._drain()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
