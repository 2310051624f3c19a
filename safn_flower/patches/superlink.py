"""The coordinator's SuperLink process (`safn.server.superlink_main`). One entry point: `prepare`.

- `HELD_PULLS`: a site's pull for work that finds none is held at the SuperLink for up to
  `HOLD_S` seconds and answered as soon as a message for that site is stored, instead of being
  answered "nothing" at once. Flower's SuperNode asks again only after a sleep
  (``site.poll_interval``, 0.2 s with safn) plus a round trip, so a message waited on average
  half a poll plus a round trip before it left; held, it leaves within `CHECK_EVERY` s. An idle
  site also sends a tenth of the requests (each 15-20 ms of the SuperLink's CPU with TLS and
  site authentication). At most `MAX_HELD` pulls are held at once (each holds one of uvicorn's
  worker threads); beyond that a pull is answered at once, as Flower does.
"""

from __future__ import annotations

import threading
import time

from safn_flower.patches import core
from safn_flower.patches.core import Patch, replace, target

HOLD_S = 2.0
"""Seconds a pull that finds no message is held (well below the SuperNode's 30 s read
timeout; a held pull ends by itself, so a site that went away holds a thread at most this)."""

CHECK_EVERY = 0.025
"""Seconds between two looks for a message while a pull is held (a query of the SuperLink's
own state, no network)."""

MAX_HELD = 32
"""Pulls held at once: uvicorn runs these handlers on a pool of 40 threads, which the other
requests (heartbeats, objects, replies) must keep some of."""


def _install_held_pulls(hold: float = HOLD_S, every: float = CHECK_EVERY,
                        max_held: int = MAX_HELD) -> None:
    from flwr.superlink.servicer.fleet import fleet_handlers

    flower_pull = fleet_handlers.pull_messages
    slots = threading.BoundedSemaphore(max_held)

    def pull_messages(request, state, store):
        response = flower_pull(request, state, store)
        if response.messages_list or not slots.acquire(blocking=False):
            return response
        try:
            deadline = time.monotonic() + hold
            while not response.messages_list and time.monotonic() < deadline:
                time.sleep(every)
                response = flower_pull(request, state, store)
            return response
        finally:
            slots.release()

    replace(HELD_PULLS, fleet_handlers, "pull_messages", pull_messages)


_HANDLERS = "flwr.superlink.servicer.fleet.fleet_handlers"

HELD_PULLS = Patch(
    "superlink_held_pulls",
    "a SuperNode's pull that finds no message is answered at once, and the SuperNode asks again "
    "after its poll interval",
    (target(_HANDLERS, "pull_messages", core.params("request", "state", "store")),
     target("flwr.superlink.routers.fleet.router", "fleet_pull_messages",
            core.source_says("fleet_handlers.pull_messages("))),
    _install_held_pulls)

PATCHES = (HELD_PULLS,)
"""Every patch of this process (`tests/test_flower_patches.py` checks them)."""


def prepare(hold: float = HOLD_S) -> tuple[str, ...]:
    """Patch this SuperLink process: pulls that find no message are held up to ``hold`` s (0:
    Flower's immediate answer, no patch). Checked first (`FlowerPatchError`), announced in one
    line; returns the names applied."""
    return core.apply([(HELD_PULLS, {"hold": hold})] if hold > 0 else [])
