"""A site's part in distributed DP-SGD (``privacy.mode: distributed``; no Flower here).

Two questions a site answers (the ClientApp: `safn.client.distributed_replies`):

- `needed_sigma`: before training, the smallest noise multiplier with which the run's planned
  rounds fit what is left of its budget (its ledger's history composed with them: metadata,
  not data), or its one-line reason for not taking part;
- `noise_share`: each round, its Poisson sample's clipped gradient sum at the global weights plus
  its share of the noise, as integers for the secure sum (`safn_core.privacy.noise_shares`),
  charged to its ledger *before* anything is computed. A round already charged is never drawn
  again: the share kept on the site's disk is re-masked instead (by the caller), else nothing
  is sent for that round.

Randomness as for local DP-SGD (`safn_core.privacy.randomness`): a virtual site of a simulation
draws its sample and noise from the round's seed and its ledger entry (reproducible); a deployed
site from the operating system's entropy (the run's seed is public).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safn_core.config import PrivacyConfig
from safn_core.errors import SafnError
from safn_core.federation.protocol import WITHHELD, Metric
from safn_core.federation.site import Site
from safn_core.federation.site_privacy import effective_privacy
from safn_core.federation.wire import Layout
from safn_core.preprocess import Preprocessor
from safn_core.privacy.noise_shares import NoiseShares, min_sites


@dataclass
class ShareOutcome:
    """A round's share: the secure sum's values (None: refused), the privacy report and the
    one-line reason of a refusal."""

    values: dict | None
    metrics: dict[str, int | float]
    refusal: str | None = None


def _budget(site: Site, privacy: PrivacyConfig, state_dir: Path | None):
    from safn_core.privacy import data_fingerprint
    from safn_core.privacy.distributed_budget import DistributedBudget

    return DistributedBudget(privacy, len(site.split.train),
                             fingerprint=data_fingerprint(site.split.train, site.cohort.features),
                             state_dir=state_dir, site=site.name)


def _privacy(site: Site, request: PrivacyConfig | None) -> PrivacyConfig:
    privacy = effective_privacy(site, request)
    if privacy.mode == "dp-sgd":  # a virtual site's own settings (a deployed one's: policy)
        from safn_core.privacy.errors import PrivacyError
        from safn_core.privacy.policy import local_only

        raise PrivacyError(local_only(privacy.distributed.colluding_sites))
    if privacy.mode != "distributed":
        raise SafnError(f"site {site.name}: privacy.mode is '{privacy.mode}' here, not "
                        f"'distributed'; the coordinator's request and this site's settings "
                        f"do not make a distributed DP run")
    return privacy


def _reason(site: Site, exc: Exception) -> str:
    return " ".join(str(exc).split()).removeprefix(f"site {site.name}: ")


def needed_sigma(site: Site, *, request: PrivacyConfig | None, state_dir: Path | None,
                 sample_rate: float, rounds: int) -> tuple[float | None, str | None]:
    """(σ this site needs for ``rounds`` steps at ``sample_rate``, None) or (None, reason)."""
    try:
        return _budget(site, _privacy(site, request), state_dir).needed_sigma(
            sample_rate, rounds), None
    except (SafnError, ValueError) as exc:
        return None, _reason(site, exc)


def privacy_report(site: Site, *, request: PrivacyConfig | None, state_dir: Path | None,
                   sigma: float) -> dict[str, int | float]:
    """The privacy report of a round whose share was kept and is sent again (charged once)."""
    from safn_core.privacy.distributed_budget import withheld_metrics

    try:
        return _budget(site, _privacy(site, request), state_dir).metrics(sigma, 1)
    except (SafnError, ValueError):
        return withheld_metrics()


def _refused(reason: str, budget=None) -> ShareOutcome:
    from safn_core.privacy.distributed_budget import withheld_metrics

    metrics = withheld_metrics()
    if budget is not None:
        try:
            metrics = budget.metrics(None, 0)
        except SafnError:
            pass
    metrics.update({Metric.NUM_EXAMPLES: 0, Metric.TRAIN_LOSS: WITHHELD, Metric.REFUSED: 1})
    return ShareOutcome(None, metrics, reason)


def noise_share(site: Site, state: dict[str, np.ndarray], pre: Preprocessor,
                class_counts: list[int], layout: Layout, shares: NoiseShares, *,
                sample_rate: float, request: PrivacyConfig | None, state_dir: Path | None,
                run_id: str, server_round: int, seed: int) -> ShareOutcome:
    """This site's share of round ``server_round`` (see the module docstring)."""
    from safn_core.privacy.clipped_gradients import clipped_gradient_sum, poisson_sample
    from safn_core.privacy.errors import PrivacyError
    from safn_core.privacy.randomness import NOISE, SAMPLING, numpy_generator

    budget = None
    try:
        privacy = _privacy(site, request)
        if shares.colluding != privacy.distributed.colluding_sites \
                or shares.clipping_norm != privacy.max_grad_norm:
            raise PrivacyError(
                f"the round's noise plan (t = {shares.colluding}, C = {shares.clipping_norm}) "
                f"is not the run's (t = {privacy.distributed.colluding_sites}, C = "
                f"{privacy.max_grad_norm})")
        if shares.sites < min_sites(shares.colluding):
            raise PrivacyError(f"a round of {shares.sites} sites cannot carry distributed DP "
                               f"against {shares.colluding} colluding sites")
        budget = _budget(site, privacy, state_dir)
        n_train = len(site.split.train)
        if n_train > shares.max_site_examples:
            raise PrivacyError(f"{n_train} training participants exceed "
                               f"federation.secagg.max_site_examples = "
                               f"{shares.max_site_examples}")
        budget.keep_plan(run_id, {"noise_multiplier": shares.noise_multiplier,
                                  "sample_rate": float(sample_rate),
                                  "clipping_norm": shares.clipping_norm,
                                  "colluding": shares.colluding, "n_train": n_train})
        if budget.charged_round(run_id, server_round):
            raise PrivacyError(f"round {server_round} of run {run_id} is already charged to "
                               f"this site's ledger and its share is not kept: a share is "
                               f"never drawn twice")
        seq = budget.reserve_round(run_id, server_round, shares.noise_multiplier, sample_rate)
    except (SafnError, ValueError) as exc:
        return _refused(_reason(site, exc), budget)
    # from here the round is charged in full, whatever happens
    material = (seed, seq) if site.cfg.site is None else None  # a virtual site: reproducible
    data = site.arrays(pre, "train")
    sampled = poisson_sample(len(data), sample_rate, numpy_generator(material, SAMPLING))
    total, _ = clipped_gradient_sum(state, pre.modalities, site.cfg.model, data, sampled,
                                    shares.clipping_norm, class_counts, layout, seed=seed,
                                    target=site.cohort.target)
    share = shares.encode(total, numpy_generator(material, NOISE))
    budget.ledger.confirm(seq, 1)
    metrics = budget.metrics(shares.noise_multiplier, 1)
    metrics.update({Metric.NUM_EXAMPLES: len(data), Metric.TRAIN_LOSS: WITHHELD,
                    Metric.REFUSED: 0})
    return ShareOutcome({"share": share, "examples": len(data), "sites": 1, "noise_shares": 1},
                        metrics)


def noise_only(shares: NoiseShares, seed: int | None) -> dict:
    """What a site that does not train this round sends: its share of the noise and no data.

    Every other site's masks must cancel, and the honest shares in the sum must still carry the
    guarantee's noise: masked zeros would leave a share out (like a dropout, which ``t``
    covers once), a share of pure noise does not. It is independent of the site's data, so it
    costs no privacy and is not charged. ``seed`` None: the operating system's entropy."""
    from safn_core.privacy.randomness import NOISE, numpy_generator

    rng = numpy_generator(None if seed is None else (seed, 0, 1), NOISE)
    return {"share": shares.encode(np.zeros(shares.dimension), rng), "examples": 0, "sites": 0,
            "noise_shares": 1}
