"""``safn-validate``: evaluate a finished model bundle on one site's own data, offline.

No server, no network: the site loads its data with the bundle's data settings, runs the same
data contract as training, applies the bundle's preprocessing (never refitted on the site's data),
and reports the full metric set with bootstrap 95 % CIs, calibration and the modality weights on
its population.

Every output says whether the evaluation is **internal** (the data's site trained the model),
**external** (it did not), **mixed** (some of the data's sites did) or **unknown** (the sites
cannot be told apart), by matching site names against the training sites the bundle records
(`safn_core.validation_scope`). The bundle folder itself is never written to: the output folder
gets its own ``model_card.md``, the bundle's card plus a section on this validation.

``--recalibrate`` (`safn_core.recalibration`) splits the site's participants into a
recalibration part and an evaluation part, fits a calibration map and a new decision threshold
on the first only, reports before/after figures on the second only, and writes a **site
bundle** (``<out>/site_bundle/``: the same weights and preprocessing, the map and threshold in
its ``bundle.json``, a model card saying where it was recalibrated). Every evaluation predicts
through `Bundle.predict`, so a site bundle is validated with its map and threshold. A bundle
from safn-train may carry a temperature fitted at training on its validation split
(``calibration``); plain validation applies it, and ``--recalibrate`` refits from the model's
own logits, so the site's map replaces it (the record keeps it under ``replaces``).

A bundle whose model takes ComBat-harmonised MRI features (``harmonisation.json``) harmonises
the data first: each site of the data adjusts itself from its own participants with the
bundle's fit, without labels (a table without a site column is one site), also with
``--recalibrate`` (both parts, before the split's fits). ``validation.json`` records it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from safn_core.cli.common import (base_parser, console, entry, fresh_output_dir, write_atomic,
                                  write_json)
from safn_core.config import load_config
from safn_core.data.cohort import LABEL, SITE, Cohort
from safn_core.data.contract import check_cohort
from safn_core.errors import DataError, SafnError
from safn_core.metrics import (METRICS, binary_metrics, bootstrap_ci, calibration,
                               calibration_text, choose_threshold)
from safn_core.recalibration import METHODS, check_parts, counts, fit_map, split_participants
from safn_core.validation_scope import is_no_site, validation_scope


def align_to_bundle(cohort: Cohort, features: list[str], source: str,
                    harmonised: tuple[str, ...] = ()) -> pd.DataFrame:
    """The cohort's table with exactly the bundle's feature columns (and, for a harmonising
    bundle, the site and every column its harmonisation needs), or a clear error."""
    needed = list(dict.fromkeys([*features, *harmonised]))
    missing = [f for f in needed if f not in cohort.table.columns]
    if missing:
        raise DataError(f"{source}: the data lacks {len(missing)} feature(s) the model was trained "
                        f"on (e.g. {', '.join(missing[:5])}); load it with the same modalities "
                        "and column names as the training data")
    site = [SITE] if harmonised and SITE in cohort.table.columns else []
    return cohort.table[[LABEL, *site] + needed]


def harmonise_sites_of(bundle, table: pd.DataFrame, min_cell: int) -> tuple[dict | None, dict]:
    """A harmonising bundle's adjustment of every site of ``table`` from its own participants
    (no labels), printed as one line; and what ``validation.json`` records of it."""
    record = bundle.harmonisation
    if record is None:
        return None, {"applied": False}
    adjustments = bundle.adjust(table, min_cell=min_cell)
    sites = {s: int(a.n) for s, a in adjustments.items()}
    one = SITE not in table.columns or set(sites) == {"all"}
    where = ("the data has no site column, so all its participants are one site, adjusted "
             f"from its {sum(sites.values())} participants" if one else
             "each site adjusted from its own participants: " + ", ".join(
                 f"{s} from {n}" for s, n in sites.items()))
    console.print(f"harmonisation: the bundle's ComBat fit ({len(record.spec.features)} MRI "
                  f"features, {record.adjustment_method} adjustment) applied before the model; "
                  f"{where}; no labels used", markup=False, highlight=False)
    return adjustments, {
        "applied": True, "method": record.method, "fit_id": record.fit.fit_id,
        "fitted_on": record.fitted_on, "n_features": len(record.spec.features),
        "adjustment": record.adjustment_method,
        "estimated_from": "each site's own participants in this data (complete cases), "
                          "without labels", "sites": sites}


def harmonisation_text(info: dict | None) -> str | None:
    """The model card line of a validation's harmonisation; None where none was applied."""
    if not info or not info.get("applied"):
        return None
    return (f"MRI features harmonised first with the bundle's ComBat fit ({info['fit_id']}): "
            "each site adjusted from its own participants here, without labels ("
            + ", ".join(f"{s}: {n}" for s, n in info["sites"].items()) + ")")


def _validated_sites(args, site_cfg, bundle, cohort: Cohort) -> tuple[list[str] | None, bool]:
    """The names the evaluated data goes by, and whether it is the site file's name: a
    federated bundle validated with --site knows the site by its site.yaml name; otherwise the
    data's site column values (None without one)."""
    if args.site and site_cfg.site is not None and bundle.meta.get("kind") == "federated":
        return [site_cfg.site.name], True
    values = sorted(str(v) for v in set(cohort.sites) if not is_no_site(v))
    return values or None, False


def figures(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000,
            seed: int = 0) -> dict:
    """Every reported figure for labels ``y`` and scores ``p`` at ``threshold``: the metrics
    with bootstrap 95 % CIs, and calibration."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed)
    return {"metrics": {k: {"value": point[k], "ci": list(ci[k])} for k in METRICS},
            "calibration": calibration(y, p), "threshold": float(threshold)}


def _modality_weights(bundle, alpha: np.ndarray) -> dict:
    mods = [m.name for m in bundle.preprocessor.modalities]
    return {m: float(a) for m, a in zip(mods, alpha.mean(0))}


def evaluate(bundle, table: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
             adjustments: dict | None = None) -> dict:
    """Predictions (through the bundle's harmonisation, with ``adjustments`` or each site's
    own, and calibration map, where it has them) and every reported figure for one
    evaluation set."""
    arrays = bundle.arrays(table, adjustments=adjustments)
    p, alpha = bundle.predict(arrays)
    y = arrays.y
    return {"y": y, "p": p, **figures(y, p, bundle.threshold, n_boot, seed),
            "modality_weights": _modality_weights(bundle, alpha)}


def threshold_source(bundle) -> str:
    """Where the bundle's decision threshold comes from, for titles and cards."""
    rec, trained = bundle.meta.get("recalibration"), bundle.meta.get("calibration")
    if rec:
        return f"from recalibration at {rec['site']} ({rec['method']} map applied)"
    if trained and trained.get("fitted"):
        t = trained["map"]["params"]["temperature"]
        return f"from training (temperature T = {t:.3f} from its validation split applied)"
    return "from training"


def run(argv: list[str] | None = None) -> int:
    parser = base_parser(
        "safn-validate",
        "Evaluate a model bundle (from safn-train, safn-sim or safn-server) on a site's own "
        "data, with no server and no network.")
    parser.add_argument("--model", metavar="BUNDLE", type=Path, required=True,
                        help="the bundle folder (a run's model/)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="PATH", type=Path,
                     help="a PPMI download folder or a CSV/Parquet table (with --mapping)")
    src.add_argument("--site", metavar="SITE.yaml", type=Path,
                     help="a site configuration; its data section says where the data is")
    parser.add_argument("--mapping", metavar="YAML", type=Path, help="column mapping of a table")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    recal = parser.add_argument_group(
        "recalibration", "refit the calibration map and decision threshold on part of the "
        "site's participants, report before/after on the rest, write <out>/site_bundle")
    recal.add_argument("--recalibrate", action="store_true",
                       help="recalibrate the bundle at this site (see above)")
    recal.add_argument("--calibration", choices=METHODS,
                       help="the calibration map: temperature (one T, keeps rankings; default) "
                            "or platt (a + b·logit)")
    recal.add_argument("--recalibration-fraction", type=float, metavar="F",
                       help="share of the site's participants (per class) that recalibrate; "
                            "the others are evaluated (default 0.5)")
    recal.add_argument("--split-seed", type=int, metavar="N",
                       help="seed of the participant split (default 0)")
    args = parser.parse_args(argv)
    _check_recalibration_options(args)

    from safn_core.bundle import load_bundle
    from safn_core.data.sources import load_path

    bundle = load_bundle(args.model)
    site_cfg = load_config(args.site if args.site else args.config, args.overrides)
    data_cfg = bundle.config.data.model_copy()
    # the site's own location of its data; how it is read (motor exclusion, eTIV) is the model's
    if args.site:
        if site_cfg.data.path is None:
            raise SafnError(f"{args.site}: data.path is not set; say where the site's data is")
        path, mapping = Path(site_cfg.data.path), site_cfg.data.mapping
    else:
        path, mapping = args.data, args.mapping or site_cfg.data.mapping
    data_cfg = data_cfg.model_copy(update={"mapping": mapping, "path": path,
                                           "min_cell": site_cfg.data.min_cell})
    out = fresh_output_dir(args.out or Path("runs") / f"validate-{datetime.now():%Y%m%d-%H%M%S}")

    cohort = load_path(path, data_cfg)
    check_cohort(cohort, data_cfg.min_cell).raise_if_failed("run safn-check for the full report")
    table = align_to_bundle(cohort, bundle.preprocessor.features, cohort.report.source,
                            bundle.harmonisation.columns if bundle.harmonisation else ())
    trained_on = bundle.config.data.path
    validated, by_site_file = _validated_sites(args, site_cfg, bundle, cohort)
    scope = validation_scope(
        bundle, validated, by_site_file=by_site_file,
        same_data=trained_on is not None and Path(trained_on).resolve() == Path(path).resolve())
    adjustments, harmonised = harmonise_sites_of(bundle, table, data_cfg.min_cell)
    if args.recalibrate:
        site = (site_cfg.site.name if args.site and site_cfg.site is not None
                else ", ".join(validated or []) or cohort.report.source)
        return run_recalibration(args, bundle, cohort, table, scope, out, site=site,
                                 min_cell=data_cfg.min_cell, adjustments=adjustments,
                                 harmonised=harmonised)
    res = evaluate(bundle, table, n_boot=args.bootstrap, adjustments=adjustments)
    res["scope"], res["harmonisation"] = scope, harmonised
    label = scope["validation"]

    n_pos = int(res["y"].sum())
    console.print(f"[bold]{label} validation[/] of {args.model} ({bundle.meta.get('kind')}) on "
                  f"{cohort.report.source}: {len(table)} participants, {n_pos} "
                  f"{bundle.label_names[1]} / {len(table) - n_pos} {bundle.label_names[0]}")
    console.print(scope["note"], markup=False, highlight=False)
    t = Table(title=f"{label} validation (threshold {bundle.threshold:.3f} "
                    f"{threshold_source(bundle)}; 95% bootstrap CIs)")
    for c in ("metric", "value", "95% CI"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k, v in res["metrics"].items():
        t.add_row(k, f"{v['value']:.3f}", f"{v['ci'][0]:.3f} – {v['ci'][1]:.3f}")
    console.print(t)
    cal = res["calibration"]
    console.print(f"calibration: {calibration_text(cal)}", markup=False, highlight=False)
    console.print("modality weights on this population: " + ", ".join(
        f"{m} {w:.2f}" for m, w in res["modality_weights"].items()))

    write_json(out / "validation.json", {
        "validation": label, "validation_note": scope["note"],
        "training_sites": scope["training_sites"], "held_out_sites": scope["held_out_sites"],
        "validated_sites": scope["validated_sites"], "sites_matched_by": scope["by"],
        "model": str(args.model), "data": cohort.report.source, "n": len(table),
        "positive": n_pos, "threshold": bundle.threshold, "metrics": res["metrics"],
        "calibration": cal, "modality_weights": res["modality_weights"],
        "majority_accuracy": max(n_pos, len(table) - n_pos) / len(table),
        "recalibration": bundle.meta.get("recalibration"),
        "training_calibration": bundle.meta.get("calibration"), "harmonisation": harmonised,
    })
    pd.DataFrame({"participant_id": table.index, "y": res["y"], "p": res["p"]}).to_csv(
        out / "predictions.csv", index=False)
    write_validation_card(out, args.model, bundle, cohort, res)  # the report embeds it
    write_validation_report(out, args.model, bundle, cohort, res)
    console.print(f"written to {out}; report: {out / 'report.html'}")
    return 0


def write_validation_report(out: Path, model_path: Path, bundle, cohort, res) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    preds = pd.DataFrame({"model": "SAFN", "y": res["y"], "p": res["p"]})
    label = res["scope"]["validation"]
    plots.roc_pr_curves(preds, ["SAFN"], out / "roc_pr.png", f"{label} validation")
    plots.reliability(res["calibration"], out / "calibration.png")
    n_pos = int(res["y"].sum())
    rep = Report(f"safn-validate: {label} validation",
                 f"model {model_path} on {cohort.report.source}")
    rep.heading(f"{label.capitalize()} validation")
    rep.text(res["scope"]["note"])
    rep.table(_scope_rows(res["scope"]))
    rep.heading("Data")
    rep.table({"participants": len(res["y"]), bundle.label_names[1]: n_pos,
               bundle.label_names[0]: len(res["y"]) - n_pos,
               "majority-class accuracy": max(n_pos, len(res["y"]) - n_pos) / len(res["y"])})
    rep.heading("Metrics (95% bootstrap CI)")
    rep.table(pd.DataFrame([{"metric": k, "value": v["value"], "CI low": v["ci"][0],
                             "CI high": v["ci"][1]} for k, v in res["metrics"].items()]))
    rep.figure(out / "roc_pr.png", "ROC and PR curves")
    rep.heading("Calibration")
    rep.text(calibration_text(res["calibration"]))
    rep.figure(out / "calibration.png", "reliability curve")
    rep.heading("Modality weights on this population")
    rep.table(res["modality_weights"])
    card = out / "model_card.md"
    if card.is_file():
        rep.heading("Model card (the bundle's, with this validation)")
        rep.code(card.read_text())
    return rep.write(out / "report.html")


def _scope_rows(scope: dict) -> dict:
    none = "none recorded"
    return {"validation": scope["validation"],
            "validated sites": ", ".join(scope["validated_sites"] or []) or "unknown",
            "matched by": scope["by"],
            "training sites": ", ".join(scope["training_sites"]) or none,
            "held-out sites": ", ".join(scope["held_out_sites"]) or "none"}


def validation_card(model_path: Path, bundle, cohort, res) -> str:
    """The bundle's model card (its text, or one made from its metadata when the file is
    missing) followed by a "Validation at ..." section on this evaluation."""
    from safn_core.modelcard import model_card

    card = Path(model_path) / "model_card.md"
    text = card.read_text() if card.is_file() else model_card(bundle.meta, bundle.config)
    scope, y = res["scope"], res["y"]
    n_pos = int(y.sum())
    neg, pos = bundle.label_names
    lines = [
        "", f"## Validation at {cohort.report.source}", "",
        f"- **{scope['validation']} validation** ({datetime.now():%Y-%m-%d}, safn-validate)",
        f"- {scope['note']}",
        *(f"- {k}: {v}" for k, v in _scope_rows(scope).items() if k != "validation"),
        f"- participants: {len(y)} ({n_pos} {pos}, {len(y) - n_pos} {neg}); decision threshold "
        f"{bundle.threshold:.3f} {threshold_source(bundle)}",
        *([f"- {h}"] if (h := harmonisation_text(res.get("harmonisation"))) else []),
        "- metrics (95% bootstrap CI):",
    ]
    for k, v in res["metrics"].items():
        lines.append(f"  - {k}: {v['value']:.3f} (95% CI {v['ci'][0]:.3f}–{v['ci'][1]:.3f})")
    lines.append(f"- calibration: {calibration_text(res['calibration'])}")
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def write_validation_card(out: Path, model_path: Path, bundle, cohort, res) -> Path:
    """``model_card.md`` in the output folder (never in the bundle folder)."""
    write_atomic(out / "model_card.md", validation_card(model_path, bundle, cohort, res))
    return out / "model_card.md"

# ------------------------------------------------------------------------------ recalibration

RECAL_DEFAULTS = {"calibration": "temperature", "recalibration_fraction": 0.5, "split_seed": 0}


def _check_recalibration_options(args) -> None:
    """--calibration, --recalibration-fraction and --split-seed only with --recalibrate; the
    fraction strictly between 0 and 1. Checked before any folder is made."""
    given = [k for k in RECAL_DEFAULTS if getattr(args, k) is not None]
    if given and not args.recalibrate:
        raise SafnError(f"--{given[0].replace('_', '-')} is an option of --recalibrate; add "
                        "--recalibrate, or leave it out for a plain validation")
    for k, v in RECAL_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    f = args.recalibration_fraction
    if not 0 < f < 1:
        raise SafnError(f"--recalibration-fraction {f:g}: must lie strictly between 0 and 1 "
                        "(the share of the site's participants that recalibrate; the others "
                        "are evaluated)")


def recalibrate(z: np.ndarray, y: np.ndarray, in_recal: np.ndarray, method: str):
    """The calibration map and decision threshold, fitted on the recalibration part only
    (rows where ``in_recal``): the map on the model's logits ``z``, then the threshold that
    maximises balanced accuracy on the calibrated scores (`choose_threshold`, the rule
    centralised training uses; a federation's histogram rule maximises the same)."""
    zr, yr = np.asarray(z)[in_recal], np.asarray(y)[in_recal]
    cmap = fit_map(method, zr, yr)
    return cmap, choose_threshold(yr, cmap(zr))


def run_recalibration(args, bundle, cohort, table: pd.DataFrame, scope: dict, out: Path, *,
                      site: str, min_cell: int, adjustments: dict | None = None,
                      harmonised: dict | None = None) -> int:
    """``--recalibrate``: split, fit on one part, report before/after on the other, and write
    the site bundle, ``validation.json``, ``recalibration_split.csv``, ``predictions.csv`` and
    ``report.html``. A harmonising bundle's features are harmonised first by ``adjustments``
    (each site's own, from all its participants here, without labels; as a plain validation)."""
    from safn_core.bundle import save_site_bundle

    arrays = bundle.arrays(table, adjustments=adjustments)
    z, p_raw, alpha = bundle.scores(arrays)  # the model's own logits: any old map is dropped
    y, names = arrays.y, bundle.label_names
    ids = table.index.to_numpy()
    in_recal = split_participants(ids, y, args.recalibration_fraction, args.split_seed)
    check_parts(y, in_recal, min_cell, args.recalibration_fraction, names)
    cmap, threshold = recalibrate(z, y, in_recal, args.calibration)
    ev = ~in_recal
    p_before, p_after = bundle.calibrate(z, p_raw), cmap(z)
    before = figures(y[ev], p_before[ev], bundle.threshold, args.bootstrap)
    after = figures(y[ev], p_after[ev], threshold, args.bootstrap)
    prevalence = float(y[in_recal].mean())  # the majority class the site would guess
    majority = {"class": names[int(prevalence >= 0.5)],
                "metrics": binary_metrics(y[ev], np.full(int(ev.sum()), prevalence), 0.5)}
    previous = bundle.meta.get("recalibration")
    record = {
        "method": cmap.method, "map": cmap.to_dict(), "threshold": threshold,
        "threshold_before": bundle.threshold,
        "training_threshold": (previous or {}).get("training_threshold", bundle.threshold),
        "site": site, "data": cohort.report.source, "validation": scope["validation"],
        "recalibration_part": counts(y[in_recal], names), "evaluation_part": counts(y[ev], names),
        "fraction": args.recalibration_fraction, "split_seed": args.split_seed,
        "stratified_by": "class", "split_by": "participant",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_bundle": str(args.model),
        # the map in force until now: an earlier site's, else the temperature from training
        "replaces": previous or bundle.meta.get("calibration"),
    }
    res = {"scope": scope, "record": record, "before": before, "after": after,
           "majority": majority, "y": y[ev], "p_before": p_before[ev], "p_after": p_after[ev],
           "modality_weights": _modality_weights(bundle, alpha[ev]), "harmonisation": harmonised}
    _print_recalibration(args, bundle, cohort, res)

    meta = {**bundle.meta, "threshold": threshold, "recalibration": record}
    site_bundle = save_site_bundle(out / "site_bundle", args.model, meta,
                                   recalibration_card(args.model, bundle, res))
    pd.DataFrame({"participant_id": ids, "y": y,
                  "part": np.where(in_recal, "recalibration", "evaluation")}).to_csv(
        out / "recalibration_split.csv", index=False)
    pd.DataFrame({"participant_id": ids[ev], "y": y[ev], "p_before": p_before[ev],
                  "p_after": p_after[ev]}).to_csv(out / "predictions.csv", index=False)
    write_json(out / "validation.json", {
        "validation": scope["validation"], "validation_note": scope["note"],
        "training_sites": scope["training_sites"], "held_out_sites": scope["held_out_sites"],
        "validated_sites": scope["validated_sites"], "sites_matched_by": scope["by"],
        "model": str(args.model), "data": cohort.report.source, "n": len(y),
        "parts": {"recalibration": record["recalibration_part"],
                  "evaluation": record["evaluation_part"]},
        "recalibration": record, "before": before, "after": after,
        "majority_class": majority, "modality_weights": res["modality_weights"],
        "site_bundle": str(site_bundle), "harmonisation": harmonised or {"applied": False},
    })
    write_recalibration_report(out, args.model, bundle, cohort, res)
    console.print(f"site bundle: {site_bundle} (the input bundle {args.model} is unchanged); "
                  f"report: {out / 'report.html'}; which participant is in which part: "
                  f"{out / 'recalibration_split.csv'} (keep it at the site)")
    return 0


def _before_after_rows(res) -> list[dict]:
    b, a, maj = res["before"]["metrics"], res["after"]["metrics"], res["majority"]["metrics"]
    return [{"metric": k, "before": b[k]["value"], "before CI": _ci(b[k]),
             "after": a[k]["value"], "after CI": _ci(a[k]), "majority class": maj[k]}
            for k in METRICS]


def _ci(m: dict) -> str:
    return f"{m['ci'][0]:.3f} – {m['ci'][1]:.3f}"


def _parts_line(record: dict, names) -> str:
    r, e = record["recalibration_part"], record["evaluation_part"]
    neg, pos = names
    return (f"recalibration part {r['n']} ({r[pos]} {pos} / {r[neg]} {neg}), evaluation part "
            f"{e['n']} ({e[pos]} {pos} / {e[neg]} {neg}); fraction "
            f"{record['fraction']:g}, split seed {record['split_seed']}, by participant, "
            "stratified by class")


def _map_line(record: dict) -> str:
    from safn_core.recalibration import CalibrationMap

    cmap = CalibrationMap.from_dict(record["map"])
    line = (f"{cmap.describe()} fitted on the recalibration part's logits; threshold "
            f"{record['threshold']:.3f} (maximum balanced accuracy on its calibrated scores; "
            f"was {record['threshold_before']:.3f})")
    if cmap.method == "platt" and cmap.params["b"] <= 0:
        line += ("; the slope b ≤ 0: at this site the model's scores run against (or carry "
                 "nothing about) the labels")
    return line


def _replaces_line(record: dict) -> str | None:
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


def _print_recalibration(args, bundle, cohort, res) -> None:
    scope, record = res["scope"], res["record"]
    label = scope["validation"]
    console.print(f"[bold]{label} validation with recalibration[/] of {args.model} "
                  f"({bundle.meta.get('kind')}) at {record['site']} on {cohort.report.source}: "
                  f"{record['recalibration_part']['n'] + record['evaluation_part']['n']} "
                  "participants")
    console.print(scope["note"], markup=False, highlight=False)
    for line in (_parts_line(record, bundle.label_names), _map_line(record),
                 _replaces_line(record)):
        if line:
            console.print(line, markup=False, highlight=False)
    t = Table(title=f"evaluation part only ({record['evaluation_part']['n']} participants "
                    "never used to recalibrate; 95% bootstrap CIs): before = the bundle as it "
                    f"is (threshold {record['threshold_before']:.3f}), after = "
                    f"{record['method']} map + threshold {record['threshold']:.3f}; majority "
                    f"class = always {res['majority']['class']}")
    rows = _before_after_rows(res)
    for c in rows[0]:
        t.add_column(c, justify="left" if c == "metric" else "right")
    for r in rows:
        t.add_row(*(v if isinstance(v, str) else f"{v:.3f}" for v in r.values()))
    console.print(t)
    for when in ("before", "after"):
        console.print(f"calibration {when}: {calibration_text(res[when]['calibration'])}",
                      markup=False, highlight=False)


def recalibration_card(model_path: Path, bundle, res) -> str:
    """The site bundle's model card: the bundle's card followed by a "Recalibration at <site>"
    section (what was fitted, on whom, and the before/after figures on the evaluation part)."""
    from safn_core.modelcard import model_card

    card = Path(model_path) / "model_card.md"
    text = card.read_text() if card.is_file() else model_card(bundle.meta, bundle.config)
    record, scope = res["record"], res["scope"]
    lines = [
        "", f"## Recalibration at {record['site']}", "",
        f"- **recalibrated at {record['site']}** ({record['date'][:10]}, safn-validate "
        f"--recalibrate) on {record['data']}; weights and preprocessing unchanged from "
        f"{record['source_bundle']}. This bundle applies the map below to every prediction and "
        "uses the new threshold: its figures hold for this site's population, not for the "
        "training sites'",
        f"- {_map_line(record)}",
        f"- {_parts_line(record, bundle.label_names)}; the figures below are on the evaluation "
        "part only, never used to recalibrate",
        *([f"- {_replaces_line(record)}"] if record.get("replaces") else []),
        *([f"- {h}"] if (h := harmonisation_text(res.get("harmonisation"))) else []),
        f"- validation scope: {scope['note']}",
        "- metrics on the evaluation part, before → after (95% bootstrap CI):",
    ]
    b, a = res["before"]["metrics"], res["after"]["metrics"]
    for k in METRICS:
        lines.append(f"  - {k}: {b[k]['value']:.3f} ({_ci(b[k])}) → {a[k]['value']:.3f} "
                     f"({_ci(a[k])})")
    lines += [f"- calibration before: {calibration_text(res['before']['calibration'])}",
              f"- calibration after: {calibration_text(res['after']['calibration'])}"]
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def write_recalibration_report(out: Path, model_path: Path, bundle, cohort, res) -> Path:
    from safn_core import plots
    from safn_core.report import Report

    record, scope = res["record"], res["scope"]
    preds = pd.concat([pd.DataFrame({"model": m, "y": res["y"], "p": res[f"p_{m}"]})
                       for m in ("before", "after")])
    plots.roc_pr_curves(preds, ["before", "after"], out / "roc_pr.png",
                        "evaluation part, before and after recalibration")
    for when in ("before", "after"):
        plots.reliability(res[when]["calibration"], out / f"calibration_{when}.png",
                          f"{when} recalibration")
    rep = Report(f"safn-validate: recalibration at {record['site']}",
                 f"model {model_path} on {cohort.report.source}")
    rep.heading(f"{scope['validation'].capitalize()} validation")
    rep.text(scope["note"])
    rep.table(_scope_rows(scope))
    rep.heading(f"Recalibration at {record['site']}")
    rep.text(_parts_line(record, bundle.label_names))
    rep.text(_map_line(record))
    if record.get("replaces"):
        rep.text(_replaces_line(record), note=True)
    rep.heading("Before and after, on the evaluation part (95% bootstrap CI)")
    rep.text(f"before: the bundle as it is (threshold {record['threshold_before']:.3f}); after: "
             f"{record['method']} map and threshold {record['threshold']:.3f}; majority class: "
             f"always {res['majority']['class']} (the recalibration part's majority)")
    rep.table(pd.DataFrame(_before_after_rows(res)))
    rep.figure(out / "roc_pr.png", "ROC and PR curves (a map with T > 0, or b > 0, keeps "
                                   "the ranking: the curves coincide)")
    rep.heading("Calibration")
    for when in ("before", "after"):
        rep.text(f"{when}: {calibration_text(res[when]['calibration'])}")
        rep.figure(out / f"calibration_{when}.png", f"reliability curve {when} recalibration")
    rep.heading("Modality weights on the evaluation part")
    rep.table(res["modality_weights"])
    card = out / "site_bundle" / "model_card.md"
    if card.is_file():
        rep.heading("Model card of the site bundle")
        rep.code(card.read_text())
    return rep.write(out / "report.html")


main = entry(run)
