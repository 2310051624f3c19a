"""Differential privacy for a site: DP-SGD through Opacus with a budget that outlives runs.

- `SitePrivacy` (engine.py): the facade a client app calls per round (plan, check, train, report).
- `PrivacyLedger` (ledger.py): the append-only, locked, atomically written record of every
  release on the site's data.
- `Accountant` / `epsilon` (accountant.py): ε from the ledger with Opacus' RDP or PRV accountant.
- `calibrate_noise` (calibration.py): σ for a whole planned run on what is left of the budget.
- `privatise_statistics` (stats.py): the statistics round through the Gaussian mechanism.
- `resolve_privacy` (policy.py): the site decides; the coordinator can only ask for more.

No Flower here. See docs/privacy.md.
"""

from safn_core.privacy.accountant import Accountant, epsilon, make_accountant
from safn_core.privacy.calibration import (calibrate_noise, gaussian_noise_multiplier,
                                           planned_steps, sample_rate_for, steps_per_epoch)
from safn_core.privacy.engine import (RoundReport, SitePrivacy, add_module_prefix,
                                      federation_state, load_federation_state,
                                      strip_module_prefix)
from safn_core.privacy.errors import (BudgetExhausted, LedgerError, LedgerLocked, LedgerMismatch,
                                      LedgerRewind, PrivacyError)
from safn_core.privacy.ledger import (PrivacyLedger, data_fingerprint, default_ledger_path,
                                      merge_history, resolve_ledger_path)
from safn_core.privacy.policy import parse_request, resolve_privacy
from safn_core.privacy.stats import (exact_clipped_statistics, privatise_statistics,
                                     statistics_sensitivity)

__all__ = [
    "SitePrivacy", "RoundReport", "PrivacyLedger", "Accountant", "epsilon", "make_accountant",
    "calibrate_noise", "gaussian_noise_multiplier", "planned_steps", "sample_rate_for",
    "steps_per_epoch", "strip_module_prefix", "add_module_prefix", "federation_state",
    "load_federation_state", "BudgetExhausted", "PrivacyError", "LedgerError", "LedgerLocked",
    "LedgerMismatch", "LedgerRewind", "data_fingerprint", "default_ledger_path",
    "resolve_ledger_path", "merge_history", "resolve_privacy", "parse_request",
    "privatise_statistics", "exact_clipped_statistics", "statistics_sensitivity",
]
