"""Who decides: the site. The coordinator may ask for DP, never weaken a site's settings."""

from __future__ import annotations

from pydantic import ValidationError

from safn_core.config import PrivacyConfig
from safn_core.privacy.errors import PrivacyError


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def local_only(colluding: int) -> str:
    """Why a site on local DP-SGD takes no part in a distributed DP run."""
    return ("this site trains only with local DP-SGD (privacy.mode: dp-sgd in its settings), "
            "and this run uses distributed DP (noise shares under secure aggregation, a "
            f"guarantee against the coordinator with up to {colluding} colluding sites); the "
            "site takes no part. To join, the site sets privacy.mode: distributed")


def resolve_privacy(site: PrivacyConfig, req: PrivacyConfig | None = None) -> PrivacyConfig:
    """The settings a site trains with: its own, tightened by the coordinator's request.

    - A request for ``mode: off`` never turns a site's DP off.
    - A request for ``dp-sgd`` turns DP on at a site that has it off (the request's ε, δ and
      clipping norm), and at a DP site can only lower ε and δ (the smaller of the two wins). A
      site on ``distributed`` then trains with local DP-SGD: a stronger guarantee than it asked.
    - A request for ``distributed`` (a run of noise shares under secure aggregation) turns DP
      on at a site that has it off, and lowers ε and δ at a ``distributed`` site; the run's
      mechanism (``privacy.distributed``, the clipping norm) is the request's, the same at every
      site. A site on ``dp-sgd`` refuses it: its updates would be protected only against the
      coordinator with up to t colluding sites, not against everyone.
    - ``statistics: gaussian`` may be requested (its ε share is the smaller one), and so may
      ``secure_rng: true``.
    - Everything else (the ledger location, the accountant, ``accept_ledger_change``,
      ``max_noise_multiplier``) is always the site's.
    """
    site = site.model_copy(update={"sites": {}})
    if req is None or req.mode == "off":
        return site
    if req.mode == "distributed" and site.mode == "dp-sgd":
        raise PrivacyError(local_only(req.distributed.colluding_sites))
    if site.mode == "off":
        update = {"mode": req.mode, "epsilon": req.epsilon, "delta": req.delta,
                  "max_grad_norm": req.max_grad_norm}
    else:
        update = {"epsilon": _min(site.epsilon, req.epsilon), "delta": _min(site.delta, req.delta)}
        if req.mode == "dp-sgd":
            update["mode"] = "dp-sgd"
    if req.mode == "distributed":
        update.update(max_grad_norm=req.max_grad_norm,
                      distributed=req.distributed.model_dump())
    if req.statistics == "gaussian" or site.statistics == "gaussian":
        share = _min(site.statistics_epsilon if site.statistics == "gaussian" else None,
                     req.statistics_epsilon if req.statistics == "gaussian" else None)
        update.update(statistics="gaussian", statistics_epsilon=share)
    if req.secure_rng:
        update["secure_rng"] = True
    merged = site.model_dump()
    merged.update(update)
    try:
        return PrivacyConfig.model_validate(merged)
    except ValidationError as exc:
        msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise PrivacyError(f"the coordinator's privacy request cannot be combined with this "
                           f"site's settings: {msg}") from None
