"""``safn-validate``: evaluate a finished model bundle on one site's own data, offline.

This module parses the arguments, prints and writes the files; the work is the library
`safn_core.validation` (`load_site_data`, `validate`, `recalibrate_at_site`, each result a
frozen dataclass), and the words of the console, cards and report are made in
`safn_core.cli.validate_outputs`.

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

A bundle of K > 2 classes (``bundle.json`` ``target``) is validated with the K-class metrics
(`safn_core.multiclass`) beside the majority-class baseline, its confusion matrix and
one-vs-rest ROC curves; ``predictions.csv`` has one probability column per class
(``p_<class>``) and the predicted class, by the bundle's decision rule (argmax, or its ordinal
cut points where it carries them); ``--recalibrate`` fits temperature or vector scaling on the
K logits (`safn_core.cli.validate_outputs_multiclass`). Data whose classes are not the bundle's
target's is refused with one line naming both.

A bundle whose model takes ComBat-harmonised MRI features (``harmonisation.json``) harmonises
the data first: each site of the data adjusts itself from its own participants with the
bundle's fit, without labels (a table without a site column is one site), also with
``--recalibrate`` (both parts, before the split's fits). ``validation.json`` records it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rich.table import Table

from safn_core.cli import validate_outputs_multiclass as kclass
from safn_core.cli.common import base_parser, console, entry, fresh_output_dir, write_json
from safn_core.cli.validate_outputs import (before_after_rows, before_after_table,
                                            harmonisation_line, map_line, parts_line,
                                            print_recalibration_head, print_weights,
                                            recalibration_card, replaces_line, say,
                                            threshold_source, write_recalibration_report,
                                            write_validation_card, write_validation_report)
from safn_core.errors import SafnError
from safn_core.metrics import calibration_text
from safn_core.recalibration import ALL_METHODS, RecalibrationOptions
from safn_core.validation import (DataSource, Recalibration, Validation, load_site_data,
                                  recalibrate_at_site, validate)
from safn_core.validation_multiclass import MultiClassRecalibration, MultiClassValidation

RECAL_DEFAULTS = {"calibration": "temperature", "recalibration_fraction": 0.5, "split_seed": 0}


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
    recal.add_argument("--calibration", choices=ALL_METHODS,
                       help="the calibration map: temperature (one T, keeps rankings; default), "
                            "platt (a + b·logit; binary bundles) or vector (a scale and a bias "
                            "per class on the K logits; bundles of K > 2 classes)")
    recal.add_argument("--recalibration-fraction", type=float, metavar="F",
                       help="share of the site's participants (per class) that recalibrate; "
                            "the others are evaluated (default 0.5)")
    recal.add_argument("--split-seed", type=int, metavar="N",
                       help="seed of the participant split (default 0)")
    args = parser.parse_args(argv)
    options = _recalibration_options(args)

    from safn_core.bundle import load_bundle

    bundle = load_bundle(args.model)
    source = DataSource(data=args.data, mapping=args.mapping, site=args.site, config=args.config,
                        overrides=tuple(args.overrides or ()))
    out = fresh_output_dir(args.out or Path("runs") / f"validate-{datetime.now():%Y%m%d-%H%M%S}")
    site = load_site_data(args.model, source, bundle)
    if (line := harmonisation_line(site.harmonisation)) is not None:
        say(line)
    if options is not None:
        res = recalibrate_at_site(site, options, n_boot=args.bootstrap)
        if isinstance(res, MultiClassRecalibration):
            kclass.print_recalibration(res)
        else:
            _print_recalibration(res)
        _write_recalibration(out, res)
        return 0
    res = validate(site, n_boot=args.bootstrap)
    k = isinstance(res, MultiClassValidation)
    (kclass.print_validation if k else _print_validation)(res)
    write_json(out / "validation.json", res.record())
    res.predictions().to_csv(out / "predictions.csv", index=False)
    # the report embeds the card
    (kclass.write_validation_card if k else write_validation_card)(out, res)
    (kclass.write_validation_report if k else write_validation_report)(out, res)
    console.print(f"written to {out}; report: {out / 'report.html'}")
    return 0


def _recalibration_options(args) -> RecalibrationOptions | None:
    """The recalibration's options, None without --recalibrate. --calibration,
    --recalibration-fraction and --split-seed belong to --recalibrate; checked before any
    folder is made."""
    given = [k for k in RECAL_DEFAULTS if getattr(args, k) is not None]
    if not args.recalibrate:
        if given:
            raise SafnError(f"--{given[0].replace('_', '-')} is an option of --recalibrate; add "
                            "--recalibrate, or leave it out for a plain validation")
        return None
    value = {k: getattr(args, k) if getattr(args, k) is not None else v
             for k, v in RECAL_DEFAULTS.items()}
    return RecalibrationOptions(method=value["calibration"],
                                fraction=value["recalibration_fraction"],
                                split_seed=value["split_seed"])


def _print_validation(res: Validation) -> None:
    site, bundle = res.site, res.site.bundle
    label, n, n_pos = site.scope["validation"], len(res.y), res.n_positive
    console.print(f"[bold]{label} validation[/] of {site.model} ({bundle.meta.get('kind')}) on "
                  f"{site.source}: {n} participants, {n_pos} {bundle.label_names[1]} / "
                  f"{n - n_pos} {bundle.label_names[0]}")
    say(site.scope["note"])
    t = Table(title=f"{label} validation (threshold {bundle.threshold:.3f} "
                    f"{threshold_source(bundle)}; 95% bootstrap CIs)")
    for c in ("metric", "value", "95% CI"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k, v in res.figures["metrics"].items():
        t.add_row(k, f"{v['value']:.3f}", f"{v['ci'][0]:.3f} – {v['ci'][1]:.3f}")
    console.print(t)
    say(f"calibration: {calibration_text(res.figures['calibration'])}")
    print_weights(res.modality_weights)


def _print_recalibration(res: Recalibration) -> None:
    site, record = res.site, res.record
    print_recalibration_head(res, site.bundle.meta.get("kind"),
                             (parts_line(record, site.bundle.label_names), map_line(record),
                              replaces_line(record)))
    console.print(before_after_table(
        f"evaluation part only ({record['evaluation_part']['n']} participants never used to "
        "recalibrate; 95% bootstrap CIs): before = the bundle as it is (threshold "
        f"{record['threshold_before']:.3f}), after = {record['method']} map + threshold "
        f"{record['threshold']:.3f}; majority class = always {res.majority['class']}",
        before_after_rows(res), lambda v: f"{v:.3f}"))
    for when, fig in (("before", res.before), ("after", res.after)):
        say(f"calibration {when}: {calibration_text(fig['calibration'])}")


def _write_recalibration(out: Path, res: Recalibration) -> None:
    """The site bundle, ``recalibration_split.csv``, ``predictions.csv``, ``validation.json``
    and ``report.html``; the input bundle is never written to."""
    from safn_core.bundle import save_site_bundle

    model = res.site.model
    k = isinstance(res, MultiClassRecalibration)
    site_bundle = save_site_bundle(out / "site_bundle", model, res.site_meta(),
                                   (kclass.recalibration_card if k else recalibration_card)(res))
    res.split().to_csv(out / "recalibration_split.csv", index=False)
    res.predictions().to_csv(out / "predictions.csv", index=False)
    write_json(out / "validation.json", res.record_for(site_bundle))
    (kclass.write_recalibration_report if k else write_recalibration_report)(out, res)
    console.print(f"site bundle: {site_bundle} (the input bundle {model} is unchanged); "
                  f"report: {out / 'report.html'}; which participant is in which part: "
                  f"{out / 'recalibration_split.csv'} (keep it at the site)")


main = entry(run)
