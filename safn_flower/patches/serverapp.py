"""The coordinator's ServerApp process: its Grid polls at safn's interval, and the pulls of a
reply's objects are quick and bounded. One entry point: `prepare`.

- Grid polling (a public seam, no patch): Flower's deployed Grid sleeps 3 s between two polls
  for replies (``HttpGrid.send_and_receive``), its simulation Grid 0.1 s. `PollingGrid` wraps
  the Grid the ServerApp is given and implements ``send_and_receive`` over the Grid's public
  ``push_messages`` / ``pull_messages`` with its own wait; everything else is the Grid's.
- `REPLY_PULLS` (a patch): the deployed Grid pulls a reply's objects with Flower's module-level
  ``pull_objects`` and its defaults (first retry after 1 s, backing off to 10 s, giving up after
  2 hours); no argument of the Grid reaches them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from safn_flower.patches import core
from safn_flower.patches.core import Patch, replace, target

REPLY_UPLOAD_WAIT = 30.0
"""Seconds a deployed ServerApp keeps trying to pull the objects of a reply that is still being
uploaded (Flower: 7200). A site killed while sending its update leaves a reply whose model object
never arrives, and Flower's Grid pulls the replies of a round one after the other: without a
bound, every other site's reply waits until the SuperLink drops the upload (3 minutes) and is
lost when that runs past ``federation.round_timeout``. With it, that one reply becomes an error
("Reply message objects are unavailable"), the round goes on with the others. A live site's
upload of a few MB takes well under a second on any link where a federation is usable."""

REPLY_PULL_BACKOFF = core.OBJECT_PULL_BACKOFF_S
"""First retry of a reply's object after 20 ms, doubling up to 250 ms (Flower: 1 s up to 10 s):
a site pushes its reply message before its objects, so the first pull of a fresh reply often
finds an object still in transit."""


def _install_reply_pulls(seconds: float = REPLY_UPLOAD_WAIT,
                         backoff: tuple[float, float] = REPLY_PULL_BACKOFF) -> None:
    """The Grid's pulls of reply objects give up after ``seconds`` and retry quickly (other
    pulls in this process unchanged)."""
    import flwr.superlink.grid.http_grid as http_grid

    pull_objects = http_grid.pull_objects

    def pull_reply_objects(*args, **kwargs):
        kwargs.setdefault("max_time", seconds)
        kwargs.setdefault("initial_backoff", backoff[0])
        kwargs.setdefault("backoff_cap", backoff[1])
        tries = (pull_objects.__kwdefaults__ or {}).get("max_tries_per_object") or 0
        kwargs.setdefault("max_tries_per_object", max(tries, 5000))
        return pull_objects(*args, **kwargs)

    pull_reply_objects.__wrapped__ = pull_objects
    replace(REPLY_PULLS, http_grid, "pull_objects", pull_reply_objects)


REPLY_PULLS = Patch(
    "serverapp_reply_pulls",
    "a deployed ServerApp retries a reply's objects after 1 s, 2 s, 4 s … and waits up to 2 h "
    "for those of a reply whose sender died while uploading it, meanwhile pulling no other "
    "site's reply",
    (target("flwr.superlink.grid.http_grid", "pull_objects",
            lambda v: core.kwdefaults("max_time", "initial_backoff", "backoff_cap",
                                      "max_tries_per_object")(getattr(v, "__wrapped__", v))),
     target("flwr.superlink.grid.http_grid", "HttpGrid.pull_messages",
            core.calls("pull_objects"))),
    _install_reply_pulls)

PATCHES = (REPLY_PULLS,)
"""Every patch of this process (`tests/test_flower_patches.py` checks them)."""


class PollingGrid:
    """The ServerApp's Grid, with ``send_and_receive`` waiting ``poll_interval`` seconds between
    two polls for replies (Flower: 3 s deployed, 0.1 s in simulation). Same semantics as
    Flower's: push all messages, pull until every reply is in or ``timeout`` has passed
    (``None``: no limit), return the replies in the order they came."""

    def __init__(self, grid, poll_interval: float):
        if isinstance(grid, PollingGrid):
            grid = grid.grid
        self.grid, self.poll_interval = grid, float(poll_interval)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        waiting = set(self.grid.push_messages(messages))
        waiting.discard(None)  # a message Flower could not push has no reply to wait for
        del messages
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while waiting:
            got = list(self.grid.pull_messages(list(waiting)))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting:
                break
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.poll_interval if left is None else min(self.poll_interval, left))
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def prepare(grid, poll_interval: float):
    """The Grid a deployed ServerApp uses: ``grid`` polled every ``poll_interval`` s
    (`PollingGrid`), with its reply pulls quick and bounded (`REPLY_PULLS`, checked first and
    announced in one line; `FlowerPatchError` when the installed Flower is not as expected).
    A simulation's in-memory Grid is only wrapped (it pulls no objects)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    inner = grid.grid if isinstance(grid, PollingGrid) else grid
    if isinstance(inner, HttpGrid):
        core.apply([(REPLY_PULLS, {})])
    return PollingGrid(grid, poll_interval)
