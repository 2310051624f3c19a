"""Central DP around a SAFN strategy: Flower's server-side fixed clipping, fed screened replies.

Without secure aggregation the coordinator clips each site's update and noises the average
(`SafnCentralDP`); under secure aggregation the sites clip and `server.secure_strategy` adds the
noise to the securely summed mean, with the same calibration (`sites_per_round`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from safn_core.config import FederationConfig
from safn_core.federation.sampling import sample_sites
from safn_core.federation.protocol import METRICS, Metric


class SafnCentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Central DP: Flower's server-side fixed clipping + Gaussian noise around a SAFN strategy.

    Flower's wrapper clips each reply's update (new − global weights) to ``clipping_norm``, lets
    the strategy aggregate, and adds N(0, (σ·C/m)²) to the result, m = sites per round. What it
    does not do, and this class adds: only screened replies reach it (a refusal, a failed site or
    a malformed update would otherwise make it skip the whole round or fail to clip), and every
    release is recorded (``strategy.central[round]``) with its *effective* noise multiplier
    z = σ / (m · max_i w_i), w_i the FedAvg weights (n_i / Σ n): removing one site's update
    changes the weighted average by at most C·max_i w_i, and the noise std is σ·C/m. With equal
    weights and every site replying, z = σ. The coordinator turns the z's into ε
    (`server.app.central_epsilon`, Opacus' RDP accountant, no sampling amplification).

    Flower draws the noise from NumPy's global generator. With ``noise_seed`` set (a simulation)
    it is seeded per round from the run's seed and the generator restored afterwards, so a
    simulation reproduces; a deployment leaves it None: the seed is in the bundle's config, and
    noise anyone can regenerate could be subtracted from the released model.
    """

    noise_seed: int | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        inner = self.strategy
        r = server_round + inner.round_offset
        kept = inner.screen_train(r, replies)
        if inner.too_few(r, kept):
            return None, None
        inner._prescreened = True
        saved = np.random.get_state() if self.noise_seed is not None else None
        if saved is not None:
            np.random.seed([int(self.noise_seed) % 2**32, r])
        try:
            arrays, metrics = super().aggregate_train(server_round, kept)
        finally:
            inner._prescreened = False
            if saved is not None:
                np.random.set_state(saved)
        if arrays is not None:
            n = np.array([float(m.content[METRICS][Metric.NUM_EXAMPLES]) for m in kept])
            w_max = float(n.max() / n.sum())
            inner.central[r] = {
                "noise_multiplier": float(self.noise_multiplier),
                "clipping_norm": float(self.clipping_norm),
                "sites_per_round": int(self.num_sampled_clients), "sites_aggregated": len(kept),
                "max_weight": w_max,
                "effective_noise_multiplier": float(self.noise_multiplier)
                / (self.num_sampled_clients * w_max)}
        return arrays, metrics


def sites_per_round(n_sites: int, fraction: float, min_sites: int) -> int:
    """How many sites `sample_sites` draws per round among ``n_sites``."""
    return len(sample_sites([str(i) for i in range(n_sites)], fraction, min_sites, 0, 1))


def with_central_dp(strategy, fed: FederationConfig, n_sites: int):
    """The strategy to ``start``: ``strategy`` itself, or wrapped for central DP when
    ``federation.central_dp.enabled`` (the wrapper reads and records through ``strategy``)."""
    cdp = fed.central_dp
    if not cdp.enabled:
        return strategy
    return SafnCentralDP(strategy, cdp.noise_multiplier, cdp.clipping_norm,
                         sites_per_round(n_sites, fed.fraction_train, fed.min_sites))
