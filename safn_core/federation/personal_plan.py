"""What a run plans for a site's personal model before anything is trained: the epochs of
personal training a DP site's plan (σ) must pay for, and the seeds personal training draws.

It reads the configuration only, so a site's privacy (`site_privacy`, which plans σ) and its
personal training (`personal_training`, which spends from that plan) both use it without
importing each other.
"""

from __future__ import annotations

from safn_core.config import SafnConfig

PERSONAL_SEED_OFFSET = 500
"""Personal training's seeds are the round's site seed plus this (distinct from the global
training's, which stay as without personalisation)."""


def planned_personal_epochs(cfg: SafnConfig) -> int:
    """Epochs of personal training a run plans at each site (for a DP site's plan)."""
    method = cfg.personalisation.method
    if method == "ditto":
        return cfg.federation.rounds * cfg.federation.local_epochs
    if method == "fine_tune":
        return cfg.personalisation.epochs
    return 0


def personal_seed(round_seed: int) -> int:
    """The seed of personal training in the round whose site seed is ``round_seed``."""
    return int(round_seed) + PERSONAL_SEED_OFFSET
