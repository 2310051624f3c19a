"""Target marginals of the clinical scales: a latent z mapped to a score by a quantile function.

Each instrument's baseline total is a Gaussian copula: a standard-normal latent z (see
`safn_core.synth.severity`) mapped through the quantile function of a per-cohort target
distribution: negative binomial for symptom counts, beta-binomial for UPSIT, categorical for H&Y
and HC MoCA ≥ 27, rounded normal for SDMT/LNS. Targets: ``docs/ppmi-data.md`` §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import ndtr


def _u(z: np.ndarray) -> np.ndarray:
    return np.clip(ndtr(z), 1e-12, 1 - 1e-12)


@dataclass(frozen=True)
class Marginal:
    """Quantile map of one scale's total: ``value = offset + sign * base.ppf(u)``.

    ``kind``: ``nb`` (mean, sd), ``bb`` (n, mean, sd), ``cat`` (values, probs), ``norm`` (mean, sd).
    With ``sign = -1`` (deficit scales, e.g. MoCA = 30 − deficit) ``u`` is flipped so that a
    higher latent z always gives a higher value.
    """

    kind: str
    params: tuple
    offset: float = 0.0
    sign: int = 1
    lo: float = 0.0
    hi: float = np.inf

    def ppf(self, z: np.ndarray) -> np.ndarray:
        u = _u(z) if self.sign > 0 else _u(-z)
        if self.kind == "nb":
            mean, sd = self.params
            p = mean / sd**2
            r = mean * p / (1 - p)
            base = stats.nbinom.ppf(u, r, p)
        elif self.kind == "bb":
            n, mean, sd = self.params
            q = mean / n
            rho = (sd**2 / (n * q * (1 - q)) - 1) / (n - 1)
            ab = 1 / rho - 1
            base = stats.betabinom.ppf(u, n, q * ab, (1 - q) * ab)
        elif self.kind == "cat":
            values, probs = self.params
            cdf = np.cumsum(probs) / np.sum(probs)
            base = np.asarray(values, float)[np.minimum(np.searchsorted(cdf, u), len(values) - 1)]
        elif self.kind == "norm":
            mean, sd = self.params
            base = np.round(mean + sd * stats.norm.ppf(u))
        else:  # pragma: no cover
            raise ValueError(self.kind)
        return np.clip(self.offset + self.sign * base, self.lo, self.hi)


def symptom_count(mean: float, sd: float, hi: float) -> Marginal:
    """A count of symptom points, 0..``hi``: negative binomial with this mean and SD."""
    return Marginal("nb", (mean, sd), hi=hi)


def deficit(top: int, mean: float, sd: float) -> Marginal:
    """A score of ``top`` minus a negative-binomial deficit (MoCA, HVLT, Benton)."""
    return Marginal("nb", (mean, sd), offset=top, sign=-1, lo=0, hi=top)

