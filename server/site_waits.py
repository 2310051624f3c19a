"""Waiting for sites: at the start of a run, for a round's sites, and for a site that is
reconnecting (Flower's own waits have no upper bound)."""

from __future__ import annotations

import time
from collections.abc import Callable

from safn_core.errors import SafnError
from safn_core.federation.events import Event, EventLog


class SitesMissing(SafnError):
    """Fewer than ``min_sites`` sites connected for longer than the configured wait, or too few
    could describe their data: the run stops, its last checkpoint intact."""


def wait_for_nodes(grid, min_sites: int, timeout: float, usable: Callable[[int], bool],
                   when: str) -> list[int]:
    """The usable connected node ids once there are ``min_sites`` of them, polling the Grid.

    Flower's own wait for ``min_available_nodes`` has no upper bound; this one raises
    `SitesMissing` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(n for n in grid.get_node_ids() if usable(n))
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() > deadline:
            have = "no site was" if not nodes else f"only {len(nodes)} of the {min_sites} " \
                                                   "sites needed were"
            raise SitesMissing(f"{have} connected {when}, for {timeout:.0f} s "
                               "(federation.wait_for_sites)")
        time.sleep(0.2)


def await_rejoin(grid, expected: dict[int, str], away: set[int], timeout: float, round_: int,
                 events: EventLog, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, interval: float = 0.2) -> set[int]:
    """At the start of round ``round_``: wait up to ``timeout`` seconds for the sites of the run
    (``expected``: node id -> site name) that are not connected, and return the connected ids.

    A site that was part of the run and is restarting (a crash, a reboot) thus takes part in the
    round it comes back for, instead of missing rounds while the others race on. ``away`` (kept
    across rounds by the caller) bounds the cost of a site that left for good: a site still
    missing after a whole wait is added to it and not waited for again; once it is connected at
    the start of a round it leaves ``away`` and is waited for again if it disappears again.
    Each wait, reconnection and give-up is an `Event.REJOIN` (code ``waiting``, ``back``,
    ``gone``).
    """
    connected = set(grid.get_node_ids())
    away -= connected
    missing = set(expected) - connected - away
    if not missing or timeout <= 0:
        return connected

    def names(ids) -> list[str]:
        return sorted(expected[n] for n in ids)

    events.emit(Event.REJOIN, code="waiting", round=round_, sites=names(missing),
                timeout=timeout)
    start = clock()
    while missing and clock() - start < timeout:
        sleep(interval)
        connected = set(grid.get_node_ids())
        back = missing & connected
        if back:
            events.emit(Event.REJOIN, code="back", round=round_, sites=names(back),
                        seconds=clock() - start)
            missing -= back
    if missing:
        away |= missing
        events.emit(Event.REJOIN, code="gone", round=round_, sites=names(missing),
                    timeout=timeout)
    return connected


class OnlyNodes:
    """A view of the Grid that lists only the nodes chosen for this round."""

    def __init__(self, grid, node_ids: list[int]):
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self):
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)
