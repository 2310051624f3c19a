"""``safn-sim``: a federated simulation on Flower's Simulation Engine (Ray backend).

The cohort is sharded into virtual sites; the same ServerApp and ClientApp that a deployment runs
train SAFN across them. In the same run and on the same per-site splits it also trains the pooled
model and one local-only model per site, and prints one comparison table on the pooled test set.
"""

from __future__ import annotations

import logging
import os
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
         "mcc", "brier")


def quiet_flower() -> None:
    """Flower and Ray log every message at INFO; the user wants one line per round."""
    for name in ("flwr", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_flower_simulation(run_dir: Path, cfg: SafnConfig, n_sites: int) -> float:
    """Run the ServerApp/ClientApp pair on the Ray backend; returns wall seconds."""
    quiet_flower()
    os.environ["SAFN_RUN_DIR"] = str(run_dir)
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    quiet_flower()  # again: importing Flower resets its logger to INFO

    init_args = {"logging_level": "ERROR", "log_to_driver": False,
                 "include_dashboard": False}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    backend = {"client_resources": {"num_cpus": cfg.simulation.num_cpus_per_site,
                                    "num_gpus": 0.0},
               "init_args": init_args}
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                   backend_config=backend, verbose_logging=False)
    return time.perf_counter() - t0


def build_sites(cohort, cfg: SafnConfig):
    from safn_core.federation.partition import partition

    s = cfg.simulation
    return partition(cohort, s.partition, s.n_sites, alpha=s.dirichlet_alpha,
                     size_alpha=s.size_skew, seed=s.seed)


def compare(cohort, parts: dict, cfg: SafnConfig, federated_weights: dict | None):
    """Pooled, federated, and local-only models scored on the pooled test set."""
    import torch

    from safn_core.federation.site import Site
    from safn_core.metrics import binary_metrics, choose_threshold
    from safn_core.preprocess import Preprocessor
    from safn_core.training.crossval import _arrays
    from safn_core.training.local import fit_with_early_stopping, make_model, predict

    torch.set_num_threads(1)
    sites = {name: Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()}
    ids = {part: np.concatenate([getattr(s.split, part) for s in sites.values()])
           for part in ("train", "val", "test")}
    table = cohort.table
    rows = []

    def score(name, model, pre, val_ids, kind):
        val, test = _arrays(pre, table.loc[val_ids]), _arrays(pre, table.loc[ids["test"]])
        p_val, _ = predict(model, val)
        p_test, _ = predict(model, test)
        m = binary_metrics(test.y, p_test, choose_threshold(val.y, p_val))
        rows.append({"model": name, "kind": kind, "n_train": None, **m})

    pooled_pre = Preprocessor(cohort.modalities).fit(table.loc[ids["train"]])
    tr, va = _arrays(pooled_pre, table.loc[ids["train"]]), _arrays(pooled_pre, table.loc[ids["val"]])
    fit = fit_with_early_stopping(tr, va, cohort.modalities, cfg.model, cfg.train, cfg.train.seed)
    score("pooled (all sites' data together)", fit.model, pooled_pre, ids["val"], "pooled")
    rows[-1]["n_train"] = len(tr)
    if federated_weights is not None:
        model = make_model(cohort.modalities, cfg.model, 0)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in federated_weights.items()})
        score("federated", model, pooled_pre, ids["val"], "federated")
        rows[-1]["n_train"] = len(tr)
    for name, site in sites.items():
        counts = np.bincount(cohort.table.loc[site.split.train, "label"], minlength=2)
        if counts.min() < 2:
            continue
        pre = Preprocessor(cohort.modalities).fit(table.loc[site.split.train])
        tr_s = _arrays(pre, table.loc[site.split.train])
        va_s = _arrays(pre, table.loc[site.split.val])
        fit = fit_with_early_stopping(tr_s, va_s, cohort.modalities, cfg.model, cfg.train,
                                      cfg.train.seed)
        score(f"local-only {name}", fit.model, pre, site.split.val, "local")
        rows[-1]["n_train"] = len(tr_s)
    df = pd.DataFrame(rows)
    local = df[df.kind == "local"]
    if not local.empty:
        best = local.loc[local.roc_auc.idxmax()].copy()
        best["model"] = f"best local-only ({best['model'].removeprefix('local-only ')})"
        best["kind"] = "best-local"
        df = pd.concat([df, best.to_frame().T], ignore_index=True)
    return df, len(ids["test"])


def print_comparison(df: pd.DataFrame, n_test: int) -> None:
    t = Table(title=f"pooled test set of all sites ({n_test} participants; each model's threshold "
                    "from its own validation data)")
    t.add_column("model")
    t.add_column("n train", justify="right")
    for k in SHOWN:
        t.add_column(k, justify="right")
    for _, r in df.iterrows():
        t.add_row(str(r.model), str(r.n_train), *[f"{float(r[k]):.3f}" for k in SHOWN])
    console.print(t)


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-sim",
        "Federated simulation: shard a cohort into virtual sites and train SAFN across them on "
        "Flower's Simulation Engine, next to pooled and local-only models.")
    parser.add_argument("--resume", metavar="RUN_DIR", type=Path,
                        help="continue an interrupted run from its last checkpoint")
    args = parser.parse_args(argv)
    from safn_core.data.sources import load_cohort
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.partition import summary
    from safn_core.federation.runfiles import load_run_config, write_config, write_sim_sites

    if args.resume:
        run_dir = args.resume
        if args.overrides or args.config or args.out:
            raise SafnError("--resume continues a run with its own saved configuration: drop "
                            "--config, --set and --out")
        if not (run_dir / "config.yaml").is_file():
            raise SafnError(f"--resume {run_dir}: not a safn-sim run folder (no config.yaml)")
        cfg = load_run_config(run_dir)
    else:
        cfg = config_from_args(args)
        run_dir = fresh_output_dir(args.out or Path("runs") / f"sim-{datetime.now():%Y%m%d-%H%M%S}")
    t0 = time.perf_counter()
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    summ = summary(cohort, parts)
    t = Table(title=f"virtual sites ({cfg.simulation.partition} partition of {len(cohort)} "
                    f"participants)")
    for c in summ.columns:
        t.add_column(str(c), justify="left" if c == "site" else "right")
    for row in summ.itertuples(index=False):
        t.add_row(*map(str, row))
    console.print(t)
    if not args.resume:
        write_config(run_dir, dump_config(cfg))
        write_sim_sites(run_dir, cohort, parts)
        summ.to_csv(run_dir / "sites.csv", index=False)
    console.print(f"federated training: {cfg.federation.strategy}, {cfg.federation.rounds} "
                  f"rounds x {cfg.federation.local_epochs} local epochs, {len(parts)} sites "
                  "(Flower Simulation Engine, Ray backend)")
    flower_s = run_flower_simulation(run_dir, cfg, len(parts))
    state = load_checkpoint(run_dir)
    if state is None or state.round < cfg.federation.rounds:
        done = 0 if state is None else state.round
        raise SafnError(f"{run_dir}: the federation stopped after round {done} of "
                        f"{cfg.federation.rounds}; see {run_dir / 'progress.log'}; resume with "
                        f"safn-sim --resume {run_dir}")
    console.print(f"federated training finished in {flower_s:.1f} s")

    from safn_core.bundle import save_bundle
    from safn_core.preprocess import Preprocessor
    from safn_core.training.local import make_model

    pre = Preprocessor.from_state(state.preprocessing)
    last = state.history[-1]
    model = make_model(pre.modalities, cfg.model, 0)
    import torch

    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.weights.items()})
    if not (run_dir / "model").exists():
        save_bundle(run_dir / "model", model, pre, cfg, threshold=last.get("threshold", 0.5),
                    class_counts=state.class_counts, label_names=cohort.label_names,
                    kind="federated",
                    metrics={"federated_pooled_test": {k: {"mean": v, "sd": None}
                                                       for k, v in last.get("pooled", {}).items()}},
                    extra={"training": {"participants": int(sum(state.class_counts)),
                                        "sites": summ.set_index("site").participants.to_dict(),
                                        "rounds": state.round}})
    write_json(run_dir / "history.json", state.history)
    if cfg.simulation.compare:
        console.print("training the pooled and local-only models on the same splits …")
        df, n_test = compare(cohort, parts, cfg, state.weights)
        print_comparison(df, n_test)
        df.to_csv(run_dir / "comparison.csv", index=False)
        write_json(run_dir / "comparison.json", df.replace({np.nan: None}).to_dict("records"))
    console.print(f"run folder: {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return 0


main = entry(run)
