"""Flower's fixed waits, shortened for a federation of few, small messages.

Flower 1.42 hard-codes waits tuned for large deployments: a SuperNode sleeps 3 s between pulls,
the ServerApp's Grid 3 s between polls for replies, and every process that fetches a message's
objects backs off 1 s, 2 s, 4 s … (up to 10 s) while they are still in transit — which they
usually are, since a ClientApp starts as soon as its task exists. For a SAFN round (half a
megabyte each way, well under a second of compute) these waits are nearly all of the time.

Each function here patches one of them in the calling process, without changing what Flower
does otherwise; ``safn-server`` (ServerApp), ``client.supernode`` and ``client.superexec`` call
them at start.
"""

from __future__ import annotations

import time

OBJECT_PULL_BACKOFF = (0.02, 0.25)
"""First retry after 20 ms, doubling up to 250 ms (Flower: 1 s up to 10 s)."""


class PollClock:
    """The ``time`` module with ``sleep`` capped at ``interval`` seconds (for the module-level
    ``time`` of a Flower module whose polling loop sleeps a fixed time)."""

    def __init__(self, interval: float):
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name):
        return getattr(time, name)


def fast_object_pulls(initial: float = OBJECT_PULL_BACKOFF[0],
                      cap: float = OBJECT_PULL_BACKOFF[1]) -> None:
    """Retry a message object that is not there yet after ``initial`` s, then up to ``cap``."""
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__ or {})
        if "initial_backoff" in defaults:
            defaults.update(initial_backoff=initial, backoff_cap=cap,
                            max_tries_per_object=max(defaults.get("max_tries_per_object") or 0,
                                                     5000))
            fn.__kwdefaults__ = defaults


def fast_grid_polling(interval: float) -> None:
    """ServerApp: poll the SuperLink for replies every ``interval`` s (Flower: 3 s)."""
    import flwr.superlink.grid.http_grid as http_grid

    http_grid.time = PollClock(interval)
