"""``safn-validate``: evaluate a finished model bundle on one site's own data, offline.

No server, no network: the site loads its data with the bundle's data settings, runs the same
data contract as training, applies the bundle's preprocessing (never refitted on the site's data),
and reports the full metric set with bootstrap 95 % CIs, calibration and the modality weights on
its population.

Every output says whether the evaluation is **internal** (the data's site trained the model),
**external** (it did not), **mixed** (some of the data's sites did) or **unknown** (the sites
cannot be told apart), by matching site names against the training sites the bundle records
(`safn_core.validation_scope`). The bundle folder itself is never written to: the output folder gets its
own ``model_card.md``, the bundle's card plus a section on this validation.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.table import Table

from safn_core.cli.common import (base_parser, console, entry, fresh_output_dir, write_atomic,
                                  write_json)
from safn_core.config import load_config
from safn_core.data.cohort import LABEL, Cohort
from safn_core.data.contract import check_cohort
from safn_core.errors import DataError, SafnError
from safn_core.metrics import METRICS, binary_metrics, bootstrap_ci, calibration, calibration_text
from safn_core.validation_scope import is_no_site, validation_scope


def align_to_bundle(cohort: Cohort, features: list[str], source: str) -> pd.DataFrame:
    """The cohort's table with exactly the bundle's feature columns, or a clear error."""
    missing = [f for f in features if f not in cohort.table.columns]
    if missing:
        raise DataError(f"{source}: the data lacks {len(missing)} feature(s) the model was trained "
                        f"on (e.g. {', '.join(missing[:5])}); load it with the same modalities "
                        "and column names as the training data")
    return cohort.table[[LABEL] + features]


def _validated_sites(args, site_cfg, bundle, cohort: Cohort) -> tuple[list[str] | None, bool]:
    """The names the evaluated data goes by, and whether it is the site file's name: a
    federated bundle validated with --site knows the site by its site.yaml name; otherwise the
    data's site column values (None without one)."""
    if args.site and site_cfg.site is not None and bundle.meta.get("kind") == "federated":
        return [site_cfg.site.name], True
    values = sorted(str(v) for v in set(cohort.sites) if not is_no_site(v))
    return values or None, False


def evaluate(bundle, table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Predictions and every reported figure for one evaluation set."""
    from safn_core.training.local import Arrays, predict

    arrays = Arrays.from_table(bundle.preprocessor, table)
    p, alpha = predict(bundle.model, arrays)
    y = arrays.y
    point = binary_metrics(y, p, bundle.threshold)
    ci = bootstrap_ci(y, p, bundle.threshold, n_boot=n_boot, seed=seed)
    mods = [m.name for m in bundle.preprocessor.modalities]
    return {
        "y": y, "p": p,
        "metrics": {k: {"value": point[k], "ci": list(ci[k])} for k in METRICS},
        "calibration": calibration(y, p),
        "modality_weights": {m: float(a) for m, a in zip(mods, alpha.mean(0))},
        "threshold": bundle.threshold,
    }


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
    args = parser.parse_args(argv)

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
    table = align_to_bundle(cohort, bundle.preprocessor.features, cohort.report.source)
    res = evaluate(bundle, table, n_boot=args.bootstrap)
    trained_on = bundle.config.data.path
    validated, by_site_file = _validated_sites(args, site_cfg, bundle, cohort)
    res["scope"] = scope = validation_scope(
        bundle, validated, by_site_file=by_site_file,
        same_data=trained_on is not None and Path(trained_on).resolve() == Path(path).resolve())
    label = scope["validation"]

    n_pos = int(res["y"].sum())
    console.print(f"[bold]{label} validation[/] of {args.model} ({bundle.meta.get('kind')}) on "
                  f"{cohort.report.source}: {len(table)} participants, {n_pos} "
                  f"{bundle.label_names[1]} / {len(table) - n_pos} {bundle.label_names[0]}")
    console.print(scope["note"], markup=False, highlight=False)
    t = Table(title=f"{label} validation (threshold {bundle.threshold:.3f} from training; "
                    "95% bootstrap CIs)")
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
        f"{bundle.threshold:.3f} from training",
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


main = entry(run)
