"""The strategies of a SAFN run: Flower's own, with round offsets, screening and state.

`make_strategy` returns Flower's FedAvg / FedProx / FedAdam / FedYogi extended by
`SafnStrategyMixin`, which adds what a clinical federation needs and Flower leaves out:

- a round offset, so that a resumed run continues its round numbers (FedAdam's bias correction
  and the clients' seeds depend on them) although `Strategy.start` always counts from 1;
- screening of training replies: NaN/Inf values, wrong array names or shapes are rejected and
  reported by site, never averaged into the global model;
- the evaluation replies kept by node, so the coordinator can compute pooled and per-site metrics
  from score histograms;
- the adaptive optimisers' moments exposed for checkpoints (`get_state` / `set_state`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from safn_core.config import FederationConfig


def _sum_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Train metrics: examples summed, loss weighted by examples (not every key averaged)."""
    n = [float(r["metrics"]["num-examples"]) for r in replies]
    loss = [float(r["metrics"]["train-loss"]) for r in replies]
    total = sum(n)
    return MetricRecord({"num-examples": int(total),
                         "train-loss": float(np.dot(n, loss) / total) if total else 0.0})


def _no_average(replies, weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics are built by the coordinator from histograms, not averaged here."""
    return MetricRecord({"num-examples": int(sum(int(r["metrics"]["num-examples"])
                                                 for r in replies))})


class SafnStrategyMixin:
    round_offset: int = 0
    expected: dict[str, tuple] | None = None
    site_names: dict[int, str] = {}
    rejected: list[dict]
    last_evaluate: dict[int, dict]

    def _init_safn(self) -> None:
        self.rejected = []
        self.last_evaluate = {}

    # -- round numbers continue across a resume ----------------------------------------------

    def configure_train(self, server_round, arrays, config, grid):
        if self.expected is None:
            self.expected = {k: tuple(a.shape) for k, a in arrays.items()}
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept = [m for m in replies if self._acceptable(server_round + self.round_offset, m)]
        return super().aggregate_train(server_round + self.round_offset, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.last_evaluate = {m.metadata.src_node_id: m.content["metrics"]
                              for m in replies if not m.has_error()}
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    # -- screening ---------------------------------------------------------------------------

    def _acceptable(self, server_round: int, msg: Message) -> bool:
        if msg.has_error():
            return True  # Flower counts it as a failure already
        site = self.site_names.get(msg.metadata.src_node_id, str(msg.metadata.src_node_id))
        reason = self._problem(msg)
        if reason:
            self.rejected.append({"round": server_round, "site": site, "reason": reason})
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


def make_strategy(fed: FederationConfig, n_sites: int):
    """The configured strategy, with SAFN's additions."""
    base = BASES[fed.strategy]
    cls = type(f"Safn{base.__name__}", (SafnStrategyMixin, base), {})
    min_nodes = min(fed.min_sites, n_sites)
    kwargs = dict(fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate,
                  min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                  min_available_nodes=min_nodes, train_metrics_aggr_fn=_sum_metrics,
                  evaluate_metrics_aggr_fn=_no_average)
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=fed.server_lr, tau=fed.tau, beta_1=fed.beta_1, beta_2=fed.beta_2)
    strategy = cls(**kwargs)
    strategy._init_safn()
    return strategy
