"""``safn-train``: centralised cross-validated evaluation of SAFN against baselines.

The pooled reference every federated result is compared against: repeated subject-wise
stratified K-fold CV, SAFN + ablations + baselines on the same folds, feature sets with and
without motor scales, then a final fit saved as a model bundle. With ``harmonisation.method:
combat`` the MRI features are harmonised inside every fold (fitted on its training part) and in
the final fit, whose bundle carries the fit (`safn_core.training.crossval`).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safn_core.cli.common import (base_parser, config_from_args, console, entry,
                                  fresh_output_dir, write_atomic, write_json)
from safn_core.config import dump_config
from safn_core.data.contract import check_cohort
from safn_core.metrics import METRICS, summarise
from safn_core.recalibration import training_calibration_text
from safn_core.tracking import Tracker
from safn_core.tracking import crossval as tracking

TABLE_METRICS = ("balanced_accuracy", "roc_auc", "pr_auc_pd", "pr_auc_hc", "mcc", "sensitivity",
                 "specificity", "accuracy", "f1", "brier")
SHORT = {"balanced_accuracy": "bal acc", "roc_auc": "ROC-AUC", "pr_auc_pd": "PR-AUC PD",
         "pr_auc_hc": "PR-AUC HC", "mcc": "MCC", "sensitivity": "sens", "specificity": "spec",
         "accuracy": "acc", "f1": "F1", "brier": "Brier"}


CALIBRATION_COLUMNS = ("temperature", "temperature_fitted", "calibration_slope_raw",
                       "calibration_slope")
"""SAFN rows' extra fold columns (`crossval.safn_predictions`): T, whether it was fitted, and
the test fold's calibration slope before and after it (NaN where not estimable)."""


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of every metric per (feature set, model), in first-seen order, and of the
    calibration columns where the folds have them (NaN for models without them)."""
    keys = (*METRICS, *(c for c in CALIBRATION_COLUMNS if c in folds.columns))
    rows = []
    for (fs, model), group in folds.groupby(["feature_set", "model"], sort=False):
        s = summarise(group.astype({c: float for c in keys}).to_dict("records"), keys)
        row = {"feature_set": fs, "model": model, "n_folds": len(group)}
        for k in keys:
            row[f"{k}_mean"], row[f"{k}_sd"] = s[k]["mean"], s[k]["sd"]
        rows.append(row)
    return pd.DataFrame(rows)


def temperature_line(folds: pd.DataFrame) -> str | None:
    """What temperature scaling did in the folds (all feature sets, SAFN rows), for the
    console and the report; None where no fold fitted a temperature column."""
    if "temperature" not in folds.columns:
        return None
    safn = folds[folds.model == "SAFN"].astype({c: float for c in CALIBRATION_COLUMNS})
    if safn.empty:
        return None
    fitted = safn[safn.temperature_fitted > 0]
    t = (f"T median {fitted.temperature.median():.2f} (range {fitted.temperature.min():.2f}–"
         f"{fitted.temperature.max():.2f})" if len(fitted) else "no T")
    slope = ", ".join(
        f"{fs} {g.calibration_slope_raw.mean():.2f} → {g.calibration_slope.mean():.2f}"
        for fs, g in safn.groupby("feature_set", sort=False)
        if g.calibration_slope.notna().any())
    kept = ("" if len(fitted) == len(safn) else ", T = 1 kept in the others (too few of a "
            "class, or classes the scores separate: no finite T)")
    return (f"temperature scaling (train.temperature_scaling, fitted on each fold's validation "
            f"split): {t} in {len(fitted)} of {len(safn)} SAFN fits{kept}; SAFN's mean "
            f"calibration slope on the test folds before → after: {slope or 'not estimable'}")


def print_summary(summary: pd.DataFrame, title: str) -> None:
    t = Table(title=title, show_lines=False)
    t.add_column("feature set")
    t.add_column("model")
    for k in TABLE_METRICS:
        t.add_column(SHORT[k], justify="right")
    last_fs = None
    for _, r in summary.iterrows():
        if last_fs is not None and r.feature_set != last_fs:
            t.add_section()
        last_fs = r.feature_set
        t.add_row(r.feature_set, r.model,
                  *[f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_sd']:.3f}" for k in TABLE_METRICS])
    console.print(t)


def markdown_table(summary: pd.DataFrame, metrics=TABLE_METRICS[:6]) -> str:
    head = "| feature set | model | " + " | ".join(SHORT[k] for k in metrics) + " |"
    sep = "|---|---|" + "---:|" * len(metrics)
    lines = [head, sep]
    for _, r in summary.iterrows():
        lines.append(f"| {r.feature_set} | {r.model} | " + " | ".join(
            f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_sd']:.3f}" for k in metrics) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, cfg, cohort, summary, preds, weights, drops, majority: float,
                 elapsed: float, temperature: str | None = None) -> Path:
    """The run's HTML page: data, results table, curves, calibration (with ``temperature``,
    `temperature_line`), modality weights."""
    from safn_core import plots
    from safn_core.metrics import calibration
    from safn_core.report import Report

    rep = Report("safn-train: centralised cross-validated evaluation",
                 f"{cohort.report.source}; {cfg.train.folds}-fold x {cfg.train.repeats} "
                 f"subject-wise stratified CV; {elapsed:.0f} s")
    rep.heading("Data")
    n_pos = int(cohort.y.sum())
    rep.table({"participants": len(cohort), cohort.label_names[1]: n_pos,
               cohort.label_names[0]: len(cohort) - n_pos,
               "majority-class accuracy": majority,
               **{f"modality {m.name} ({m.side})": f"{len(m.features)} features"
                  for m in cohort.modalities}})
    if cohort.report.excluded:
        rep.table(cohort.report.excluded, "excluded participants")
    harmonisation = harmonisation_line(cohort, cfg)
    if harmonisation:
        rep.text(harmonisation, note=True)
    rep.heading("Results (mean ± SD over folds and repeats)")
    rep.text(f"The majority class gives accuracy {majority:.3f} and PR-AUC (PD positive) "
             f"{majority if n_pos >= len(cohort) - n_pos else 1 - majority:.3f}: a model must "
             "beat these by a visible margin.", note=True)
    shown = summary[["feature_set", "model"]].copy()
    for k in TABLE_METRICS:
        shown[SHORT[k]] = [f"{m:.3f} ± {s:.3f}" for m, s in
                           zip(summary[f"{k}_mean"], summary[f"{k}_sd"])]
    rep.table(shown)
    rep.heading("ROC and precision-recall curves")
    rep.figure(out / "roc_pr.png", "out-of-fold predictions of repeat 1, all features")
    safn = preds[preds.model == "SAFN"]
    if not safn.empty:
        calib = calibration(safn.y.to_numpy(), safn.p.to_numpy())
        plots.reliability(calib, out / "calibration.png", "SAFN, out-of-fold (repeat 1)")
        rep.heading("Calibration")
        if temperature:
            rep.text(temperature, note=True)
        rep.figure(out / "calibration.png", "reliability curve of SAFN's out-of-fold predictions")
    if not weights.empty:
        rep.heading("Modality weights")
        rep.figure(out / "modality_weights.png",
                   "gate weights are not attributions: compare with the modality-drop ablation")
    rep.heading("Configuration")
    rep.code(dump_config(cfg))
    return rep.write(out / "report.html")


def harmonisation_line(cohort, cfg) -> str | None:
    """What the run harmonises, for the console and results.json; None without harmonisation.
    Checks the cohort has sites and the configuration fits it (one clear line if not)."""
    if not cfg.harmonisation.enabled:
        return None
    from safn_core.harmonisation.pooled import require_sites
    from safn_core.harmonisation.setup import combat_spec

    require_sites(cohort.table, cohort.report.source)
    spec = combat_spec(cfg.harmonisation, cohort.modalities)
    mods = [m.name for m in cohort.modalities if set(m.features) & set(spec.features)]
    h = cfg.harmonisation
    bayes = (f"{'parametric' if h.parametric else 'non-parametric'} empirical Bayes"
             if h.empirical_bayes else "no empirical Bayes")
    return (f"harmonisation: ComBat of {len(spec.features)} features ({', '.join(mods)}) across "
            f"the sites {', '.join(sorted(set(cohort.sites)))}, preserving "
            f"{', '.join(spec.covariates) or 'no covariate'}, {bayes}; fitted inside each "
            "training fold on its training participants only (and on the final fit's "
            "training part for the bundle)")


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-train",
        "Centralised evaluation: repeated subject-wise stratified K-fold CV of SAFN, its "
        "ablations and baselines on the same folds; saves the final model bundle.",
        default_config=None, tracking=True)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 folds x 1 repeat, 20 epochs, feature set 'all' only")
    args = parser.parse_args(argv)
    if args.quick:
        args.overrides = ["train.folds=3", "train.repeats=1", "train.max_epochs=20",
                          "train.feature_sets=[all]", *args.overrides]
    cfg = config_from_args(args)
    Tracker.check(cfg.tracking)
    out = fresh_output_dir(args.out or Path("runs") / f"train-{datetime.now():%Y%m%d-%H%M%S}")
    with Tracker(cfg.tracking, out) as tracker:
        return _train(cfg, out, tracker)


def _train(cfg, out: Path, tracker: Tracker) -> int:
    """Cross-validation, the final fit and the outputs in ``out``, logged by ``tracker``."""

    from safn_core.data.sources import load_cohort
    from safn_core.training.crossval import final_model

    t0 = time.perf_counter()
    cohort = load_cohort(cfg.data, cfg.synth)
    check_cohort(cohort, cfg.data.min_cell).raise_if_failed("run safn-check for the full report")
    tracking.start(tracker, cfg, out)
    if not cohort.target.binary:
        _run_kclass(cfg, cohort, out, t0)
        _tracking_note(tracker, out)
        return 0
    n_pos = int(cohort.y.sum())
    harmonisation = _start(cohort, cfg, out)
    res = _cross_validate(cohort, cfg)

    folds = res["folds"]
    summary = summary_table(folds)
    majority = float(max(n_pos, len(cohort) - n_pos) / len(cohort))
    print_summary(summary, f"{cfg.train.folds}-fold x {cfg.train.repeats} CV, mean ± SD "
                           f"(majority-class accuracy {majority:.3f})")
    folds.to_csv(out / "folds.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    res["predictions"].to_csv(out / "predictions.csv", index=False)
    write_atomic(out / "results.md", markdown_table(summary))
    temperature = temperature_line(folds)
    if temperature:
        console.print(temperature, markup=False, highlight=False)

    weights, drops = res["weights"], res["modality_drop"]
    mods = [m.name for m in cohort.modalities]
    w_all = weights[weights.feature_set == "all"] if not weights.empty else weights
    d_all = drops[drops.feature_set == "all"] if not drops.empty else drops
    if not w_all.empty:
        weights.to_csv(out / "modality_weights.csv", index=False)
        line = ", ".join(f"{m} {w_all[m].mean():.2f}" for m in mods)
        console.print(f"mean SAFN modality weights (feature set all): {line}")
    if not d_all.empty:
        drops.to_csv(out / "modality_drop.csv", index=False)
        line = ", ".join(f"{m} {d_all[m].mean():+.3f}" for m in mods)
        console.print(f"ROC-AUC lost when a modality is replaced by its training mean: {line}")

    from safn_core import plots

    preds = res["predictions"]
    first = preds[(preds.repeat == 0) & (preds.feature_set == "all")]
    plots.roc_pr_curves(first, list(dict.fromkeys(first.model)), out / "roc_pr.png",
                        "out-of-fold predictions, repeat 1, all features")
    if not w_all.empty:
        plots.modality_weights(w_all, d_all, out / "modality_weights.png")

    console.print("final fit of SAFN on all participants …")
    final = final_model(cohort, cfg)
    fit, pre, threshold, counts = final.fit, final.preprocessor, final.threshold, \
        final.class_counts
    safn_row = summary[(summary.feature_set == "all") & (summary.model == "SAFN")]
    cv_metrics = {k: {"mean": float(safn_row[f"{k}_mean"].iloc[0]),
                      "sd": float(safn_row[f"{k}_sd"].iloc[0])}
                  for k in METRICS} if not safn_row.empty else {}
    from safn_core.bundle import save_bundle

    save_bundle(out / "model", fit.model, pre, cfg, threshold=threshold, class_counts=counts,
                label_names=cohort.label_names, kind="centralised",
                metrics={"cross_validation": cv_metrics},
                extra={"training": {"participants": len(cohort), "epochs": fit.epochs_run,
                                    "sites": pd.Series(cohort.sites).value_counts()
                                    .sort_index().to_dict()}},
                harmonisation=final.harmonisation, calibration=final.calibration)
    if final.calibration is not None:
        console.print("final model: " + training_calibration_text(final.calibration.to_dict()),
                      markup=False, highlight=False)
    elapsed = time.perf_counter() - t0
    results = {
        "cohort": {"n": len(cohort), "positive": n_pos, "majority_accuracy": majority},
        "summary": summary.replace({np.nan: None}).to_dict("records"),
        "modality_weights": {m: float(w_all[m].mean()) for m in mods} if not w_all.empty else {},
        "modality_drop_auc": {m: float(d_all[m].mean()) for m in mods} if not d_all.empty else {},
        "harmonisation": harmonisation,
        "temperature_scaling": {"folds": temperature, "final_model": final.calibration.to_dict()}
        if final.calibration is not None else None,
        "seconds": elapsed,
    }
    write_report(out, cfg, cohort, summary, first, w_all, d_all, majority, elapsed, temperature)
    note = tracking.finish(tracker, out)
    if note is not None:
        results["tracking"] = note
    write_json(out / "results.json", results)
    console.print(f"run folder: {out} ({elapsed:.0f} s); report: {out / 'report.html'}")
    return 0


def _tracking_note(tracker: Tracker, out: Path) -> None:
    """Log the finished run; its note under ``tracking`` in the results.json already written."""
    import json

    note = tracking.finish(tracker, out)
    if note is not None:
        results = json.loads((out / "results.json").read_text())
        write_json(out / "results.json", {**results, "tracking": note})


def _start(cohort, cfg, out: Path) -> str | None:
    """The cohort's line (and the harmonisation's) on the console, the configuration and the
    load report in the run folder; returns the harmonisation line (None without one)."""
    if cohort.target.binary:
        n_pos = int(cohort.y.sum())
        counts = (f"{n_pos} {cohort.label_names[1]} / {len(cohort) - n_pos} "
                  f"{cohort.label_names[0]}")
    else:
        counts = f"target {cohort.target.name}: " + ", ".join(
            f"{int((cohort.y == k).sum())} {c}" for k, c in enumerate(cohort.label_names))
    console.print(f"[bold]cohort[/]: {cohort.report.source}: {len(cohort)} participants, "
                  f"{counts}; modalities "
                  + ", ".join(f"{m.name} ({len(m.features)})" for m in cohort.modalities))
    harmonisation = harmonisation_line(cohort, cfg)
    if harmonisation:
        console.print(harmonisation, markup=False, highlight=False)
    write_atomic(out / "config.yaml", dump_config(cfg))
    write_json(out / "load_report.json", cohort.report.to_dict())
    return harmonisation


def _cross_validate(cohort, cfg) -> dict:
    """`cross_validate` under a progress bar of folds."""
    from safn_core.training.crossval import cross_validate

    with Progress(TextColumn("[bold]cross-validation"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("folds"), TimeElapsedColumn(), console=console,
                  transient=False) as bar:
        task = bar.add_task("cv", total=cfg.train.folds * cfg.train.repeats)
        return cross_validate(cohort, cfg,
                              lambda done, total: bar.update(task, completed=done))


def _run_kclass(cfg, cohort, out: Path, t0: float) -> int:
    """safn-train for a target of K > 2 classes (`safn_core.cli.train_kclass`)."""
    from safn_core.cli import train_kclass
    from safn_core.training.crossval import check_decision_rule, final_model

    check_decision_rule(cohort, cfg)
    _start(cohort, cfg, out)
    res = _cross_validate(cohort, cfg)
    kclass = train_kclass.write_outputs(out, cfg, cohort, res, time.perf_counter() - t0)
    console.print("final fit of SAFN on all participants …")
    final = final_model(cohort, cfg)
    elapsed = time.perf_counter() - t0
    train_kclass.save(out, cfg, cohort, final, kclass["summary"], elapsed, kclass)
    console.print(f"run folder: {out} ({elapsed:.0f} s); report: {out / 'report.html'}")
    return 0


main = entry(run)
