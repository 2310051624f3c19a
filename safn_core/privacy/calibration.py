"""The noise multiplier for a whole planned federation, on what is left of a site's budget.

A run plans ``rounds × local_epochs × steps_per_epoch`` DP-SGD steps at the site's sampling rate
``q`` (Poisson sampling, ``q = 1 / ceil(n_train / batch_size)`` as Opacus sets it; Opacus takes
``int(1 / q)`` steps per epoch). `calibrate_noise` finds the smallest σ (to Opacus' search
tolerance) such that the ledger's earlier spend *composed with* all the planned steps stays within
the site's total ε at δ::

    ε( ledger history + [(σ, q, planned steps)] ) ≤ ε_budget

With an empty ledger this is exactly ``opacus.accountants.utils.get_noise_multiplier`` (same
search, same tolerance). With earlier spend it is calibration on the remaining budget done the
right way: by composing with the real history, not by subtracting ε's (ε's do not add up).
"""

from __future__ import annotations

import math

from opacus.accountants.utils import MAX_SIGMA
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from safn_core.privacy.accountant import History, epsilon
from safn_core.privacy.errors import BudgetExhausted


def sample_rate_for(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses for a loader of ``batch_size`` over ``n_train`` people."""
    if n_train <= 0:
        raise ValueError("the training split is empty")
    return 1.0 / math.ceil(n_train / batch_size)


def steps_per_epoch(n_train: int, sample_rate: float) -> int:
    """Batches per epoch of Opacus' Poisson loader (``UniformWithReplacementSampler``)."""
    return len(UniformWithReplacementSampler(num_samples=n_train, sample_rate=sample_rate))


def planned_steps(rounds: int, local_epochs: int, n_train: int, sample_rate: float) -> int:
    return int(rounds) * int(local_epochs) * steps_per_epoch(n_train, sample_rate)


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", prior: History = (),
                    epsilon_tolerance: float = 0.01) -> float:
    """Smallest σ (within ``epsilon_tolerance`` of ε) with ε(prior + (σ, q, steps)) ≤ target.

    Raises `BudgetExhausted` when ``prior`` alone already reaches the target, or when not even
    σ = 10⁶ fits.
    """
    prior = list(prior)
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"the privacy budget is spent: ε = {spent:.4g} of {target_epsilon:g} "
            f"(δ = {delta:.3g}, {accountant}) before this run", spent=spent,
            budget=target_epsilon)

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, sample_rate, steps)], delta, accountant)

    # The search of opacus.accountants.utils.get_noise_multiplier, with the prior composed in.
    eps_high = float("inf")
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps_at(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise BudgetExhausted(
                f"what is left of the privacy budget (ε spent {spent:.4g} of "
                f"{target_epsilon:g}) cannot pay for {steps} more DP-SGD steps at sampling "
                f"rate {sample_rate:.4g}, even with noise multiplier {MAX_SIGMA:g}",
                spent=spent, budget=target_epsilon)
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def gaussian_noise_multiplier(*, target_epsilon: float, delta: float, accountant: str = "rdp",
                              epsilon_tolerance: float = 0.01) -> float:
    """σ of a single Gaussian release (sampling rate 1, one step) worth ``target_epsilon``."""
    return calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=1.0, steps=1,
                           accountant=accountant, epsilon_tolerance=epsilon_tolerance)
