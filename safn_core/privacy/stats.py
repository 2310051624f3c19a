"""The statistics round under DP (``privacy.statistics: gaussian``): the Gaussian mechanism.

What a site releases in the statistics round is the vector, over its TRAINING split,

    per feature f:  c_f = #observed,  s_f = Σ x'_f,  q_f = Σ x'_f²    and the class counts k_0 … k_{K-1}

where ``x'_f = clip((x_f − mid_f) / half_f, −1, 1)`` rescales feature f by its *public* plausible
range ``[mid_f − half_f, mid_f + half_f]`` (the data contract's ranges; never computed from data),
and K is the target's number of classes (`safn_core.targets`; 2 for PD vs HC).
Adding or removing one participant changes each c_f by ≤ 1, each s_f by ≤ 1 in absolute value, each
q_f by ≤ 1 and one class count by 1, so the L2 sensitivity of the whole vector is

    Δ = sqrt(3·F + 1)                                   (F = number of features)

Every component gets independent N(0, (σΔ)²) noise: one release of the Gaussian mechanism with
noise multiplier σ, which is exactly a subsampled Gaussian with sampling rate 1 and one step, so
the ledger records it as ``(σ, 1.0, 1)`` and Opacus' accountant composes it with DP-SGD.
Everything after the noise (clipping counts at 0, converting back to raw units, the coordinator's
sums) is post-processing and costs nothing more.

No small-cell suppression may run *before* the noise (a data-dependent suppression changes the
sensitivity); the noise replaces it.

`release_statistics` is the statistics round of a DP site: σ for ``statistics_epsilon``, the
release charged to the site's ledger before it is made, and the released values kept in the
ledger, so that a resumed run re-sends the same numbers (post-processing, free) instead of
paying again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from safn_core.preprocess import FeatureStats
from safn_core.privacy.budget import SiteBudget
from safn_core.privacy.calibration import gaussian_noise_multiplier
from safn_core.privacy.errors import BudgetExhausted, PrivacyError
from safn_core.privacy.randomness import STATISTICS, numpy_generator

RELEASED = "statistics_released"
"""The ledger event that keeps a run's released (noised) statistics."""


def statistics_sensitivity(n_features: int) -> float:
    """L2 sensitivity of the released vector (add/remove one participant): sqrt(3F + 1)."""
    return float(np.sqrt(3 * n_features + 1))


def _ranges(features: Sequence[str], ranges: Mapping[str, tuple[float, float]]):
    missing = [f for f in features if f not in ranges]
    if missing:
        shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
        raise PrivacyError(
            f"privacy.statistics 'gaussian' needs a public plausible range for every feature; "
            f"{len(missing)} have none ({shown}). Add them to the table mapping's ranges or use "
            f"privacy.statistics: exact")
    lo = np.array([float(ranges[f][0]) for f in features])
    hi = np.array([float(ranges[f][1]) for f in features])
    bad = [f for f, a, b in zip(features, lo, hi)
           if not (np.isfinite(a) and np.isfinite(b) and b > a)]
    if bad:
        raise PrivacyError(f"plausible range of {bad[0]!r} is not a finite interval lo < hi")
    return (lo + hi) / 2, (hi - lo) / 2


def exact_clipped_statistics(frame: pd.DataFrame, features: Sequence[str], labels: np.ndarray,
                             ranges: Mapping[str, tuple[float, float]], n_classes: int = 2):
    """The noise-free vector (c, s, q, k) in range units, before the Gaussian mechanism; k has
    one count per class (``n_classes``)."""
    mid, half = _ranges(features, ranges)
    x = frame[list(features)].to_numpy(dtype=np.float64)
    observed = ~np.isnan(x)
    z = np.clip((np.where(observed, x, mid) - mid) / half, -1.0, 1.0) * observed
    k = int(n_classes)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)[:k].astype(np.float64)
    return observed.sum(0).astype(np.float64), z.sum(0), (z * z).sum(0), counts, mid, half


def privatise_statistics(frame: pd.DataFrame, features: Sequence[str], labels: np.ndarray,
                         ranges: Mapping[str, tuple[float, float]], noise_multiplier: float,
                         rng: np.random.Generator, n_classes: int = 2
                         ) -> tuple[FeatureStats, list[float]]:
    """The statistics of ``frame`` (the TRAINING split) through the Gaussian mechanism.

    Returns `FeatureStats` in raw units (additive across sites, as the exact ones) and the noisy
    class counts (``n_classes`` of them). The caller must record ``(noise_multiplier, 1.0, 1)`` in the site's ledger
    *before* releasing the result (`release_statistics` does both).
    """
    if not noise_multiplier > 0:
        raise ValueError("the noise multiplier must be > 0")
    features = list(features)
    c, s, q, k, mid, half = exact_clipped_statistics(frame, features, labels, ranges, n_classes)
    std = noise_multiplier * statistics_sensitivity(len(features))
    c = c + rng.normal(0.0, std, c.shape)
    s = s + rng.normal(0.0, std, s.shape)
    q = q + rng.normal(0.0, std, q.shape)
    k = k + rng.normal(0.0, std, k.shape)
    # post-processing: project onto what real statistics can be
    c = np.clip(c, 0.0, None)
    s = np.clip(s, -c, c)
    q = np.clip(q, s * s / np.maximum(c, 1e-12), c)  # Cauchy-Schwarz: s² ≤ c·q, and q ≤ c
    q = np.where(c > 0, q, 0.0)
    k = np.clip(k, 1.0, None)  # the class-balanced loss needs every class count > 0
    total = c * mid + half * s
    total_sq = c * mid * mid + 2 * mid * half * s + half * half * q
    return FeatureStats(tuple(features), c, total, total_sq), k.tolist()


def release_statistics(budget: SiteBudget, run_id: str, frame: pd.DataFrame,
                       features: Sequence[str], labels,
                       ranges: Mapping[str, tuple[float, float]], *,
                       seed_material: Sequence[int] | None = None, n_classes: int = 2
                       ) -> tuple[FeatureStats, list[float], dict]:
    """The statistics round of run ``run_id`` through the Gaussian mechanism, charged first.

    Only with ``privacy.statistics: gaussian``, and before the run's training is planned (the
    plan composes with it). A run that already released re-sends what it released (the ledger
    keeps it; no new charge). Randomness: `randomness` (``seed_material`` for a simulation's
    virtual site, the ledger entry's number added; None: the operating system's entropy).
    Returns the noisy `FeatureStats`, the noisy class counts (``n_classes``) and ``{noise_multiplier,
    epsilon (spent so far), delta, repeated}``.
    """
    who, ledger, features = budget._who, budget.ledger, list(features)
    if budget.cfg.statistics != "gaussian":
        raise PrivacyError(f"{who}the statistics round is exact at this site "
                           f"(privacy.statistics: exact); use the site's exact statistics")
    for event in reversed(ledger.events):
        if event.get("kind") == RELEASED and event.get("run_id") == str(run_id):
            if event["features"] != features:
                raise PrivacyError(f"{who}run {run_id} released statistics of other features; "
                                   f"start a new run")
            if len(event["class_counts"]) != int(n_classes):
                raise PrivacyError(f"{who}run {run_id} released the counts of "
                                   f"{len(event['class_counts'])} classes, not {n_classes} (another "
                                   f"target); start a new run")
            stats = FeatureStats(tuple(features), *(np.asarray(event[k], dtype=np.float64)
                                                    for k in ("count", "total", "total_sq")))
            return stats, list(event["class_counts"]), {
                "noise_multiplier": event["noise_multiplier"], "epsilon": budget.epsilon(),
                "delta": budget.delta, "repeated": True}
    if ledger.plan(str(run_id)) is not None:
        raise PrivacyError(f"{who}run {run_id} already planned its training budget; the "
                           f"statistics round must come before training")
    sigma = gaussian_noise_multiplier(target_epsilon=float(budget.cfg.statistics_epsilon),
                                      delta=budget.delta, accountant=budget.cfg.accountant)
    with ledger.transaction():
        history = ledger.history()
        after = budget.accountant.epsilon_after(history, [(sigma, 1.0, 1)])
        if after > budget.epsilon_budget:
            spent = budget.accountant.epsilon(history)
            raise BudgetExhausted(
                f"{who}privacy budget exhausted: ε spent so far {spent:.4g} of "
                f"{budget.epsilon_budget:g}; the noised statistics round would bring it to "
                f"{after:.4g}. The site sends no statistics. Ledger: {ledger.path}",
                spent=spent, budget=budget.epsilon_budget, needed=after)
        seq = ledger.reserve(kind="statistics", run_id=str(run_id), round=0,
                             noise_multiplier=sigma, sample_rate=1.0, steps=1,
                             note=f"{len(features)} features, Gaussian mechanism")
    material = None if seed_material is None else (*seed_material, seq)
    stats, counts = privatise_statistics(frame, features, np.asarray(labels), ranges, sigma,
                                         numpy_generator(material, STATISTICS), n_classes)
    with ledger.transaction():
        ledger.confirm(seq, 1)
        ledger.add_event(RELEASED, run_id=str(run_id), seq=seq, noise_multiplier=sigma,
                         features=features, count=stats.count.tolist(),
                         total=stats.total.tolist(), total_sq=stats.total_sq.tolist(),
                         class_counts=[float(c) for c in counts])
    return stats, counts, {"noise_multiplier": sigma, "epsilon": budget.epsilon(),
                           "delta": budget.delta, "repeated": False}
