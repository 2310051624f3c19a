"""What ``safn-validate`` shows and writes of a `safn_core.validation` result, in words: the
console lines, the model cards (the bundle's card plus a section on this validation, or on a
recalibration) and ``report.html``. The records themselves carry values and codes; the
sentences are made here."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.table import Table

from safn_core.cli.common import console, write_atomic
from safn_core.metrics import METRICS, calibration_text
from safn_core.recalibration import CalibrationMap
from safn_core.validation import Recalibration, Validation


def threshold_source(bundle) -> str:
    """Where the bundle's decision threshold comes from, for titles and cards."""
    rec, trained = bundle.meta.get("recalibration"), bundle.meta.get("calibration")
    if rec:
        return f"from recalibration at {rec['site']} ({rec['method']} map applied)"
    if trained and trained.get("fitted"):
        t = trained["map"]["params"]["temperature"]
        return f"from training (temperature T = {t:.3f} from its validation split applied)"
    return "from training"


def harmonisation_line(info: dict) -> str | None:
    """The console line of a validation's harmonisation; None where none was applied."""
    if not info.get("applied"):
        return None
    sites = info["sites"]
    where = ("the data has no site column, so all its participants are one site, adjusted "
             f"from its {sum(sites.values())} participants" if info["sites_from"] == "whole_table"
             else "each site adjusted from its own participants: " + ", ".join(
                 f"{s} from {n}" for s, n in sites.items()))
    return (f"harmonisation: the bundle's ComBat fit ({info['n_features']} MRI features, "
            f"{info['adjustment']} adjustment) applied before the model; {where}; no labels used")


def harmonisation_text(info: dict | None) -> str | None:
    """The model card line of a validation's harmonisation; None where none was applied."""
    if not info or not info.get("applied"):
        return None
    return (f"MRI features harmonised first with the bundle's ComBat fit ({info['fit_id']}): "
            "each site adjusted from its own participants here, without labels ("
            + ", ".join(f"{s}: {n}" for s, n in info["sites"].items()) + ")")


def scope_rows(scope: dict) -> dict:
    none = "none recorded"
    return {"validation": scope["validation"],
            "validated sites": ", ".join(scope["validated_sites"] or []) or "unknown",
            "matched by": scope["by"],
            "training sites": ", ".join(scope["training_sites"]) or none,
            "held-out sites": ", ".join(scope["held_out_sites"]) or "none"}


def _bundle_card(model_path: Path, bundle) -> str:
    from safn_core.modelcard import model_card

    card = Path(model_path) / "model_card.md"
    return card.read_text() if card.is_file() else model_card(bundle.meta, bundle.config)


def _ci(m: dict) -> str:
    return f"{m['ci'][0]:.3f} – {m['ci'][1]:.3f}"


# ----------------------------------------------------------------- shared with K classes
# (`safn_core.cli.validate_outputs_multiclass` and the console of `safn_core.cli.validate`)


def say(line: str) -> None:
    """A console line as it is: no rich markup, no highlighting."""
    console.print(line, markup=False, highlight=False)


def print_weights(weights: dict) -> None:
    console.print("modality weights on this population: " + ", ".join(
        f"{m} {w:.2f}" for m, w in weights.items()))


def print_recalibration_head(res, what: str, lines) -> None:
    """The first console lines of a recalibration: who, where, ``what`` model, the scope's
    note, then each of ``lines`` that is not None."""
    site, record = res.site, res.record
    console.print(f"[bold]{site.scope['validation']} validation with recalibration[/] of "
                  f"{site.model} ({what}) at {record['site']} on "
                  f"{site.source}: {len(res.y)} participants")
    say(site.scope["note"])
    for line in lines:
        if line:
            say(line)


def before_after_table(title: str, rows: list[dict], num) -> Table:
    """The console table of `before_after_rows`: strings as they are, numbers by ``num``."""
    t = Table(title=title)
    for c in rows[0]:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for r in rows:
        t.add_row(*(v if isinstance(v, str) else num(v) for v in r.values()))
    return t


def validation_card_head(site) -> list[str]:
    """The first lines of a card's "Validation at ..." section: scope and its note."""
    scope = site.scope
    return ["", f"## Validation at {site.source}", "",
            f"- **{scope['validation']} validation** ({datetime.now():%Y-%m-%d}, safn-validate)",
            f"- {scope['note']}",
            *(f"- {k}: {v}" for k, v in scope_rows(scope).items() if k != "validation")]


def recalibration_card_head(record: dict, applies: str) -> list[str]:
    """The first lines of a site bundle card's "Recalibration at <site>" section; ``applies``:
    what the bundle applies besides the map."""
    return ["", f"## Recalibration at {record['site']}", "",
            f"- **recalibrated at {record['site']}** ({record['date'][:10]}, safn-validate "
            f"--recalibrate) on {record['data']}; weights and preprocessing unchanged from "
            f"{record['source_bundle']}. This bundle applies the map below to every "
            f"prediction{applies}: its figures hold for this site's population, not for the "
            "training sites'"]


def card_with(model_path: Path, bundle, lines: list[str]) -> str:
    """The bundle's model card followed by ``lines``."""
    text = _bundle_card(model_path, bundle)
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def write_card(out: Path, text: str) -> Path:
    """``model_card.md`` in the output folder (never in the bundle folder)."""
    write_atomic(out / "model_card.md", text)
    return out / "model_card.md"


def scope_section(rep, scope: dict) -> None:
    """The report's first section: the validation's scope."""
    rep.heading(f"{scope['validation'].capitalize()} validation")
    rep.text(scope["note"])
    rep.table(scope_rows(scope))


def recalibration_section(rep, record: dict, parts: str, map_text: str) -> None:
    rep.heading(f"Recalibration at {record['site']}")
    rep.text(parts)
    rep.text(map_text)
    if record.get("replaces"):
        rep.text(replaces_line(record), note=True)


def finish_report(rep, out: Path, weights: dict, population: str, card: Path,
                  card_heading: str) -> Path:
    """The report's last sections (the modality weights on ``population``, then the model
    card at ``card`` where there is one) and ``report.html`` written."""
    rep.heading(f"Modality weights on {population}")
    rep.table(weights)
    if card.is_file():
        rep.heading(card_heading)
        rep.code(card.read_text())
    return rep.write(out / "report.html")


# ------------------------------------------------------------------------------ validation


def validation_card(res: Validation) -> str:
    """The bundle's model card (its text, or one made from its metadata when the file is
    missing) followed by a "Validation at ..." section on this evaluation."""
    site, bundle = res.site, res.site.bundle
    y, n_pos = res.y, res.n_positive
    neg, pos = bundle.label_names
    lines = [
        *validation_card_head(site),
        f"- participants: {len(y)} ({n_pos} {pos}, {len(y) - n_pos} {neg}); decision threshold "
        f"{bundle.threshold:.3f} {threshold_source(bundle)}",
        *([f"- {h}"] if (h := harmonisation_text(site.harmonisation)) else []),
        "- metrics (95% bootstrap CI):",
    ]
    for k, v in res.figures["metrics"].items():
        lines.append(f"  - {k}: {v['value']:.3f} (95% CI {v['ci'][0]:.3f}–{v['ci'][1]:.3f})")
    lines.append(f"- calibration: {calibration_text(res.figures['calibration'])}")
    return card_with(site.model, bundle, lines)


def write_validation_card(out: Path, res: Validation) -> Path:
    """``model_card.md`` in the output folder (never in the bundle folder)."""
    return write_card(out, validation_card(res))


def write_validation_report(out: Path, res: Validation) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    site, bundle = res.site, res.site.bundle
    preds = pd.DataFrame({"model": "SAFN", "y": res.y, "p": res.p})
    label = site.scope["validation"]
    plots.roc_pr_curves(preds, ["SAFN"], out / "roc_pr.png", f"{label} validation")
    plots.reliability(res.figures["calibration"], out / "calibration.png")
    n, n_pos = len(res.y), res.n_positive
    rep = Report(f"safn-validate: {label} validation", f"model {site.model} on {site.source}")
    scope_section(rep, site.scope)
    rep.heading("Data")
    rep.table({"participants": n, bundle.label_names[1]: n_pos,
               bundle.label_names[0]: n - n_pos,
               "majority-class accuracy": max(n_pos, n - n_pos) / n})
    rep.heading("Metrics (95% bootstrap CI)")
    rep.table(pd.DataFrame([{"metric": k, "value": v["value"], "CI low": v["ci"][0],
                             "CI high": v["ci"][1]} for k, v in res.figures["metrics"].items()]))
    rep.figure(out / "roc_pr.png", "ROC and PR curves")
    rep.heading("Calibration")
    rep.text(calibration_text(res.figures["calibration"]))
    rep.figure(out / "calibration.png", "reliability curve")
    return finish_report(rep, out, res.modality_weights, "this population",
                         out / "model_card.md", "Model card (the bundle's, with this validation)")


# ------------------------------------------------------------------------------ recalibration


def before_after_rows(res: Recalibration) -> list[dict]:
    b, a, maj = res.before["metrics"], res.after["metrics"], res.majority["metrics"]
    return [{"metric": k, "before": b[k]["value"], "before CI": _ci(b[k]),
             "after": a[k]["value"], "after CI": _ci(a[k]), "majority class": maj[k]}
            for k in METRICS]


def parts_line(record: dict, names) -> str:
    r, e = record["recalibration_part"], record["evaluation_part"]
    neg, pos = names
    return (f"recalibration part {r['n']} ({r[pos]} {pos} / {r[neg]} {neg}), evaluation part "
            f"{e['n']} ({e[pos]} {pos} / {e[neg]} {neg}); fraction "
            f"{record['fraction']:g}, split seed {record['split_seed']}, by participant, "
            "stratified by class")


def map_line(record: dict) -> str:
    cmap = CalibrationMap.from_dict(record["map"])
    line = (f"{cmap.describe()} fitted on the recalibration part's logits; threshold "
            f"{record['threshold']:.3f} (maximum balanced accuracy on its calibrated scores; "
            f"was {record['threshold_before']:.3f})")
    if cmap.method == "platt" and cmap.params["b"] <= 0:
        line += ("; the slope b ≤ 0: at this site the model's scores run against (or carry "
                 "nothing about) the labels")
    return line


def replaces_line(record: dict) -> str | None:
    old = record.get("replaces")
    if not old:
        return None
    if old.get("fitted_at") == "training":
        t = old["map"]["params"]["temperature"]
        what = (f"a temperature T = {t:.3f} fitted at training on its validation split"
                if old.get("fitted") else "no fitted temperature (T = 1 from training)")
        return (f"the bundle carried {what}: refitted from the model's own logits, this map "
                "and threshold replace it (they are not stacked on it); 'before' is the "
                "bundle with its training temperature and threshold")
    return (f"the bundle was already recalibrated at {old['site']} ({old['date'][:10]}, "
            f"{old['method']}): refitted from the model's own logits, this map and threshold "
            "replace that one (they are not stacked on it); 'before' is the bundle with its "
            "old map and threshold")


def recalibration_card(res: Recalibration) -> str:
    """The site bundle's model card: the bundle's card followed by a "Recalibration at <site>"
    section (what was fitted, on whom, and the before/after figures on the evaluation part)."""
    site, record = res.site, res.record
    lines = [
        *recalibration_card_head(record, " and uses the new threshold"),
        f"- {map_line(record)}",
        f"- {parts_line(record, site.bundle.label_names)}; the figures below are on the "
        "evaluation part only, never used to recalibrate",
        *([f"- {replaces_line(record)}"] if record.get("replaces") else []),
        *([f"- {h}"] if (h := harmonisation_text(site.harmonisation)) else []),
        f"- validation scope: {site.scope['note']}",
        "- metrics on the evaluation part, before → after (95% bootstrap CI):",
    ]
    b, a = res.before["metrics"], res.after["metrics"]
    for k in METRICS:
        lines.append(f"  - {k}: {b[k]['value']:.3f} ({_ci(b[k])}) → {a[k]['value']:.3f} "
                     f"({_ci(a[k])})")
    lines += [f"- calibration before: {calibration_text(res.before['calibration'])}",
              f"- calibration after: {calibration_text(res.after['calibration'])}"]
    return card_with(site.model, site.bundle, lines)


def write_recalibration_report(out: Path, res: Recalibration) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    site, record = res.site, res.record
    y_ev = res.y[res.evaluated]
    preds = pd.concat([pd.DataFrame({"model": "before", "y": y_ev, "p": res.p_before}),
                       pd.DataFrame({"model": "after", "y": y_ev, "p": res.p_after})])
    plots.roc_pr_curves(preds, ["before", "after"], out / "roc_pr.png",
                        "evaluation part, before and after recalibration")
    for when, fig in (("before", res.before), ("after", res.after)):
        plots.reliability(fig["calibration"], out / f"calibration_{when}.png",
                          f"{when} recalibration")
    rep = Report(f"safn-validate: recalibration at {record['site']}",
                 f"model {site.model} on {site.source}")
    scope_section(rep, site.scope)
    recalibration_section(rep, record, parts_line(record, site.bundle.label_names),
                          map_line(record))
    rep.heading("Before and after, on the evaluation part (95% bootstrap CI)")
    rep.text(f"before: the bundle as it is (threshold {record['threshold_before']:.3f}); after: "
             f"{record['method']} map and threshold {record['threshold']:.3f}; majority class: "
             f"always {res.majority['class']} (the recalibration part's majority)")
    rep.table(pd.DataFrame(before_after_rows(res)))
    rep.figure(out / "roc_pr.png", "ROC and PR curves (a map with T > 0, or b > 0, keeps "
                                   "the ranking: the curves coincide)")
    rep.heading("Calibration")
    for when, fig in (("before", res.before), ("after", res.after)):
        rep.text(f"{when}: {calibration_text(fig['calibration'])}")
        rep.figure(out / f"calibration_{when}.png", f"reliability curve {when} recalibration")
    return finish_report(rep, out, res.modality_weights, "the evaluation part",
                         out / "site_bundle" / "model_card.md", "Model card of the site bundle")
