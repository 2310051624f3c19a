"""Preprocessing fitted on training data only: mean imputation and z-scoring, per feature.

The state is built from *sufficient statistics* (per-feature count, sum, sum of squares), so the
same code serves a centralised fit (statistics of the training fold) and a federation (the sum of
every site's statistics over its training split): no per-site scaler exists anywhere.

A modality with no value at all for a participant is not imputed into existence: `transform`
returns a mask of the modalities present, and SAFN masks the missing token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from safn_core.data.cohort import Modality


@dataclass
class FeatureStats:
    """Per-feature count of observed values, sum and sum of squares (additive across sites)."""

    features: tuple[str, ...]
    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, features: list[str] | tuple[str, ...]) -> "FeatureStats":
        x = frame[list(features)].to_numpy(dtype=np.float64)
        observed = ~np.isnan(x)
        x0 = np.where(observed, x, 0.0)
        return cls(tuple(features), observed.sum(0).astype(np.float64), x0.sum(0),
                   (x0 * x0).sum(0))

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        if self.features != other.features:
            raise ValueError("feature statistics of different feature lists cannot be added")
        return FeatureStats(self.features, self.count + other.count, self.total + other.total,
                            self.total_sq + other.total_sq)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)

    def std(self) -> np.ndarray:
        """Sample standard deviation (ddof = 1); 1 where undefined or zero."""
        n = self.count
        mean = self.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.total_sq - n * mean * mean) / np.maximum(n - 1, 1)
        sd = np.sqrt(np.clip(var, 0.0, None))
        return np.where((n > 1) & (sd > 1e-12), sd, 1.0)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "count": self.count.tolist(),
                "total": self.total.tolist(), "total_sq": self.total_sq.tolist()}


class Preprocessor:
    """Impute with the training mean, scale to zero mean and unit SD; report modality masks."""

    def __init__(self, modalities: tuple[Modality, ...]):
        self.modalities = tuple(modalities)
        self.features = [f for m in self.modalities for f in m.features]
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, frame: pd.DataFrame) -> "Preprocessor":
        """Fit on a training frame (participants × features)."""
        return self.fit_stats(FeatureStats.from_frame(frame, self.features))

    def fit_stats(self, stats: FeatureStats) -> "Preprocessor":
        """Fit from (possibly federated) sufficient statistics."""
        if tuple(stats.features) != tuple(self.features):
            raise ValueError("statistics do not describe this preprocessor's features")
        self.mean_ = stats.mean()
        self.scale_ = stats.std()
        return self

    # -- applying -----------------------------------------------------------------------------

    def _check(self) -> None:
        if self.mean_ is None:
            raise RuntimeError("Preprocessor is not fitted; call fit() or fit_stats() first")

    def transform(self, frame: pd.DataFrame) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-modality float32 blocks (imputed, scaled) and a (n, M) mask of modalities present."""
        self._check()
        x = frame[self.features].to_numpy(dtype=np.float64)
        observed = ~np.isnan(x)
        z = (np.where(observed, x, self.mean_) - self.mean_) / self.scale_
        blocks, mask, start = [], [], 0
        for m in self.modalities:
            stop = start + len(m.features)
            blocks.append(z[:, start:stop].astype(np.float32))
            mask.append(observed[:, start:stop].any(axis=1))
            start = stop
        return blocks, np.stack(mask, axis=1)

    def transform_flat(self, frame: pd.DataFrame) -> np.ndarray:
        """All features in one (n, F) float array, for the scikit-learn baselines."""
        blocks, _ = self.transform(frame)
        return np.concatenate(blocks, axis=1)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self._check()
        return {
            "modalities": [{"name": m.name, "features": list(m.features), "side": m.side}
                           for m in self.modalities],
            "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict) -> "Preprocessor":
        mods = tuple(Modality(m["name"], tuple(m["features"]), m["side"])
                     for m in state["modalities"])
        pre = cls(mods)
        pre.mean_ = np.asarray(state["mean"], dtype=np.float64)
        pre.scale_ = np.asarray(state["scale"], dtype=np.float64)
        return pre
