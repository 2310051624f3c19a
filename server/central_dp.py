"""Central DP as a part of the SAFN strategy: site-level clipping and Gaussian noise on the mean.

Without secure aggregation the coordinator clips each site's update and noises the average with
Flower's own `DifferentialPrivacyServerSideFixedClipping` (`CentralDP.wrap` puts it around
Flower's strategy; the SAFN strategy feeds it screened replies only, so a refusal, a failed
site or a malformed update never makes it skip a round or fail to clip). Under secure
aggregation the sites clip their updates and send them with equal weights, and the coordinator
adds the noise to the securely summed mean (`CentralDP.noised`), with the same calibration.

Every release is recorded with its *effective* noise multiplier z = σ / (m · max_i w_i), m the
sites per round and w_i the aggregation weights: removing one site's update changes the
weighted mean by at most C·max_i w_i while the noise std is σ·C/m. With equal weights and every
drawn site replying, z = σ. The coordinator turns the z's into ε
(`safn_core.federation.privacy_report.central_entry`, Opacus' RDP accountant, no sampling
amplification).

Flower draws its noise from NumPy's global generator. With ``noise_seed`` set (a simulation)
it is seeded per round from the run's seed and the generator restored afterwards, so a
simulation reproduces; a deployment leaves it None: the seed is in the bundle's config, and
noise anyone can regenerate could be subtracted from the released model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from safn_core.config import CentralDPConfig


class CentralDP:
    """Site-level central DP: σ (``noise_multiplier``), C (``clipping_norm``), m sites per
    round; ``noise_seed`` None draws the noise from the OS's entropy (deployment)."""

    def __init__(self, config: CentralDPConfig, sites_per_round: int,
                 noise_seed: int | None = None):
        self.noise_multiplier = float(config.noise_multiplier)
        self.clipping_norm = float(config.clipping_norm)
        self.sites_per_round = int(sites_per_round)
        self.noise_seed = noise_seed

    def wrap(self, inner: Strategy) -> DifferentialPrivacyServerSideFixedClipping:
        """Flower's server-side fixed clipping around ``inner`` (coordinator-side clipping)."""
        return DifferentialPrivacyServerSideFixedClipping(
            inner, self.noise_multiplier, self.clipping_norm, self.sites_per_round)

    @contextmanager
    def seeded(self, r: int) -> Iterator[None]:
        """NumPy's global generator seeded for round ``r`` (a simulation), restored after."""
        if self.noise_seed is None:
            yield
            return
        saved = np.random.get_state()
        np.random.seed([int(self.noise_seed) % 2**32, r])
        try:
            yield
        finally:
            np.random.set_state(saved)

    def release(self, weights: list[float], clipped_at: str | None = None) -> dict:
        """The record of one release over updates aggregated with ``weights``."""
        w = np.asarray(weights, dtype=float)
        w_max = float(w.max() / w.sum())
        out = {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
               "sites_per_round": self.sites_per_round, "sites_aggregated": int(len(w)),
               "max_weight": w_max,
               "effective_noise_multiplier": self.noise_multiplier
               / (self.sites_per_round * w_max)}
        if clipped_at is not None:
            out["clipped_at"] = clipped_at
        return out

    def noised(self, r: int, mean_update: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
        """Under secure aggregation: the mean of ``k`` clipped, equally weighted updates plus
        N(0, (σ·C/m)²), and the release's record (effective σ·k/m)."""
        from safn_core.privacy.randomness import numpy_generator

        rng = numpy_generator(None if self.noise_seed is None else [self.noise_seed, r], 3)
        std = self.noise_multiplier * self.clipping_norm / self.sites_per_round
        noisy = mean_update + rng.normal(0.0, std, size=mean_update.shape)
        record = {**self.release([1.0] * k), "max_weight": 1.0 / k,
                  "effective_noise_multiplier": self.noise_multiplier * k / self.sites_per_round,
                  "clipped_at": "sites (secure aggregation)"}
        return noisy, record
