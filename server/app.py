"""The SAFN ServerApp: the coordinator's side of a run, in simulation and deployment alike.

A run (`Coordinator.run`): the statistics phase (`safn.server.run_setup.prepare_run`: sites,
statistics round, harmonisation) gives a frozen `RunSetup`; the book of rounds
(`safn.server.round_book.RoundBook`) starts a new model or resumes the run folder's checkpoint; the
SAFN strategy (`safn.server.strategy.SafnStrategy`, around Flower's own) runs the remaining rounds and
reports each to the book, which makes its history entry, selects the model, checkpoints and
says when to stop early; then the selected round's model bundle
(`safn_core.federation.federated_bundle`) and, for a personalised run, each site's personal
model against the global one. What the run tells its watchers is events
(`safn_core.federation.events`: ``events.jsonl``, echoed in English to ``progress.log`` and the
console).

The run folder comes from the run config key ``run-dir`` (deployment: ``flwr run --run-config``,
`app`) or the ``SAFN_RUN_DIR`` environment variable (``run_simulation``, whose run config is
empty: `simulation_app`); it holds the resolved ``config.yaml``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from safn_core.config import SafnConfig
from safn_core.federation.aggregate import global_preprocessing
from safn_core.federation.checkpoint import RunState, checkpointed_round
from safn_core.federation.event_text import shown
from safn_core.federation.events import EVENTS_FILE, Event, EventLog
from safn_core.federation.federated_bundle import (FederatedRun, NoSiteTrained, floor_summary,
                                                   rounds_table, save_federated_bundle)
from safn_core.federation.protocol import MODEL, Config, RunEnd
from safn_core.federation.run_folder import load_run_config, run_dir_from, write_data_sources
from safn_core.federation.sampling import sites_per_round
from safn_core.federation.secure_records import evaluate_packing, share_packing, train_packing
from safn_core.io import write_json
from safn_core.preprocess import Preprocessor
from safn_core.secagg import SecureAggregationRefused, SecureSumFailed
from safn.server.central_dp import CentralDP
from safn.server.distributed_dp import DistributedDP, DistributedDPStopped, plan_distributed
from safn.server.logistic_floor import fit_floor, floor_record, floor_wanted
from safn.server.round_book import RoundBook
from safn.server.run_context import RunContext
from safn.server.run_end import tell_sites_run_ended
from safn.server.run_setup import RunSetup, prepare_run
from safn.server.secure_strategy import SecureSum
from safn.server.site_targets import TargetMismatch
from safn.server.site_waits import SitesMissing
from safn.server.strategies import (distributed_optimizer, flower_strategy, optimizer_state,
                                    restore_optimizer_state)
from safn.server.strategy import SafnStrategy, StrategyOptions

RUN_STOPPERS = (SitesMissing, TargetMismatch, SecureAggregationRefused, SecureSumFailed,
                NoSiteTrained, DistributedDPStopped)
"""What ends a run as failed (with its checkpoint intact), not as a crash."""


class Coordinator:
    """One federated run on a Grid, with checkpoints after every round."""

    def __init__(self, grid: Grid, cfg: SafnConfig, run_dir: Path, events: EventLog,
                 deployed: bool = False):
        self.run = RunContext.of(grid, cfg, run_dir, events, deployed)

    def run_federation(self) -> RunState:
        run, fed = self.run, self.run.cfg.federation
        random.seed(run.cfg.train.seed)  # anything left to Flower's random.sample is seeded
        setup = prepare_run(run)
        write_data_sources(run.run_dir, setup.described.sources)  # for the run report
        desc = setup.described
        pre, counts = global_preprocessing(setup.modalities, desc.stats, desc.counts)
        floor = fit_floor(run, setup, pre, counts) if floor_wanted(run.cfg) else None
        book = RoundBook.open(run.run_dir, run.cfg, run.events, setup, pre, counts, floor)
        if not book.stopped and book.state.round < fed.rounds:
            # a new run whose model starts at the floor evaluates it first (round 0)
            self._train(setup, book, evaluate_first=floor is not None and not book.state.history)
        self._finish(setup, book)
        self._personalise(setup, book.state)
        return book.state

    def _train(self, setup: RunSetup, book: RoundBook, evaluate_first: bool = False) -> None:
        run, fed, seed = self.run, self.run.cfg.federation, self.run.cfg.train.seed
        state = book.state
        sites, distributed = setup.sites, None
        if run.cfg.privacy.mode == "distributed":  # σ for the run, and who can pay for it
            plan, sites = plan_distributed(run, setup.sites)
            distributed = DistributedDP(plan, book.layout.size, fed.secagg.max_site_examples)
        base = (distributed_optimizer(run.cfg.privacy, fed) if distributed is not None
                else flower_strategy(fed))
        restore_optimizer_state(base, state.strategy_state)
        parties = len(sites.eligible)
        m = sites_per_round(parties, fed.fraction_train, fed.min_sites)
        # a simulation seeds central DP's noise from the run's seed (reproducible); a
        # deployment never does (the seed is public: the noise could be regenerated)
        central = (CentralDP(fed.central_dp, m, None if run.deployed else seed)
                   if fed.central_dp.enabled else None)
        secure = None
        if setup.secure is not None:
            secure = SecureSum(setup.secure, {
                "train": (share_packing(book.layout.size, parties) if distributed is not None
                          else train_packing(book.layout.size, fed, parties)),
                "evaluate": evaluate_packing(fed.histogram_bins, fed, parties,
                                             setup.target.n_classes)})
        # without secure aggregation the coordinator clips (Flower's DP wrapper); under it the
        # sites clip and the strategy noises the securely summed mean
        inner = central.wrap(base) if central is not None and secure is None else base
        strategy = SafnStrategy(inner, StrategyOptions.from_config(fed, seed), sites,
                                secure=secure, central_dp=central, distributed=distributed,
                                events=run.events)
        pre = Preprocessor.from_state(state.preprocessing)
        config = ConfigRecord({
            Config.PRE_MEAN: pre.mean_.tolist(), Config.PRE_SCALE: pre.scale_.tolist(),
            Config.CLASS_COUNTS: [int(c) for c in state.class_counts],
            Config.LOCAL_EPOCHS: fed.local_epochs, Config.SEED: seed,
            Config.HISTOGRAM_BINS: fed.histogram_bins, Config.SAFN_CONFIG: run.shared_text,
            Config.HELD_OUT_SITES: sorted(setup.held_out),
            # stable across a resume (unlike Flower's run id): DP sites key their plan on it
            Config.RUN_ID: run.run_id,
            Config.MODEL_LAYOUT: book.layout.fingerprint(),
            **setup.extra,  # the harmonisation fit, if any: the sites harmonise with it
        })
        strategy.start(
            grid=run.grid, initial_arrays=ArrayRecord({MODEL: Array(
                book.layout.flatten(state.weights))}),
            num_rounds=fed.rounds, timeout=fed.round_timeout, train_config=config,
            evaluate_config=ConfigRecord(dict(config)), first_round=state.round + 1,
            on_round=lambda record, arrays: book.close_round(
                record, arrays[MODEL].numpy(), optimizer_state(base)),
            evaluate_first=evaluate_first)

    def _finish(self, setup: RunSetup, book: RoundBook) -> None:
        """Per-round tables, then the model bundle of the selected round."""
        run, state = self.run, book.state
        write_json(run.run_dir / "history.json", state.history)
        write_json(run.run_dir / "timing.json", dict(setup.timing))
        rounds_table(state.history).to_csv(run.run_dir / "rounds.csv", index=False)
        if (run.run_dir / "model").exists():
            return
        harmonisation = None
        if setup.harmonisation is not None:  # every site harmonised its data with this fit
            from safn_core.harmonisation.record import HarmonisationRecord
            from safn.server.harmonisation import fitted_on

            harmonisation = HarmonisationRecord.from_config(
                setup.harmonisation, run.cfg.harmonisation, fitted_on(run.run_dir))
        desc, selection = setup.described, book.selection
        save_federated_bundle(run.run_dir, run.cfg, state, FederatedRun(
            label_names=setup.label_names, target=setup.target, held_out=setup.held_out,
            sources=desc.sources,
            gaussian=desc.gaussian, withheld=desc.refused, selection_rule=selection.select,
            patience=selection.patience,
            stopped_early=selection.should_stop and state.round < run.cfg.federation.rounds,
            logistic_floor=floor_summary(floor_record(run.run_dir), state.history)),
            harmonisation=harmonisation)

    def _personalise(self, setup: RunSetup, state: RunState) -> None:
        """A personalised run's last step: each training site's personal model against the
        selected global one on its test split (`safn.server.personalisation`); once per run."""
        from safn_core.federation.aggregate import selected_entry
        from safn.server.personalisation import personalisation_done, personalise_sites

        if not self.run.cfg.personalisation.enabled or personalisation_done(self.run.run_dir):
            return
        record = personalise_sites(self.run, setup, state, state.selected_weights(),
                                   selected_entry(state.history).get("threshold", 0.5))
        self.run.events.emit(Event.PERSONALISATION, record=record)


def make_server_app(deployed: bool) -> ServerApp:
    """The ServerApp of a deployment (``flwr run`` on a SuperLink: the run folder comes in the run
    config's ``run-dir``) or of a simulation (``run_simulation``: ``SAFN_RUN_DIR``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_coordinator(grid, context, deployed)

    return server_app


def run_coordinator(grid: Grid, context: Context, deployed: bool) -> None:
    """One run, its outcome in ``federation_status.json`` and events, and (deployed) the sites
    told that it ended."""
    torch.set_num_threads(1)
    run_dir = run_dir_from(dict(context.run_config))
    cfg = load_run_config(run_dir)
    if deployed:  # the Grid a SuperLink's ServerApp gets, with safn's polling and pulls
        from safn_flower.patches import serverapp as serverapp_patches

        grid = serverapp_patches.prepare(grid, cfg.server.poll_interval)
    progress = run_dir / "progress.log"

    def echo(text: str) -> None:
        with progress.open("a") as fh:
            fh.write(text + "\n")
        print(text, flush=True)

    events = EventLog(run_dir / EVENTS_FILE, shown(echo))
    coordinator = Coordinator(grid, cfg, run_dir, events, deployed=deployed)
    try:
        state = coordinator.run_federation()
    except RUN_STOPPERS as exc:
        last = checkpointed_round(run_dir)
        write_json(run_dir / "federation_status.json",
                   {"status": "failed", "reason": str(exc),
                    "round": last or 0, "kind": type(exc).__name__})
        events.emit(Event.RUN_END, status="failed", code=type(exc).__name__, detail=str(exc),
                    round=last or 0, checkpoint_round=last,
                    checkpoints=str(run_dir / "checkpoints"))
        end = (RunEnd.STOPPED, str(exc), last or 0)
    else:
        write_json(run_dir / "federation_status.json",
                   {"status": "completed", "round": state.round})
        events.emit(Event.RUN_END, status="completed", round=state.round)
        end = (RunEnd.COMPLETED, "", state.round)
    if deployed:  # a simulation has no site processes waiting to be told
        tell_sites_run_ended(grid, coordinator.run.shared_text, coordinator.run.run_id, *end,
                             timeout=min(30.0, cfg.federation.round_timeout), events=events)


app = make_server_app(deployed=True)  # the app bundle's component (`safn_flower/flwr_app`)
simulation_app = make_server_app(deployed=False)  # safn-sim's (`safn.simulations.engine`)
