"""The model card every bundle carries: what the model is for, what it saw, how well it did."""

from __future__ import annotations

from safn_core.config import SafnConfig
from safn_core.federation.provenance import basis_lines, sources_line, synthetic_sites
from safn_core.recalibration import training_calibration_text


def _metric_lines(metrics: dict, indent: str = "") -> list[str]:
    lines = []
    for section, values in metrics.items():
        if not isinstance(values, dict) or not values:
            continue
        lines.append(f"{indent}- **{section.replace('_', ' ')}**:")
        for key, v in values.items():
            if isinstance(v, dict) and "mean" in v:
                sd = f" ± {v['sd']:.3f} (SD)" if v.get("sd") is not None else ""
                lines.append(f"{indent}  - {key}: {v['mean']:.3f}{sd}")
            elif isinstance(v, dict) and "value" in v:
                ci = v.get("ci")
                ci_text = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else ""
                lines.append(f"{indent}  - {key}: {v['value']:.3f}{ci_text}")
            elif isinstance(v, (int, float)):
                lines.append(f"{indent}  - {key}: {v:.3f}")
    return lines


def _privacy_lines(privacy: dict | None) -> list[str]:
    """Distributed DP (its guarantee and against whom), ε per site (DP-SGD or distributed DP at
    the sites) and central DP, as recorded in the run's history."""
    if not privacy:
        return ["- no differential privacy: the model's weights are not covered by any ε"]
    lines = []
    distributed = privacy.get("distributed_dp")
    if distributed:
        t = distributed["colluding"]
        lines += [
            f"- {distributed['mechanism']}: one DP-SGD step over the union of the sites' "
            f"Poisson samples per round, noise multiplier σ {distributed['noise_multiplier']:.4g}, "
            f"sampling rate q {distributed['sample_rate']:g}, clipping norm C "
            f"{distributed['clipping_norm']:g}, t = {t} colluding or dropped-out "
            f"site{'' if t == 1 else 's'}; {distributed['rounds_applied']} of "
            f"{distributed['rounds']} rounds took their step",
            f"- guarantee: {distributed['guarantee']}",
            f"- not against: more than {t} colluding or dropped-out site"
            f"{'' if t == 1 else 's'}, a coordinator that invents sites, or sites running "
            "modified software (docs/privacy.md, Distributed DP)"]
    site_dp = privacy.get("site_dp")
    if site_dp:
        lines.append(f"- {site_dp['mechanism']}:")
        modes = {s.get("mode") for s in site_dp["sites"].values() if s.get("dp")}
        for name, s in sorted(site_dp["sites"].items()):
            if not s.get("dp"):
                lines.append(f"  - {name}: no DP")
                continue
            eps = s.get("epsilon")
            budget = s.get("epsilon_budget")
            kind = "distributed DP" if s.get("mode") == "distributed" else "DP-SGD"
            mark = f" ({kind})" if len(modes) > 1 else ""
            lines.append(f"  - {name}{mark}: ε {eps:.3f} of {budget:g} at δ "
                         f"{s.get('delta', 0):.2g}; {s['rounds_trained']} rounds trained, "
                         f"{s['rounds_refused']} refused" if eps is not None else
                         f"  - {name}: {kind}, no round trained ({s['rounds_refused']} refused)")
    central = privacy.get("central_dp")
    if central:
        lines.append(f"- {central['mechanism']}: ε {central['epsilon']:.3f} at δ "
                     f"{central['delta']:.2g} (site-level, for whoever receives the model; "
                     f"σ {central['noise_multiplier']:g}, clipping norm "
                     f"{central['clipping_norm']:g}, {central['releases']} releases)")
    stats = (privacy.get("statistics_dp") or {}).get("sites") or {}
    if stats:
        lines.append("- statistics round through the Gaussian mechanism (`privacy.statistics: "
                     "gaussian`, in the site's ε above) at: " + ", ".join(
                         f"{name} (σ {s['noise_multiplier']:.3g})"
                         for name, s in sorted(stats.items())))
    exact = "the statistics round of every other site" if stats else "the statistics round"
    lines.append(f"- not covered: {exact} (exact sums; `privacy.statistics: gaussian` covers "
                 "it) and the evaluation histograms (docs/privacy.md)")
    return lines


def _run_lines(meta: dict) -> list[str]:
    """The run's two identities side by side: its own (bundle.json, the sites' privacy ledgers
    and audit logs) and Flower's, one per submission (a resume is a new Flower run)."""
    if not meta.get("run_id"):
        return []
    flower = meta.get("flower_run_ids") or []
    return [f"- run id {meta['run_id']}" + (
        f" (Flower run{'s' if len(flower) > 1 else ''} {', '.join(flower)}: one per "
        "submission, a resume starts a new one)" if flower else "")]


def _source_lines(training: dict, data) -> tuple[list[str], list[str]]:
    """The Training data line on where the data came from, and the Known-limits line on
    synthetic data (if any). A federated bundle says what each SITE said its data is
    (``training.data_sources``, from the statistics round), never the coordinator's own
    ``data.source`` (a default there); a centralised bundle's ``data.source`` is its own."""
    sources = training.get("data_sources")
    if sources is None:
        synthetic = data.source == "synthetic"
        return ([f"- source: {data.source}"
                 f"{' (synthetic PPMI-style cohort, not real patients)' if synthetic else ''}"],
                ["- Trained on synthetic data: its figures say nothing about real patients."]
                if synthetic else [])
    line = [f"- {sources_line(sources, training.get('held_out_sites') or ())}"]
    fake = synthetic_sites(sources)
    if fake and len(fake) == len(sources):
        return line, ["- Trained on synthetic data: its figures say nothing about real "
                      "patients."]
    if fake:
        return line, [f"- Synthetic data (not real patients) at {', '.join(fake)}: the figures "
                      "that rest on those sites say nothing about real patients."]
    return line, []


def _basis_lines(meta: dict, config: SafnConfig) -> list[str]:
    """How many participants (and, federated, sites) the Performance figures rest on."""
    training = meta.get("training", {})
    basis = training.get("test_evaluation")
    if basis is not None:
        return [f"- {line}" for line in basis_lines(basis)]
    if "cross_validation" in (meta.get("metrics") or {}) and training.get("participants"):
        t = config.train
        return [f"- cross-validation: mean ± SD over {t.folds} folds × {t.repeats} repeats of "
                f"the {training['participants']} participants (each tested once per repeat, "
                "by a model that did not see it)"]
    return []


_ADJUSTMENT = {"parametric": "parametric empirical Bayes",
               "non-parametric": "non-parametric empirical Bayes",
               "none": "no empirical Bayes (each site's plain location and scale)"}


def _covariates_text(covariates: dict) -> str:
    parts = [f"{c} (continuous)" for c in covariates.get("continuous", [])]
    parts += [f"{c} (categories {', '.join(map(str, levels))}; reference {levels[0]})"
              for c, levels in (covariates.get("categorical") or {}).items()]
    return ", ".join(parts) or "none"


def _harmonisation_lines(meta: dict) -> list[str]:
    """The Harmonisation section of a bundle whose model takes ComBat-harmonised features
    (``bundle.json`` ``harmonisation``, written by `safn_core.bundle.save_bundle`)."""
    h = meta.get("harmonisation")
    if not h:
        return []
    mods = ", ".join(h.get("modalities") or []) or "no modality"
    lines = [
        "", "## Harmonisation",
        f"- ComBat (`harmonisation.method: {h.get('method')}`) of {h.get('n_features')} MRI "
        f"features ({mods}) across sites, before preprocessing; covariates preserved: "
        f"{_covariates_text(h.get('covariates') or {})}; each site's effects estimated with "
        f"{_ADJUSTMENT.get(h.get('adjustment'), h.get('adjustment'))}",
        f"- fitted on {h.get('fitted_on') or 'training data'} ({h.get('participants')} "
        f"participants in the fit; fit {h.get('fit_id')}, in {h.get('file')})",
    ]
    if meta.get("kind") == "centralised" and "cross_validation" in (meta.get("metrics") or {}):
        lines.append("- cross-validation: ComBat was fitted inside each training fold on that "
                     "fold's training participants only and applied to its validation and test "
                     "participants; the Performance figures are of harmonised folds")
    lines += [
        "- applying the model: each site (a training site, a held-out site, a new hospital) "
        "adjusts itself from its own participants with this fit, without labels, and nobody "
        "refits; `safn-validate` does this for every site of its data, and a site needs at "
        "least `data.min_cell` participants",
        "- the diagnosis is not a covariate: where the share of PD differs between sites, part "
        "of the disease effect can be removed with the site effect (docs/harmonisation.md)",
    ]
    return lines


def _calibration_lines(meta: dict) -> list[str]:
    """The Calibration section of a bundle with a temperature fitted at training
    (``bundle.json`` ``calibration``, ``train.temperature_scaling``)."""
    record = meta.get("calibration")
    if not record:
        return []
    return ["", "## Calibration", f"- {training_calibration_text(record)}",
            "- a site may refit the map on its own participants (`safn-validate --recalibrate`): "
            "refitted from the model's own logits, its map replaces this one"]


def _target_lines(meta: dict, config: SafnConfig) -> list[str]:
    """The Target section of a K-class bundle (or of one whose target is defined by a
    feature): the target, its classes and their order, the decision rule, the features the
    target removed from the inputs. Empty for a plain binary bundle (its card is unchanged)."""
    target, decision = meta.get("target") or {}, meta.get("decision") or {}
    classes = list(target.get("classes") or meta.get("label_names") or [])
    defined_by = list(target.get("defined_by") or [])
    if len(classes) <= 2 and not defined_by:
        return []
    cuts = decision.get("cutpoints")
    rule = ("ordinal cut points " + ", ".join(f"{c:.3f}" for c in cuts) + " on the expected "
            "class index Σ k·P_k (fitted on validation data)" if cuts else
            "argmax (the most probable class)")
    lines = ["", "## Target",
             f"- {target.get('name', 'label')}: {len(classes)} classes, label k = class k: "
             + ", ".join(f"{k} {c}" for k, c in enumerate(classes))
             + (" (ordered)" if target.get("ordered") else " (unordered)"),
             f"- output head: {config.model.head} ({_head_text(meta, config)}); the model "
             "gives the K class probabilities (softmax of its K logits)",
             f"- decision rule: {rule}"]
    lines.append("- features the target removed from the inputs (they define the label): "
                 + (", ".join(defined_by) if defined_by else "none"))
    return lines


def _head_text(meta: dict, config: SafnConfig) -> str:
    head = config.model.head
    return ("cumulative link, proportional odds" if head == "ordinal"
            else "multi-class softmax")


def _per_class_lines(metrics: dict) -> list[str]:
    """Per-class figures, confusion counts and majority-class baseline of a K-class bundle's
    metrics (a section's ``per_class``, ``confusion`` and ``majority``)."""
    lines = []
    for section, values in metrics.items():
        per_class = values.get("per_class") if isinstance(values, dict) else None
        if not isinstance(per_class, dict) or not per_class:
            continue
        title = section.replace("_", " ")
        lines.append(f"- **{title}, per class (one vs rest)**:")
        for name, v in per_class.items():
            figs = [f"{k.replace('_', '-')} {v[k]:.3f}" for k in ("roc_auc", "pr_auc", "recall",
                                                                  "precision")
                    if isinstance(v, dict) and isinstance(v.get(k), (int, float))]
            lines.append(f"  - {name}: " + (", ".join(figs) or "n/a"))
        confusion = values.get("confusion")
        if confusion:
            lines.append(f"- **{title}, confusion matrix** (rows true, columns predicted "
                         + " / ".join(per_class) + "): " + "; ".join(
                             f"{name}: " + " ".join(str(int(c)) for c in row)
                             for name, row in zip(per_class, confusion)))
        majority = values.get("majority")
        if isinstance(majority, dict):
            figs = [f"{k.replace('_', ' ')} {majority[k]:.3f}" for k in
                    ("balanced_accuracy", "accuracy", "qwk", "mae")
                    if isinstance(majority.get(k), (int, float))]
            cls = majority.get("class")
            who = list(per_class)[cls] if isinstance(cls, int) and cls < len(per_class) else cls
            lines.append(f"- **{title}, majority-class baseline** (always {who}): "
                         + ", ".join(figs))
    return lines


def model_card(meta: dict, config: SafnConfig) -> str:
    """Markdown model card from a bundle's metadata and configuration."""
    data = config.data
    training = meta.get("training", {})
    sites = training.get("sites", {})
    if isinstance(sites, list):
        sites = {s: None for s in sites}
    source_lines, synthetic_limits = _source_lines(training, data)
    # a federation's count is the statistics round's: the training sites' training splits
    counted = " in the training sites' training splits" if meta.get("kind") == "federated" else ""
    names = list(meta.get("label_names", ["HC", "PD"]))
    if len(names) == 2:
        neg, pos = names
        task = f"{pos} vs {neg}"
        threshold = f"{meta.get('threshold', 0.5):.3f} (chosen on validation data)"
    else:
        task = f"participants into {len(names)} classes ({', '.join(names)})"
        threshold = "none (K classes: see Target for the decision rule)"
    lines = [
        "# Model card: SAFN",
        "",
        "## Intended use",
        f"Research on classifying {task} from baseline MRI (cortical thickness, "
        "subcortical volumes), clinical assessments and demographics, and on federated training "
        "across sites. **Not a medical device**: not for diagnosing or managing individual "
        "patients.",
        "",
        "## Model",
        f"- kind: {meta.get('kind')} training; {meta.get('n_parameters', 0):,} parameters; "
        f"decision threshold {threshold}",
        f"- gate {config.model.gate}, cross-attention {'on' if config.model.cross_attention else 'off'}, "
        f"loss {config.model.loss} (β {config.model.cb_beta}, γ {config.model.focal_gamma})",
        *_run_lines(meta),
        "",
        "## Training data",
        *source_lines,
        f"- participants: {training.get('participants', 'n/a')}{counted}; class counts used "
        f"by the loss "
        f"({', '.join(names)}): {meta.get('class_counts')}",
    ]
    if training.get("selected_round") is not None:
        sel = training.get("selection") or {}
        lines.append(f"- federated: {training.get('rounds')} rounds trained; the model is round "
                     f"{training['selected_round']}, selected by pooled validation "
                     f"({sel.get('rule')}, patience {sel.get('patience')}"
                     f"{', stopped early' if sel.get('stopped_early') else ''})")
    floor = training.get("logistic_floor")
    if floor and floor.get("skipped") is not None:
        lines.append(f"- logistic regression floor: not fitted ({floor['skipped']}); the wide "
                     "path started at zero")
    elif floor:
        lines.append(f"- starts from the exact federated logistic regression (the wide path; "
                     f"penalty λ {floor['penalty']:g} chosen by pooled validation loss, "
                     f"{floor['newton_rounds']} Newton rounds over {len(floor['sites'])} sites"
                     + (", securely summed" if floor.get("secure_aggregation") else "")
                     + "); round 0 is that regression, kept if no training round beats it on "
                     "validation")
    if sites:
        lines.append("- sites: " + ", ".join(f"{s} ({n})" if n is not None else str(s)
                                              for s, n in sites.items()))
    lines += _target_lines(meta, config)
    lines += ["", "## Features and exclusions"]
    for m in meta.get("modalities", []):
        lines.append(f"- {m['name']} ({m['side']} side): {m['n_features']} features")
    lines += [
        f"- MDS-UPDRS I–III and H&Y {'excluded' if data.exclude_motor else 'included'} "
        "(`data.exclude_motor`)",
        "- never features: cohort/diagnosis, diagnosis dates, disease duration, medication/LEDD, "
        "MDS-UPDRS IV, DaTscan-derived values (leakage guards)",
        f"- participants {'with all modalities only' if data.require_all_modalities else 'with missing modalities masked'}",
    ]
    lines += _harmonisation_lines(meta)
    lines += _calibration_lines(meta)
    lines += [
        "",
        "## Performance",
    ]
    metric_lines = _metric_lines(meta.get("metrics", {}))
    lines += _basis_lines(meta, config)
    lines += metric_lines or ["- no evaluation recorded in this bundle"]
    lines += _per_class_lines(meta.get("metrics", {}))
    lines += ["", "## Privacy", *_privacy_lines(meta.get("privacy"))]
    lines += [
        "",
        "## Known limits",
        "- In PPMI, MDS-UPDRS III, H&Y and (for controls) MoCA nearly define the label through the "
        "entry criteria: compare with the results without motor scales and imaging-only.",
        "- Baseline visit only (de novo PD): says nothing about progression or treated patients.",
        "- Scanner and site effects are as large as disease effects on MRI; performance at a new "
        "site must be checked there (`safn-validate`).",
    ]
    lines += synthetic_limits
    return "\n".join(lines) + "\n"
