"""Distributed DP-SGD's noise shares on the secure sum's fixed-point grid (docs/privacy.md).

One federated round is one DP-SGD step over the union of the sites' Poisson samples. Site *i*
clips every sampled participant's gradient to L2 norm ``C``, sums them (``g_i``, float64) and
sends, inside the masked secure sum (`safn_core.secagg`, integers mod 2^64)::

    y_i = round(s · g_i) + round(s · z_i),      z_i ~ N(0, share_std²) per coordinate

``s`` is a power of two (the grid is 1/s). The coordinator unmasks only ``Σ y_i`` and reads
``Σ y_i / s``: the federation's clipped sum plus the noise of every share.

**Why the released sum is (at least as private as) the Gaussian mechanism Opacus accounts.**
Write ``L = (round(s·g_i) + s·z_i)_i`` for the sites' *unrounded* noised vectors and
``T(L) = Σ_i round(L_i)``, so the coordinator sees ``T(L)`` (each ``round(s·g_i)`` is already an
integer). Adding or removing one participant, who belongs to one site ``j``, changes that site's
integer sum by a vector ``Δ`` with ``‖Δ‖ ≤ s·C + √d`` (clipping bounds the change by ``s·C``; the
two roundings add at most 1 per coordinate). Split ``Δ`` into integer vectors ``Δ_i`` over the
``h`` honest contributing sites, each within 1 per coordinate of ``Δ/h``. Because every ``Δ_i`` is
an integer vector, ``T(L + (Δ_1, …, Δ_h)) = T(L) + Δ``: the released value of the neighbouring
dataset is the *same function* ``T`` of a Gaussian vector shifted by ``(Δ_i)``, whose whitened
norm is at most ``sqrt((s·C + √d)² + h²·d) / (√h · s · share_std)``. By data processing the
released sum is therefore no less private than a Gaussian mechanism with sensitivity

    C_eff = sqrt((C + √d / s)² + n² · d / s²)        (n ≥ h: the sites asked)

and noise standard deviation ``√h · share_std``. Shares are drawn with
``share_std = σ · C_eff / √(n − t)``, so whenever at least ``n − t`` honest shares are in the sum
(``t`` sites collude with the coordinator and know their own shares, or dropped out), the noise
multiplier against ``C_eff`` is at least ``σ``. The argument holds pointwise for any sample of the
other participants, so Poisson subsampling at rate ``q`` gives Opacus' subsampled-Gaussian
accounting of ``(σ, q, 1 step)`` per round exactly (add/remove adjacency). Nothing is clipped on
the grid: the shares are integers added mod 2^64 (a `Packing` ``ring`` field), and the scale
leaves 2^62 / (64 noise SDs + every site's largest clipped sum) of headroom, so the sum does not
wrap in practice (`decode` checks it).

``C_eff`` exceeds ``C`` by about ``√d / s`` — below 1e-8 relative for SAFN's ~10^5 weights at the
scales used here (`rounding_slack`); the shares are drawn against ``C_eff``, so it costs noise, not
privacy. The shares are float64 Gaussians snapped to the integer grid, which is coarser than
their float64 spacing (about 2^10 times at the defaults, less for a small
``max_site_examples`` with a large σ): the same kind of defence as Mironov's snapping mechanism
against floating-point attacks on the low-order bits, without its formal analysis here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

HEADROOM_SDS = 64.0
"""The scale leaves room for this many standard deviations of the total noise."""

RING_LIMIT = 2.0**62
"""|Σ y| per coordinate the scale is sized for (half the int64 range: no wrap-around)."""

FORMAT = "safn-noise-shares/1"


@dataclass(frozen=True)
class NoiseShares:
    """One run's distributed noise: what every share of every round is drawn with.

    ``noise_multiplier`` σ (against ``sensitivity``), ``clipping_norm`` C, ``sites`` n (asked in a
    round), ``colluding`` t, ``dimension`` d (model weights), ``scale`` s (power of two),
    ``max_site_examples`` (a site's clipped sum is at most this many times C)."""

    noise_multiplier: float
    clipping_norm: float
    sites: int
    colluding: int
    dimension: int
    scale: float
    max_site_examples: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clipping_norm > 0):
            raise ValueError("noise shares need σ > 0 and C > 0")
        if self.colluding < 0 or self.sites < min_sites(self.colluding):
            raise ValueError(f"distributed DP against {self.colluding} colluding or dropped "
                             f"sites needs at least {min_sites(self.colluding)} sites in a round, "
                             f"got {self.sites}")
        if self.dimension < 1 or self.max_site_examples < 1:
            raise ValueError("noise shares need a dimension and max_site_examples ≥ 1")
        if math.frexp(self.scale)[0] != 0.5:
            raise ValueError(f"the grid scale must be a power of two, got {self.scale!r}")

    @classmethod
    def plan(cls, *, noise_multiplier: float, clipping_norm: float, sites: int, colluding: int,
             dimension: int, max_site_examples: int) -> "NoiseShares":
        """The shares with the largest scale (finest grid) whose sum cannot wrap in practice."""
        c, sigma = float(clipping_norm), float(noise_multiplier)
        # the total noise SD is σ·C_eff·√(n/(n−t)) ≤ σ·C·1.01·√n; each site's sum ≤ M·C
        reach = (sites * max_site_examples * c
                 + HEADROOM_SDS * sigma * 1.01 * c * math.sqrt(sites / max(sites - colluding, 1)))
        scale = math.ldexp(1.0, math.floor(math.log2(RING_LIMIT / reach)))
        return cls(sigma, c, int(sites), int(colluding), int(dimension), scale,
                   int(max_site_examples))

    # -- the guarantee's quantities -------------------------------------------------------------

    @property
    def honest(self) -> int:
        """Shares that must be in a sum for the guarantee: n − t."""
        return self.sites - self.colluding

    @property
    def sensitivity(self) -> float:
        """C_eff: the clipping norm plus the grid's rounding (module docstring)."""
        d, s = self.dimension, self.scale
        return math.sqrt((self.clipping_norm + math.sqrt(d) / s) ** 2 + self.sites ** 2 * d / s ** 2)

    @property
    def rounding_slack(self) -> float:
        """C_eff / C − 1: what the grid costs, relative."""
        return self.sensitivity / self.clipping_norm - 1.0

    @property
    def share_std(self) -> float:
        """Each site's noise SD per coordinate (real units): σ · C_eff / √(n − t)."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.honest)

    def total_std(self, shares: int) -> float:
        """The SD of the noise in a sum of ``shares`` shares."""
        return self.share_std * math.sqrt(shares)

    # -- a site's share ----------------------------------------------------------------------------

    def encode(self, gradient_sum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``round(s·g) + round(s·z)`` as int64, z ~ N(0, share_std²) drawn from ``rng``."""
        g = np.asarray(gradient_sum, dtype=np.float64)
        if g.shape != (self.dimension,):
            raise ValueError(f"a gradient sum of {self.dimension} values was expected, got "
                             f"shape {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError("the clipped gradient sum has non-finite values")
        bound = self.max_site_examples * self.clipping_norm * (1 + 1e-9)
        if float(np.linalg.norm(g)) > bound:
            raise ValueError(f"the clipped gradient sum's norm {np.linalg.norm(g):.4g} exceeds "
                             f"max_site_examples · C = {bound:.4g}: it was not clipped")
        signal = np.rint(g * self.scale).astype(np.int64)
        noise = np.rint(rng.normal(0.0, self.share_std * self.scale, size=g.shape)).astype(np.int64)
        return signal + noise

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The unmasked sum of shares back to real units (the noised clipped gradient sum)."""
        total = np.asarray(total)
        if total.dtype != np.int64 or total.shape != (self.dimension,):
            raise ValueError(f"expected an int64 sum of {self.dimension} values, got "
                             f"{total.dtype} of shape {total.shape}")
        if total.size and float(np.abs(total.astype(np.float64)).max()) > RING_LIMIT * 1.5:
            raise ValueError("the sum of noise shares is beyond the grid's headroom (a wrapped "
                             "sum, or a site's share not drawn with this plan)")
        return total.astype(np.float64) / self.scale

    # -- on the wire ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NoiseShares":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a noise-shares plan (expected format {FORMAT!r})")
        keys = {"noise_multiplier", "clipping_norm", "sites", "colluding", "dimension", "scale",
                "max_site_examples"}
        if set(data) - {"format"} != keys:
            raise ValueError(f"a noise-shares plan has the keys {sorted(keys)}; got "
                             f"{sorted(set(data) - {'format'})}")
        return cls(float(data["noise_multiplier"]), float(data["clipping_norm"]),
                   int(data["sites"]), int(data["colluding"]), int(data["dimension"]),
                   float(data["scale"]), int(data["max_site_examples"]))


def min_sites(colluding: int) -> int:
    """Training sites a round needs against ``colluding`` colluding or dropped sites:
    max(3, t + 2) (secure aggregation's minimum; and ≥ 2 honest shares)."""
    return max(3, int(colluding) + 2)
