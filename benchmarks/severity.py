"""Severity profiling (issue #32): SAFN's K-class heads against K-class baselines, and federated
against pooled, on the synthetic cohort's ordered targets.

Targets: ``hc_prodromal_pd`` (HC / prodromal / PD) and ``hy_stage`` (HC / H&Y 1 / H&Y ≥ 2; NHY
defines it and is never an input). The synthetic cohort is the default one with
``synth.n_prodromal: 300`` (configs/severity.yaml: ≈ PPMI 2.0's prodromal share), loaded
through the PPMI loader with ``data.target`` set.

Centralised (5 folds × 3 repeats, one set of subject-wise splits stratified by class, shared by
every model; `safn_core.training.crossval.cross_validate`): per target and feature set —
``no_motor`` (imaging, non-motor clinical scales, demographics) and ``all`` (with the motor
scales; for ``hy_stage`` still without NHY) — SAFN with the softmax head and with the ordinal
(cumulative-link) head, against the multinomial logistic regression (scikit-learn, C = 0.1, and
the exact penalised fit SAFN starts from, penalty chosen on validation), the ordinal logistic
regression, gradient boosting (early-stopped on the same validation split) and the MLP; the
majority class beside them. Columns: macro one-vs-rest ROC-AUC, quadratic weighted kappa (QWK)
under argmax and under the ordinal rule (cut points on the expected class index fitted on each
fold's validation split to maximise QWK, the same rule for every model), balanced accuracy and
mean absolute class error (argmax), each mean ± SD over the 15 folds.

Federated (``--seeds``, default 0 1 2; the synthetic cohort's 5 natural sites; configs/severity.yaml
run by ``safn-sim`` with the seed as train.seed, federation.split_seed and simulation.seed): the
federated SAFN against the pooled SAFN trained on the union of the sites' training splits and
scored on the same pooled test set (safn-sim's comparison). ``--fed-variants``: ``recipe``
(configs/severity.yaml: without the motor scales), ``recipe, motor scales in``, and a labelled
sensitivity row, ``select by val macro ROC-AUC`` (both models keep the round of the best pooled
validation macro ROC-AUC instead of the lowest validation cross-entropy).

Targets, each printed MET / MISSED with its figures:

  * centralised, every target and feature set: SAFN (the default head, ``model.head: softmax``) ≥ the
    best baseline in macro ROC-AUC and in QWK (means over folds; QWK under argmax, and under
    the cut-point rule as a second line);
  * federated, every target: federated − pooled macro ROC-AUC ≥ −0.02 (mean over seeds).

    .venv/bin/python benchmarks/severity.py                      # everything (about an hour)
    .venv/bin/python benchmarks/severity.py --targets hy_stage --skip-federated
    .venv/bin/python benchmarks/severity.py --repeats 1 --seeds 0 --out severity.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "severity.yaml"
TARGETS = ("hc_prodromal_pd", "hy_stage")
FEATURE_SETS = ("no_motor", "all")
HEADS = {"SAFN (softmax)": "softmax", "SAFN (ordinal)": "ordinal"}
BASELINES = ("majority", "logistic_regression", "exact_logistic_regression", "ordinal_logistic",
             "hist_gradient_boosting_es", "mlp")
METRICS = ("roc_auc", "qwk", "qwk_cut", "balanced_accuracy", "mae")
HEADERS = {"roc_auc": "macro ROC-AUC", "qwk": "QWK", "qwk_cut": "QWK (cut points)",
           "balanced_accuracy": "bal. acc.", "mae": "MAE"}
FED_GAP = -0.02


def centralised(target: str, folds: int, repeats: int, user: list[str]) -> dict:
    """Cross-validated rows of every model on both feature sets of ``target``."""
    from safn_core.config import load_config
    from safn_core.data.sources import load_cohort
    from safn_core.training.crossval import cross_validate

    cfg = load_config(CONFIG, overrides=[
        f"data.target={target}", "data.exclude_motor=false", f"train.folds={folds}",
        f"train.repeats={repeats}", f"train.feature_sets=[{','.join(FEATURE_SETS)}]",
        f"train.baselines=[{','.join(BASELINES)}]", "train.modality_drop=false", *user])
    cohort = load_cohort(cfg.data, cfg.synth)
    counts = {c: int((cohort.y == k).sum()) for k, c in enumerate(cohort.label_names)}
    variants = [(name, cfg.model.model_copy(update={"head": head}))
                for name, head in HEADS.items()]
    t0 = time.perf_counter()
    res = cross_validate(cohort, cfg, variants=variants)
    folds_df = res["folds"]
    out = {"target": target, "counts": counts, "n": len(cohort), "rows": {},
           "seconds": time.perf_counter() - t0,
           "default_head": cfg.model.head}
    for (fs, model), g in folds_df.groupby(["feature_set", "model"], sort=False):
        out["rows"].setdefault(fs, {})[model] = {
            k: _stat(g[k]) for k in (*METRICS, "majority_balanced_accuracy", "majority_qwk",
                                     "majority_mae") if k in g}
    return out


def _stat(values) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if len(v) else None,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


FED_VARIANTS = {
    "recipe": [],
    # configs/severity.yaml excludes the motor scales; this row puts them back (H&Y still out
    # of hy_stage's inputs: it defines the label)
    "recipe, motor scales in": ["data.exclude_motor=false"],
    # a sensitivity analysis, not the target's row: the federation and its pooled comparator
    # both keep the round of the best pooled validation macro ROC-AUC instead of the best
    # pooled validation cross-entropy
    "select by val macro ROC-AUC": ["federation.select=val_roc_auc"],
}


def federated(target: str, seed: int, work: Path, user: list[str],
              variant: str = "recipe") -> dict:
    """One safn-sim run: the federated and the pooled SAFN's K-class metrics."""
    out = work / f"{target}-{seed}-{variant.replace(' ', '_')}"
    sets = [f"data.target={target}", f"train.seed={seed}", f"federation.split_seed={seed}",
            f"simulation.seed={seed}", f"simulation.site_state_dir={out}-ledgers",
            "simulation.compare=true", *FED_VARIANTS[variant], *user]
    from common import safn_sim  # benchmarks/ is on sys.path when run as a script

    results, seconds, failed = safn_sim(CONFIG, out, sets)
    if failed:
        return {"seed": seed, "failed": failed, "seconds": seconds}
    rows = results["comparison"]["rows"]
    by_kind = {r["kind"]: r for r in rows}
    fed, pooled = by_kind["federated"], by_kind["pooled"]
    return {"seed": seed, "seconds": seconds,
            **{f"federated_{k}": fed.get(k) for k in METRICS},
            **{f"pooled_{k}": pooled.get(k) for k in METRICS},
            "federated_round": fed.get("selected_round"),
            "pooled_round": pooled.get("selected_round"),
            "gap": fed["roc_auc"] - pooled["roc_auc"]}


def fmt(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def centralised_table(res: dict) -> str:
    lines = [f"### {res['target']} ({res['n']} participants: "
             + ", ".join(f"{n} {c}" for c, n in res["counts"].items()) + ")", "",
             "| feature set | model | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for fs, models in res["rows"].items():
        for model, m in models.items():
            lines.append(f"| {fs} | {model} | " + " | ".join(fmt(m.get(k)) for k in METRICS)
                         + " |")
        any_row = next(iter(models.values()))
        lines.append(f"| {fs} | *majority class* | 0.500 | "
                     f"{fmt(any_row.get('majority_qwk'))} | - | "
                     f"{fmt(any_row.get('majority_balanced_accuracy'))} | "
                     f"{fmt(any_row.get('majority_mae'))} |")
    return "\n".join(lines) + "\n"


def centralised_targets(res: dict) -> list[dict]:
    out = []
    safn = next(n for n, h in HEADS.items() if h == res["default_head"])
    for fs, models in res["rows"].items():
        base = {n: m for n, m in models.items() if n not in HEADS and n != "majority"}
        for k in ("roc_auc", "qwk", "qwk_cut"):
            best_name = max(base, key=lambda n: base[n][k]["mean"] or -1)
            s, b = models[safn][k]["mean"], base[best_name][k]["mean"]
            out.append({"target": f"{res['target']}, {fs}: {safn} ≥ best baseline in {k}",
                        "met": s >= b, "figures": f"{s:.3f} vs {best_name} {b:.3f} "
                                                  f"({s - b:+.3f})"})
    return out


def federated_summary(target: str, runs: list[dict], variant: str) -> tuple[str, dict]:
    ok = [r for r in runs if "failed" not in r]
    gaps = [r["gap"] for r in ok]
    rounds = " / ".join(",".join("-" if r[f"{w}_round"] is None else str(int(r[f"{w}_round"]))
                                 for r in ok) for w in ("pooled", "federated"))
    line = (f"| {target} | {variant} | " + " | ".join(
        fmt(_stat([r[f'{w}_{k}'] for r in ok if r.get(f'{w}_{k}') is not None]))
        for w in ("pooled", "federated") for k in ("roc_auc", "qwk"))
        + f" | {fmt(_stat(gaps))} | {rounds} | {len(ok)}/{len(runs)} |")
    mean_gap = float(np.mean(gaps)) if gaps else float("nan")
    tgt = {"target": f"{target}: federated − pooled macro ROC-AUC ≥ {FED_GAP}",
           "met": bool(gaps) and mean_gap >= FED_GAP,
           "figures": f"{mean_gap:+.3f} (per seed "
                      + ", ".join(f"{g:+.3f}" for g in gaps) + ")"}
    return line, tgt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--skip-centralised", action="store_true")
    ap.add_argument("--skip-federated", action="store_true")
    ap.add_argument("--fed-variants", nargs="+", default=["recipe"], choices=list(FED_VARIANTS),
                    help="federated settings to run (the targets are judged on the recipe rows, "
                         "not on the selection sensitivity row)")
    ap.add_argument("--set", dest="user", action="append", default=[],
                    help="config override applied to every run (after the benchmark's own)")
    ap.add_argument("--out", type=Path, help="write the tables and targets (.md or .json)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    report, targets, results = [], [], {"centralised": [], "federated": {}}
    if not args.skip_centralised:
        report.append("## Centralised (5-fold × 3 CV unless stated; mean ± SD over folds)\n")
        for target in args.targets:
            res = centralised(target, args.folds, args.repeats, args.user)
            results["centralised"].append(res)
            table = centralised_table(res)
            print(table, flush=True)
            report.append(table)
            targets += centralised_targets(res)
    if not args.skip_federated:
        report.append("## Federated vs pooled (5 natural sites; mean ± SD over seeds "
                      f"{', '.join(map(str, args.seeds))})\n")
        report.append("| target | setting | pooled ROC-AUC | pooled QWK | federated ROC-AUC | "
                      "federated QWK | fed − pooled | rounds kept (pooled / federated) | runs |"
                      "\n|---|---|---:|---:|---:|---:|---:|---|---:|")
        with tempfile.TemporaryDirectory(prefix="safn-severity-") as tmp:
            for target in args.targets:
                for variant in args.fed_variants:
                    runs = []
                    for seed in args.seeds:
                        r = federated(target, seed, Path(tmp), args.user, variant)
                        print(f"[{target}, {variant}, seed {seed}] "
                              + (f"FAILED: {r['failed']}" if "failed" in r else
                                 f"federated {r['federated_roc_auc']:.3f}, pooled "
                                 f"{r['pooled_roc_auc']:.3f} ({r['seconds']:.0f} s)"),
                              flush=True)
                        runs.append(r)
                    results["federated"][f"{target} ({variant})"] = runs
                    line, tgt = federated_summary(target, runs, variant)
                    report.append(line)
                    if variant.startswith("recipe"):
                        tgt["target"] = tgt["target"].replace(":", f" ({variant}):", 1)
                        targets.append(tgt)
        report.append("")
    report.append("## Targets\n")
    for t in targets:
        report.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['figures']}")
    report.append(f"\n{time.perf_counter() - t0:.0f} s in all.")
    text = "\n".join(report)
    print("\n".join(report[-len(targets) - 2:]))
    if args.out:
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps({**results, "targets": targets}, indent=2))
        else:
            args.out.write_text(text + "\n")
    failed = any("failed" in r for runs in results["federated"].values() for r in runs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
