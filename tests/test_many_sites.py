"""What a thousand virtual sites need: the simulation's dispatcher asks Flower's in-memory state
only for nodes that have a message (`safn_flower.patches.simulation.nodes_with_undelivered`: the same
messages reach the same nodes, without one full scan of the store per node per sweep); a run
that stops for lack of sites says why in a line of bounded length. Scale figures:
benchmarks/sim_many_sites.py."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from safn_flower.patches.simulation import nodes_with_undelivered as _nodes_with_undelivered


def _msg(dst: int, delivered: str = "") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=delivered))


def test_only_nodes_with_an_undelivered_message_are_asked_in_node_order():
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store={
        "a": _msg(7), "b": _msg(3, delivered="2026-12-02T00:00:00"), "c": _msg(5), "d": _msg(7)})
    nodes = {3: 0, 5: 1, 7: 2, 9: 3}  # node id -> partition id, Flower's order
    assert _nodes_with_undelivered(state, nodes) == [5, 7]
    state.message_ins_store.clear()
    assert _nodes_with_undelivered(state, nodes) == []


def test_a_thousand_refusals_make_one_bounded_line():
    from safn.server.statistics_round import refusals_in_brief

    refused = {f"site_{i:04d}": "its training split has 0 / 4 participants per class"
               for i in range(1000)}
    text = refusals_in_brief(refused)
    assert text.count("site_") == 10 and "site_0009:" in text and "site_0010" not in text
    assert text.endswith("; and 990 more sites (each site's reason: progress.log)")
    assert refusals_in_brief(dict(list(refused.items())[:3])).count("; ") == 3
