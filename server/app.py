"""The SAFN ServerApp: the coordinator's side of a run, thin over `safn_core.federation`.

A run: wait (bounded) for ``min_sites`` sites, a statistics round (`server.statistics_round`;
the sites' training-split sums build one global preprocessing and the loss's class counts), then
the strategy's rounds; after each round, pooled metrics from the sites' summed score histograms,
the model selection (`federation.select`: the round with the best pooled validation loss or
ROC-AUC, or the last; early stopping after `federation.patience` rounds without improvement)
and a checkpoint that keeps the selected round's weights. With ``federation.secure_aggregation``
(the default) every sum is a secure sum (`server.secure_aggregation`): the coordinator never
sees one site's values. A run folder that already holds checkpoints is resumed from its last
complete round. At the end the model bundle (same format as safn-train) of the
selected round, with that round's threshold and metrics, is written to ``<run folder>/model``.

The run folder comes from the run config key ``run-dir`` (deployment: ``flwr run --run-config``)
or the ``SAFN_RUN_DIR`` environment variable (``run_simulation``, whose run config is empty); it
holds the resolved ``config.yaml``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from safn_core.config import SafnConfig
from safn_core.federation.aggregate import (global_preprocessing, held_out_metrics, round_line,
                                            round_metrics, secure_round_metrics, selected_entry)
from safn_core.federation.secure_records import evaluate_packing, train_packing
from safn_core.secagg import SecureAggregationRefused, SecureSumFailed
from safn_core.federation.checkpoint import (RunState, checkpoint_note, checkpointed_round,
                                             load_checkpoint, save_checkpoint)
from safn_core.federation.privacy_report import central_entry, privacy_entry, privacy_summary
from safn_core.federation.protocol import (MODEL, Config, Describe, Layout, Metric, RunEnd,
                                           evaluation_from_metrics, is_withheld,
                                           modalities_from_record)
from safn_core.federation.provenance import evaluation_basis
from safn_core.federation.run_folder import (expected_sites, load_run_config, run_dir_from,
                                            run_identity, write_data_sources)
from safn_core.federation.shared_config import shared_config_text
from safn_core.federation.site import state_to_numpy
from safn_core.io import write_json
from safn_core.metrics import METRICS
from safn_core.preprocess import Preprocessor
from safn_core.training.local import make_model
from safn_core.training.selection import RoundSelection
from server.site_waits import SitesMissing
from server.statistics_round import (Described, secure_statistics_round, statistics_round,
                                     wait_for_sites)
from server.central_dp import sites_per_round, with_central_dp
from server.run_end import tell_sites_run_ended
from server.strategies import make_strategy



class Coordinator:
    """One federated run on a Grid, with checkpoints after every round."""

    def __init__(self, grid: Grid, cfg: SafnConfig, run_dir: Path, report=print,
                 simulation: bool = False):
        self.grid, self.cfg, self.run_dir, self.report = grid, cfg, Path(run_dir), report
        self.fed = cfg.federation
        # a simulation seeds central DP's noise from the run's seed (reproducible); a
        # deployment never does (the seed is public: the noise could be regenerated)
        self.simulation = simulation
        self.shared_text = shared_config_text(cfg)  # what every message tells the sites

    # -- phases ------------------------------------------------------------------------------

    def run(self) -> RunState:
        fed = self.fed
        random.seed(self.cfg.train.seed)  # anything left to Flower's random.sample is seeded
        t0 = time.perf_counter()
        # a simulation waits for every virtual site (they register one by one), a deployment
        # for every listed site, or min_sites once federation.wait_for_sites has passed
        expected = max(fed.min_sites, len(expected_sites(self.run_dir) or self.cfg.server.sites))
        nodes = wait_for_sites(self.grid, expected, fed.min_sites, fed.wait_for_sites,
                               self.report)
        t_connected = time.perf_counter()
        if fed.secure_aggregation:
            desc = self._secure_statistics_round(nodes)
        else:
            desc = statistics_round(self.grid, nodes, fed.round_timeout, self.shared_text,
                                    fed.min_sites, tuple(self.cfg.server.held_out_sites),
                                    run_id=run_identity(self.run_dir))
        self.held_out = {desc.names[n] for n in desc.held_out}
        desc = self._harmonise(nodes, desc)
        if self.held_out:
            self.report("held-out sites (evaluation only): " + ", ".join(sorted(self.held_out)))
        # the first figure includes the wait for the sites to connect, the second says how long
        self.timing = {"statistics_round_s": time.perf_counter() - t0,
                       "waiting_for_sites_s": t_connected - t0}
        self._t_last = time.perf_counter()
        for name, why in desc.refused.items():
            self.report(f"site {name} withheld its statistics: {why}")
        self.desc = desc
        write_data_sources(self.run_dir, desc.sources)  # for the run report (run_report.py)
        for name, g in sorted(desc.gaussian.items()):
            self.report(f"site {name} sent noised statistics (Gaussian mechanism, σ "
                        f"{g[Metric.NOISE_MULTIPLIER]:.3g}; its ε spent so far "
                        f"{g[Metric.EPSILON]:.3g} at δ {g[Metric.DELTA]:.2g})")
        self.modalities = modalities_from_record(desc.structure)
        self.label_names = tuple(desc.structure[Describe.LABEL_NAMES])
        self.state = self._initial_state(desc)
        self.state.sites = {str(k): v for k, v in desc.names.items()}
        self.selection = self._selection()
        if self.selection.should_stop:
            self.report(f"early stopping had ended this run after round {self.state.round}: "
                        f"the model is round {self.selection.selected_round}")
        elif self.state.round < fed.rounds:
            try:
                self._train(desc)
            except StopEarly as stop:
                self.report(str(stop))
        self._finish()
        self._personalise()
        return self.state

    def _personalise(self) -> None:
        """A personalised run's last step: each training site's personal model against the
        selected global one on its test split (`server.personalisation`); done once per run."""
        from server.personalisation import lines, personalisation_done, personalise_sites

        if not self.cfg.personalisation.enabled or personalisation_done(self.run_dir):
            return
        last = selected_entry(self.state.history)
        record = personalise_sites(self, sorted(self.desc.eligible),
                                   self.state.selected_weights(), last.get("threshold", 0.5))
        for line in lines(record):
            self.report(line)

    def _harmonise(self, nodes: list[int], desc: Described) -> Described:
        """Federated ComBat (`server.harmonisation`), then the statistics round again on the
        harmonised training splits: the preprocessing is fitted on harmonised data. Every later
        message carries the fit (``self.extra``)."""
        self.extra, self.harmonisation = {}, None
        if not self.cfg.harmonisation.enabled:
            return desc
        import json

        from server.harmonisation import fit_harmonisation

        self.harmonisation = fit_harmonisation(self, desc)
        self.extra = {Config.HARMONISATION_FIT: json.dumps(self.harmonisation.to_dict())}
        fed = self.fed
        if fed.secure_aggregation:
            self.secure.base_config.update(self.extra)
            saved = load_checkpoint(self.run_dir)
            return secure_statistics_round(self.secure, nodes, self.cfg, self.shared_text,
                                           (saved.round if saved is not None else 0) + 1,
                                           self.report, context_round=1, extra=self.extra)
        return statistics_round(self.grid, nodes, fed.round_timeout, self.shared_text,
                                fed.min_sites, tuple(self.cfg.server.held_out_sites),
                                run_id=run_identity(self.run_dir), extra=self.extra)

    def _secure_statistics_round(self, nodes: list[int]) -> Described:
        from server.secure_aggregation import SecureAggregation

        fed = self.fed
        self.secure = SecureAggregation(
            self.grid, run_identity(self.run_dir), fed.round_timeout,
            {Config.SAFN_CONFIG: self.shared_text,
             Config.HELD_OUT_SITES: list(self.cfg.server.held_out_sites),
             Config.RUN_ID: run_identity(self.run_dir)}, fed.min_sites,
            fed.secagg.max_attempts, self.report)
        saved = load_checkpoint(self.run_dir)
        return secure_statistics_round(self.secure, nodes, self.cfg, self.shared_text,
                                       (saved.round if saved is not None else 0) + 1,
                                       self.report)

    def _initial_state(self, desc: Described) -> RunState:
        pre, class_counts = global_preprocessing(self.modalities, desc.stats, desc.counts)
        state = load_checkpoint(self.run_dir)
        if state is None:
            model = make_model(self.modalities, self.cfg.model, self.cfg.train.seed)
            self.report(f"statistics round: {sum(class_counts)} training participants "
                        f"at {len(desc.eligible)} sites; class counts {class_counts}")
            return RunState(0, state_to_numpy(model), pre.state_dict(), class_counts)
        self.report(f"resuming after round {state.round} of {self.fed.rounds}")
        saved = np.asarray(state.preprocessing["mean"])
        if saved.shape != pre.mean_.shape or not np.allclose(pre.mean_, saved):
            self.report("note: the sites' data changed since the checkpoint; the run keeps the "
                        "checkpoint's preprocessing")
        return state

    def _selection(self) -> RoundSelection:
        """The run's model selection: from the checkpoint when resuming (the same decisions as
        an uninterrupted run), else new from ``federation.select`` / ``patience``."""
        fed = self.fed
        if not self.state.selection:
            return RoundSelection(fed.select, fed.patience)
        saved = RoundSelection.from_state(self.state.selection)
        if (saved.select, saved.patience) != (fed.select, fed.patience):
            self.report(f"note: the checkpoint selects by {saved.select} (patience "
                        f"{saved.patience}); the resumed run keeps that rule, not the "
                        f"configuration's {fed.select} (patience {fed.patience})")
        return saved

    def _train(self, desc: Described) -> None:
        fed = self.fed
        pre = Preprocessor.from_state(self.state.preprocessing)
        strategy = make_strategy(fed, self.cfg.train.seed)
        strategy.round_offset = self.state.round
        strategy.site_names = dict(desc.names)
        strategy.report = self.report  # rejoin waits are progress lines
        strategy.eligible = set(desc.eligible)
        strategy.evaluators = set(desc.eligible) | set(desc.held_out)
        strategy.set_state(self.state.strategy_state)
        self.strategy = strategy
        if self.fed.secure_aggregation:
            strategy.secure = self.secure
            parties = len(desc.eligible)
            strategy.packings = {
                "train": train_packing(Layout.of(self.state.weights).size, fed, parties),
                "evaluate": evaluate_packing(fed.histogram_bins, fed, parties)}
            if fed.central_dp.enabled:  # clipped at the sites, noised here (strategies.py)
                strategy.central_dp = fed.central_dp
                strategy.central_sites_per_round = sites_per_round(
                    parties, fed.fraction_train, fed.min_sites)
                strategy.noise_seed = self.cfg.train.seed if self.simulation else None
        # central DP wraps the strategy (Flower's server-side clipping + noise); the wrapper
        # reads and records through `strategy`, which the history below keeps using
        # (under secure aggregation the sites clip and the strategy adds the noise itself)
        runner = strategy if fed.secure_aggregation else with_central_dp(strategy, fed,
                                                                          len(desc.eligible))
        if runner is not strategy and self.simulation:
            runner.noise_seed = self.cfg.train.seed
        config = ConfigRecord({
            Config.PRE_MEAN: pre.mean_.tolist(), Config.PRE_SCALE: pre.scale_.tolist(),
            Config.CLASS_COUNTS: [int(c) for c in self.state.class_counts],
            Config.LOCAL_EPOCHS: fed.local_epochs, Config.SEED: self.cfg.train.seed,
            Config.HISTOGRAM_BINS: fed.histogram_bins, Config.SAFN_CONFIG: self.shared_text,
            Config.HELD_OUT_SITES: sorted(self.held_out),
            # stable across a resume (unlike Flower's run id): DP sites key their plan on it
            Config.RUN_ID: run_identity(self.run_dir),
            **self.extra,  # the harmonisation fit, if any: the sites harmonise with it
        })
        self.layout = Layout.of(self.state.weights)  # the model travels as one vector
        config[Config.MODEL_LAYOUT] = self.layout.fingerprint()
        arrays = ArrayRecord({MODEL: Array(self.layout.flatten(self.state.weights))})
        runner.start(grid=self.grid, initial_arrays=arrays,
                     num_rounds=fed.rounds - self.state.round, timeout=fed.round_timeout,
                     train_config=config, evaluate_config=ConfigRecord(dict(config)),
                     evaluate_fn=self._end_of_round)

    def _end_of_round(self, server_round: int, arrays: ArrayRecord):
        """After each round: pooled/per-site metrics from histograms, then a checkpoint."""
        if server_round == 0:
            return None
        s = self.strategy
        r = s.round_offset + server_round
        entry: dict = {"round": r}
        if s.secure is not None and s.last_secure_train is not None:
            if "train_loss" in s.last_secure_train:
                entry["train_loss"] = s.last_secure_train["train_loss"]
            entry["sites_trained"] = sorted(s.last_train)
        elif s.last_train:
            # a DP site withholds its training loss (−1): outside its ε
            losses = [(float(m[Metric.NUM_EXAMPLES]), float(m[Metric.TRAIN_LOSS]))
                      for m in s.last_train.values() if not is_withheld(m[Metric.TRAIN_LOSS])]
            if losses:
                entry["train_loss"] = float(np.average([lo for _, lo in losses],
                                                       weights=[n for n, _ in losses]))
            entry["sites_trained"] = sorted(s.last_train)
        privacy = privacy_entry(s.last_privacy)
        if privacy:
            entry["privacy"] = privacy  # ε per site (spent so far), never averaged
        refused = sorted(({"site": x["site"], "reason": x["reason"]} for x in s.refusals
                          if x["round"] == r), key=lambda x: x["site"])
        if refused:
            entry["refused"] = refused
        if r in s.central:
            entry["central_dp"] = central_entry(s.central[r], self.state.history,
                                                self.fed.central_dp.delta)
        hists = {name: evaluation_from_metrics(m) for name, m in s.last_evaluate.items()}
        external = {k: hists.pop(k) for k in list(hists) if k in self.held_out}
        if s.secure is not None and s.last_secure_evaluate is not None:
            entry.update(secure_round_metrics(s.last_secure_evaluate, s.last_site_metrics,
                                              self.cfg.data.min_cell,
                                              s.last_secure_evaluate_sites))
        elif hists:
            entry.update(round_metrics(hists))
        if external:  # external validation at the pooled threshold of the training sites
            entry["held_out"] = held_out_metrics(external, entry.get("threshold", 0.5))
        entry["rejected"] = [x for x in s.rejected if x["round"] == r]
        if s.secure is not None:
            entry["secure_sum"] = {
                "sites_trained": (s.last_secure_train or {}).get("sites"),
                "sites_evaluated": int((s.last_secure_evaluate or {}).get("sites", 0)),
                "retries": [x for x in s.secure.retries if x["round"] == r]}
        now = time.perf_counter()
        entry["seconds"], self._t_last = now - self._t_last, now
        weights = self.layout.unflatten(arrays[MODEL].numpy())
        best = (None if self.selection.update(r, entry.get("val_loss"), entry.get("val_roc_auc"))
                else self.state.selected_weights())
        entry["selected_round"] = self.selection.selected_round
        self.state = RunState(r, weights, self.state.preprocessing, self.state.class_counts,
                              s.get_state(), self.state.history + [entry], self.state.sites,
                              self.selection.state_dict(), best)
        save_checkpoint(self.run_dir, self.state)
        write_json(self.run_dir / "history.json", self.state.history)
        self.report(round_line(entry, self.fed.rounds))
        if self.selection.should_stop and r < self.fed.rounds:
            raise StopEarly(
                f"early stopping after round {r}: {self.selection.patience} rounds without "
                f"improvement of the pooled {self.selection.select.replace('_', ' ')}; the "
                f"model is round {self.selection.selected_round}")
        return None

    def _finish(self) -> None:
        """The model bundle (weights + preprocessing + config + metrics) and per-round tables."""
        write_json(self.run_dir / "history.json", self.state.history)
        write_json(self.run_dir / "timing.json", self.timing)
        rounds_table(self.state.history).to_csv(self.run_dir / "rounds.csv", index=False)
        if (self.run_dir / "model").exists():
            return
        if not any(e.get("sites_trained") for e in self.state.history):
            raise NoSiteTrained(no_site_trained_reason(self.state.history, self.desc.refused,
                                                       self.fed.rounds))
        from safn_core.bundle import save_bundle

        pre = Preprocessor.from_state(self.state.preprocessing)
        model = make_model(pre.modalities, self.cfg.model, 0)
        model.load_state_dict({k: torch.as_tensor(v)
                               for k, v in self.state.selected_weights().items()})
        last = selected_entry(self.state.history)  # the selected round: threshold, metrics
        pooled = last.get("pooled") or {}
        record = None
        if self.harmonisation is not None:  # every site harmonised its data with this fit
            from safn_core.harmonisation.record import HarmonisationRecord
            from server.harmonisation import fitted_on

            record = HarmonisationRecord.from_config(self.harmonisation, self.cfg.harmonisation,
                                                     fitted_on(self.run_dir))
        save_bundle(self.run_dir / "model", model, pre, self.cfg, harmonisation=record,
                    threshold=last.get("threshold", 0.5), class_counts=self.state.class_counts,
                    label_names=self.label_names, kind="federated",
                    metrics={"federated_pooled_test": {k: {"mean": v, "sd": None}
                                                       for k, v in pooled.items()},
                             **{f"held_out_{name}": {k: {"value": m[k], "ci": m["ci"][k]}
                                                     for k in METRICS}
                                for name, m in (last.get("held_out") or {}).items() if m}},
                    extra={"privacy": privacy_summary(self.state.history,
                                                      self.desc.gaussian),
                           "run_id": run_identity(self.run_dir),
                           # Flower's run ids of this run: one per submission (safn-server
                           # --resume submits a new Flower run); none in a simulation
                           "flower_run_ids": flower_run_ids(self.run_dir),
                           "training": {
                        "participants": int(sum(self.state.class_counts)),
                        "sites": sorted(set(self.state.sites.values()) - self.held_out),
                        "held_out_sites": sorted(self.held_out), "rounds": self.state.round,
                        # what the sites said their data is, not this coordinator's data.source
                        "data_sources": dict(sorted(self.desc.sources.items())),
                        # participants and sites behind the metrics (no count below min_cell)
                        "test_evaluation": evaluation_basis(
                            last, sorted(set(self.state.sites.values()) - self.held_out),
                            self.cfg.data.min_cell),
                        "selected_round": last.get("round"),
                        "selection": {"rule": self.selection.select,
                                      "patience": self.selection.patience,
                                      "stopped_early": self.selection.should_stop
                                      and self.state.round < self.fed.rounds},
                        "strategy": self.fed.strategy, "local_epochs": self.fed.local_epochs,
                        "evaluated_on": f"{last.get('n_test', 0)} test participants at "
                                        f"{last.get('sites_reported', 0)} sites (score "
                                        "histograms; sites below min_cell withheld)"}})


class StopEarly(Exception):
    """Raised after a round's checkpoint when the model selection stops the run early: it ends
    Flower's `Strategy.start` loop (which has no other way out) and the run goes on to its
    bundle. Not an error."""


class NoSiteTrained(SitesMissing):
    """No site trained in any round (each refused, failed or was rejected): there is no model,
    and the run ends as failed instead of writing an untrained bundle."""


def no_site_trained_reason(history: list[dict], withheld: dict[str, str], rounds: int) -> str:
    """One line: no site trained, and each site's last reason (refusal, rejected update,
    withheld statistics)."""
    why: dict[str, str] = {f"site {k}": f"withheld its statistics: {v}"
                           for k, v in withheld.items()}
    for e in history:
        for x in e.get("rejected", []):
            if x.get("site") not in (None, "-"):
                why[f"site {x['site']}"] = f"update rejected: {x['reason']}"
        for x in e.get("refused", []):
            why[f"site {x['site']}"] = f"refused: {x['reason']}"
    return (f"no site trained in any of the {rounds} rounds, so there is no model (no bundle "
            "written)" + "".join(f"; {k} {v}" for k, v in sorted(why.items())))


def flower_run_ids(run_dir: Path) -> list[str]:
    """The Flower runs safn-server submitted for this run folder (``flower_runs.json``)."""
    import json

    try:
        runs = json.loads((Path(run_dir) / "flower_runs.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []
    return [str(r["run_id"]) for r in runs]


def rounds_table(history: list[dict]) -> pd.DataFrame:
    """One row per round and site ('pooled' included): the metric history as a table."""
    rows = []
    for e in history:
        base = {"round": e["round"], "train_loss": e.get("train_loss"),
                "threshold": e.get("threshold")}
        if e.get("pooled"):
            rows.append({**base, "site": "pooled", "n_test": e.get("n_test"), **e["pooled"]})
        privacy = e.get("privacy") or {}
        for site, m in (e.get("sites") or {}).items():
            eps = (privacy.get(site) or {}).get("epsilon")
            rows.append({**base, "site": site, **(m or {"withheld": True}),
                         **({"epsilon": eps} if privacy else {})})
    return pd.DataFrame(rows)


def make_server_app(deployed: bool) -> ServerApp:
    """The ServerApp of a deployment (``flwr run`` on a SuperLink: the run folder comes in the run
    config's ``run-dir``) or of a simulation (``run_simulation``: ``SAFN_RUN_DIR``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_coordinator(grid, context, deployed)

    return server_app


def run_coordinator(grid: Grid, context: Context, deployed: bool) -> None:
    torch.set_num_threads(1)
    run_dir = run_dir_from(dict(context.run_config))
    cfg = load_run_config(run_dir)
    progress = run_dir / "progress.log"
    if deployed:
        from safn_flower import patches

        patches.apply({"serverapp_grid_polling": {"interval": cfg.server.poll_interval},
                       "serverapp_reply_upload_wait": {}, "object_pull_backoff": {}})

    def report(line: str) -> None:
        with progress.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    coordinator = Coordinator(grid, cfg, run_dir, report, simulation=not deployed)
    try:
        state = coordinator.run()
    except (SitesMissing, SecureAggregationRefused, SecureSumFailed) as exc:
        last = checkpointed_round(run_dir) or 0
        report(f"run stopped: {exc}; {checkpoint_note(run_dir)}")
        write_json(run_dir / "federation_status.json",
                   {"status": "failed", "reason": str(exc), "round": last,
                    "kind": type(exc).__name__})
        end = (RunEnd.STOPPED, str(exc), last)
    else:
        write_json(run_dir / "federation_status.json",
                   {"status": "completed", "round": state.round})
        end = (RunEnd.COMPLETED, "", state.round)
    if deployed:  # a simulation has no site processes waiting to be told
        tell_sites_run_ended(grid, coordinator.shared_text, run_identity(run_dir), *end,
                             timeout=min(30.0, cfg.federation.round_timeout), report=report)


app = make_server_app(deployed=True)  # the app bundle's component (`safn_flower/flwr_app`)
simulation_app = make_server_app(deployed=False)  # safn-sim's (`simulations.engine`)
