"""``safn-validate``: evaluate a finished model bundle on one site's own data, offline.

No server, no network: the site loads its data with the bundle's data settings, runs the same
data contract as training, applies the bundle's preprocessing (never refitted on the site's data),
and reports the full metric set with bootstrap 95 % CIs, calibration and the modality weights on
its population.

Every output says whether the evaluation is **internal** (the data's site trained the model),
**external** (it did not), **mixed** (some of the data's sites did) or **unknown** (the sites
cannot be told apart), by matching site names against the training sites the bundle records
(`validation_scope`). The bundle folder itself is never written to: the output folder gets its
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

# site values that name no site: a table without a site column ("all"), a PPMI participant
# whose site is unknown
NO_SITE = {"all", "nan", "none", ""}


def align_to_bundle(cohort: Cohort, features: list[str], source: str) -> pd.DataFrame:
    """The cohort's table with exactly the bundle's feature columns, or a clear error."""
    missing = [f for f in features if f not in cohort.table.columns]
    if missing:
        raise DataError(f"{source}: the data lacks {len(missing)} feature(s) the model was trained "
                        f"on (e.g. {', '.join(missing[:5])}); load it with the same modalities "
                        "and column names as the training data")
    return cohort.table[[LABEL] + features]


def recorded_sites(meta: dict) -> tuple[list[str], list[str]]:
    """The training sites and the held-out (evaluation-only) sites a bundle records: a
    federation's site names, or the site column values of a centralised bundle's table."""
    training = meta.get("training") or {}
    sites = training.get("sites") or []
    names = sites.keys() if isinstance(sites, dict) else sites
    return (sorted(str(s) for s in names if not _no_site(s)),
            sorted(str(s) for s in training.get("held_out_sites") or []))


def _no_site(value) -> bool:
    return str(value).strip().lower() in NO_SITE


def _random_virtual_sites(bundle, training: list[str]) -> bool:
    """A simulation's virtual sites cut at random from one cohort (``simulation.partition``
    iid, dirichlet or size_skew): their names say nothing about a table's site column."""
    sim = bundle.config.simulation
    names = {f"site_{i + 1:02d}" for i in range(sim.n_sites)}
    return (bundle.meta.get("kind") == "federated" and sim.partition != "natural"
            and bool(training) and set(training) <= names)


def validation_scope(bundle, validated: list[str] | None, *, by_site_file: bool = False,
                     same_data: bool = False) -> dict:
    """Is this evaluation internal, external, mixed or unknown, and why.

    ``validated`` names the evaluated data's sites: the site.yaml ``site.name`` (how a
    federation knows a site) or the data's site column values (None when it has none). A
    value matches a training site by its name, or as ``site_<value>`` (how a simulation with
    ``partition: natural`` names the sites of a site column). Names are all a bundle records,
    so a new site reusing a training site's name reads as internal. ``same_data``: the data
    file is the one the bundle's config names (the training table of a centralised bundle).
    """
    training, held_out = recorded_sites(bundle.meta)

    def trained(v: str) -> bool:
        return v in training or f"site_{v}" in training

    scope = {"training_sites": training, "held_out_sites": held_out,
             "validated_sites": validated, "by": "site.name in the site file" if by_site_file
             else "the data's site column"}
    if (validated is None or not training
            or (not by_site_file and _random_virtual_sites(bundle, training))):
        label = "internal" if same_data else "unknown"
        scope.update(validation=label, internal_sites=[], external_sites=[])
    else:
        inside = [v for v in validated if trained(v)]
        outside = [v for v in validated if not trained(v)]
        label = "internal" if not outside else "external" if not inside else "mixed"
        scope.update(validation=label, internal_sites=inside, external_sites=outside)
    scope["note"] = scope_note(bundle, scope, same_data)
    return scope


def scope_note(bundle, scope: dict, same_data: bool) -> str:
    """Plain words on what the label means for these figures."""
    label, federated = scope["validation"], bundle.meta.get("kind") == "federated"
    inside, outside = ", ".join(scope["internal_sites"]), ", ".join(scope["external_sites"])
    train = ", ".join(scope["training_sites"]) or "none recorded"
    if label == "unknown":
        why = ("the data has no site column" if scope["validated_sites"] is None
               else "the bundle records no training site names" if not scope["training_sites"]
               else "the model was trained on virtual sites cut at random from one cohort "
                    f"(simulation.partition {bundle.config.simulation.partition})")
        return (f"Unknown whether these participants trained the model: {why}, so their sites "
                "cannot be matched to the training sites. Treat the figures as internal "
                "(optimistic) unless the data is known to be new.")
    if label == "external":
        held = [v for v in scope["external_sites"]
                if v in scope["held_out_sites"] or f"site_{v}" in scope["held_out_sites"]]
        extra = (f" {', '.join(held)} took part in the run as held-out site(s): evaluated the "
                 "model during the run, never trained it." if held else "")
        if federated and scope["by"] == "the data's site column":
            extra += (" A federation knows its sites by their site.yaml names: for a training "
                      "site's own data, validate with --site site.yaml.")
        what = (f"{outside} did not train this model (training sites: {train}" if federated
                else f"the model's training table has no participants from {outside} (its "
                     f"sites: {train}")
        return f"External validation: {what}; matched by site name).{extra}"
    if federated:
        whose = f"{inside}'s own" if inside else "the training sites'"
        risk = (f"These participants may include {whose} training participants: the "
                "model was fitted on each training site's training split and chosen on its "
                "validation split, and only its test split was unseen. The figures are "
                "optimistic; the model card's test-split figures are the internal estimate on "
                "unseen participants.")
        seen, unseen = f"{inside} trained this model", f"{outside} did not"
    else:
        risk = ("The model's final fit used every participant of its training table; "
                + ("this is that table: these participants trained the model and the figures "
                   "are optimistic (resubstitution)." if same_data else
                   "those of these participants who were in it trained the model, and the "
                   "figures are optimistic to that extent.")
                + " The model card's cross-validation figures are the internal estimate on "
                  "unseen participants.")
        seen = f"the model's training table has participants from {inside or 'this data'}"
        unseen = f"none from {outside}"
    if label == "mixed":
        return (f"Mixed: {seen}, {unseen} (matched by site name); the figures mix seen and "
                f"unseen participants. {risk} Validate each site's data on its own for separate "
                "internal and external figures.")
    return f"Internal validation: {seen}. {risk}"


def _validated_sites(args, site_cfg, bundle, cohort: Cohort) -> tuple[list[str] | None, bool]:
    """The names the evaluated data goes by, and whether it is the site file's name: a
    federated bundle validated with --site knows the site by its site.yaml name; otherwise the
    data's site column values (None without one)."""
    if args.site and site_cfg.site is not None and bundle.meta.get("kind") == "federated":
        return [site_cfg.site.name], True
    values = sorted(str(v) for v in set(cohort.sites) if not _no_site(v))
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
