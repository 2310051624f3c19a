"""A site's statistics round and training rounds with its privacy settings, budget and ledger
(no Flower here).

The ClientApp calls `site_statistics` for the statistics (``describe``) message: the exact
training-split statistics (`Site.describe`, small cells withheld), or, at a DP site with
``privacy.statistics: gaussian``, the same fields through the Gaussian mechanism, charged to its
ledger (`safn_core.privacy.release_statistics`; no small-cell suppression: the noise replaces
it). It calls `train_round` for every training message. It decides the site's effective
privacy settings, finds its ledger, trains (DP-SGD through `SitePrivacy`, or the plain path of a
non-DP site) and returns what may leave the site: the new weights and metrics with the SAME keys
for every site, DP or not, trained or refused (Flower's strategies require identical keys):

=================  =====================================================================
``num-examples``   size of the training split (public, as in Opacus); 0 when refused
``train-loss``     mean training loss of a non-DP site; −1 (withheld) for a DP site, whose
                   loss is an exact statistic of its training split, outside its ε
``dp``             1 when the site trains with DP-SGD, else 0
``epsilon``        ε spent so far at ``delta`` (every run in the ledger, this round
                   included); −1 for a site without DP (no guarantee, ε = ∞)
``delta``          δ of that ε (0 without DP)
``epsilon-budget`` the site's total ε budget (−1 without DP)
``noise-multiplier`` σ of the run's plan (0 without DP or before a plan exists)
``dp-steps``       DP-SGD steps taken this round (0 without DP or when refused)
``refused``        1 when the site did not train this round (its reason travels separately)
=================  =====================================================================

Who decides (`effective_privacy`): a deployed site's own ``privacy:`` (its site.yaml), tightened
by the coordinator's request (the run's shared ``privacy:`` section) through `resolve_privacy`;
a virtual site of a simulation has no separate request: the simulation's ``privacy:`` section,
with its ``sites.<name>`` override, *is* that virtual site's own file.

A site refuses a round (nothing trained, nothing spent, the other sites go on) when its budget
cannot pay for the round (`BudgetExhausted`) or when its privacy settings or ledger cannot be
trusted (any other `PrivacyError`, e.g. a ledger for other data). The reason is one line.

Randomness of the DP releases (`safn_core.privacy.randomness`): a virtual site draws it from the
round's seed (reproducible simulations), a deployed site from the operating system's entropy
(the coordinator knows the run's seed), ``privacy.secure_rng`` from Opacus' secure mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from safn_core.config import PrivacyConfig
from safn_core.data.cohort import LABEL
from safn_core.errors import SafnError
from safn_core.federation.personal_plan import planned_personal_epochs
from safn_core.federation.protocol import WITHHELD, Describe, Metric
from safn_core.federation.site import Site, SmallCell
from safn_core.preprocess import FeatureStats, Preprocessor

if TYPE_CHECKING:
    from safn_core.privacy import SitePrivacy

# safn_core.privacy (Opacus) is imported only where DP is used: a deployed site pays the import
# in every message's fresh process, and a non-DP site should not pay it at all.

METRIC_KEYS = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS, Metric.DP, Metric.EPSILON, Metric.DELTA,
               Metric.EPSILON_BUDGET, Metric.NOISE_MULTIPLIER, Metric.DP_STEPS, Metric.REFUSED)
"""The keys of every training reply's metrics (DP or not, trained or refused)."""


@dataclass
class RoundOutcome:
    weights: dict[str, np.ndarray] | None  # None when refused
    metrics: dict[str, int | float]
    refusal: str | None = None  # the one-line reason, when refused
    loss: float = float("nan")  # for the site's own log (never sent by a DP site)


@dataclass
class StatisticsOutcome:
    """What a site sends in the statistics round: the training split's per-feature count, sum
    and sum of squares and its class counts (noised under ``statistics: gaussian``), or the
    one-line reason it sends none. ``mechanism`` says which: ``{"statistics": "exact"}`` or
    ``{"statistics": "gaussian", "noise-multiplier", "epsilon" (spent so far), "delta"}``."""

    stats: FeatureStats | None
    counts: list[float] | None
    mechanism: dict | None = None
    refusal: str | None = None


def effective_privacy(site: Site, request: PrivacyConfig | None) -> PrivacyConfig:
    """The privacy settings a site trains with in this run (see the module docstring)."""
    if site.cfg.site is not None:  # a deployed site: its own file, tightened by the request
        from safn_core.privacy import resolve_privacy

        return resolve_privacy(site.cfg.privacy.for_site(None), request)
    return site.cfg.privacy.for_site(site.name)  # a virtual site: the simulation's settings


def _off_metrics(n: int, loss: float) -> dict[str, int | float]:
    return {Metric.NUM_EXAMPLES: int(n), Metric.TRAIN_LOSS: float(loss), Metric.DP: 0,
            Metric.EPSILON: WITHHELD, Metric.DELTA: 0.0, Metric.EPSILON_BUDGET: WITHHELD,
            Metric.NOISE_MULTIPLIER: 0.0, Metric.DP_STEPS: 0, Metric.REFUSED: 0}


def _reason(site: Site, exc: Exception) -> str:
    """The exception as one line, without the core's "site X: " prefix (the coordinator
    names the site itself)."""
    return " ".join(str(exc).split()).removeprefix(f"site {site.name}: ")


def _refused(reason: str, sp: "SitePrivacy | None", dp: bool) -> RoundOutcome:
    metrics = _off_metrics(0, WITHHELD)
    metrics[Metric.DP] = int(dp)
    if sp is not None:
        try:
            metrics.update(sp.metrics_now())
        except SafnError:  # the ledger itself is the problem: report no ε
            pass
    metrics.update({Metric.NUM_EXAMPLES: 0, Metric.TRAIN_LOSS: WITHHELD, Metric.DP_STEPS: 0,
                    Metric.REFUSED: 1})
    return RoundOutcome(None, metrics, reason)


def _seeded(site: Site) -> bool:
    """A virtual site's DP randomness comes from the run's seed (reproducible), a deployed
    site's never (see the module docstring)."""
    return site.cfg.site is None


def site_statistics(site: Site, *, request: PrivacyConfig | None, state_dir: Path | None,
                     run_id: str, seed: int, check_cells: bool = True) -> StatisticsOutcome:
    """The site's reply to the statistics round of run ``run_id`` (see the module docstring).

    ``seed`` seeds a virtual site's Gaussian noise (with the ledger entry's number).
    ``check_cells=False`` under secure aggregation: the exact statistics are only revealed
    summed over the federation, where ``min_cell`` then applies."""
    try:
        privacy = effective_privacy(site, request)
    except (SafnError, ValueError) as exc:
        return StatisticsOutcome(None, None, None, _reason(site, exc))
    if not privacy.dp or privacy.statistics != "gaussian":
        try:
            stats, counts = site.describe(check_cells=check_cells)
        except SmallCell as exc:
            return StatisticsOutcome(None, None, None, str(exc))
        return StatisticsOutcome(stats, [float(c) for c in counts],
                                 {Describe.STATISTICS: Describe.EXACT})
    from safn_core.privacy import PrivacyError, SiteBudget, data_fingerprint, release_statistics

    train = site.cohort.table.loc[site.split.train]
    try:
        budget = SiteBudget(privacy, len(train), state_dir=state_dir, site=site.name,
                            fingerprint=data_fingerprint(site.split.train, site.cohort.features))
        stats, counts, info = release_statistics(
            budget, run_id, train, site.cohort.features, train[LABEL].to_numpy(),
            site.cohort.plausible_ranges, seed_material=(seed,) if _seeded(site) else None,
            n_classes=site.cohort.n_classes)
    except PrivacyError as exc:
        return StatisticsOutcome(None, None, None, _reason(site, exc))
    return StatisticsOutcome(stats, counts, {
        Describe.STATISTICS: Describe.GAUSSIAN, Metric.NOISE_MULTIPLIER: float(info["noise_multiplier"]),
        Metric.EPSILON: float(info["epsilon"]), Metric.DELTA: float(info["delta"])})


def train_round(site: Site, state: dict, pre: Preprocessor, class_counts: list[int], *,
                request: PrivacyConfig | None, state_dir: Path | None, run_id: str, rounds: int,
                epochs: int, server_round: int, seed: int,
                proximal_mu: float = 0.0) -> RoundOutcome:
    """One round of local training at ``site`` under its effective privacy settings (its own,
    tightened by the coordinator's ``request``; `effective_privacy`).

    A non-DP site trains exactly as before (`Site.train`: same seeds, same weights as the
    in-process loop). A DP site opens its ledger under ``state_dir`` (``privacy.ledger`` wins),
    makes or reuses the run's plan under ``run_id`` (σ for ``rounds`` × ``epochs`` × steps per
    epoch), checks and reserves the round, trains with DP-SGD and confirms the steps taken.
    """
    try:
        privacy = effective_privacy(site, request)
    except (SafnError, ValueError) as exc:  # PrivacyError is a SafnError
        return _refused(_reason(site, exc), None, True)
    if not privacy.dp:  # a distributed-mode site outside a distributed run: local DP-SGD
        weights, n, loss = site.train(state, pre, class_counts, model_cfg=site.cfg.model,
                                      epochs=epochs, seed=seed, proximal_mu=proximal_mu)
        return RoundOutcome(weights, _off_metrics(n, loss), None, loss)
    from safn_core.privacy import PrivacyError

    sp = None
    try:
        sp = site_dp(site, pre, privacy, state_dir=state_dir, run_id=run_id, rounds=rounds,
                     epochs=epochs)
        sp.check_round(server_round)
        weights, report = sp.train_round(state, pre.modalities, site.cfg.model, class_counts,
                                         server_round=server_round, seed=seed,
                                         proximal_mu=proximal_mu, target=site.cohort.target)
    except PrivacyError as exc:
        return _refused(_reason(site, exc), sp, True)
    metrics = _off_metrics(report.n_train, WITHHELD)  # a DP site's loss stays at the site
    metrics.update(report.metrics())
    return RoundOutcome(weights, metrics, None, report.train_loss)


def site_dp(site: Site, pre: Preprocessor, privacy: PrivacyConfig, *, state_dir: Path | None,
            run_id: str, rounds: int, epochs: int, lr: float | None = None) -> "SitePrivacy":
    """The site's DP-SGD for run ``run_id`` on its training split: the federation's rounds and,
    planned in the same σ, its personal training (`personal_plan.planned_personal_epochs`;
    `personal_training` spends from it).
    ``lr`` replaces ``train.lr`` (personal training may use its own); the plan does not
    depend on it."""
    from safn_core.privacy import SitePrivacy, data_fingerprint

    train_cfg = site.cfg.train if lr is None else site.cfg.train.model_copy(update={"lr": lr})
    return SitePrivacy(privacy, site.arrays(pre, "train"), train_cfg, rounds=rounds,
                       local_epochs=epochs, personal_epochs=planned_personal_epochs(site.cfg),
                       run_id=run_id,
                       fingerprint=data_fingerprint(site.split.train, site.cohort.features),
                       state_dir=state_dir, site=site.name, seeded=_seeded(site))
