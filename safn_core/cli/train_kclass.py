"""``safn-train`` for a target with K > 2 classes: the K-class summary, report and bundle.

Cross-validation is the same code as for the binary target (`safn_core.training.crossval`:
same splits, stratified by class, same preprocessing, same models); only what is summarised
differs: macro one-vs-rest ROC-AUC and PR-AUC, balanced accuracy, macro F1 and, for an ordered
target, quadratic weighted kappa and the mean absolute class error, each beside the majority-class
baseline (the training fold's most frequent class), plus the pooled out-of-fold confusion matrix
of SAFN and its gate weights per class. Decision rule: argmax; for an ordered target also the
ordinal cut points fitted on each fold's validation split (columns ``*_cut``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich.table import Table

from safn_core.cli.common import console, write_atomic, write_json
from safn_core.config import dump_config
from safn_core.metrics import summarise

METRICS = ("roc_auc", "pr_auc", "balanced_accuracy", "macro_f1", "qwk", "mae", "accuracy",
           "log_loss", "brier", "balanced_accuracy_cut", "qwk_cut", "mae_cut",
           "majority_balanced_accuracy", "majority_qwk", "majority_mae")
SHORT = {"roc_auc": "ROC-AUC (macro)", "pr_auc": "PR-AUC (macro)", "balanced_accuracy": "bal acc",
         "macro_f1": "macro F1", "qwk": "QWK", "mae": "MAE", "accuracy": "acc",
         "log_loss": "log loss", "brier": "Brier", "balanced_accuracy_cut": "bal acc (cut)",
         "qwk_cut": "QWK (cut)", "mae_cut": "MAE (cut)"}


def table_metrics(ordered: bool) -> tuple[str, ...]:
    base = ("roc_auc", "pr_auc", "balanced_accuracy", "macro_f1")
    return base + (("qwk", "mae", "qwk_cut") if ordered else ())


def summary_table(folds: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of every K-class metric per (feature set, model), in first-seen order."""
    keys = [k for k in METRICS if k in folds.columns]
    keys += [c for c in folds.columns if c.startswith(("roc_auc[", "recall["))]
    rows = []
    for (fs, model), group in folds.groupby(["feature_set", "model"], sort=False):
        s = summarise(group[keys].astype(float).to_dict("records"), keys)
        row = {"feature_set": fs, "model": model, "n_folds": len(group)}
        for k in keys:
            row[f"{k}_mean"], row[f"{k}_sd"] = s[k]["mean"], s[k]["sd"]
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(r, k: str) -> str:
    m, s = r.get(f"{k}_mean"), r.get(f"{k}_sd")
    return "-" if m is None or not np.isfinite(m) else f"{m:.3f} ± {s:.3f}"


def print_summary(summary: pd.DataFrame, ordered: bool, title: str) -> None:
    t = Table(title=title)
    t.add_column("feature set")
    t.add_column("model")
    keys = table_metrics(ordered)
    for k in keys:
        t.add_column(SHORT[k], justify="right")
    for _, r in summary.iterrows():
        t.add_row(r.feature_set, r.model, *[_cell(r, k) for k in keys])
    console.print(t)


def majority_line(summary: pd.DataFrame, ordered: bool) -> str:
    """The majority-class baseline's figures (the same for every model: it ignores them)."""
    r = summary.iloc[0]
    parts = [f"balanced accuracy {r.get('majority_balanced_accuracy_mean', float('nan')):.3f}",
             "macro ROC-AUC 0.500"]
    if ordered:
        parts += [f"QWK {r.get('majority_qwk_mean', float('nan')):.3f}",
                  f"MAE {r.get('majority_mae_mean', float('nan')):.3f}"]
    return ("the majority class of each training fold, predicted for everyone, scores "
            + ", ".join(parts) + ": a model must beat these by a visible margin")


def markdown_table(summary: pd.DataFrame, ordered: bool) -> str:
    keys = table_metrics(ordered)
    lines = ["| feature set | model | " + " | ".join(SHORT[k] for k in keys) + " |",
             "|---|---|" + "---:|" * len(keys)]
    for _, r in summary.iterrows():
        lines.append(f"| {r.feature_set} | {r.model} | "
                     + " | ".join(_cell(r, k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def pooled_confusion(preds: pd.DataFrame, classes, model: str = "SAFN",
                     feature_set: str = "all") -> pd.DataFrame | None:
    """Out-of-fold confusion counts (rows true, columns argmax) of ``model``, all repeats."""
    sel = preds[(preds.model == model) & (preds.feature_set == feature_set)]
    if sel.empty:
        return None
    from safn_core.multiclass import confusion_counts

    counts = confusion_counts(sel.y.to_numpy(dtype=int),
                              sel[[f"p_{c}" for c in classes]].to_numpy(), len(classes))
    return pd.DataFrame(counts, index=[f"true {c}" for c in classes],
                        columns=[f"predicted {c}" for c in classes])


def write_outputs(out, cfg, cohort, res: dict, elapsed: float) -> dict:
    """Console lines, folds/results/predictions files, report.html; returns results.json's
    K-class part."""
    from safn_core.report import Report

    target = cohort.target
    folds = res["folds"]
    summary = summary_table(folds.drop(columns=["confusion"], errors="ignore"))
    print_summary(summary, target.ordered,
                  f"{target.name}: {cfg.train.folds}-fold x {cfg.train.repeats} CV, mean ± SD")
    console.print(majority_line(summary, target.ordered), markup=False, highlight=False)
    folds.drop(columns=["confusion"], errors="ignore").to_csv(out / "folds.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    res["predictions"].to_csv(out / "predictions.csv", index=False)
    write_atomic(out / "results.md", markdown_table(summary, target.ordered))
    by_class = res.get("weights_by_class")
    mods = [m.name for m in cohort.modalities]
    weights_by_class = {}
    if by_class is not None and not by_class.empty:
        by_class.to_csv(out / "modality_weights_by_class.csv", index=False)
        sel = by_class[by_class.feature_set == "all"]
        for name, g in sel.groupby("class", sort=False):
            weights_by_class[name] = {m: float(g[m].mean()) for m in mods if m in g}
        for name, w in weights_by_class.items():
            console.print(f"mean SAFN modality weights of {name}: "
                          + ", ".join(f"{m} {v:.2f}" for m, v in w.items()),
                          markup=False, highlight=False)
    confusion = pooled_confusion(res["predictions"], target.classes)

    counts = {c: int((cohort.y == k).sum()) for k, c in enumerate(target.classes)}
    rep = Report(f"safn-train: {target.name} ({target.n_classes} "
                 f"{'ordered ' if target.ordered else ''}classes)",
                 f"{cohort.report.source}; {cfg.train.folds}-fold x {cfg.train.repeats} "
                 f"subject-wise stratified CV; {elapsed:.0f} s")
    rep.heading("Data")
    rep.table({"participants": len(cohort), **counts,
               **{f"modality {m.name} ({m.side})": f"{len(m.features)} features"
                  for m in cohort.modalities}})
    if target.defined_by:
        rep.text(f"{', '.join(target.defined_by)} define(s) the target and were removed from "
                 "the inputs.", note=True)
    if cohort.report.excluded:
        rep.table(cohort.report.excluded, "excluded participants")
    rep.heading("Results (mean ± SD over folds and repeats)")
    rep.text(majority_line(summary, target.ordered), note=True)
    shown = summary[["feature_set", "model"]].copy()
    for k in table_metrics(target.ordered):
        shown[SHORT[k]] = [_cell(r, k) for _, r in summary.iterrows()]
    rep.table(shown)
    if confusion is not None:
        rep.heading("SAFN's out-of-fold confusion matrix (all features, every repeat, argmax)")
        rep.table(confusion.reset_index(names=""))
    if weights_by_class:
        rep.heading("SAFN's modality weights per class (feature set all)")
        rep.table([{"class": c, **w} for c, w in weights_by_class.items()],
                  "gate weights are not attributions")
    rep.heading("Configuration")
    rep.code(dump_config(cfg))
    rep.write(out / "report.html")
    return {"target": target.to_dict(), "class_counts": counts,
            "summary": summary.replace({np.nan: None}).to_dict("records"),
            "modality_weights_by_class": weights_by_class,
            "confusion": None if confusion is None else confusion.to_numpy().tolist(),
            "decision_rule": {
                "folds": "argmax; ordered targets also cut points fitted on each fold's "
                         "validation split (*_cut columns)",
                "bundle": cfg.train.decision_rule}}


def save(out, cfg, cohort, final, summary_records: list[dict], elapsed: float,
         kclass: dict) -> None:
    """The final model's bundle and results.json."""
    from safn_core.bundle import save_bundle

    safn = next((r for r in summary_records
                 if r["feature_set"] == "all" and r["model"] == "SAFN"), None)
    cv = {k: {"mean": safn.get(f"{k}_mean"), "sd": safn.get(f"{k}_sd")}
          for k in METRICS if safn and f"{k}_mean" in safn} if safn else {}
    save_bundle(out / "model", final.fit.model, final.preprocessor, cfg, threshold=None,
                class_counts=final.class_counts, label_names=cohort.label_names,
                kind="centralised", metrics={"cross_validation": cv},
                extra={"training": {"participants": len(cohort),
                                    "epochs": final.fit.epochs_run,
                                    "sites": pd.Series(cohort.sites).value_counts()
                                    .sort_index().to_dict()}},
                harmonisation=final.harmonisation, calibration=None, target=cohort.target,
                cutpoints=final.cutpoints)
    write_json(out / "results.json", {"cohort": {"n": len(cohort)}, **kclass,
                                      "seconds": elapsed})
