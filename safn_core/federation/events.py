"""What a run tells the people watching it, as data: one JSON line per event in ``events.jsonl``.

The coordinator (the ServerApp, in simulation and deployment alike) never hands out sentences
to be parsed: it emits events, each a code (`Event`) and JSON-safe fields, appended to the run
folder's ``events.jsonl`` (one complete line per write, flushed) and echoed in English on its
own console (`safn_core.federation.event_text.shown`). Whoever follows the run (`safn-server`, a test, a dashboard) reads the same lines
with `EventFollower` and decides what to show; English is made only where it is shown, by
`safn_core.federation.event_text.render`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from safn_core.processes import LogFollower

EVENTS_FILE = "events.jsonl"


class Event:
    """Event codes (the ``event`` field of each line)."""

    SITES_CONNECTED = "sites_connected"  # the start-of-run wait ended (expected, connected)
    STATISTICS = "statistics"  # the statistics round is done: participants, sites, classes
    STATISTICS_WITHHELD = "statistics_withheld"  # a site withheld its statistics (code)
    STATISTICS_NOISED = "statistics_noised"  # a DP site's Gaussian-mechanism statistics
    STATISTICS_CLIPPED = "statistics_clipped"  # secure statistics clipped to their bounds
    FEATURES_WITHHELD = "features_withheld"  # features seen in fewer than min_cell people
    SECURE_STATISTICS = "secure_statistics"  # secure sum of the statistics: contributors
    HELD_OUT = "held_out"  # the run's held-out sites
    RESUMED = "resumed"  # resuming after round r
    NOTE = "note"  # a resume's note (code): data changed, selection rule kept
    HARMONISATION = "harmonisation"  # ComBat fitted / kept / clipped (code)
    LOGISTIC = "logistic"  # the logistic regression floor fitted / kept / skipped (code)
    DP_PLAN = "dp_plan"  # distributed DP: planned / kept / a site declined / stopped (code)
    REJOIN = "rejoin"  # a round's wait for reconnecting sites (code: waiting/back/gone)
    SECURE_RETRY = "secure_retry"  # a secure sum redone without the sites that dropped out
    ROUND = "round"  # a round's history entry
    STOPPED_EARLY = "stopped_early"  # model selection ended the run
    PERSONALISATION = "personalisation"  # the personalised comparison's record
    RUN_END_UNACKNOWLEDGED = "run_end_unacknowledged"  # sites that did not confirm the end
    RUN_END = "run_end"  # completed / failed (with the failure's code and detail)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class EventLog:
    """Appends events to ``path`` (one JSON line each) and hands each to ``echo`` (e.g.
    ``event_text.shown(print)``: in English on a console).

    ``path`` None keeps events in memory only (`events`); ``echo`` None shows nothing.
    """

    def __init__(self, path: Path | None, echo: Callable[[dict], None] | None = None):
        self.path = None if path is None else Path(path)
        self.echo = echo
        self.events: list[dict] = []
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event_code: str, /, **fields) -> dict:
        """Record event ``event_code`` with ``fields`` (JSON-safe; NumPy values and sets are
        converted); returns the event."""
        if {"event", "time"} & set(fields):
            raise ValueError("'event' and 'time' are an event's own fields")
        event = {"event": event_code, "time": round(time.time(), 3), **_jsonable(fields)}
        line = json.dumps(event, sort_keys=False, allow_nan=False) + "\n"
        with self._lock:
            self.events.append(event)
            if self.path is not None:
                # one write of one complete line: a follower never sees half an event
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode("utf-8"))
                finally:
                    os.close(fd)
        if self.echo is not None:
            self.echo(event)
        return event


class EventFollower:
    """The new events of a run folder's ``events.jsonl``, from where the last call stopped (a
    line still being written is read once it is complete)."""

    def __init__(self, path: Path, from_end: bool = False):
        self._lines = LogFollower(path, from_end=from_end)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self._lines.lines() if line.strip()]


def read_events(run_dir: Path) -> list[dict]:
    """Every event of a run folder, in order."""
    return EventFollower(Path(run_dir) / EVENTS_FILE).events()
