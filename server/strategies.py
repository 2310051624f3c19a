"""Flower's own strategies, built by Flower's constructors from ``federation.*``.

`flower_strategy` returns the FedAvg / FedProx / FedAdam / FedYogi that `safn.server.strategy.
SafnStrategy` wraps. The SAFN strategy chooses each round's sites itself (by name, seeded per
round) and offers Flower's strategy only those, so Flower's strategy is told to take every site
it is offered (fraction 1, at least 1 node); the real fractions and minimum are the SAFN
strategy's options, and its ``summary()`` logs both. Flower's metric aggregations are replaced
by `safn.server.screening.train_metrics` / `evaluate_metrics` (ε and counts are never averaged).

The adaptive optimisers' moments (``m_t``, ``v_t``: public attributes of Flower's FedOpt) are
what a checkpoint must keep of a strategy: `optimizer_state` / `restore_optimizer_state`.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from safn_core.config import FederationConfig, PrivacyConfig
from safn.server.screening import evaluate_metrics, train_metrics

FLOWER_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam,
                     "fedyogi": FedYogi}
OPTIMIZER_STATE = ("m_t", "v_t", "momentum_vector")


def flower_strategy(fed: FederationConfig) -> Strategy:
    """Flower's strategy for ``federation.strategy``, with every option it takes from the
    configuration (FedProx's μ; FedAdam/FedYogi's η, τ, β₁, β₂)."""
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1,
                  train_metrics_aggr_fn=train_metrics, evaluate_metrics_aggr_fn=evaluate_metrics)
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy in ("fedadam", "fedyogi"):
        kwargs.update(eta=fed.server_lr, tau=fed.tau, beta_1=fed.beta_1, beta_2=fed.beta_2)
    return FLOWER_STRATEGIES[fed.strategy](**kwargs)


def distributed_optimizer(privacy: PrivacyConfig, fed: FederationConfig) -> Strategy:
    """Distributed DP's step on the noised mean gradient (`safn.server.distributed_dp`):
    Flower's FedAdam (``adam``: η the learning rate, β₁ the momentum, β₂ and τ from
    ``federation``) or FedAvgM (``sgd``: server learning rate and momentum)."""
    d = privacy.distributed
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=1,
                  train_metrics_aggr_fn=train_metrics, evaluate_metrics_aggr_fn=evaluate_metrics)
    if d.optimizer == "adam":
        return FedAdam(eta=d.learning_rate, beta_1=d.momentum, beta_2=fed.beta_2, tau=fed.tau,
                       **kwargs)
    return FedAvgM(server_learning_rate=d.learning_rate, server_momentum=d.momentum, **kwargs)


def optimizer_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """FedAdam/FedYogi's moments, FedAvgM's momentum (empty for FedAvg/FedProx and before the
    first step)."""
    state = {}
    for name in OPTIMIZER_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, list):  # FedAvgM's momentum: a list of arrays
            value = {str(i): v for i, v in enumerate(value)}
        if value:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def restore_optimizer_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put a checkpoint's moments back into Flower's FedAdam/FedYogi (a strategy without
    them ignores them, as Flower's FedAvg would)."""
    for name, value in state.items():
        if name in OPTIMIZER_STATE and hasattr(strategy, name):
            if isinstance(getattr(strategy, name), list) or name == "momentum_vector":
                setattr(strategy, name, [np.asarray(value[k]) for k in sorted(value, key=int)])
            else:
                setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
