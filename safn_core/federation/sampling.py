"""Which sites take part in a round, and each site's seed in it.

Both are functions of names and round numbers only (never of Flower's node ids, which change per
launch, nor of the global `random` state), so a run, its resume and the in-process reference loop
(`tests/reference_loop.py`) draw the same sites and train with the same seeds.
"""

from __future__ import annotations

import random


def site_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one site's local training in one round."""
    return int(seed) + 1000 * int(server_round) + int(partition_id)


def sample_sites(names: list[str], fraction: float, min_sites: int, seed: int,
                 server_round: int) -> list[str]:
    """Sites taking part in a round: seeded per round, so a resumed run samples the same."""
    k = sites_per_round(len(names), fraction, min_sites)
    rng = random.Random(seed * 1_000_003 + server_round)
    return sorted(rng.sample(sorted(names), k))


def sites_per_round(n_sites: int, fraction: float, min_sites: int) -> int:
    """How many sites `sample_sites` draws per round among ``n_sites``."""
    return min(n_sites, max(int(n_sites * fraction), min_sites))
