"""The strategies of a SAFN run: Flower's own, with round offsets, screening and state.

`make_strategy` returns Flower's FedAvg / FedProx / FedAdam / FedYogi extended by
`SafnStrategyMixin`, which adds what a clinical federation needs and Flower leaves out:

- a bounded wait at the start of each training round for sites of the run that are
  reconnecting (`await_rejoin`, ``federation.rejoin_wait``), so a restarted site takes part in
  the round it came back for;
- a round offset, so that a resumed run continues its round numbers (FedAdam's bias correction
  and the sites' seeds depend on them) although `Strategy.start` always counts from 1;
- reproducible participation: the sites of a round are drawn by `sample_sites` (seeded per
  round, by site name), the same draw as the in-process loop and the same after a resume —
  Flower's own draw depends on the global `random` state and on node ids that change per launch;
- a deterministic aggregation order (replies sorted by site name): float sums depend on order,
  and an order fixed by arrival time would make runs and resumes differ in the last bits;
- screening of training replies: NaN/Inf values, wrong array names or shapes are rejected and
  reported by site, never averaged into the global model; a round with fewer than ``min_sites``
  acceptable replies leaves the model unchanged;
- the evaluation replies kept by site, so the coordinator computes pooled and per-site metrics
  from score histograms (Flower would weight-average every key, which is wrong for counts);
- each site's privacy metrics (ε spent so far, δ, σ, steps) kept by site, never averaged, and a
  site's refusal to train (budget exhausted, ledger problem) recorded with its reason and left
  out of the aggregate while the other sites' updates are used;
- optional central DP (`server.central_dp.with_central_dp`): Flower's
  `DifferentialPrivacyServerSideFixedClipping` around the strategy, fed only with screened
  replies, its site-level noise recorded per round;
- secure aggregation (`server.secure_strategy.SecureSumMixin`, when ``secure`` is set): the
  coordinator sees only the sums; screening then happens at each site;
- the adaptive optimisers' moments exposed for checkpoints (`get_state` / `set_state`).

The waits themselves (start of run, each round, a reconnecting site) are `server.site_waits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from safn_core.config import FederationConfig
from safn_core.federation.sampling import sample_sites
from safn_core.federation.protocol import (ARRAYS, CONFIG, METRICS, REFUSAL, WITHHELD, Config,
                                           Describe, Metric, is_withheld)
from server.secure_strategy import SecureSumMixin
from server.site_waits import OnlyNodes, await_rejoin, wait_for_nodes


def train_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Train metrics: examples summed, loss weighted by examples over the sites that report one
    (a DP site withholds its loss as −1), never ε or any other privacy key averaged."""
    n = [float(r[METRICS][Metric.NUM_EXAMPLES]) for r in replies]
    loss = [float(r[METRICS][Metric.TRAIN_LOSS]) for r in replies]
    total = sum(n)
    reported = [(w, lo) for w, lo in zip(n, loss) if not is_withheld(lo)]
    weight = sum(w for w, _ in reported)
    return MetricRecord({Metric.NUM_EXAMPLES: int(total),
                         Metric.TRAIN_LOSS: (float(sum(w * lo for w, lo in reported) / weight)
                                             if weight else WITHHELD)})


PRIVACY_KEYS = {Metric.DP: "dp", Metric.EPSILON: "epsilon", Metric.DELTA: "delta",
                Metric.EPSILON_BUDGET: "epsilon_budget",
                Metric.NOISE_MULTIPLIER: "noise_multiplier", Metric.DP_STEPS: "dp_steps",
                Metric.REFUSED: "refused"}


def privacy_of(metrics) -> dict | None:
    """A site's privacy report from its training metrics (None for a reply without one)."""
    if metrics is None or Metric.DP not in metrics:
        return None
    out = {name: metrics[key] for key, name in PRIVACY_KEYS.items() if key in metrics}
    out["dp"] = bool(int(out.get("dp", 0)))
    out["refused"] = bool(int(out.get("refused", 0)))
    for key in ("epsilon", "epsilon_budget"):
        if key in out and is_withheld(out[key]):
            out[key] = None  # no guarantee (a site without DP)
    return out


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def evaluate_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics are built by the coordinator from histograms, not averaged here."""
    return MetricRecord({Metric.NUM_EXAMPLES: int(sum(int(r[METRICS][Metric.NUM_EXAMPLES])
                                                      for r in replies))})


class SafnStrategyMixin(SecureSumMixin):
    round_offset: int = 0
    seed: int = 0
    min_sites: int = 1
    fraction: tuple[float, float] = (1.0, 1.0)
    expected: dict[str, tuple] | None = None
    eligible: set[int] | None = None
    evaluators: set[int] | None = None  # eligible + held-out sites (evaluation only)
    wait_for_sites: float = 300.0
    rejoin_wait: float = 0.0

    def _init_safn(self) -> None:
        self.site_names: dict[int, str] = {}
        self.away: set[int] = set()  # sites of the run no longer waited for (await_rejoin)
        self._sent: list[Message] = []  # this round's training instructions (ids once sent)
        self.report: Callable[[str], None] = print
        self.rejected: list[dict] = []
        self.refusals: list[dict] = []
        self.last_train: dict[str, dict] = {}
        self.last_privacy: dict[str, dict] = {}
        self.last_evaluate: dict[str, dict] = {}
        self.central: dict[int, dict] = {}  # round -> central DP release (with_central_dp)
        self._prescreened = False
        self._secure_round: dict[str, tuple] = {}
        self.last_secure_train: dict | None = None
        self.last_secure_evaluate: dict | None = None
        self.last_secure_evaluate_sites: list[str] = []  # the sites in that sum
        self.last_site_metrics: dict = {}

    def _site(self, msg: Message) -> str:
        # a training reply is for the node its instruction went to, also when the SuperLink
        # wrote it (src: the SuperLink) because that node went away
        nid = next((m.metadata.dst_node_id for m in self._sent
                    if m.metadata.message_id == msg.metadata.reply_to_message_id),
                   msg.metadata.src_node_id)
        return self.site_names.get(nid, f"node {nid}")

    def _choose(self, grid, fraction: float, seed: int, server_round: int,
                allowed: set[int] | None = None) -> OnlyNodes:
        """The round's sites, drawn among connected sites that passed the statistics round
        (a site that withheld its statistics for small cells takes no part in the run)."""
        allowed = self.eligible if allowed is None else allowed
        nodes = wait_for_nodes(grid, self.min_sites, self.wait_for_sites,
                               lambda n: allowed is None or n in allowed,
                               f"in round {server_round}")
        by_name = {self.site_names.get(n, f"node {n}"): n for n in nodes}
        names = sample_sites(list(by_name), fraction, self.min_sites, seed, server_round)
        return OnlyNodes(grid, [by_name[n] for n in names])

    def await_rejoin(self, grid, r: int) -> None:
        """Before a training round: a bounded wait for the run's sites that are reconnecting."""
        if self.eligible and self.rejoin_wait > 0:
            await_rejoin(grid, {n: self.site_names.get(n, f"node {n}") for n in self.eligible},
                         self.away, self.rejoin_wait, f"round {r}", self.report)

    # -- rounds: offset, sampling ------------------------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):
        r = server_round + self.round_offset
        if self.expected is None:
            self.expected = {k: tuple(a.shape) for k, a in arrays.items()}
        self.await_rejoin(grid, r)
        chosen = self._choose(grid, self.fraction[0], self.seed, r)
        self._current_vector = np.asarray(next(iter(arrays.values())).numpy(), dtype=np.float64)
        if self.secure is not None:
            chosen = self.secure_start(grid, "train", r, chosen.get_node_ids(), config,
                                       next_name="evaluate")
        self._sent = list(super().configure_train(r, arrays, config, chosen))
        return self._sent

    def configure_evaluate(self, server_round, arrays, config, grid):
        r = server_round + self.round_offset
        chosen = self._choose(grid, self.fraction[1], self.seed + 1, r)
        held_out = sorted((self.evaluators or set()) - (self.eligible or set()))
        connected = set(grid.get_node_ids())
        if self.secure is not None:
            chosen = self.secure_start(grid, "evaluate", r, chosen.get_node_ids(), config,
                                       next_name="train", next_round=r + 1)
        chosen = OnlyNodes(grid, chosen.get_node_ids()
                            + [n for n in held_out if n in connected])  # always evaluate
        messages = list(super().configure_evaluate(r, arrays, config, chosen))
        if self.secure is not None:  # held-out sites evaluate alone, in plain text
            # (Flower's messages share one RecordDict: a held-out site gets its own)
            plain = ConfigRecord({k: v for k, v in config.items()
                                  if not k.startswith(Config.SECAGG_PREFIX)})
            messages = [Message(RecordDict({ARRAYS: m.content[ARRAYS], CONFIG: plain}),
                                dst_node_id=m.metadata.dst_node_id,
                                message_type=m.metadata.message_type)
                        if m.metadata.dst_node_id in held_out else m for m in messages]
        return messages

    # -- aggregation: screened, ordered ------------------------------------------------------

    def _note_train_reply(self, r: int, m: Message) -> bool:
        """Record a training reply's failure, privacy report or refusal (with the site's
        reason); True when it carries an update to use."""
        site = self._site(m)
        if m.has_error():
            self.rejected.append({"round": r, "site": site, "reason":
                                  f"the site failed: {_one_line(m.error.reason)}"})
            return False
        metrics = m.content.metric_records.get(METRICS)
        report = privacy_of(metrics)
        if report is not None:
            self.last_privacy[site] = report
        if metrics is not None and int(metrics.get(Metric.REFUSED, 0)) == 1:
            why = m.content.config_records.get(REFUSAL)
            self.refusals.append({"round": r, "site": site, "reason": _one_line(
                why[Describe.REASON] if why is not None and Describe.REASON in why
                else "no reason given")})
            return False
        return True

    def screen_train(self, r: int, replies: Iterable[Message]) -> list[Message]:
        """The round's usable training replies, sorted by site, arrays in the global order.

        Records each site's privacy report (``last_privacy``, refused sites included), its
        refusal with the site's reason (``refusals``), failed sites and unusable updates
        (``rejected``), and the kept sites' metrics (``last_train``).
        """
        self.last_privacy = {}
        kept = []
        for m in replies:
            if not self._note_train_reply(r, m):
                continue
            if self._acceptable(r, m):
                kept.append(m)
        kept.sort(key=self._site)
        for m in kept:  # Flower's DP clipping pairs arrays with the global ones by position
            arrays = m.content[ARRAYS]
            if self.expected is not None and list(arrays.keys()) != list(self.expected):
                m.content[ARRAYS] = ArrayRecord({k: arrays[k] for k in self.expected})
        self.last_train = {self._site(m): {k: v for k, v in m.content[METRICS].items()}
                           for m in kept}
        return kept

    def too_few(self, r: int, kept: list[Message]) -> bool:
        if len(kept) >= self.min_sites:
            return False
        self.rejected.append({"round": r, "site": "-", "reason":
                              f"only {len(kept)} acceptable updates, fewer than min_sites "
                              f"= {self.min_sites}: the model is unchanged this round"})
        return True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        r = server_round + self.round_offset
        if self.secure is not None and not self._prescreened:
            return self.secure_aggregate_train(r, list(replies))
        kept = list(replies) if self._prescreened else self.screen_train(r, replies)
        if not self._prescreened and self.too_few(r, kept):
            return None, None
        return super().aggregate_train(r, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        if self.secure is not None:
            return self.secure_aggregate_evaluate(server_round + self.round_offset,
                                                  list(replies))
        replies = [m for m in replies if not m.has_error()]
        self.last_evaluate = {self._site(m): m.content[METRICS] for m in replies}
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    # -- screening ---------------------------------------------------------------------------

    def _acceptable(self, server_round: int, msg: Message) -> bool:
        reason = self._problem(msg)
        if reason:
            self.rejected.append({"round": server_round, "site": self._site(msg),
                                  "reason": reason})
        return reason is None

    def _problem(self, msg: Message) -> str | None:
        if ARRAYS not in msg.content.array_records:
            return "reply has no model arrays"
        arrays = msg.content[ARRAYS]
        if self.expected is not None:
            if set(arrays.keys()) != set(self.expected):
                odd = sorted(set(arrays.keys()) ^ set(self.expected))[:3]
                return f"wrong array names ({', '.join(odd)})"
            for k, a in arrays.items():
                if tuple(a.shape) != self.expected[k]:
                    return f"wrong shape of {k}: {tuple(a.shape)} instead of {self.expected[k]}"
        for k, a in arrays.items():
            if not np.all(np.isfinite(a.numpy())):
                return f"non-finite values (NaN/Inf) in {k}"
        metrics = msg.content.metric_records.get(METRICS)
        if metrics is None or int(metrics.get(Metric.NUM_EXAMPLES, 0)) <= 0:
            return "no positive num-examples"
        return None

    # -- state for checkpoints ---------------------------------------------------------------

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        """FedAdam/FedYogi moments (empty for FedAvg/FedProx)."""
        state = {}
        for name in ("m_t", "v_t"):
            value = getattr(self, name, None)
            if value:
                state[name] = {k: np.asarray(v) for k, v in value.items()}
        return state

    def set_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for name, value in state.items():
            setattr(self, name, {k: np.asarray(v) for k, v in value.items()})


BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}


def make_strategy(fed: FederationConfig, seed: int):
    """The configured strategy, with SAFN's additions.

    Flower's own node sampling and waiting are neutralised (fractions 1, minimums 1): the mixin
    chooses the round's sites itself and the coordinator waits for ``min_sites`` with a bound.
    """
    base = BASES[fed.strategy]
    cls = type(f"Safn{base.__name__}", (SafnStrategyMixin, base), {})
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1, train_metrics_aggr_fn=train_metrics,
                  evaluate_metrics_aggr_fn=evaluate_metrics)
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=fed.server_lr, tau=fed.tau, beta_1=fed.beta_1, beta_2=fed.beta_2)
    strategy = cls(**kwargs)
    strategy._init_safn()
    strategy.seed = seed
    strategy.min_sites = fed.min_sites
    strategy.wait_for_sites = fed.wait_for_sites
    strategy.rejoin_wait = fed.rejoin_wait
    strategy.fraction = (fed.fraction_train, fed.fraction_evaluate)
    return strategy
