"""Empirical Bayes for one site: its location and scale effects from its own standardised data.

Input: z, the site's participants × features matrix standardised with the global fit,
z = (y − α̂ − xβ̂)/σ̂. The site's effects are γ̂ = mean of z and δ̂² = variance of z (ddof 1)
per feature. The priors pool across the site's features, never across sites (as in ComBat:
γ ~ N(γ̄, τ²), δ² ~ InvGamma(a, b) by the method of moments), so a site needs nothing from the
others. Formulas, iteration and stopping rule follow neuroCombat 0.2.12 (``it_sol``,
``int_eprior``, ``aprior``, ``bprior``) so that the results agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONV = 1e-4  # neuroCombat's it_sol default
MAX_ITER = 10_000


@dataclass(frozen=True)
class Priors:
    """Hyper-parameters of one site's priors, across its features."""

    gamma_bar: float
    tau2: float
    a: float
    b: float


def location_scale(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """γ̂ (mean) and δ̂² (variance, ddof 1) of each feature over the site's participants."""
    return z.mean(axis=0), z.var(axis=0, ddof=1)


def priors(gamma_hat: np.ndarray, delta2_hat: np.ndarray) -> Priors:
    """Method-of-moments priors: γ̄, τ² from γ̂; a, b of the inverse gamma from δ̂²."""
    m, s2 = float(delta2_hat.mean()), float(np.var(delta2_hat, ddof=1))
    return Priors(float(gamma_hat.mean()), float(np.var(gamma_hat, ddof=1)),
                  (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2)


def parametric(z: np.ndarray, gamma_hat: np.ndarray, delta2_hat: np.ndarray,
               pr: Priors) -> tuple[np.ndarray, np.ndarray, int]:
    """Posterior γ*, δ*² by neuroCombat's fixed-point iteration; also the iterations used.

    The stopping rule is neuroCombat's (and R sva's) exactly: the largest of
    |new − old|/old over both parameters, with the signed old value in the denominator, must
    fall to ``CONV`` or below. Returns iterations = -1 if ``MAX_ITER`` is reached.
    """
    n = z.shape[0]
    g_old, d_old = gamma_hat.copy(), delta2_hat.copy()
    for count in range(1, MAX_ITER + 1):
        g_new = (pr.tau2 * n * gamma_hat + d_old * pr.gamma_bar) / (pr.tau2 * n + d_old)
        sum2 = ((z - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + pr.b) / (n / 2.0 + pr.a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max(np.max(np.abs(g_new - g_old) / g_old),
                         np.max(np.abs(d_new - d_old) / d_old))
        g_old, d_old = g_new, d_new
        if not change > CONV:
            return g_new, d_new, count
    return g_new, d_new, -1


def nonparametric(z: np.ndarray, gamma_hat: np.ndarray,
                  delta2_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior γ*, δ*² with the other features' (γ̂, δ̂²) as the prior's support
    (neuroCombat's ``int_eprior``).

    Feature i's weight on feature k ≠ i is its likelihood N(z_i | γ̂_k, δ̂²_k), computed here in
    logarithms: neuroCombat's product underflows to 0/0 for sites of several hundred; where it
    does not, the two agree to rounding.
    """
    n, v = z.shape
    s1, s2 = z.sum(axis=0), (z**2).sum(axis=0)
    # sum over participants of (z_ji − γ̂_k)², for every pair (i, k)
    sum2 = s2[:, None] - 2 * s1[:, None] * gamma_hat[None, :] + n * gamma_hat[None, :] ** 2
    log_lh = -0.5 * n * np.log(2 * np.pi * delta2_hat)[None, :] - sum2 / (2 * delta2_hat)[None, :]
    log_lh[np.arange(v), np.arange(v)] = -np.inf
    w = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return w @ gamma_hat, w @ delta2_hat
