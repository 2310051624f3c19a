"""The sums a site sends: small dataclasses of arrays that are added field by field.

Every field of `MeanSums` (round 1) and `ResidualSums` (round 2) is additive over sites, so the
federation-wide total is the element-wise sum of the sites' `to_arrays()` dictionaries: exactly
what a secure aggregation computes. Nothing in them has a participant dimension; their shapes
depend only on the `CombatSpec` (number of design columns p and features v).

``from_arrays`` is the way back from what travelled (a Flower ArrayRecord, a masked sum): it
checks names, shapes and finiteness against the spec, so a malformed message is one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, TypeVar

import numpy as np

from safn_core.errors import DataError
from safn_core.harmonisation.design import CombatSpec

S = TypeVar("S", bound="_Sums")


class _Sums:
    """Arrays that add field by field; subclasses are dataclasses and define `_shapes`."""

    @staticmethod
    def _shapes(p: int, v: int) -> dict[str, tuple[int, ...]]:  # pragma: no cover
        raise NotImplementedError

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name), dtype=np.float64)
                for f in fields(self)}

    @classmethod
    def from_arrays(cls: type[S], arrays: dict[str, np.ndarray], spec: CombatSpec) -> S:
        want = cls._shapes(len(spec.design_columns), len(spec.features))
        what = f"harmonisation {cls.__name__}"
        if set(arrays) != set(want):
            raise DataError(f"{what}: expected the arrays {sorted(want)}, got {sorted(arrays)}")
        out = {}
        for name, shape in want.items():
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.shape != shape:
                raise DataError(f"{what}: array '{name}' has shape {a.shape}, expected {shape} "
                                "for this spec (another spec at the sender?)")
            if not np.isfinite(a).all():
                raise DataError(f"{what}: array '{name}' holds non-finite values")
            out[name] = a
        return cls(**out)

    def __add__(self: S, other: S) -> S:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in fields(self)})

    @classmethod
    def total(cls: type[S], parts: Iterable[S]) -> S:
        """The sum of the sites' parts (what a secure aggregation of them reveals)."""
        parts = list(parts)
        if not parts:
            raise DataError(f"harmonisation {cls.__name__}: no site sent its sums")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    @property
    def count(self) -> int:
        return int(round(float(np.asarray(self.n).reshape(-1)[0])))  # type: ignore[attr-defined]


@dataclass
class MeanSums(_Sums):
    """Round 1 of one site (or the federation's total): what the regression needs.

    ``n`` (1,): participants; ``x_sum`` (p,), ``y_sum`` (v,): sums of the covariate columns and
    the features; ``xx`` (p, p), ``xy`` (p, v): cross-products of the covariates, and of
    covariates and features, each centred on the site's own means (the within-site part).
    Summed over sites, these are every quantity the coordinator's solve uses.
    """

    n: np.ndarray
    x_sum: np.ndarray
    y_sum: np.ndarray
    xx: np.ndarray
    xy: np.ndarray

    @staticmethod
    def _shapes(p: int, v: int) -> dict[str, tuple[int, ...]]:
        return {"n": (1,), "x_sum": (p,), "y_sum": (v,), "xx": (p, p), "xy": (p, v)}


@dataclass
class ResidualSums(_Sums):
    """Round 2 of one site (or the total): ``n`` (1,) participants and ``rss`` (v,), per feature
    the sum of squared residuals of the fitted mean model over the site's participants."""

    n: np.ndarray
    rss: np.ndarray

    @staticmethod
    def _shapes(p: int, v: int) -> dict[str, tuple[int, ...]]:
        return {"n": (1,), "rss": (v,)}
