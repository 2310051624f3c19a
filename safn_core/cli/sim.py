"""``safn-sim``: a federated simulation on Flower's Simulation Engine (Ray backend).

The cohort is sharded into virtual sites; the same ServerApp and ClientApp that a deployment runs
train SAFN across them. In the same run and on the same per-site splits it also trains the pooled
model and one local-only model per site, and prints one comparison table on the pooled test set
(the union of the sites' test splits).

How Flower is launched, and why: `flwr.simulation.run_simulation` with the app objects, in this
process. `flwr run` would start a detached SuperLink that outlives the run, build and ship an app
bundle and poll every few seconds (7-10 s fixed cost per run on this machine); `run_simulation`
runs the ServerApp in a thread next to an in-memory Grid and the ClientApps in Ray actors, with
nothing left running afterwards. Its run config is empty, so the apps find the run folder (and its
resolved ``config.yaml``) through the ``SAFN_RUN_DIR`` environment variable, which Ray's workers
inherit; a deployment passes ``run-dir`` in the run config instead. The app code is the same.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from safn_core.cli.common import (base_parser, config_from_args, console, entry,
                                  fresh_output_dir, write_json)
from safn_core.config import SafnConfig, dump_config
from safn_core.errors import SafnError

SHOWN = ("roc_auc", "pr_auc_pd", "pr_auc_hc", "balanced_accuracy", "sensitivity", "specificity",
         "f1", "mcc", "brier")


def quiet_flower() -> None:
    """Flower and Ray log every message at INFO; the user wants one line per round."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("flwr", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")


def tune_flower_polling(interval: float = 0.01) -> bool:
    """Shorten the two 0.1 s polling loops of Flower 1.42's simulation runtime.

    Why: with a small model a round's ClientApp work takes ~0.1 s, but each message waits up to
    0.1 s for the ServerApp's in-memory Grid to pull replies (``InMemoryGrid.pull_interval``) and
    up to 0.1 s for the dispatcher to hand it to a Ray actor (``vce_api.add_messages_to_queue``):
    ~0.4 s of idle time per round (train + evaluate), more than the work itself. Only the poll
    intervals change; the dispatcher below is Flower's own loop with a shorter wait (longer with
    many nodes, so that polling stays cheap). Applied only to the Flower version it was checked
    on; returns whether it was applied.
    """
    import flwr

    if not flwr.__version__.startswith("1.42."):
        return False
    try:
        import flwr.server.superlink.fleet.vce.vce_api as vce
        import flwr.superlink.grid.inmemory_grid as grid
    except ImportError:  # pragma: no cover - layout changed
        return False
    if grid.InMemoryGrid.__init__.__defaults__ != (0.1,) and not _STOCK:
        return False
    _STOCK.setdefault("pull_interval", grid.InMemoryGrid.__init__.__defaults__)
    _STOCK.setdefault("dispatch", vce.add_messages_to_queue)
    grid.InMemoryGrid.__init__.__defaults__ = (interval,)

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        wait = max(interval, 2e-4 * len(nodes_mapping))
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(wait)

    vce.add_messages_to_queue = add_messages_to_queue
    return True


_STOCK: dict = {}


def restore_flower_polling() -> None:
    """Undo `tune_flower_polling` (benchmarks compare both)."""
    if _STOCK:
        import flwr.server.superlink.fleet.vce.vce_api as vce
        import flwr.superlink.grid.inmemory_grid as grid

        grid.InMemoryGrid.__init__.__defaults__ = _STOCK["pull_interval"]
        vce.add_messages_to_queue = _STOCK["dispatch"]


def backend_config(cfg: SafnConfig) -> dict:
    """Ray backend: one CPU per ClientApp actor, a small object store, no dashboard."""
    s = cfg.simulation
    init_args = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False,
                 "object_store_memory": int(s.ray_object_store_mb) * 1024 * 1024}
    if s.ray_num_cpus:
        init_args["num_cpus"] = int(s.ray_num_cpus)
    if s.ray_address:
        init_args = {"address": s.ray_address, "logging_level": "ERROR",
                     "log_to_driver": False}
    return {"client_resources": {"num_cpus": s.num_cpus_per_site, "num_gpus": 0.0},
            "init_args": init_args}


def run_flower_simulation(run_dir: Path, cfg: SafnConfig, n_sites: int) -> float:
    """Run the ServerApp/ClientApp pair on the Ray backend; returns wall seconds."""
    quiet_flower()
    os.environ["SAFN_RUN_DIR"] = str(Path(run_dir).resolve())
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    quiet_flower()  # again: importing Flower resets its logger to INFO
    if cfg.simulation.fast_polling:
        tune_flower_polling()
    t0 = time.perf_counter()
    backend = backend_config(cfg)
    try:
        start_ray(backend["init_args"])
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                       backend_config=backend, verbose_logging=False)
    finally:
        _stop_ray()
    return time.perf_counter() - t0


def start_ray(init_args: dict) -> None:
    """Start Ray as Flower would, but pass the import path by environment, not runtime_env.

    Why: Flower's backend calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}})``,
    and a runtime_env costs ~1 s more at start-up and ~0.5 s more per actor on this machine;
    Ray's workers inherit the driver's environment anyway. Flower skips its own ``ray.init``
    when Ray is already running, and shuts it down at the end as usual.
    """
    import ray

    if ray.is_initialized() or "address" in init_args:
        return
    paths = [p for p in (*sys.path, os.environ.get("PYTHONPATH", "")) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(**init_args)


def _stop_ray() -> None:
    """Flower shuts Ray down at the end; make sure, even after an error."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass


def build_sites(cohort, cfg: SafnConfig) -> dict[str, np.ndarray]:
    from safn_core.federation.partition import partition

    s = cfg.simulation
    return partition(cohort, s.partition, s.n_sites, alpha=s.dirichlet_alpha,
                     size_alpha=s.size_skew, seed=s.seed)


def compare(cohort, parts: dict, cfg: SafnConfig, federated=None) -> tuple[pd.DataFrame, int]:
    """Pooled, federated and local-only models scored on the pooled test set.

    All use the sites' own train/validation/test splits (the federation's): the pooled model
    trains on the union of the training splits with preprocessing fitted there, each local-only
    model on one site's training split with its own preprocessing; each early-stops and picks
    its threshold on its own validation data (pooled: all sites'; local: its site's; federated:
    all sites', the threshold the federation also picks from pooled validation histograms).
    """
    import torch

    from safn_core.federation.site import Site
    from safn_core.metrics import binary_metrics, choose_threshold
    from safn_core.preprocess import Preprocessor
    from safn_core.training.local import Arrays, fit_with_early_stopping, predict

    torch.set_num_threads(1)
    sites = {name: Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()}
    ids = {part: np.concatenate([getattr(s.split, part) for s in sites.values()])
           for part in ("train", "val", "test")}
    table = cohort.table
    rows = []

    def score(name, kind, model, pre, val_ids, n_train, sites_used):
        val = Arrays.from_table(pre, table.loc[val_ids])
        test = Arrays.from_table(pre, table.loc[ids["test"]])
        p_val, _ = predict(model, val)
        p_test, _ = predict(model, test)
        t = choose_threshold(val.y, p_val)
        rows.append({"model": name, "kind": kind, "n_train": int(n_train), "sites": sites_used,
                     "threshold": t, **binary_metrics(test.y, p_test, t)})

    pooled_pre = Preprocessor(cohort.modalities).fit(table.loc[ids["train"]])
    tr = Arrays.from_table(pooled_pre, table.loc[ids["train"]])
    va = Arrays.from_table(pooled_pre, table.loc[ids["val"]])
    fit = fit_with_early_stopping(tr, va, cohort.modalities, cfg.model, cfg.train, cfg.train.seed)
    score("pooled (all training splits together)", "pooled", fit.model, pooled_pre, ids["val"],
          len(tr), len(sites))
    if federated is not None:
        model, pre = federated
        score("federated", "federated", model, pre, ids["val"], len(tr), len(sites))
    for name, site in sites.items():
        counts = np.bincount(table.loc[site.split.train, "label"], minlength=2)
        if counts.min() < 2 or len(np.unique(table.loc[site.split.val, "label"])) < 2:
            continue
        pre = Preprocessor(cohort.modalities).fit(table.loc[site.split.train])
        tr_s = Arrays.from_table(pre, table.loc[site.split.train])
        va_s = Arrays.from_table(pre, table.loc[site.split.val])
        fit = fit_with_early_stopping(tr_s, va_s, cohort.modalities, cfg.model, cfg.train,
                                      cfg.train.seed)
        score(f"local-only {name}", "local", fit.model, pre, site.split.val, len(tr_s), 1)
    df = pd.DataFrame(rows)
    local = df[df.kind == "local"]
    if not local.empty:
        best = local.loc[local.roc_auc.idxmax()].copy()
        best["model"] = f"best local-only ({best['model'].removeprefix('local-only ')})"
        best["kind"] = "best-local"
        df = pd.concat([df, best.to_frame().T], ignore_index=True)
    return df, len(ids["test"])


def print_comparison(df: pd.DataFrame, n_test: int, n_sites: int) -> None:
    t = Table(title=f"Evaluated on the pooled test set: the union of the {n_sites} sites' test "
                    f"splits ({n_test} participants). Each model's threshold from its own "
                    "validation data.")
    t.add_column("model")
    t.add_column("n train", justify="right")
    for k in SHOWN:
        t.add_column(k, justify="right")
    for _, r in df.iterrows():
        t.add_row(str(r.model), str(r.n_train), *[f"{float(r[k]):.3f}" for k in SHOWN])
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
        t = Table(title="DP-SGD at the sites: ε spent so far per round (every run in each "
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
    """The finished federation's model and preprocessing, from its bundle."""
    from safn_core.bundle import load_bundle

    bundle = load_bundle(run_dir / "model")
    return bundle.model, bundle.preprocessor


def run_loso(cohort, parts, cfg: SafnConfig, run_dir: Path, comparison) -> pd.DataFrame:
    """Leave-one-site-out: one federation per held-out site, then the external table."""
    from safn_core.federation.loso import leave_one_site_out, summarise_loso

    loso = leave_one_site_out(cohort, parts, cfg, run_dir, run_flower_simulation,
                              report=console.print)
    cols = ("roc_auc", "balanced_accuracy", "pr_auc_pd", "pr_auc_hc", "sensitivity",
            "specificity")
    t = Table(title="leave-one-site-out: federation trained on the other sites, tested on all "
                    "of the held-out site (bootstrap 95% CI)")
    for c in ("held-out site", "n", *cols):
        t.add_column(c, justify="left" if c == "held-out site" else "right")
    for _, r in loso.iterrows():
        t.add_row(r.held_out, str(r.n), *[f"{r[k]:.3f} [{r[k + '_ci'][0]:.2f}, "
                                          f"{r[k + '_ci'][1]:.2f}]" for k in cols])
    summ = summarise_loso(loso)
    t.add_section()
    t.add_row("mean ± SD across held-out sites", str(int(loso.n.sum())),
              *[f"{summ[k]['mean']:.3f} ± {summ[k]['sd']:.3f}" for k in cols])
    if comparison is not None:
        for kind in ("pooled", "federated", "best-local"):
            row = comparison[comparison.kind == kind]
            if not row.empty:
                r = row.iloc[0]
                t.add_row(f"{r.model} (pooled test)", "", *[f"{float(r[k]):.3f}" for k in cols])
    console.print(t)
    loso.to_csv(run_dir / "loso.csv", index=False)
    write_json(run_dir / "loso.json", {"sites": loso.replace({np.nan: None}).to_dict("records"),
                                       "summary": summ})
    return loso


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-sim",
        "Federated simulation: shard a cohort into virtual sites and train SAFN across them on "
        "Flower's Simulation Engine, next to pooled and local-only models.",
        default_config=None)
    parser.add_argument("--resume", metavar="RUN_DIR", type=Path,
                        help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--loso", action="store_true",
                        help="also run leave-one-site-out external validation "
                             "(shortcut for --set simulation.loso=true)")
    args = parser.parse_args(argv)
    if args.loso and not args.resume:
        args.overrides.append("simulation.loso=true")
    from safn_core.data.sources import load_cohort
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.partition import summary
    from safn_core.federation.runfiles import (SIM_SITE_STATE, load_run_config, write_config,
                                              write_sim_sites)

    if args.resume:
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise SafnError(f"--resume {run_dir}: not a safn-sim run folder (no config.yaml)")
        if args.config or args.overrides or args.out:
            raise SafnError("--resume continues a run with its own config.yaml; do not combine "
                            "it with --config, --set or --out")
        cfg = load_run_config(run_dir.resolve())
    else:
        cfg = config_from_args(args)
        run_dir = fresh_output_dir(args.out or Path("runs") / f"sim-{datetime.now():%Y%m%d-%H%M%S}")
        # the virtual sites' ledgers live outside the run folder (a later run finds the spent
        # budget); fixed as an absolute path in config.yaml so resume and LOSO use the same
        ledgers = cfg.simulation.site_state_dir or run_dir.resolve().parent / SIM_SITE_STATE
        cfg.simulation.site_state_dir = Path(ledgers).resolve()
    t0 = time.perf_counter()
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    summ = summary(cohort, parts)
    print_sites(cohort, cfg, summ)
    if not args.resume:
        write_config(run_dir, dump_config(cfg))
        write_sim_sites(run_dir, cohort, parts)
        summ.to_csv(run_dir / "sites.csv", index=False)
    fed = cfg.federation
    console.print(f"federated training: {fed.strategy}, {fed.rounds} rounds x "
                  f"{fed.local_epochs} local epochs, {len(parts)} sites (Flower Simulation "
                  f"Engine, Ray backend, {cfg.simulation.num_cpus_per_site:g} CPU per site)")
    flower_s = run_flower_simulation(run_dir, cfg, len(parts))
    state = load_checkpoint(run_dir)
    if state is None or state.round < fed.rounds or not (run_dir / "model").is_dir():
        done = 0 if state is None else state.round
        raise SafnError(f"{run_dir}: the federation stopped after round {done} of {fed.rounds}; "
                        f"see {run_dir / 'progress.log'}; resume with safn-sim --resume {run_dir}")
    console.print(f"federated training finished in {flower_s:.1f} s; model bundle: "
                  f"{run_dir / 'model'}")
    print_privacy(state.history, cfg)
    results = {"run_dir": str(run_dir), "flower_seconds": flower_s, "rounds": state.round,
               "strategy": fed.strategy, "sites": summ.to_dict("records"),
               "federated_last_round": state.history[-1] if state.history else None}
    if cfg.simulation.compare:
        console.print("training the pooled and local-only models on the same splits ...")
        df, n_test = compare(cohort, parts, cfg, load_federated(run_dir))
        print_comparison(df, n_test, len(parts))
        if not (run_dir / "comparison.csv").exists():
            df.to_csv(run_dir / "comparison.csv", index=False)
        results["comparison"] = {"evaluated_on": f"pooled test set: union of the {len(parts)} "
                                                 f"sites' test splits ({n_test} participants)",
                                 "rows": df.replace({np.nan: None}).to_dict("records")}
    loso = None
    if cfg.simulation.loso and not (run_dir / "loso.csv").exists():
        loso = run_loso(cohort, parts, cfg, run_dir, df if cfg.simulation.compare else None)
        results["loso"] = json.loads((run_dir / "loso.json").read_text())
    from safn_core.federation.sim_report import write_sim_report

    write_sim_report(run_dir, cfg, cohort.report.source, summ, state.history,
                     df if cfg.simulation.compare else None, loso)
    results["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "results.json", results)
    console.print(f"run folder: {run_dir} ({results['seconds']:.0f} s); report: "
                  f"{run_dir / 'report.html'}")
    return 0


main = entry(run)
