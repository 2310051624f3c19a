"""One federated round as data, and the history entry it makes.

The strategy (`safn.server.strategy.SafnStrategy`) reports each round as a frozen `RoundRecord` of
plain values (no Flower types): what each site's reply said once screened, what the secure
sums returned, the central DP release. `round_entry` turns a record into the round's entry of
``history.json`` and is a pure function of it (and of the run's earlier entries, for ε over
central DP releases); the model selection then adds ``selected_round``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from safn_core.federation.aggregate import held_out_metrics, round_metrics, secure_round_metrics
from safn_core.federation.privacy_report import central_entry, privacy_entry
from safn_core.federation.protocol import Metric, is_withheld


@dataclass(frozen=True)
class SecureTrainSum:
    """What the secure training sum revealed: how many sites and examples, the mean loss."""

    sites: int
    examples: int
    train_loss: float | None = None


@dataclass(frozen=True)
class SecureEvaluation:
    """What the secure evaluation sum revealed: pooled histograms and loss sums (``pooled``),
    the sites in the sum (names only), and each site's own metrics where its counts pass
    ``min_cell`` (None where they do not)."""

    pooled: Mapping
    sites: tuple[str, ...]
    site_metrics: Mapping[str, dict | None]


@dataclass(frozen=True)
class RoundRecord:
    """What one round produced, as the coordinator may see it."""

    round: int
    trained: Mapping[str, Mapping] = field(default_factory=dict)  # kept sites' train metrics
    privacy: Mapping[str, dict] = field(default_factory=dict)  # site -> report (refusals too)
    refused: tuple[dict, ...] = ()  # {"site", "reason"}
    rejected: tuple[dict, ...] = ()  # {"site", "code", ...}
    evaluated: Mapping[str, dict] = field(default_factory=dict)  # site -> score histograms
    held_out: frozenset[str] = frozenset()  # sites that only evaluate
    secure_train: SecureTrainSum | None = None
    secure_evaluation: SecureEvaluation | None = None
    retries: tuple[dict, ...] = ()  # secure sums redone without sites that dropped out
    central_dp: dict | None = None  # the central DP release of this round
    distributed_dp: dict | None = None  # distributed DP: the round's mechanism and sum
    secure: bool = False  # the round's sums were secure sums


def round_entry(record: RoundRecord, history: list[dict], min_cell: int,
                central_delta: float, target=None) -> dict:
    """The round's history entry (without ``seconds`` and ``selected_round``); ``target``: the
    run's `safn_core.targets.Target` (a K-class run's class names and order)."""
    r = record.round
    entry: dict = {"round": r}
    if record.secure_train is not None:
        if record.secure_train.train_loss is not None:
            entry["train_loss"] = record.secure_train.train_loss
        entry["sites_trained"] = sorted(record.trained)
    elif record.trained:
        # a DP site withholds its training loss (−1): outside its ε
        losses = [(float(m[Metric.NUM_EXAMPLES]), float(m[Metric.TRAIN_LOSS]))
                  for m in record.trained.values() if not is_withheld(m[Metric.TRAIN_LOSS])]
        if losses:
            entry["train_loss"] = float(np.average([lo for _, lo in losses],
                                                   weights=[n for n, _ in losses]))
        entry["sites_trained"] = sorted(record.trained)
    privacy = privacy_entry(dict(record.privacy))
    if privacy:
        entry["privacy"] = privacy  # ε per site (spent so far), never averaged
    refused = sorted(({"site": x["site"], "reason": x["reason"]} for x in record.refused),
                     key=lambda x: x["site"])
    if refused:
        entry["refused"] = refused
    if record.central_dp is not None:
        entry["central_dp"] = central_entry(record.central_dp, history, central_delta)
    if record.distributed_dp is not None:
        entry["distributed_dp"] = dict(record.distributed_dp)
    hists = dict(record.evaluated)
    external = {k: hists.pop(k) for k in list(hists) if k in record.held_out}
    if record.secure_evaluation is not None:
        s = record.secure_evaluation
        entry.update(secure_round_metrics(s.pooled, dict(s.site_metrics), min_cell,
                                          list(s.sites), target=target))
    elif hists:
        entry.update(round_metrics(hists, target=target))
    if external:  # external validation at the pooled threshold of the training sites
        entry["held_out"] = held_out_metrics(external, entry.get("threshold", 0.5), target)
    entry["rejected"] = [{"round": r, **x} for x in record.rejected]
    if record.secure:
        entry["secure_sum"] = {
            "sites_trained": (record.secure_train.sites if record.secure_train else None),
            "sites_evaluated": int((record.secure_evaluation.pooled if record.secure_evaluation
                                    else {}).get("sites", 0)),
            "retries": list(record.retries)}
    return entry
