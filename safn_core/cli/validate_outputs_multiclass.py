"""What ``safn-validate`` shows and writes for a K-class bundle (K > 2): the console, the model
cards and ``report.html`` of a `validation_multiclass` result (the binary ones are in
`safn_core.cli.validate_outputs`). The K-class figures: macro one-vs-rest ROC-AUC and PR-AUC,
balanced accuracy, accuracy, macro F1, quadratic weighted kappa and mean absolute class error
(ordered targets), log loss and Brier score, each with its bootstrap 95 % CI and beside the
majority-class baseline; the confusion matrix (counts and row-normalised); per-class figures
and one-vs-rest ROC curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from safn_core.cli.common import console
from safn_core.cli.validate_outputs import (before_after_table, card_with, finish_report,
                                            harmonisation_text, print_recalibration_head,
                                            print_weights, recalibration_card_head,
                                            recalibration_section, replaces_line, say,
                                            scope_section, validation_card_head, write_card)
from safn_core.recalibration_multiclass import MultiClassMap
from safn_core.validation_multiclass import MultiClassRecalibration, MultiClassValidation


def _ci_text(m: dict) -> str:
    ci = m.get("ci")
    return "—" if not ci or None in ci else f"{ci[0]:.3f} – {ci[1]:.3f}"


def _num(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def metric_rows(figures: dict) -> list[dict]:
    """One row per K-class metric: value, 95 % CI and the majority-class baseline's value."""
    maj = figures["majority"]
    return [{"metric": k, "value": v["value"], "95% CI": _ci_text(v),
             "majority class": maj.get(k, "—") if maj.get(k) is not None else "—"}
            for k, v in figures["metrics"].items()]


def confusion_table(figures: dict) -> pd.DataFrame:
    """The confusion matrix as a table: rows true class, columns predicted class."""
    classes = figures["classes"]
    return pd.DataFrame([{"true \\ predicted": name, **dict(zip(classes, map(int, row)))}
                         for name, row in zip(classes, figures["confusion"])])


def per_class_table(figures: dict) -> pd.DataFrame:
    return pd.DataFrame([{"class": name, "n": v["n"], "ROC-AUC (vs rest)": v["roc_auc"],
                          "PR-AUC (vs rest)": v["pr_auc"], "recall": v["recall"],
                          "precision": v["precision"]}
                         for name, v in figures["per_class"].items()])


def counts_text(c: dict) -> str:
    return f"{c['n']} (" + " / ".join(f"{v} {k}" for k, v in c.items() if k != "n") + ")"


def majority_text(figures: dict) -> str:
    return f"always {figures['majority']['class_name']}"


def _metric_table(title: str, figures: dict) -> Table:
    t = Table(title=title)
    for c in ("metric", "value", "95% CI", "majority class"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for r in metric_rows(figures):
        t.add_row(r["metric"], _num(r["value"]), r["95% CI"],
                  r["majority class"] if isinstance(r["majority class"], str)
                  else _num(r["majority class"]))
    return t


def _confusion_lines(figures: dict) -> list[str]:
    classes = figures["classes"]
    return ["confusion matrix (rows true, columns predicted: " + ", ".join(classes) + "):"] + [
        f"  {name}: " + " ".join(str(int(v)) for v in row)
        for name, row in zip(classes, figures["confusion"])]


# ------------------------------------------------------------------------------ validation


def print_validation(res: MultiClassValidation) -> None:
    site, bundle = res.site, res.site.bundle
    label = site.scope["validation"]
    console.print(f"[bold]{label} validation[/] of {site.model} ({bundle.meta.get('kind')}, "
                  f"target {bundle.target.name}) on {site.source}: "
                  f"{counts_text(res.class_counts())} participants")
    say(site.scope["note"])
    say(f"decision rule: {res.figures['rule_text']}")
    console.print(_metric_table(f"{label} validation, {len(res.classes)} classes (95% "
                                f"bootstrap CIs; majority class = {majority_text(res.figures)})",
                                res.figures))
    for line in _confusion_lines(res.figures):
        say(line)
    print_weights(res.modality_weights)


def _figure_lines(figures: dict) -> list[str]:
    lines = [f"- decision rule: {figures['rule_text']}",
             f"- metrics (95% bootstrap CI; majority class = {majority_text(figures)}):"]
    for r in metric_rows(figures):
        maj = r["majority class"]
        lines.append(f"  - {r['metric']}: {_num(r['value'])} (95% CI {r['95% CI']}; majority "
                     f"{maj if isinstance(maj, str) else _num(maj)})")
    lines.append("- per class (one vs rest): " + "; ".join(
        f"{name}: n {v['n']}, ROC-AUC {_num(v['roc_auc'])}, recall {_num(v['recall'])}"
        for name, v in figures["per_class"].items()))
    lines.append("- confusion matrix (rows true, columns predicted "
                 + " / ".join(figures["classes"]) + "): "
                 + "; ".join(f"{name}: " + " ".join(str(int(v)) for v in row)
                             for name, row in zip(figures["classes"], figures["confusion"])))
    return lines


def validation_card(res: MultiClassValidation) -> str:
    """The bundle's model card followed by a "Validation at ..." section (K classes)."""
    site, bundle = res.site, res.site.bundle
    lines = [
        *validation_card_head(site),
        f"- target {bundle.target.name}: classes {', '.join(res.classes)}"
        f"{' (ordered)' if bundle.target.ordered else ''}; participants "
        f"{counts_text(res.class_counts())}",
        *([f"- {h}"] if (h := harmonisation_text(site.harmonisation)) else []),
        *_figure_lines(res.figures),
    ]
    return card_with(site.model, bundle, lines)


def write_validation_card(out: Path, res: MultiClassValidation) -> Path:
    return write_card(out, validation_card(res))


def _figures_section(rep, figures: dict, out: Path, stem: str, what: str) -> None:
    from safn_core import plots

    plots.confusion_matrices(figures["confusion"], figures["classes"],
                             out / f"{stem}confusion.png", what)
    rep.table(pd.DataFrame(metric_rows(figures)),
              f"majority class: {majority_text(figures)}; decision rule: {figures['rule_text']}")
    rep.table(confusion_table(figures), "confusion matrix (counts): rows true class, columns "
                                        "predicted class")
    rep.figure(out / f"{stem}confusion.png", "confusion matrix: counts and row-normalised")
    rep.table(per_class_table(figures), "per class, one vs rest")


def write_validation_report(out: Path, res: MultiClassValidation) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    site, bundle = res.site, res.site.bundle
    label = site.scope["validation"]
    rep = Report(f"safn-validate: {label} validation",
                 f"model {site.model} on {site.source}; target {bundle.target.name} "
                 f"({len(res.classes)} classes)")
    scope_section(rep, site.scope)
    rep.heading("Data")
    rep.table({"participants": len(res.y), **{k: v for k, v in res.class_counts().items()
                                              if k != "n"}})
    rep.heading("Metrics (95% bootstrap CI) beside the majority class")
    _figures_section(rep, res.figures, out, "", f"{label} validation")
    plots.ovr_roc_curves(res.y, res.p, res.classes, out / "roc_ovr.png")
    rep.figure(out / "roc_ovr.png", "one-vs-rest ROC curve of each class")
    return finish_report(rep, out, res.modality_weights, "this population",
                         out / "model_card.md", "Model card (the bundle's, with this validation)")


# ------------------------------------------------------------------------------ recalibration


def map_line(record: dict) -> str:
    cmap = MultiClassMap.from_dict(record["map"])
    rule = ("argmax" if record.get("cutpoints") is None else "ordinal cut points "
            + ", ".join(f"{c:.3f}" for c in record["cutpoints"]) + " refitted on its "
            "calibrated probabilities")
    return (f"{cmap.describe()} fitted on the recalibration part's K logits by minimising the "
            f"multi-class log loss; decision rule {rule}")


def parts_line(record: dict) -> str:
    return (f"recalibration part {counts_text(record['recalibration_part'])}, evaluation part "
            f"{counts_text(record['evaluation_part'])}; fraction {record['fraction']:g}, split "
            f"seed {record['split_seed']}, by participant, stratified by class")


def before_after_rows(res: MultiClassRecalibration) -> list[dict]:
    b, a, maj = res.before["metrics"], res.after["metrics"], res.majority
    return [{"metric": k, "before": b[k]["value"], "before CI": _ci_text(b[k]),
             "after": a[k]["value"] if k in a else None,
             "after CI": _ci_text(a[k]) if k in a else "—",
             "majority class": maj.get(k) if maj.get(k) is not None else "—"} for k in b]


def print_recalibration(res: MultiClassRecalibration) -> None:
    record = res.record
    print_recalibration_head(res, f"target {res.site.bundle.target.name}",
                             (parts_line(record), map_line(record), replaces_line(record)))
    console.print(before_after_table(
        f"evaluation part only ({record['evaluation_part']['n']} participants; 95% bootstrap "
        f"CIs): before = the bundle as it is, after = {record['method']} map; majority class = "
        f"{majority_text(res.after)}", before_after_rows(res), _num))


def recalibration_card(res: MultiClassRecalibration) -> str:
    """The site bundle's model card: the bundle's card and a "Recalibration at <site>"
    section."""
    site, record = res.site, res.record
    lines = [
        *recalibration_card_head(record, ""),
        f"- {map_line(record)}",
        f"- {parts_line(record)}; the figures below are on the evaluation part only",
        *([f"- {replaces_line(record)}"] if record.get("replaces") else []),
        f"- validation scope: {site.scope['note']}",
        "- metrics on the evaluation part, before → after (95% bootstrap CI):",
    ]
    for r in before_after_rows(res):
        lines.append(f"  - {r['metric']}: {_num(r['before'])} ({r['before CI']}) → "
                     f"{_num(r['after'])} ({r['after CI']})")
    lines += ["- after recalibration:", *("  " + x for x in _figure_lines(res.after))]
    return card_with(site.model, site.bundle, lines)


def write_recalibration_report(out: Path, res: MultiClassRecalibration) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    site, record = res.site, res.record
    classes = site.bundle.label_names
    y_ev = res.y[res.evaluated]
    rep = Report(f"safn-validate: recalibration at {record['site']}",
                 f"model {site.model} on {site.source}; target {site.bundle.target.name}")
    scope_section(rep, site.scope)
    recalibration_section(rep, record, parts_line(record), map_line(record))
    rep.heading("Before and after, on the evaluation part (95% bootstrap CI)")
    rep.table(pd.DataFrame(before_after_rows(res)),
              f"majority class: {majority_text(res.after)} (the recalibration part's majority)")
    for when, fig in (("before", res.before), ("after", res.after)):
        rep.heading(f"{when.capitalize()} recalibration")
        _figures_section(rep, fig, out, f"{when}_", f"{when} recalibration")
    plots.ovr_roc_curves(y_ev, res.p_before, classes, out / "roc_ovr.png",
                         "One-vs-rest ROC, before (solid) and after (dashed)", res.p_after,
                         "after")
    rep.figure(out / "roc_ovr.png", "one-vs-rest ROC curves (a temperature keeps them)")
    return finish_report(rep, out, res.modality_weights, "the evaluation part",
                         out / "site_bundle" / "model_card.md", "Model card of the site bundle")
