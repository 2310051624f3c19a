"""Reals as fixed-point integers in Z_{2^64}, with a scale that makes overflow impossible.

A real field has a clip bound ``B``: each site clips its values to ``[-B, B]`` and sends
``q = round(x · scale)`` as a two's-complement uint64. With at most ``max_parties`` summands the
sum satisfies ``|Σ q| ≤ max_parties · ceil(B · scale) ≤ 2^63 − 1``, so it never wraps and reads
back exactly as an int64. ``scale`` is the largest power of two with
``max_parties · B · scale < 2^63`` (a power of two so that ``x · scale`` and ``Σq / scale`` are
exact in floating point); when ``B · scale`` is not an integer — only possible for
``max_parties > 1024`` — it is halved until ``max_parties · ceil(B · scale) ≤ 2^63 − 1`` holds.

Error of a decoded sum of ``n ≤ max_parties`` clipped values, per coordinate::

    |decoded − exact sum| ≤ max_parties · (0.5 / scale + B · 2^-52)

(each summand rounded to the nearest multiple of ``1/scale``; plus half a float64 ulp of a value of
magnitude at most about ``max_parties · B`` when the int64 sum is turned into a float64).
"""

from __future__ import annotations

import math

import numpy as np

INT64_MAX = 2**63 - 1


def scale_for(bound: float, max_parties: int) -> float:
    """The largest power of two ``s`` with ``max_parties · bound · s < 2^63`` (see module doc)."""
    bound = float(bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"a clip bound must be a positive finite number, got {bound!r}")
    if isinstance(max_parties, bool) or not isinstance(max_parties, int) or max_parties < 1:
        raise ValueError(f"max_parties must be a positive int, got {max_parties!r}")
    # Start just above the answer, then step down with exact integer comparisons.
    exponent = 63 - math.frexp(max_parties * bound)[1] + 1
    while not _fits(bound, max_parties, exponent):
        exponent -= 1
    return math.ldexp(1.0, exponent)


def _fits(bound: float, max_parties: int, exponent: int) -> bool:
    scaled = math.ldexp(bound, exponent)          # exact: a power-of-two scaling
    if not math.isfinite(scaled):
        return False
    return max_parties * math.ceil(scaled) <= INT64_MAX


def error_bound(bound: float, max_parties: int) -> float:
    """The per-coordinate absolute error bound of a decoded sum (see module doc)."""
    scale = scale_for(bound, max_parties)
    return max_parties * (0.5 / scale + float(bound) * 2.0**-52)


def quantise(values: np.ndarray, bound: float, scale: float) -> tuple[np.ndarray, int]:
    """Clip to ``[-bound, bound]`` and round to uint64 (two's complement); also the clip count."""
    values = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > bound))
    q = np.rint(np.clip(values, -bound, bound) * scale).astype(np.int64)
    return q.view(np.uint64), clipped


def dequantise(total: np.ndarray, scale: float) -> np.ndarray:
    """A uint64 sum of quantised values back to float64 (negatives via two's complement)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / scale
