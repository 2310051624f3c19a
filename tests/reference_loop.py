"""A federated run as a plain in-process loop: the same protocol, no Flower, no network.

The reference the Flower simulation is measured against, by the tests (the Flower apps add
nothing to the maths: tests/test_federation_flower.py) and the overhead benchmark
(benchmarks/sim_overhead.py, which imports it from here with the repository root on its path).
It calls exactly the functions the ClientApp and ServerApp call, with the same per-site seeds
(`safn_core.federation.sampling`), and aggregates in the same order (sites sorted by name), so
FedAvg gives the same weights as a Flower run. Not part of the package: production runs go
through Flower's strategies, and `ServerOptimizer` is their update written out without Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from safn_core.config import SafnConfig
from safn_core.data.cohort import Cohort
from safn_core.errors import DataError
from safn_core.federation.aggregate import global_preprocessing, round_metrics, weighted_mean
from safn_core.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from safn_core.federation.event_text import round_line
from safn_core.federation.sampling import sample_sites, site_seed
from safn_core.federation.site import Site, SmallCell, state_to_numpy
from safn_core.preprocess import Preprocessor
from safn_core.training.local import make_model


class ServerOptimizer:
    """The server update of FedAvg / FedProx / FedAdam / FedYogi, as Flower 1.42 computes it.

    The Flower apps use Flower's own strategies; this class lets `run_in_process` apply the same
    update without Flower. ``m_t``/``v_t`` are the adaptive moments, checkpointed under the
    same names as the Flower strategies' attributes.
    """

    def __init__(self, strategy: str, eta: float = 0.01, tau: float = 1e-3,
                 beta_1: float = 0.9, beta_2: float = 0.99):
        self.strategy, self.eta, self.tau = strategy, eta, tau
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.m_t: dict[str, np.ndarray] | None = None
        self.v_t: dict[str, np.ndarray] | None = None

    def step(self, server_round: int, current: dict[str, np.ndarray],
             updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        avg = weighted_mean(updates)
        if self.strategy in ("fedavg", "fedprox"):
            return avg
        delta = {k: avg[k] - current[k] for k in avg}
        if not self.m_t:
            self.m_t = {k: np.zeros_like(v) for k, v in avg.items()}
        self.m_t = {k: self.beta_1 * v + (1 - self.beta_1) * delta[k] for k, v in self.m_t.items()}
        if not self.v_t:
            self.v_t = {k: np.zeros_like(v) for k, v in avg.items()}
        if self.strategy == "fedadam":
            self.v_t = {k: self.beta_2 * v + (1 - self.beta_2) * delta[k] ** 2
                        for k, v in self.v_t.items()}
            eta = (self.eta * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
                   / (1 - np.power(self.beta_1, server_round + 1.0)))
        elif self.strategy == "fedyogi":
            self.v_t = {k: v - (1.0 - self.beta_2) * delta[k] ** 2 * np.sign(v - delta[k] ** 2)
                        for k, v in self.v_t.items()}
            eta = self.eta
        else:
            raise ValueError(f"unknown strategy {self.strategy}")
        return {k: np.asarray(x + eta * self.m_t[k] / (np.sqrt(self.v_t[k]) + self.tau))
                for k, x in current.items()}

    def get_state(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: dict(v) for name in ("m_t", "v_t") if (v := getattr(self, name))}

    def set_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for name, value in state.items():
            setattr(self, name, {k: np.asarray(v) for k, v in value.items()})


def run_in_process(sites: dict[str, Cohort], cfg: SafnConfig, run_dir: Path | None = None,
                   report: Callable[[str], None] = print) -> RunState:
    """Statistics round, then ``federation.rounds`` rounds of train / aggregate / evaluate.

    With ``run_dir``, every round is checkpointed there and an existing checkpoint is resumed.
    """
    fed = cfg.federation
    objs = {name: Site(name, cohort, cfg) for name, cohort in sorted(sites.items())}
    pid = {name: i for i, name in enumerate(sites)}  # partition id = order given (as in safn-sim)
    stats, counts = [], []
    for name, site in list(objs.items()):
        try:
            s, c = site.describe()
        except SmallCell as exc:
            report(f"site {site.name} withheld its statistics: {exc}")
            del objs[name]  # as in the ServerApp: it takes no part in the run
            continue
        stats.append(s)
        counts.append(c)
    if len(stats) < fed.min_sites:
        raise DataError(f"only {len(stats)} sites could describe their training data, fewer "
                        f"than federation.min_sites = {fed.min_sites}")
    modalities = next(iter(sites.values())).modalities
    state = load_checkpoint(run_dir) if run_dir is not None else None
    if state is None:
        pre, class_counts = global_preprocessing(modalities, stats, counts)
        model = make_model(modalities, cfg.model, cfg.train.seed)
        floor = _floor(objs, pre, class_counts) if cfg.model.wide != "off" else None
        if floor is not None:
            model.set_wide(floor.coef, floor.intercept)
        state = RunState(0, state_to_numpy(model), pre.state_dict(), class_counts)
        if floor is not None:  # round 0: the floor evaluated before any training
            evaluated = sample_sites(list(objs), fed.fraction_evaluate, fed.min_sites,
                                     cfg.train.seed + 1, 0)
            hists = {name: objs[name].evaluate(state.weights, pre, cfg.model,
                                               fed.histogram_bins) for name in evaluated}
            state.history.append({"round": 0, **round_metrics(hists)})
            report(round_line(state.history[0], fed.rounds))
    pre = Preprocessor.from_state(state.preprocessing)
    opt = ServerOptimizer(fed.strategy, fed.server_lr, fed.tau, fed.beta_1, fed.beta_2)
    opt.set_state(state.strategy_state)
    weights = state.weights
    mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
    for r in range(state.round + 1, fed.rounds + 1):
        t0 = time.perf_counter()
        chosen = sample_sites(list(objs), fed.fraction_train, fed.min_sites, cfg.train.seed, r)
        updates, losses = [], []
        for name in chosen:
            w, n, loss = objs[name].train(weights, pre, state.class_counts, model_cfg=cfg.model,
                                          epochs=fed.local_epochs, proximal_mu=mu,
                                          seed=site_seed(cfg.train.seed, r, pid[name]))
            updates.append((w, n))
            losses.append((loss, n))
        weights = opt.step(r, weights, updates)
        evaluated = sample_sites(list(objs), fed.fraction_evaluate, fed.min_sites,
                                 cfg.train.seed + 1, r)
        hists = {name: objs[name].evaluate(weights, pre, cfg.model, fed.histogram_bins)
                 for name in evaluated}
        entry = {"round": r, "train_loss": float(np.average([lo for lo, _ in losses],
                                                            weights=[n for _, n in losses])),
                 **round_metrics(hists), "seconds": time.perf_counter() - t0}
        state = RunState(r, weights, state.preprocessing, state.class_counts, opt.get_state(),
                         state.history + [entry], {str(pid[k]): k for k in objs})
        if run_dir is not None:
            save_checkpoint(run_dir, state)
        report(round_line(entry, fed.rounds))
    return state


def _floor(sites: dict[str, Site], pre: Preprocessor, class_counts):
    """The logistic regression floor from the sites' plain sums (the coordinator's
    `safn.server.logistic_floor` without Flower): None when a site refuses."""
    from safn_core.federation.site_logistic import logistic_values, refusal
    from safn_core.logistic import PENALTIES, add_sums, class_weights, solve

    if any(refusal(site, secure=False) for site in sites.values()):
        return None
    weights = class_weights(class_counts)
    return solve(lambda betas: add_sums(logistic_values(site, pre, betas, weights, False)
                                        for site in sites.values()),
                 len(pre.features), weights, PENALTIES)
