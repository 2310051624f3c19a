"""The SAFN strategy: a Flower strategy wrapped with what a clinical federation needs.

`SafnStrategy` holds a Flower strategy built by Flower's own constructor (`flower_strategy`:
FedAvg, FedProx, FedAdam or FedYogi; Flower's central DP wrapper around it when the coordinator
clips) and does not reach into it. It adds:

- reproducible participation: the round's sites are drawn by name
  (`safn_core.federation.sampling.sample_sites`, seeded per round) among the connected sites
  that passed the statistics round, and only those are offered to Flower's strategy, which
  takes every site it is offered;
- bounded waits: for ``min_sites`` sites (`safn.server.site_waits.wait_for_nodes`) and, before a
  training round, for sites of the run that are reconnecting (``rejoin_wait``);
- a deterministic aggregation order (replies sorted by site name: float sums depend on order);
- screening of training replies (`safn.server.screening`): NaN/Inf values, wrong array names or
  shapes, failed sites and refusals are recorded by site and never averaged; a round with
  fewer than ``min_sites`` usable replies leaves the model unchanged;
- held-out sites, which evaluate every round (alone, in plain text) and never train;
- the parts it is given: secure aggregation (`safn.server.secure_strategy.SecureSum`: the
  coordinator sees only sums) and central DP (`safn.server.central_dp.CentralDP`).

`start` runs rounds ``first_round`` … ``num_rounds`` (a resumed run starts after its last
checkpointed round, with the real round numbers: FedAdam's bias correction and the sites'
seeds depend on them), reports each round as a frozen `RoundRecord` to ``on_round`` (which
returns True to stop the run early) and returns a `StrategyResult`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from safn_core.config import FederationConfig
from safn_core.federation.events import EventLog
from safn_core.federation.protocol import (ARRAYS, CONFIG, METRICS, WITHHELD, Config, Metric,
                                           evaluation_from_metrics)
from safn_core.federation.round_record import RoundRecord, SecureTrainSum
from safn_core.federation.sampling import sample_sites
from safn.server import screening
from safn.server.central_dp import CentralDP
from safn.server.secure_strategy import SecureSum
from safn.server.run_sites import RunSites
from safn.server.site_waits import OnlyNodes, await_rejoin, wait_for_nodes

if TYPE_CHECKING:
    from safn.server.distributed_dp import DistributedDP


@dataclass(frozen=True)
class StrategyOptions:
    """How the SAFN strategy chooses and waits for sites (``federation.*`` and ``train.seed``)."""

    seed: int = 0
    min_sites: int = 1
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    wait_for_sites: float = 300.0
    rejoin_wait: float = 0.0

    @classmethod
    def from_config(cls, fed: FederationConfig, seed: int) -> StrategyOptions:
        return cls(seed=int(seed), min_sites=fed.min_sites, fraction_train=fed.fraction_train,
                   fraction_evaluate=fed.fraction_evaluate, wait_for_sites=fed.wait_for_sites,
                   rejoin_wait=fed.rejoin_wait)


@dataclass(frozen=True)
class StrategyResult:
    """What `SafnStrategy.start` returns: the model after the last round it ran, that round,
    whether ``on_round`` stopped the run early, and Flower's own metrics by round."""

    arrays: ArrayRecord
    last_round: int
    stopped_early: bool
    flower: Result = field(default_factory=Result)


@dataclass
class _Round:
    """The working notes of the round in progress (turned into a `RoundRecord` at its end)."""

    r: int
    sent: list[Message] = field(default_factory=list)  # training instructions (ids once sent)
    current: np.ndarray | None = None  # the global model before the round (central DP)
    train: screening.TrainingReplies = field(default_factory=screening.TrainingReplies)
    secure_train: object = None
    evaluated: dict = field(default_factory=dict)
    secure_evaluation: object = None
    central_dp: dict | None = None
    shares: object = None  # distributed DP: the round's noise plan (`NoiseShares`)
    distributed_dp: dict | None = None


class SafnStrategy(Strategy):
    """A Flower strategy (``inner``) with SAFN's site choice, screening, secure sums and
    central DP. ``expected`` maps the model's array names to their shapes (replies are
    screened against it; taken from the first round's arrays when None)."""

    def __init__(self, inner: Strategy, options: StrategyOptions, sites: RunSites, *,
                 secure: SecureSum | None = None, central_dp: CentralDP | None = None,
                 distributed: "DistributedDP | None" = None,
                 events: EventLog | None = None, expected: Mapping[str, tuple] | None = None):
        if central_dp is not None and secure is None \
                and not hasattr(inner, "num_sampled_clients"):
            raise ValueError("central DP without secure aggregation needs Flower's DP wrapper "
                             "around the inner strategy: pass CentralDP.wrap(inner)")
        self.inner = inner
        self.options = options
        self.sites = sites
        self.secure = secure
        self.central_dp = central_dp
        if distributed is not None and (secure is None or central_dp is not None):
            raise ValueError("distributed DP needs secure aggregation and no central DP")
        self.distributed = distributed
        self.events = events if events is not None else EventLog(None, None)
        self._expected = None if expected is None else dict(expected)
        self._away: set[int] = set()  # sites of the run no longer waited for (await_rejoin)
        self._round = _Round(0)
        self._timeout: float | None = None  # the rounds' deadline (`start`)

    def summary(self) -> None:
        o = self.options
        log(INFO, "\t├──> SAFN site choice (by site name, seeded per round):")
        log(INFO, "\t│\t├──Fraction: train (%.2f) | evaluate (%.2f) of the %d training sites",
            o.fraction_train, o.fraction_evaluate, len(self.sites.eligible))
        log(INFO, "\t│\t├──Minimum sites: %d (waited for up to %.0f s); rejoin wait %.0f s",
            o.min_sites, o.wait_for_sites, o.rejoin_wait)
        log(INFO, "\t│\t└──Held-out sites (evaluation only): %d", len(self.sites.held_out))
        log(INFO, "\t├──> Secure aggregation: %s", "on" if self.secure else "off")
        if self.distributed is not None:
            p = self.distributed.plan
            log(INFO, "\t├──> Distributed DP-SGD: σ %.4g, q %s, C %s, against %d colluding "
                "sites; one noised gradient step per round", p.noise_multiplier, p.sample_rate,
                p.clipping_norm, p.colluding)
        if self.central_dp is not None:
            log(INFO, "\t├──> Central DP: σ %s, C %s, %d sites per round",
                self.central_dp.noise_multiplier, self.central_dp.clipping_norm,
                self.central_dp.sites_per_round)
        log(INFO, "\t└──> %s, offered only the chosen sites (it takes every one):",
            type(self.inner).__name__)
        self.inner.summary()

    # -- the run ------------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              first_round: int = 1,
              on_round: Callable[[RoundRecord, ArrayRecord], bool] | None = None,
              evaluate_first: bool = False) -> StrategyResult:
        """Rounds ``first_round`` … ``num_rounds``: train, aggregate, evaluate; after each, the
        round's record to ``on_round`` (True: stop here). ``evaluate_first``: before round 1,
        round 0 evaluates ``initial_arrays`` without training (the model SAFN starts from, so
        that the selection can keep it)."""
        self._timeout = timeout
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        flower = Result(arrays=initial_arrays)
        arrays, last, stopped = initial_arrays, first_round - 1, False
        t0 = time.time()
        if evaluate_first and first_round == 1:
            log(INFO, "")
            log(INFO, "[ROUND 0/%s: evaluation of the initial model]", num_rounds)
            self._round = _Round(0)
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(0, arrays, evaluate_config, grid),
                timeout=timeout)
            self.aggregate_evaluate(0, replies)
            last = 0
            if on_round is not None and on_round(self.record(), arrays):
                return StrategyResult(arrays, 0, True, flower)
        for r in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", r, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(r, arrays, train_config, grid), timeout=timeout)
            new, train_metrics = self.aggregate_train(r, replies)
            if new is not None:
                arrays = flower.arrays = new
            if train_metrics is not None:
                flower.train_metrics_clientapp[r] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(r, arrays, evaluate_config, grid),
                timeout=timeout)
            evaluate_metrics = self.aggregate_evaluate(r, replies)
            if evaluate_metrics is not None:
                flower.evaluate_metrics_clientapp[r] = evaluate_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(r, arrays)
                if res is not None:
                    flower.evaluate_metrics_serverapp[r] = res
            last = r
            if on_round is not None and on_round(self.record(), arrays):
                stopped = r < num_rounds
                break
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t0)
        for line in io.StringIO(str(flower)):
            log(INFO, "\t%s", line.strip("\n"))
        return StrategyResult(arrays, last, stopped, flower)

    def record(self) -> RoundRecord:
        """The round just aggregated, as data."""
        w = self._round
        secure = self.secure is not None
        return RoundRecord(
            round=w.r,
            trained=({s: {} for s in w.train.answered} if secure else
                     {self._site(m): dict(m.content[METRICS].items()) for m in w.train.kept}),
            privacy=dict(w.train.privacy), refused=tuple(w.train.refused),
            rejected=tuple(w.train.rejected), evaluated=dict(w.evaluated),
            held_out=self.sites.held_out_names,
            secure_train=w.secure_train, secure_evaluation=w.secure_evaluation,
            retries=self.secure.retries(w.r) if secure else (), central_dp=w.central_dp,
            distributed_dp=w.distributed_dp, secure=secure)

    # -- choosing sites -----------------------------------------------------------------------

    def _site(self, msg: Message) -> str:
        # a training reply is for the node its instruction went to, also when the SuperLink
        # wrote it (src: the SuperLink) because that node went away
        nid = next((m.metadata.dst_node_id for m in self._round.sent
                    if m.metadata.message_id == msg.metadata.reply_to_message_id),
                   msg.metadata.src_node_id)
        return self.sites.name(nid)

    def choose(self, grid, fraction: float, seed: int, r: int) -> OnlyNodes:
        """The round's sites, drawn among connected sites that passed the statistics round
        (a site that withheld its statistics for small cells takes no part in the run)."""
        o = self.options
        nodes = wait_for_nodes(grid, o.min_sites, o.wait_for_sites,
                               lambda n: n in self.sites.eligible, f"in round {r}")
        by_name = {self.sites.name(n): n for n in nodes}
        names = sample_sites(list(by_name), fraction, o.min_sites, seed, r)
        return OnlyNodes(grid, [by_name[n] for n in names])

    def _await_rejoin(self, grid, r: int) -> None:
        if self.sites.eligible and self.options.rejoin_wait > 0:
            await_rejoin(grid, {n: self.sites.name(n) for n in self.sites.eligible},
                         self._away, self.options.rejoin_wait, r, self.events)

    # -- training -----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round
        self._round = _Round(r)
        if self._expected is None:
            self._expected = {k: tuple(a.shape) for k, a in arrays.items()}
        self._await_rejoin(grid, r)
        chosen = self.choose(grid, self.options.fraction_train, self.options.seed, r)
        self._round.current = np.asarray(next(iter(arrays.values())).numpy(), dtype=np.float64)
        if self.secure is not None:
            chosen = self.secure.start(grid, "train", r, chosen.get_node_ids(), config,
                                       next_name="evaluate")
        if self.distributed is not None:  # the round's noise plan, sized for its secure sum
            self._round.shares = self.distributed.configure(config, len(chosen.get_node_ids()))
        self._round.sent = list(self.inner.configure_train(r, arrays, config, chosen))
        return self._round.sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round
        if self._round.r != r:  # aggregation without configure_train (Flower's API allows it)
            self._round = _Round(r)
        w = self._round
        replies = list(replies)
        if self.secure is not None:
            return self._aggregate_secure(r, replies)
        w.train = screening.screen(replies, self._site, self._expected)
        kept = w.train.kept
        if len(kept) < self.options.min_sites:
            w.train.rejected.append(screening.too_few(len(kept), self.options.min_sites))
            return None, None
        if self.central_dp is None:
            return self.inner.aggregate_train(r, kept)
        with self.central_dp.seeded(r):
            new, metrics = self.inner.aggregate_train(r, kept)
        if new is not None:
            w.central_dp = self.central_dp.release(
                [float(m.content[METRICS][Metric.NUM_EXAMPLES]) for m in kept])
        return new, metrics

    def _aggregate_secure(self, r: int, replies: list[Message]):
        """FedAvg's example-weighted mean from the secure sums, then Flower's strategy's own
        step (FedAdam/FedYogi) on it, as if one site had sent the mean."""
        w = self._round
        for m in replies:
            screening.note_reply(m, self._site(m), w.train)
        # a site that did not answer by the deadline is named (its masks did not cancel: the
        # sum is redone without it); its late reply is never pulled
        w.train.rejected.extend(screening.no_reply(w.sent, replies, self.sites.name,
                                                   self._timeout))
        if self.distributed is not None:
            return self._aggregate_shares(r, replies)
        total = self.secure.train_mean(replies)
        w.secure_train = total.summary
        if total.summary.sites < self.options.min_sites or total.mean is None:
            w.train.rejected.append(screening.too_few(total.summary.sites,
                                                      self.options.min_sites))
            return None, None
        mean = total.mean
        if self.central_dp is not None:
            noisy, w.central_dp = self.central_dp.noised(r, mean, total.summary.sites)
            mean = w.current + noisy
        return self._inner_step(r, mean.astype(np.float32), total.summary.examples,
                                total.summary.train_loss)

    def _inner_step(self, r: int, mean: np.ndarray, examples: int, loss: float | None):
        """Flower's strategy's own step on ``mean``, handed to it as if one site had sent it
        (FedAvg keeps it, FedAdam/FedYogi/FedAvgM step from the current model towards it)."""
        key = next(iter(self._expected))
        reply = Message(RecordDict({
            ARRAYS: ArrayRecord({key: Array(mean)}),
            METRICS: MetricRecord({Metric.NUM_EXAMPLES: int(examples),
                                   Metric.TRAIN_LOSS: WITHHELD if loss is None else loss})}),
            dst_node_id=0, message_type=MessageType.TRAIN)
        return self.inner.aggregate_train(r, [reply])

    def _aggregate_shares(self, r: int, replies: list[Message]):
        """Distributed DP: the noised mean gradient from the sum of noise shares (a retry needs
        n − t of them), then Flower's optimiser step on it (handed ``w − g`` as the mean)."""
        w = self._round
        values = self.secure.shares_sum(replies, w.shares.honest)
        grad, w.distributed_dp = self.distributed.gradient(w.shares, values)
        w.secure_train = SecureTrainSum(int(values["sites"]), int(values["examples"]), None)
        if grad is None:
            w.train.rejected.append(screening.too_few(int(values["sites"]), w.shares.honest))
            return None, None
        return self._inner_step(r, w.current - grad, int(values["examples"]), None)

    # -- evaluation ---------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        r = server_round
        if self._round.r != r:  # evaluation without training first (Flower's API allows it)
            self._round = _Round(r)
        chosen = self.choose(grid, self.options.fraction_evaluate, self.options.seed + 1, r)
        held_out = sorted(self.sites.held_out)
        connected = set(grid.get_node_ids())
        if self.secure is not None:
            chosen = self.secure.start(grid, "evaluate", r, chosen.get_node_ids(), config,
                                       next_name="train", next_round=r + 1)
        chosen = OnlyNodes(grid, chosen.get_node_ids()
                           + [n for n in held_out if n in connected])  # always evaluate
        messages = list(self.inner.configure_evaluate(r, arrays, config, chosen))
        if self.secure is not None:  # held-out sites evaluate alone, in plain text
            # (Flower's messages share one RecordDict: a held-out site gets its own)
            plain = ConfigRecord({k: v for k, v in config.items()
                                  if not k.startswith(Config.SECAGG_PREFIX)})
            messages = [Message(RecordDict({ARRAYS: m.content[ARRAYS], CONFIG: plain}),
                                dst_node_id=m.metadata.dst_node_id,
                                message_type=m.metadata.message_type)
                        if m.metadata.dst_node_id in held_out else m for m in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        w = self._round
        replies = list(replies)
        if self.secure is None:
            replies = [m for m in replies if not m.has_error()]
            w.evaluated = {self._site(m): evaluation_from_metrics(m.content[METRICS])
                           for m in replies}
            return self.inner.aggregate_evaluate(server_round, replies)
        plain = [m for m in replies if m.metadata.src_node_id in self.sites.held_out]
        masked = [m for m in replies if m.metadata.src_node_id not in self.sites.held_out]
        w.evaluated = {self._site(m): evaluation_from_metrics(m.content[METRICS])
                       for m in plain if not m.has_error()}
        w.secure_evaluation = self.secure.evaluation(masked, self.sites.name)
        return MetricRecord({Metric.NUM_EXAMPLES: int(np.asarray(
            w.secure_evaluation.pooled["test"]).sum())})
