"""The run's sites after the statistics round: who they are, who trains, who only evaluates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RunSites:
    """The run's sites after the statistics round: node id -> name, who trains (``eligible``),
    who only evaluates (``held_out``)."""

    names: Mapping[int, str]
    eligible: frozenset[int]
    held_out: frozenset[int] = frozenset()

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node {node_id}")

    @property
    def held_out_names(self) -> frozenset[str]:
        return frozenset(self.name(n) for n in self.held_out)
