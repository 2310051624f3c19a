"""The simulation driver (safn-sim: `safn.simulations.engine`, Flower's Simulation Engine in this
process). One entry point: `prepare`, a context manager around one simulation.

- Grid polling (a public seam, no patch): with ``simulation.fast_polling`` the ServerApp's
  in-memory Grid is wrapped in `serverapp.PollingGrid` (10 ms between polls; Flower: 0.1 s),
  by running the ServerApp through a ServerApp of ours (``ServerApp.__call__`` is public).
- `DISPATCH` (a patch): Flower's dispatcher hands the ClientApps their messages in sweeps
  0.1 s apart, and each sweep asks its in-memory state for every node's messages. With
  ``simulation.fast_polling`` (the default) the sweeps are 10 ms apart, Flower's own sweep
  otherwise unchanged: at 5 sites that is ~0.12 s of every round (benchmarks/sim_overhead.py,
  docs/flower-patches.md). With ``simulation.many_sites_dispatcher`` a sweep also asks only for
  the nodes that have a message, read from Flower's state under its lock: at hundreds of
  virtual sites the full sweep is most of the driver's CPU (benchmarks/sim_many_sites.py).
- `RAY_LEFT_RUNNING` (a patch, only on an existing Ray cluster: ``simulation.ray_address``):
  Flower's Ray backend shuts Ray down when the run ends, before safn-sim has read where the
  ClientApps ran and removed the sites' mirrors (`safn.simulations.ray_cluster`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from safn_flower.patches import core
from safn_flower.patches.core import Patch, replace, target

GRID_POLL_INTERVAL = 0.01
"""Seconds between the simulation ServerApp's polls for replies with ``fast_polling`` (Flower's
in-memory Grid: 0.1)."""

DISPATCH_INTERVAL = 0.01
"""Seconds between two sweeps of the patched dispatcher (Flower: 0.1); longer with many nodes
(0.2 ms a node), so that a sweep stays cheap."""


def nodes_with_undelivered(state, nodes_mapping) -> list:
    """The nodes that have a message not yet handed out, from one look at the state's store.

    Flower's dispatcher asks ``get_message_ins`` once per node per sweep, and each call reads
    (and checks) every stored message: N nodes x M messages per sweep, which at 1000 virtual
    sites was most of the driver's CPU. Asking only for the nodes that have one keeps Flower's own
    checks and delivery marking, once per message."""
    with state.lock:
        pending = {m.metadata.dst_node_id for m in list(state.message_ins_store.values())
                   if m.metadata.delivered_at == ""}
    return [node_id for node_id in nodes_mapping if node_id in pending]


def _install_dispatch(interval: float = DISPATCH_INTERVAL, only_pending: bool = False) -> None:
    """Flower's own dispatcher loop with a shorter wait; with ``only_pending``, asking only for
    nodes that have a message (`nodes_with_undelivered`)."""
    import flwr.server.superlink.fleet.vce.vce_api as vce

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        wait = max(interval, 2e-4 * len(nodes_mapping))
        while not f_stop.is_set():
            nodes = (nodes_with_undelivered(state, nodes_mapping) if only_pending
                     else list(nodes_mapping.keys()))
            for node_id in nodes:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(wait)

    replace(DISPATCH, vce, "add_messages_to_queue", add_messages_to_queue)


_LS = "flwr.server.superlink.linkstate.in_memory_linkstate"

DISPATCH = Patch(
    "sim_dispatch_interval",
    "the simulation's dispatcher hands messages to the Ray actors in sweeps 0.1 s apart, each "
    "asking the in-memory state for every node's messages (a scan of all stored messages per "
    "node)",
    (target("flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue",
            core.params("state", "queue", "nodes_mapping", "f_stop")),
     target(_LS, "InMemoryLinkState.__init__", core.calls("message_ins_store", "lock")),
     target(_LS, "InMemoryLinkState.get_message_ins",
            core.calls("message_ins_store", "dst_node_id", "delivered_at"))),
    _install_dispatch)


def _install_ray_left_running() -> None:
    """The backend's actors are ended as before; Ray itself is left to safn-sim, which shuts it
    down after reading the cluster's state (`safn.simulations.ray_cluster`)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    replace(RAY_LEFT_RUNNING, raybackend.RayBackend, "terminate", terminate)


RAY_LEFT_RUNNING = Patch(
    "sim_ray_left_running",
    "the simulation's Ray backend shuts Ray down when the run ends, before safn-sim on a Ray "
    "cluster can read where the ClientApps ran and remove the sites' mirrors",
    (target("flwr.server.superlink.fleet.vce.backend.raybackend", "RayBackend.terminate",
            core.calls("terminate_all_actors", "shutdown")),),
    _install_ray_left_running)

PATCHES = (DISPATCH, RAY_LEFT_RUNNING)
"""Every patch of this process (`tests/test_flower_patches.py` checks them)."""


def polled_server_app(server_app, poll_interval: float = GRID_POLL_INTERVAL):
    """A ServerApp that runs ``server_app`` with its Grid polled every ``poll_interval`` s."""
    from flwr.serverapp import ServerApp

    from safn_flower.patches.serverapp import PollingGrid

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        server_app(PollingGrid(grid, poll_interval), context)

    return app


@contextlib.contextmanager
def prepare(server_app, *, fast_polling: bool, many_sites_dispatcher: bool = False,
            ray_cluster: bool = False) -> Iterator[object]:
    """Around one simulation: yields the ServerApp to run (``server_app``, its Grid polled every
    `GRID_POLL_INTERVAL` s with ``fast_polling``), with the dispatcher patch when
    ``fast_polling`` (sweeps 10 ms apart) or ``many_sites_dispatcher`` (also asking only for
    nodes with a message) and the Ray patch on a ``ray_cluster`` (checked first, announced in
    one line; `FlowerPatchError` before anything changes); the patches it applied are undone at
    the end."""
    dispatch = fast_polling or many_sites_dispatcher
    chosen = ([(DISPATCH, {"only_pending": many_sites_dispatcher})] if dispatch else []) + \
        ([(RAY_LEFT_RUNNING, {})] if ray_cluster else [])
    done = core.apply(chosen)
    try:
        yield polled_server_app(server_app) if fast_polling else server_app
    finally:
        core.restore(done)
