"""What can go wrong with a site's privacy budget and its ledger (all user-facing `SafnError`s).

`BudgetExhausted` is the one a client app catches every round: the site refuses to train (its
reply says why) while the federation goes on with the other sites. The ledger errors stop the
site: they mean its record of spent privacy cannot be trusted or would be lost.
"""

from __future__ import annotations

from safn_core.errors import SafnError


class PrivacyError(SafnError):
    """A privacy setting or ledger problem the site's operator must resolve."""


class BudgetExhausted(PrivacyError):
    """The next release (a training round, a statistics round) does not fit the site's budget.

    Raised *before* anything is trained or released; nothing is spent.
    """

    def __init__(self, message: str, *, spent: float, budget: float, needed: float | None = None):
        super().__init__(message)
        self.spent = spent
        self.budget = budget
        self.needed = needed


class LedgerError(PrivacyError):
    """The ledger file is unreadable, locked, for other data, or would be rewound."""


class LedgerMismatch(LedgerError):
    """The ledger was written for other training data, another accountant or another δ."""


class LedgerRewind(LedgerError):
    """A write would forget recorded spend (an older copy of the ledger)."""


class LedgerLocked(LedgerError):
    """Another process holds the ledger's lock for longer than the timeout."""
