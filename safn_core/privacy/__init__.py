"""Differential privacy for a site: DP-SGD through Opacus with a budget that outlives runs.

- `SiteBudget` (budget.py): a DP site's settings, ledger and ε spent, behind every release.
- `SitePrivacy` (engine.py): a run's DP-SGD rounds on top of it (plan, check, train, report).
- `release_statistics` / `privatise_statistics` (stats.py): the statistics round through the
  Gaussian mechanism, charged to the same ledger.
- `PrivacyLedger` (ledger.py; the file, its lock and writes: ledger_file.py): the append-only,
  locked, atomically written record of every release on the site's data.
- `Accountant` / `epsilon` (accountant.py): ε from the ledger with Opacus' RDP or PRV accountant.
- `calibrate_noise` (calibration.py): σ for a whole planned run on what is left of the budget.
- randomness.py: where the noise and the Poisson sampling draw from (secure, seeded, OS entropy).
- `resolve_privacy` (policy.py): the site decides; the coordinator can only ask for more.

No Flower here. See docs/privacy.md.
"""

from safn_core.privacy.accountant import Accountant, epsilon
from safn_core.privacy.budget import SiteBudget
from safn_core.privacy.calibration import (calibrate_noise, gaussian_noise_multiplier,
                                           planned_steps, sample_rate_for, steps_per_epoch)
from safn_core.privacy.engine import (RoundReport, SitePrivacy, federation_state,
                                      load_federation_state, strip_module_prefix)
from safn_core.privacy.errors import (BudgetExhausted, LedgerError, LedgerLocked, LedgerMismatch,
                                      LedgerRewind, PrivacyError)
from safn_core.privacy.ledger import (PrivacyLedger, data_fingerprint, default_ledger_path,
                                      merge_history, resolve_ledger_path)
from safn_core.privacy.policy import resolve_privacy
from safn_core.privacy.stats import (exact_clipped_statistics, privatise_statistics,
                                     release_statistics, statistics_sensitivity)

__all__ = [
    "SiteBudget", "SitePrivacy", "RoundReport", "PrivacyLedger", "Accountant", "epsilon",
    "calibrate_noise", "gaussian_noise_multiplier", "planned_steps", "sample_rate_for",
    "steps_per_epoch", "strip_module_prefix", "federation_state", "load_federation_state",
    "BudgetExhausted", "PrivacyError", "LedgerError", "LedgerLocked", "LedgerMismatch",
    "LedgerRewind", "data_fingerprint", "default_ledger_path", "resolve_ledger_path",
    "merge_history", "resolve_privacy", "privatise_statistics", "release_statistics",
    "exact_clipped_statistics", "statistics_sensitivity",
]
