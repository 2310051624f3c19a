"""The strategies of a SAFN run: Flower's own, with round offsets, screening and state.

`make_strategy` returns Flower's FedAvg / FedProx / FedAdam / FedYogi extended by
`SafnStrategyMixin`, which adds what a clinical federation needs and Flower leaves out:

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
- the adaptive optimisers' moments exposed for checkpoints (`get_state` / `set_state`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from safn_core.config import FederationConfig
from safn_core.federation.loop import sample_sites


def train_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Train metrics: examples summed, loss weighted by examples (not every key averaged)."""
    n = [float(r["metrics"]["num-examples"]) for r in replies]
    loss = [float(r["metrics"]["train-loss"]) for r in replies]
    total = sum(n)
    return MetricRecord({"num-examples": int(total),
                         "train-loss": float(np.dot(n, loss) / total) if total else 0.0})


def evaluate_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics are built by the coordinator from histograms, not averaged here."""
    return MetricRecord({"num-examples": int(sum(int(r["metrics"]["num-examples"])
                                                 for r in replies))})


class _OnlyNodes:
    """A view of the Grid that lists only the nodes chosen for this round."""

    def __init__(self, grid, node_ids: list[int]):
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self):
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


class SafnStrategyMixin:
    round_offset: int = 0
    seed: int = 0
    min_sites: int = 1
    fraction: tuple[float, float] = (1.0, 1.0)
    expected: dict[str, tuple] | None = None
    eligible: set[int] | None = None

    def _init_safn(self) -> None:
        self.site_names: dict[int, str] = {}
        self.rejected: list[dict] = []
        self.last_train: dict[str, dict] = {}
        self.last_evaluate: dict[str, dict] = {}

    def _site(self, msg: Message) -> str:
        nid = msg.metadata.src_node_id
        return self.site_names.get(nid, f"node {nid}")

    def _choose(self, grid, fraction: float, seed: int, server_round: int) -> _OnlyNodes:
        """The round's sites, drawn among connected sites that passed the statistics round
        (a site that withheld its statistics for small cells takes no part in the run)."""
        nodes = [n for n in grid.get_node_ids() if self.eligible is None or n in self.eligible]
        by_name = {self.site_names.get(n, f"node {n}"): n for n in nodes}
        names = sample_sites(list(by_name), fraction, self.min_sites, seed, server_round)
        return _OnlyNodes(grid, [by_name[n] for n in names])

    # -- rounds: offset, sampling ------------------------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):
        r = server_round + self.round_offset
        if self.expected is None:
            self.expected = {k: tuple(a.shape) for k, a in arrays.items()}
        return super().configure_train(r, arrays, config,
                                       self._choose(grid, self.fraction[0], self.seed, r))

    def configure_evaluate(self, server_round, arrays, config, grid):
        r = server_round + self.round_offset
        return super().configure_evaluate(r, arrays, config,
                                          self._choose(grid, self.fraction[1], self.seed + 1, r))

    # -- aggregation: screened, ordered ------------------------------------------------------

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        r = server_round + self.round_offset
        replies = [m for m in replies if not m.has_error()]
        kept = sorted((m for m in replies if self._acceptable(r, m)), key=self._site)
        self.last_train = {self._site(m): {k: v for k, v in m.content["metrics"].items()}
                           for m in kept}
        if len(kept) < self.min_sites:
            self.rejected.append({"round": r, "site": "-", "reason":
                                  f"only {len(kept)} acceptable updates, fewer than min_sites "
                                  f"= {self.min_sites}: the model is unchanged this round"})
            return None, None
        return super().aggregate_train(r, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [m for m in replies if not m.has_error()]
        self.last_evaluate = {self._site(m): m.content["metrics"] for m in replies}
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    # -- screening ---------------------------------------------------------------------------

    def _acceptable(self, server_round: int, msg: Message) -> bool:
        reason = self._problem(msg)
        if reason:
            self.rejected.append({"round": server_round, "site": self._site(msg),
                                  "reason": reason})
        return reason is None

    def _problem(self, msg: Message) -> str | None:
        if "arrays" not in msg.content.array_records:
            return "reply has no model arrays"
        arrays = msg.content["arrays"]
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
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None or int(metrics.get("num-examples", 0)) <= 0:
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
    strategy.fraction = (fed.fraction_train, fed.fraction_evaluate)
    return strategy
