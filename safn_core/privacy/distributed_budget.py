"""A site's budget under distributed DP-SGD: the σ it needs, and one ledger entry per round.

Every participant belongs to one site, and every round is one Poisson-subsampled Gaussian step
over the union (`noise_shares`), so every site's ledger records the same mechanism per round,
``(σ, q, 1 step)``, and keeps its own ε at its own δ. The coordinator asks each site for the
smallest σ that lets the run's planned rounds fit what is left of its budget (`needed_sigma`:
metadata, not data) and uses the largest; a site then checks every round against its ledger
and reserves it *before* computing anything (`reserve_round`), and confirms it after; a round
already charged is never drawn again (`charged_round`: the share kept on the site's disk is
sent again, or nothing).
"""

from __future__ import annotations

from safn_core.federation.protocol import WITHHELD, Metric
from safn_core.privacy.budget import SiteBudget
from safn_core.privacy.calibration import calibrate_noise
from safn_core.privacy.errors import BudgetExhausted, PrivacyError
from safn_core.privacy.ledger_file import now

KIND = "distributed"
"""The ledger entries' kind: one distributed DP-SGD step."""


class DistributedBudget(SiteBudget):
    """A DP site's ledger as seen by distributed DP-SGD (its `SiteBudget` otherwise)."""

    def needed_sigma(self, sample_rate: float, rounds: int) -> float:
        """The smallest σ with which ``rounds`` more steps at ``sample_rate`` fit the budget.

        Raises `BudgetExhausted` when nothing fits or when that σ is above the site's
        ``privacy.max_noise_multiplier``."""
        history = self.ledger.history()
        try:
            sigma = calibrate_noise(target_epsilon=self.epsilon_budget, delta=self.delta,
                                    sample_rate=sample_rate, steps=int(rounds),
                                    accountant=self.cfg.accountant, prior=history)
        except BudgetExhausted as exc:
            raise BudgetExhausted(
                f"{self._who}privacy budget exhausted, the site does not take part: {exc}. "
                f"Ledger: {self.ledger.path}", spent=exc.spent, budget=exc.budget) from None
        if sigma > self.cfg.max_noise_multiplier:
            spent = self.accountant.epsilon(history)
            raise BudgetExhausted(
                f"{self._who}the run's {rounds} distributed DP-SGD steps at q = "
                f"{sample_rate:.4g} would need noise σ = {sigma:.3g} from what is left of this site's "
                f"privacy budget "
                f"(ε spent {spent:.4g} of {self.epsilon_budget:g}), above "
                f"privacy.max_noise_multiplier = {self.cfg.max_noise_multiplier:g}; plan fewer "
                f"rounds or a smaller sampling rate. Ledger: {self.ledger.path}",
                spent=spent, budget=self.epsilon_budget)
        return sigma

    def keep_plan(self, run_id: str, plan: dict) -> None:
        """Record the run's mechanism once; a later round with another σ, q or C is refused."""
        with self.ledger.transaction():
            old = self.ledger.plan(run_id)
            if old is None:
                self.ledger.set_plan(run_id, {**plan, "mode": KIND, "created": now(),
                                              "delta": self.delta,
                                              "accountant": self.cfg.accountant,
                                              "epsilon_budget": self.epsilon_budget})
                return
        for key in ("noise_multiplier", "sample_rate", "clipping_norm", "colluding"):
            if old.get(key) != plan.get(key):
                raise PrivacyError(f"{self._who}run {run_id} was planned with {key} = "
                                   f"{old.get(key)} and now asks {plan.get(key)}; a run's "
                                   f"mechanism cannot change mid-run")

    def charged_round(self, run_id: str, server_round: int) -> bool:
        """Whether this run's ``server_round`` step is already in the ledger."""
        return any(e["run_id"] == str(run_id) and e["round"] == int(server_round)
                   and e["kind"] == KIND for e in self.ledger.entries)

    def reserve_round(self, run_id: str, server_round: int, sigma: float,
                      sample_rate: float) -> int:
        """Check the step fits, then charge it (before anything is computed); its ``seq``."""
        with self.ledger.transaction():
            history = self.ledger.history()
            after = self.accountant.epsilon_after(history, [(sigma, sample_rate, 1)])
            if after > self.epsilon_budget * (1 + 1e-9):
                spent = self.accountant.epsilon(history)
                raise BudgetExhausted(
                    f"{self._who}privacy budget exhausted: ε spent so far {spent:.4g} of "
                    f"{self.epsilon_budget:g}; round {server_round} (σ = {sigma:.4g}, q = "
                    f"{sample_rate:.4g}) would bring it to {after:.4g}. Ledger: "
                    f"{self.ledger.path}", spent=spent, budget=self.epsilon_budget, needed=after)
            return self.ledger.reserve(kind=KIND, run_id=run_id, round=int(server_round),
                                       noise_multiplier=sigma, sample_rate=sample_rate, steps=1,
                                       note="noise share under secure aggregation")

    def metrics(self, sigma: float | None, steps: int) -> dict[str, int | float]:
        """The privacy report of a training reply (the keys every site sends)."""
        return {Metric.DP: 1, Metric.EPSILON: self.epsilon(), Metric.DELTA: self.delta,
                Metric.EPSILON_BUDGET: self.epsilon_budget,
                Metric.NOISE_MULTIPLIER: float(sigma) if sigma else 0.0,
                Metric.DP_STEPS: int(steps)}


def withheld_metrics() -> dict[str, int | float]:
    """The privacy report of a site whose ledger could not be read."""
    return {Metric.DP: 1, Metric.EPSILON: WITHHELD, Metric.DELTA: 0.0,
            Metric.EPSILON_BUDGET: WITHHELD, Metric.NOISE_MULTIPLIER: 0.0, Metric.DP_STEPS: 0}
