"""`SiteBudget`: a DP site's settings, its ledger and the ε it has spent.

Every release a DP site makes is charged through one of these: the Gaussian statistics round
(`stats.release_statistics`) and the DP-SGD rounds (`engine.SitePrivacy`, which adds the run's
plan and training on top). Opening one checks the settings against the training split (δ below
1/n_train, a fingerprint of the split) and opens the ledger (`ledger.PrivacyLedger`), which
refuses a ledger written for other data, another accountant or another δ.
"""

from __future__ import annotations

from pathlib import Path

from safn_core.config import PrivacyConfig
from safn_core.privacy.accountant import Accountant
from safn_core.privacy.errors import PrivacyError
from safn_core.privacy.ledger import PrivacyLedger, resolve_ledger_path


class SiteBudget:
    """A DP site's budget over every run on its data (``privacy.mode: dp-sgd`` only).

    Parameters
    ----------
    cfg: the site's effective privacy settings (`resolve_privacy` of site.yaml and the request).
    n_train: size of the TRAINING split (the people every release is about).
    fingerprint: `data_fingerprint(train participant ids, features)`.
    ledger_path / state_dir: where the ledger lives (``privacy.ledger`` wins, relative to
        ``state_dir``; default ``<state_dir>/privacy_ledger.json``).
    """

    def __init__(self, cfg: PrivacyConfig, n_train: int, *, fingerprint: str | None,
                 ledger_path: str | Path | None = None, state_dir: str | Path | None = None,
                 site: str = "", lock_timeout: float = 60.0):
        self.cfg = cfg.for_site(None) if cfg.sites else cfg
        self.site = site
        self.n_train = int(n_train)
        who = self._who = f"site {site}: " if site else ""
        if not self.cfg.dp:
            raise PrivacyError(f"{who}privacy.mode is 'off' at this site: it has no privacy "
                               f"budget and no DP release")
        if self.n_train < 2:
            raise PrivacyError(f"{who}DP needs a training split of at least 2 participants")
        if not fingerprint:
            raise PrivacyError(f"{who}a DP site needs the fingerprint of its training split "
                               f"(data_fingerprint(participant ids, features))")
        self.delta = (float(self.cfg.delta) if self.cfg.delta is not None
                      else 1.0 / (10 * self.n_train))
        if self.delta >= 1.0 / self.n_train:
            raise PrivacyError(
                f"{who}privacy.delta = {self.delta:g} is not below 1/n_train = 1/{self.n_train}: "
                f"such a δ allows releasing a participant's record outright; use e.g. "
                f"{1.0 / (10 * self.n_train):.2g} (the default, 1/(10·n_train))")
        self.epsilon_budget = float(self.cfg.epsilon)
        self.accountant = Accountant(self.cfg.accountant, self.delta)
        path = Path(ledger_path) if ledger_path is not None else \
            resolve_ledger_path(self.cfg.ledger, state_dir)
        self.ledger = PrivacyLedger.open(path, fingerprint=fingerprint,
                                         accountant=self.cfg.accountant, delta=self.delta,
                                         site=site, accept_changes=self.cfg.accept_ledger_change,
                                         lock_timeout=lock_timeout)

    def epsilon(self) -> float:
        """ε spent so far by everything in the ledger, at δ."""
        return self.accountant.epsilon(self.ledger.history())
