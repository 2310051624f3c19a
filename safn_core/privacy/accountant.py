"""ε from a ledger's history with Opacus' own accountants (RDP or PRV), and the fit check.

No accounting of our own: the history ``[(noise_multiplier, sample_rate, steps), ...]`` is handed
to a fresh ``opacus.accountants.RDPAccountant`` / ``PRVAccountant`` exactly as those accountants
record it when ``DPOptimizer`` steps (consecutive equal releases merged), and its
``get_epsilon(delta)`` is the answer. So the ε a site reports is, by construction, what Opacus
computes for the same steps, sampling rate and noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from opacus.accountants import create_accountant

from safn_core.privacy.ledger import merge_history

History = list[tuple[float, float, int]]


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, mechanism: str) -> float:
    """ε at ``delta`` of the composition of every release in ``history`` (0 for none)."""
    merged = tuple(merge_history(history))
    if not merged:
        return 0.0
    return _epsilon(merged, float(delta), mechanism)


@lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, mechanism: str) -> float:
    # ε is a pure function of (history, δ, mechanism); Opacus' RDP sum over ~150 orders costs
    # ~0.1 s, so the same question asked twice in a round is answered once.
    if mechanism not in ("rdp", "prv"):
        raise ValueError(f"unknown accountant {mechanism!r}; expected 'rdp' or 'prv'")
    acc = create_accountant(mechanism=mechanism)
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP warns when the best order is the largest one; PRV's log(1-q) at q = 1 (a plain
        # Gaussian release) divides by zero harmlessly. Neither changes the result.
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class Accountant:
    """ε of a ledger (or any history) at a fixed δ, and after more releases."""

    def __init__(self, mechanism: str, delta: float):
        self.mechanism = mechanism
        self.delta = float(delta)

    def epsilon(self, history: Iterable[tuple[float, float, int]]) -> float:
        return epsilon(history, self.delta, self.mechanism)

    def epsilon_after(self, history: History, planned: Iterable[tuple[float, float, int]]) -> float:
        return self.epsilon(list(history) + list(planned))
