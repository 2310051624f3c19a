"""``safn-sim``: a federated simulation on Flower's Simulation Engine (Ray backend).

The cohort is sharded into virtual sites (`safn.simulations.partition`, written by
`safn.simulations.virtual_sites`); the same ServerApp and ClientApp that a deployment runs train SAFN
across them (`safn.simulations.engine`). In the same run and on the same per-site splits it also trains
the pooled model and one local-only model per site (`safn.simulations.compare`), and prints one
comparison table on the pooled test set (the union of the sites' test splits).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from safn_core.cli.common import (base_parser, config_from_args, console, entry,
                                  fresh_output_dir, write_json)
from safn_core.config import SafnConfig, dump_config
from safn_core.errors import SafnError
from safn_core.federation.aggregate import selected_entry
from safn_core.report import interval_text
from safn_core.tracking import Tracker
from safn_core.training.selection import RoundSelection
from safn.simulations.compare import N_BOOT, build_sites, compare, flat_intervals
from safn.simulations.engine import run_flower_simulation

SHOWN = ("roc_auc", "pr_auc_pd", "pr_auc_hc", "balanced_accuracy", "sensitivity", "specificity",
         "f1", "mcc", "brier")


def shown_metrics(df: pd.DataFrame) -> tuple[str, ...]:
    """The comparison's columns: the binary metrics, or a K-class target's
    (`compare_kclass.SHOWN`)."""
    if "pr_auc_pd" in df.columns or df.empty:
        return SHOWN
    from safn.simulations.compare_kclass import SHOWN as SHOWN_K

    return SHOWN_K


def print_comparison(df: pd.DataFrame, n_test: int, n_sites: int) -> None:
    shown = shown_metrics(df)
    t = Table(show_lines=True,
              title=f"Evaluated on the pooled test set: the union of the {n_sites} sites' test "
                    f"splits ({n_test} participants). Each model's threshold from its own "
                    "validation data. Under each figure its 95% interval (bootstrap over the "
                    "test participants).")
    t.add_column("model")
    t.add_column("n train", justify="right")
    t.add_column("round", justify="right")  # the selected round (same rule for every model)
    for k in shown:
        t.add_column(k, justify="right")
    for _, r in df.iterrows():
        rnd = r.get("selected_round")
        t.add_row(str(r.model), str(r.n_train), "-" if pd.isna(rnd) else str(int(rnd)),
                  *[interval_text(r[k], r.get(f"{k}_ci"), sep="\n") for k in shown])
    console.print(t)


def print_sites(cohort, cfg: SafnConfig, summ: pd.DataFrame) -> None:
    t = Table(title=f"virtual sites ({cfg.simulation.partition} partition of {len(cohort)} "
                    "participants)")
    for c in summ.columns:
        t.add_column(str(c), justify="left" if c == "site" else "right")
    for row in summ.itertuples(index=False):
        t.add_row(*map(str, row))
    console.print(t)


def print_privacy(history: list[dict], cfg: SafnConfig) -> None:
    """ε per site per round (DP-SGD sites) and central DP, when the run used DP."""
    from safn_core.federation.privacy_report import CENTRAL_DP, epsilon_wide, privacy_summary

    summary = privacy_summary(history)
    if not summary:
        return
    wide = epsilon_wide(history)
    if not wide.empty:
        mode = ("distributed DP (noise shares under secure aggregation)"
                if cfg.privacy.mode == "distributed" else "DP-SGD at the sites")
        t = Table(title=f"{mode}: ε spent so far per round (every run in each "
                        f"site's ledger; ledgers under {cfg.simulation.site_state_dir})")
        for c in wide.columns:
            t.add_column(str(c), justify="right")
        for row in wide.itertuples(index=False):
            t.add_row(*map(str, row))
        console.print(t)
    central = summary.get("central_dp")
    if central:
        console.print(f"{CENTRAL_DP}: ε {central['epsilon']:.3f} at δ {central['delta']:g} "
                      f"(site-level) after {central['releases']} releases")


def load_federated(run_dir: Path):
    """The finished federation's model, preprocessing and selected round, from its bundle."""
    from safn_core.bundle import load_bundle

    bundle = load_bundle(run_dir / "model")
    training = bundle.meta.get("training") or {}
    return bundle.model, bundle.preprocessor, training.get("selected_round")


def run_loso(cohort, parts, cfg: SafnConfig, run_dir: Path, comparison) -> pd.DataFrame:
    """Leave-one-site-out: one federation per held-out site, then the external table."""
    from safn.simulations.loso import leave_one_site_out, loso_metrics, summarise_loso

    if cfg.federation.secure_aggregation and len(parts) - 1 < 3:
        from safn_core.errors import ConfigError

        raise ConfigError(f"leave-one-site-out with {len(parts)} sites trains each federation "
                          f"on {len(parts) - 1}: federation.secure_aggregation needs at least 3; "
                          "set federation.secure_aggregation=false explicitly, or use more sites")
    loso = leave_one_site_out(cohort, parts, cfg, run_dir, run_flower_simulation,
                              report=console.print)
    cols = (("roc_auc", "balanced_accuracy", "pr_auc_pd", "pr_auc_hc", "sensitivity",
             "specificity") if cohort.n_classes == 2 else loso_metrics(loso))
    t = Table(show_lines=True,
              title="leave-one-site-out: federation trained on the other sites, tested on all "
                    "of the held-out site (bootstrap 95% CI)")
    for c in ("held-out site", "n", *cols):
        t.add_column(c, justify="left" if c == "held-out site" else "right")
    for _, r in loso.iterrows():
        t.add_row(r.held_out, str(r.n), *[interval_text(r[k], r.get(f"{k}_ci"), sep="\n")
                                          for k in cols])
    summ = summarise_loso(loso)
    t.add_section()
    t.add_row("mean ± SD across held-out sites", str(int(loso.n.sum())),
              *[f"{summ[k]['mean']:.3f} ± {summ[k]['sd']:.3f}" for k in cols])
    floor = summarise_loso(loso, "floor_")
    if floor:
        t.add_section()
        for _, r in loso.iterrows():
            t.add_row(f"{r.held_out}: logistic regression floor", str(r.n),
                      *[interval_text(r[f"floor_{k}"], r.get(f"floor_{k}_ci"), sep="\n")
                        for k in cols])
        t.add_row("floor: mean ± SD across held-out sites", str(int(loso.n.sum())),
                  *[f"{floor[k]['mean']:.3f} ± {floor[k]['sd']:.3f}" for k in cols])
    if comparison is not None:
        t.add_section()
        for kind in ("pooled", "federated", "federated-lr", "pooled-lr", "best-local"):
            row = comparison[comparison.kind == kind]
            if not row.empty:
                r = row.iloc[0]
                t.add_row(f"{r.model} (pooled test)", "",
                          *[interval_text(r[k], r.get(f"{k}_ci"), sep="\n") for k in cols])
    console.print(t)
    flat_intervals(loso).to_csv(run_dir / "loso.csv", index=False)
    write_json(run_dir / "loso.json", {"sites": loso.replace({np.nan: None}).to_dict("records"),
                                       "summary": summ, "floor_summary": floor or None})
    return loso


def check_cluster(cfg: SafnConfig) -> None:
    """On a Ray cluster: join it once before anything is written (`ray_cluster.preflight`)."""
    if cfg.simulation.ray_address:
        from safn.simulations.ray_cluster import preflight

        preflight(cfg.simulation.ray_address, cfg.simulation.num_cpus_per_site)


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-sim",
        "Federated simulation: shard a cohort into virtual sites and train SAFN across them on "
        "Flower's Simulation Engine, next to pooled and local-only models.",
        default_config=None, tracking=True)
    parser.add_argument("--resume", metavar="RUN_DIR", type=Path,
                        help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--loso", action="store_true",
                        help="also run leave-one-site-out external validation "
                             "(shortcut for --set simulation.loso=true)")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="run on an existing Ray cluster: 'auto' (the cluster this machine "
                             "is a node of) or the head's host:port (simulation.ray_address; "
                             "also with --resume)")
    args = parser.parse_args(argv)
    if args.ray_address and not args.resume:
        args.overrides.append(f"simulation.ray_address={args.ray_address}")
    if args.loso and not args.resume:
        args.overrides.append("simulation.loso=true")
    from safn_core.federation.run_folder import load_run_config
    from safn.simulations.virtual_sites import SIM_SITE_STATE

    if args.resume:
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise SafnError(f"--resume {run_dir}: not a safn-sim run folder (no config.yaml)")
        if args.config or args.overrides or args.out:
            raise SafnError("--resume continues a run with its own config.yaml; do not combine "
                            "it with --config, --set or --out")
        cfg = load_run_config(run_dir.resolve())
        if args.ray_address:  # where it runs, not what it computes: may change on resume
            cfg = cfg.model_copy(deep=True)
            cfg.simulation.ray_address = args.ray_address
        if args.tracking is not None:  # where it is logged, too
            cfg = cfg.model_copy(deep=True)
            cfg.tracking.enabled, cfg.tracking.uri = True, args.tracking or cfg.tracking.uri
        Tracker.check(cfg.tracking)
        check_cluster(cfg)
    else:
        cfg = config_from_args(args)
        Tracker.check(cfg.tracking)
        check_cluster(cfg)
        run_dir = fresh_output_dir(args.out or Path("runs") / f"sim-{datetime.now():%Y%m%d-%H%M%S}")
        # the virtual sites' ledgers live outside the run folder (a later run finds the spent
        # budget); fixed as an absolute path in config.yaml so resume and LOSO use the same
        ledgers = cfg.simulation.site_state_dir or run_dir.resolve().parent / SIM_SITE_STATE
        cfg.simulation.site_state_dir = Path(ledgers).resolve()
    with Tracker(cfg.tracking, run_dir) as tracker:
        return simulate(cfg, run_dir, bool(args.resume), tracker)


def simulate(cfg: SafnConfig, run_dir: Path, resumed: bool, tracker: Tracker) -> int:
    """The run in ``run_dir`` (new, or ``resumed``), logged by ``tracker``."""
    from safn_core.data.sources import load_cohort
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.run_folder import write_config
    from safn.simulations import tracking
    from safn.simulations.partition import summary
    from safn.simulations.virtual_sites import write_virtual_sites

    t0 = time.perf_counter()
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    if cfg.federation.secure_aggregation and cfg.simulation.loso and len(parts) == 3:
        from safn_core.errors import ConfigError

        raise ConfigError("leave-one-site-out with 3 sites trains each federation on 2: "
                          "federation.secure_aggregation needs at least 3; set "
                          "federation.secure_aggregation=false explicitly, or use more sites")
    if cfg.federation.secure_aggregation and len(parts) < 3:
        from safn_core.errors import ConfigError

        raise ConfigError(f"federation.secure_aggregation needs at least 3 sites; the "
                          f"{cfg.simulation.partition} partition made {len(parts)}: with 2, a "
                          "sum reveals each site's values to the other. Add sites, or set "
                          "federation.secure_aggregation=false explicitly if you accept that "
                          "exposure")
    summ = summary(cohort, parts)
    print_sites(cohort, cfg, summ)
    if not resumed:
        write_config(run_dir, dump_config(cfg))
        write_virtual_sites(run_dir, cohort, parts)
        summ.to_csv(run_dir / "sites.csv", index=False)
    tracking.start(tracker, cfg, run_dir)
    fed = cfg.federation
    work = (f"distributed DP ({cfg.privacy.distributed.optimizer}), {fed.rounds} rounds of one "
            f"noised gradient step" if cfg.privacy.mode == "distributed" else
            f"{fed.strategy}, {fed.rounds} rounds x {fed.local_epochs} local epochs")
    console.print(f"federated training: {work}, {len(parts)} sites (Flower Simulation "
                  f"Engine, Ray backend, {cfg.simulation.num_cpus_per_site:g} CPU per site)")
    flower_s = run_flower_simulation(run_dir, cfg, len(parts))
    state = load_checkpoint(run_dir)
    status_file = run_dir / "federation_status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    if status.get("status") == "failed":  # the ServerApp's reason, e.g. no site ever trained
        raise SafnError(f"{run_dir}: the federation failed: {status.get('reason')}")
    stopped_early = bool(state is not None and state.selection
                         and RoundSelection.from_state(state.selection).should_stop)
    if state is None or (state.round < fed.rounds and not stopped_early) \
            or not (run_dir / "model").is_dir():
        done = 0 if state is None else state.round
        raise SafnError(f"{run_dir}: the federation stopped after round {done} of {fed.rounds}; "
                        f"see {run_dir / 'progress.log'}; resume with safn-sim --resume {run_dir}")
    console.print(f"federated training finished in {flower_s:.1f} s; model bundle: "
                  f"{run_dir / 'model'}")
    print_privacy(state.history, cfg)
    from safn_core.federation.privacy_report import strategy_label

    chosen = selected_entry(state.history)
    results = {"run_dir": str(run_dir), "flower_seconds": flower_s, "rounds": state.round,
               "strategy": strategy_label(cfg), "sites": summ.to_dict("records"),
               "selection": {"rule": fed.select, "patience": fed.patience,
                             "stopped_early": stopped_early},
               "selected_round": chosen.get("round"),
               "federated_selected_round": chosen or None,
               "federated_last_round": state.history[-1] if state.history else None}
    if cfg.personalisation.enabled and (run_dir / "personalisation.json").is_file():
        # what the coordinator learnt (the sites' own full records stay in their state folders)
        results["personalisation"] = json.loads((run_dir / "personalisation.json").read_text())
    if cfg.simulation.compare:
        console.print("training the pooled and local-only models on the same splits ...")
        from safn.server.logistic_floor import load_floor

        df, n_test = compare(cohort, parts, cfg, load_federated(run_dir), load_floor(run_dir))
        print_comparison(df, n_test, len(parts))
        if not (run_dir / "comparison.csv").exists():
            flat_intervals(df).to_csv(run_dir / "comparison.csv", index=False)
        results["comparison"] = {"evaluated_on": f"pooled test set: union of the {len(parts)} "
                                                 f"sites' test splits ({n_test} participants)",
                                 "intervals": {"level": 0.95, "method": "participant_bootstrap",
                                               "resamples": N_BOOT, "seed": cfg.train.seed},
                                 "rows": df.replace({np.nan: None}).to_dict("records")}
    loso = None
    if cfg.simulation.loso and not (run_dir / "loso.csv").exists():
        loso = run_loso(cohort, parts, cfg, run_dir, df if cfg.simulation.compare else None)
        results["loso"] = json.loads((run_dir / "loso.json").read_text())
    from safn.simulations.report import write_sim_report

    write_sim_report(run_dir, cfg, cohort.report.source, summ, state.history,
                     df if cfg.simulation.compare else None, loso)
    note = tracking.finish(tracker, run_dir, df if cfg.simulation.compare else None, loso)
    if note is not None:
        results["tracking"] = note
    results["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "results.json", results)
    console.print(f"run folder: {run_dir} ({results['seconds']:.0f} s); report: "
                  f"{run_dir / 'report.html'}")
    return 0


main = entry(run)
