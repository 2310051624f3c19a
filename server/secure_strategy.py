"""Secure aggregation as a part of the SAFN strategy (`safn.server.secure_aggregation` runs the
protocol).

`SecureSum` puts each aggregation's context, packing and participants' keys into the round's
messages and turns the masked replies into what the coordinator may see: for training, the sums
of ``n·w``, ``n``, the loss and the number of sites, from which `train_mean` gives FedAvg's
example-weighted mean (the strategy hands it to Flower's strategy as if one site had sent it, so
FedAdam/FedYogi take their own server step on it); for evaluation, the pooled histograms and
validation loss, plus each site's own ROC-AUC where its own counts pass ``min_cell``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from safn_core.federation.protocol import ARRAYS, MASKED, METRICS, Metric
from safn_core.federation.round_record import SecureEvaluation, SecureTrainSum
from safn_core.secagg.packing import Packing
from safn.server.secure_aggregation import SecureAggregation
from safn.server.site_waits import OnlyNodes, SitesMissing


@dataclass(frozen=True)
class SecureTrainResult:
    """The secure training sum: what it reveals (`summary`) and the weighted mean update."""

    summary: SecureTrainSum
    mean: np.ndarray | None  # None when there is nothing to average
    weight: int


class SecureSum:
    """The secure sums of a run's rounds: one `SecureAggregation` driver, one packing per
    aggregation (``train``, ``evaluate``)."""

    def __init__(self, driver: SecureAggregation, packings: dict[str, Packing]):
        self.driver = driver
        self.packings = dict(packings)
        self._open: dict[str, tuple] = {}  # aggregation name -> (context, participants)

    @property
    def min_parties(self) -> int:
        return self.driver.min_parties

    def retries(self, r: int) -> tuple[dict, ...]:
        """The sums of round ``r`` that were redone without sites that dropped out."""
        return tuple(x for x in self.driver.retries if x["round"] == r)

    def start(self, grid, name: str, r: int, nodes: list[int], config, next_name: str,
              next_round: int | None = None) -> OnlyNodes:
        """Put aggregation ``name`` of round ``r`` into ``config`` (context, packing, every
        participant's public key, the next aggregation); the round's sites are those whose key
        the coordinator has (at least 3, else the round cannot be summed securely)."""
        ctx = self.driver.context(r, name)
        nxt = self.driver.context(r if next_round is None else next_round, next_name)
        entries, ids = self.driver.start(ctx, self.packings[name], nodes, nxt)
        if len(ids) < self.driver.min_parties:
            raise SitesMissing(f"round {r}: only {len(ids)} sites can take part in the secure "
                               f"{name} sum, fewer than {self.driver.min_parties}; secure "
                               "aggregation needs 3 or more contributing sites")
        for k, v in entries.items():
            config[k] = v
        self._open[name] = (ctx, ids)
        return OnlyNodes(grid, ids)

    def _sum(self, name: str, replies: list[Message], min_parties: int | None = None):
        ctx, ids = self._open.pop(name)
        vectors = {}
        for m in replies:
            if m.has_error():
                continue
            self.driver.note(m.metadata.src_node_id, m.content)
            arr = m.content.array_records.get(ARRAYS)
            if arr is not None and MASKED in arr:
                vectors[m.metadata.src_node_id] = arr[MASKED].numpy()
        return self.driver.finish(ctx, self.packings[name], ids, vectors, min_parties)

    def shares_sum(self, replies: list[Message], min_parties: int) -> dict:
        """Distributed DP: the decoded sum of the sites' noise shares, their training-split
        sizes and count; a retry after a dropout needs ``min_parties`` (n − t) sites."""
        return self._sum("train", replies, min_parties).values

    def train_mean(self, replies: list[Message]) -> SecureTrainResult:
        """FedAvg's example-weighted mean from the sums of the sites' ``n·w`` and ``n``."""
        total = self._sum("train", replies).values
        loss = (float(total["loss_sum"]) / int(total["loss_examples"])
                if int(total["loss_examples"]) > 0 else None)
        summary = SecureTrainSum(int(total["sites"]), int(total["examples"]), loss)
        weight = int(total["weight"])
        return SecureTrainResult(summary, total["weighted"] / weight if weight > 0 else None,
                                 weight)

    def evaluation(self, replies: list[Message], name_of) -> SecureEvaluation:
        """The pooled evaluation sums, the sites in them (names, not values), and each site's
        own ROC-AUC where its counts pass ``min_cell``."""
        result = self._sum("evaluate", replies)
        own = {}
        for m in replies:
            if m.has_error():
                continue
            met = m.content[METRICS]
            own[name_of(m.metadata.src_node_id)] = ({"roc_auc": float(met[Metric.SITE_ROC_AUC]),
                                "n": int(met[Metric.SITE_N])}
                               if int(met.get(Metric.SITE_REPORTED, 0)) else None)
        sites = tuple(sorted(name_of(n) for n in result.contributors))
        return SecureEvaluation(result.values, sites, own)
