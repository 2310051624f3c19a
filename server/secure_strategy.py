"""Secure aggregation inside a SAFN strategy (`server.secure_aggregation` runs the protocol).

`SecureSumMixin` is the part of `server.strategies.SafnStrategyMixin` that, when ``secure`` is
set, puts each aggregation's context, packing and participants' keys into the round's messages
and turns the masked replies into what Flower's strategy expects: for training, FedAvg's
example-weighted mean (from the sums of ``n·w`` and ``n``) handed to the strategy as if one site
had sent it, so FedAdam/FedYogi take their own server step on it; for evaluation, the pooled
histograms and validation loss (the coordinator computes the metrics), plus each site's own
ROC-AUC where its own counts pass ``min_cell``. Under central DP the sites send clipped updates
with equal weights and `_central_release` adds the noise.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from safn_core.federation.protocol import ARRAYS, MASKED, METRICS, WITHHELD, Metric
from server.site_waits import OnlyNodes, SitesMissing


class SecureSumMixin:
    secure = None  # a SecureAggregation when federation.secure_aggregation is on
    packings: dict | None = None  # aggregation name -> Packing

    def secure_start(self, grid, name: str, r: int, nodes: list[int], config, next_name: str,
                     next_round: int | None = None) -> OnlyNodes:
        """Put aggregation ``name`` of round ``r`` into ``config`` (context, packing, every
        participant's public key, the next aggregation); the round's sites are those whose key
        the coordinator has (at least 3, else the round cannot be summed securely)."""
        ctx = self.secure.context(r, name)
        nxt = self.secure.context(r if next_round is None else next_round, next_name)
        entries, ids = self.secure.start(ctx, self.packings[name], nodes, nxt)
        if len(ids) < self.secure.min_parties:
            raise SitesMissing(f"round {r}: only {len(ids)} sites can take part in the secure "
                               f"{name} sum, fewer than {self.secure.min_parties}; secure "
                               "aggregation needs 3 or more contributing sites")
        for k, v in entries.items():
            config[k] = v
        self._secure_round[name] = (ctx, ids)
        return OnlyNodes(grid, ids)

    def _secure_sum(self, name: str, replies: list[Message]):
        ctx, ids = self._secure_round[name]
        vectors = {}
        for m in replies:
            if m.has_error():
                continue
            self.secure.note(m.metadata.src_node_id, m.content)
            arr = m.content.array_records.get(ARRAYS)
            if arr is not None and MASKED in arr:
                vectors[m.metadata.src_node_id] = arr[MASKED].numpy()
        return self.secure.finish(ctx, self.packings[name], ids, vectors)

    def secure_aggregate_train(self, r: int, replies: list[Message]):
        """FedAvg's example-weighted mean from the sum of the sites' ``n·w`` and ``n``, then the
        strategy's own step (FedAdam/FedYogi) on it, as if one site had sent the mean."""
        self.last_privacy, self.last_train = {}, {}
        for m in replies:
            if self._note_train_reply(r, m):
                self.last_train[self._site(m)] = {}
        total = self._secure_sum("train", replies).values
        self.last_secure_train = {"sites": int(total["sites"]),
                                  "examples": int(total["examples"])}
        if int(total["loss_examples"]) > 0:
            self.last_secure_train["train_loss"] = (float(total["loss_sum"])
                                                    / int(total["loss_examples"]))
        if int(total["sites"]) < self.min_sites or int(total["weight"]) <= 0:
            self.too_few(r, [None] * int(total["sites"]))
            return None, None
        mean = total["weighted"] / int(total["weight"])
        if self.central_dp is not None:
            mean = self._central_release(r, mean, int(total["sites"]))
        key = next(iter(self.expected))
        dtype = np.float32
        reply = Message(RecordDict({
            ARRAYS: ArrayRecord({key: Array(mean.astype(dtype))}),
            METRICS: MetricRecord({
                Metric.NUM_EXAMPLES: int(total["examples"]),
                Metric.TRAIN_LOSS: self.last_secure_train.get("train_loss", WITHHELD)})}),
            dst_node_id=0, message_type=MessageType.TRAIN)
        self._prescreened = True
        try:
            return super().aggregate_train(r, [reply])
        finally:
            self._prescreened = False

    central_dp = None  # CentralDPConfig when central DP runs under secure aggregation
    central_sites_per_round: int = 1
    noise_seed: int | None = None  # a simulation's seed (reproducible noise); None: OS entropy

    def _central_release(self, r: int, mean_update: np.ndarray, k: int) -> np.ndarray:
        """Central DP under secure aggregation: the sites clipped their updates to L2 norm C and
        sent them with equal weights; the mean of k of them, plus N(0, (σ·C/m)²), m the sites
        per round, is added to the global model. One site changes the mean by at most C/k, so
        the effective noise multiplier is σ·k/m (σ when every drawn site replied)."""
        from safn_core.privacy.randomness import numpy_generator

        cdp, m = self.central_dp, self.central_sites_per_round
        rng = numpy_generator(None if self.noise_seed is None else [self.noise_seed, r], 3)
        std = cdp.noise_multiplier * cdp.clipping_norm / m
        noisy = mean_update + rng.normal(0.0, std, size=mean_update.shape)
        self.central[r] = {
            "noise_multiplier": float(cdp.noise_multiplier),
            "clipping_norm": float(cdp.clipping_norm), "sites_per_round": int(m),
            "sites_aggregated": int(k), "max_weight": 1.0 / k,
            "effective_noise_multiplier": float(cdp.noise_multiplier) * k / m,
            "clipped_at": "sites (secure aggregation)"}
        return self._current_vector + noisy

    def secure_aggregate_evaluate(self, r: int, replies: list[Message]):
        held_out = (self.evaluators or set()) - (self.eligible or set())
        plain = [m for m in replies if m.metadata.src_node_id in held_out]
        masked = [m for m in replies if m.metadata.src_node_id not in held_out]
        self.last_evaluate = {self._site(m): m.content[METRICS] for m in plain
                              if not m.has_error()}
        result = self._secure_sum("evaluate", masked)
        self.last_secure_evaluate = result.values
        # which sites are in the sum (their names, not their values): what the pooled metrics
        # rest on, for the model card
        self.last_secure_evaluate_sites = sorted(self.site_names.get(n, f"node {n}")
                                                 for n in result.contributors)
        own = {}
        for m in masked:
            if m.has_error():
                continue
            met = m.content[METRICS]
            own[self._site(m)] = ({"roc_auc": float(met[Metric.SITE_ROC_AUC]),
                                   "n": int(met[Metric.SITE_N])}
                                  if int(met.get(Metric.SITE_REPORTED, 0)) else None)
        self.last_site_metrics = own
        return MetricRecord({Metric.NUM_EXAMPLES: int(np.asarray(
            self.last_secure_evaluate["test"]).sum())})
