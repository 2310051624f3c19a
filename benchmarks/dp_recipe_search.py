"""Search for the distributed DP recipe (issue #28): optuna over model size and DP-SGD settings.

Every trial is one complete ``safn-sim`` run with ``privacy.mode: distributed`` at ε = 3
(δ = 1e-5), seed 0, on fresh site ledgers, on the synthetic cohort WITHOUT the motor scales
(``data.exclude_motor=true``: the default synthetic cohort is at the ceiling, where every recipe
looks alike); ``--cohorts no_motor ad_data`` also runs ad_data (4 IID sites, benchmarks/cohorts.py)
and averages the two. The objective is the pooled VALIDATION metric of the round the federation
selected (history.json's ``val_roc_auc`` of that round, or ``val_loss`` with ``--objective``); the
test metrics (history.json's ``pooled`` field) are never read. Every round is trained
(``federation.patience=null``); the selected round is the one with the best pooled validation
loss (configs/simulation.yaml's ``federation.select``).

Searched (TPE sampler, seeded; the first trial is the untuned default: today's model, adam,
lr 0.01, C 1, q 0.2, 50 rounds):

  model.d_model 8..64, model.n_heads 1|2|4 (divides every d_model), model.encoder_hidden,
  model.ffn_hidden, model.head_hidden, model.ensemble_size 1..8, model.wide off|trained,
  privacy.distributed.optimizer adam|sgd, privacy.distributed.learning_rate (log scale),
  privacy.max_grad_norm C (log scale), privacy.distributed.sample_rate q, federation.rounds.

Fixed: privacy.accountant=prv, privacy.max_noise_multiplier=30 (a recipe whose σ exceeds 30 is
refused by the sites: the trial scores 0.5 / +inf and is recorded as failed).

The search's size and wall time are printed and written with ``--out`` (JSON: every trial's
parameters, value, σ and seconds): hyper-parameter search on private data leaks through the
choice, so its cost is part of the result (docs/benchmarks.md).

    .venv/bin/python benchmarks/dp_recipe_search.py --minutes 35 --out /tmp/dp_search.json
    .venv/bin/python benchmarks/dp_recipe_search.py --trials 3 --cohorts no_motor ad_data
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "configs" / "simulation.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the benchmark's own cohorts and their overrides: the search runs what the table measures
from privacy_utility import COHORTS, cohort_overrides  # noqa: E402

FIXED = ["privacy.mode=distributed", "privacy.accountant=prv",
         "privacy.max_noise_multiplier=30", "federation.patience=null",
         "simulation.compare=false"]
DEFAULT_TRIAL = {"d_model": 64, "n_heads": 4, "encoder_hidden": 128, "ffn_hidden": 128,
                 "head_hidden": 64, "ensemble_size": 8, "wide": "trained", "optimizer": "adam",
                 "learning_rate": 0.01, "max_grad_norm": 1.0, "sample_rate": 0.2, "rounds": 50}


def suggest(trial) -> dict:
    return {
        "d_model": trial.suggest_categorical("d_model", [8, 16, 32, 64]),
        "n_heads": trial.suggest_categorical("n_heads", [1, 2, 4]),
        "encoder_hidden": trial.suggest_categorical("encoder_hidden", [16, 32, 64, 128]),
        "ffn_hidden": trial.suggest_categorical("ffn_hidden", [16, 32, 64, 128]),
        "head_hidden": trial.suggest_categorical("head_hidden", [8, 16, 32, 64]),
        "ensemble_size": trial.suggest_int("ensemble_size", 1, 8),
        "wide": trial.suggest_categorical("wide", ["off", "trained"]),
        "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd"]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1.0, log=True),
        "max_grad_norm": trial.suggest_float("max_grad_norm", 0.05, 5.0, log=True),
        "sample_rate": trial.suggest_float("sample_rate", 0.05, 1.0),
        "rounds": trial.suggest_int("rounds", 10, 100, step=10),
    }


def recipe_sets(p: dict) -> list[str]:
    return [f"model.d_model={p['d_model']}", f"model.n_heads={p['n_heads']}",
            f"model.encoder_hidden={p['encoder_hidden']}", f"model.ffn_hidden={p['ffn_hidden']}",
            f"model.head_hidden={p['head_hidden']}", f"model.ensemble_size={p['ensemble_size']}",
            f"model.wide={p['wide']}", f"privacy.distributed.optimizer={p['optimizer']}",
            f"privacy.distributed.learning_rate={p['learning_rate']:.6g}",
            f"privacy.max_grad_norm={p['max_grad_norm']:.6g}",
            f"privacy.distributed.sample_rate={p['sample_rate']:.6g}",
            f"federation.rounds={p['rounds']}"]


def selected_validation(run_dir: Path) -> dict:
    """The selected round's pooled validation loss and ROC-AUC (never the test metrics)."""
    history = json.loads((run_dir / "history.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    sel = results.get("selected_round")
    entry = next((e for e in history if e.get("round") == sel), history[-1])
    sigma = json.loads((run_dir / "distributed_dp.json").read_text())["noise_multiplier"]
    return {"round": entry.get("round"), "val_loss": entry.get("val_loss"),
            "val_roc_auc": entry.get("val_roc_auc"), "sigma": sigma,
            "rounds_run": len(history)}


def run_trial(p: dict, cohort: str, args, work: Path, cache: dict) -> dict:
    run_work = Path(tempfile.mkdtemp(prefix=f"{cohort}-", dir=work))
    out = run_work / "run"
    sets = [f"train.seed={args.seed}", f"federation.split_seed={args.seed}",
            f"simulation.seed={args.seed}", f"simulation.site_state_dir={run_work / 'ledgers'}",
            f"privacy.epsilon={args.epsilon:g}", f"privacy.delta={args.delta:g}", *FIXED,
            *cohort_overrides(cohort, work, cache), *recipe_sets(p)]
    cmd = [str(BIN / "safn-sim"), "--config", str(CONFIG), "--out", str(out),
           *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    try:
        if proc.returncode or not (out / "history.json").is_file():
            tail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())[-400:]
            return {"failed": tail or f"exit status {proc.returncode}", "seconds": seconds}
        return {**selected_validation(out), "seconds": seconds}
    finally:
        shutil.rmtree(run_work, ignore_errors=True)


def main() -> None:
    import optuna

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=35.0,
                    help="no new trial starts after this much wall time (default 35)")
    ap.add_argument("--trials", type=int, default=None, help="at most this many trials")
    ap.add_argument("--cohorts", nargs="+", default=["no_motor"], choices=list(COHORTS))
    ap.add_argument("--objective", choices=["val_roc_auc", "val_loss"], default="val_roc_auc")
    ap.add_argument("--seed", type=int, default=0, help="data split / training seed")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--sampler-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write every trial and the best recipe here (JSON)")
    args = ap.parse_args()

    maximise = args.objective == "val_roc_auc"
    work = Path(tempfile.mkdtemp(prefix="safn-dpsearch-")).resolve()
    cache: dict = {}
    log: list[dict] = []
    t_start = time.perf_counter()

    def save(study=None) -> dict:
        done = [r for r in log if r["value"] is not None and not r.get("failed")]
        best = (max if maximise else min)(done, key=lambda r: r["value"]) if done else None
        summary = {"objective": f"pooled validation {args.objective} of the selected round",
                   "cohorts": args.cohorts, "seed": args.seed, "epsilon": args.epsilon,
                   "delta": args.delta, "fixed": FIXED, "trials": len(log),
                   "failed_trials": sum(bool(r.get("failed")) for r in log),
                   "wall_seconds": time.perf_counter() - t_start,
                   "simulation_seconds": sum(r["seconds"] for r in log),
                   "best": best, "log": log}
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1, default=str))
        return summary

    def objective(trial) -> float:
        p = suggest(trial)
        per = {c: run_trial(p, c, args, work, cache) for c in args.cohorts}
        failed = {c: r["failed"] for c, r in per.items() if "failed" in r}
        if failed:
            value = 0.5 if maximise else math.inf
        else:
            vals = [r[args.objective] for r in per.values()]
            value = float(sum(vals) / len(vals))
        rec = {"trial": trial.number, "params": p, "value": None if failed else value,
               "failed": failed or None, "per_cohort": per,
               "seconds": sum(r["seconds"] for r in per.values())}
        log.append(rec)
        save()
        best = (max if maximise else min)(
            [r["value"] for r in log if r["value"] is not None] or [value])
        sig = ", ".join(f"σ {r['sigma']:.2f} round {r['round']}" for r in per.values()
                        if "sigma" in r)
        print(f"trial {trial.number:3d} ({rec['seconds']:.0f} s, "
              f"{(time.perf_counter() - t_start) / 60:.1f} min): "
              f"{'FAILED ' + str(failed)[:200] if failed else f'{args.objective} {value:.4f}'}"
              f"  [{sig}] best {best:.4f}  {p}", flush=True)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if maximise else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
    study.enqueue_trial(DEFAULT_TRIAL)
    print(f"objective: pooled validation {args.objective} of the selected round; cohorts "
          f"{args.cohorts}; seed {args.seed}; ε = {args.epsilon:g}, δ = {args.delta:g}; "
          f"budget {args.minutes:g} min" + (f", at most {args.trials} trials" if args.trials
                                             else ""), flush=True)
    try:
        study.optimize(objective, n_trials=args.trials, timeout=args.minutes * 60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = save()
    print(f"\nsearch: {s['trials']} trials ({s['failed_trials']} failed) in "
          f"{s['wall_seconds'] / 60:.1f} min wall time ({s['simulation_seconds'] / 60:.1f} min "
          f"of safn-sim runs), {len(args.cohorts)} run(s) per trial")
    if s["best"]:
        b = s["best"]
        print(f"best trial {b['trial']}: {args.objective} {b['value']:.4f}  {b['params']}")
        print("as --set: " + " ".join(recipe_sets(b["params"])))


if __name__ == "__main__":
    main()
