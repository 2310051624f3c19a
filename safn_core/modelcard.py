"""The model card every bundle carries: what the model is for, what it saw, how well it did."""

from __future__ import annotations

from safn_core.config import SafnConfig


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
    """ε per site (DP-SGD at the sites) and central DP, as recorded in the run's history."""
    if not privacy:
        return ["- no differential privacy: the model's weights are not covered by any ε"]
    lines = []
    site_dp = privacy.get("site_dp")
    if site_dp:
        lines.append(f"- {site_dp['mechanism']}:")
        for name, s in sorted(site_dp["sites"].items()):
            if not s.get("dp"):
                lines.append(f"  - {name}: no DP")
                continue
            eps = s.get("epsilon")
            budget = s.get("epsilon_budget")
            lines.append(f"  - {name}: ε {eps:.3f} of {budget:g} at δ {s.get('delta', 0):.2g}; "
                         f"{s['rounds_trained']} rounds trained, {s['rounds_refused']} refused"
                         if eps is not None else
                         f"  - {name}: DP-SGD, no round trained ({s['rounds_refused']} refused)")
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


def model_card(meta: dict, config: SafnConfig) -> str:
    """Markdown model card from a bundle's metadata and configuration."""
    data = config.data
    training = meta.get("training", {})
    sites = training.get("sites", {})
    if isinstance(sites, list):
        sites = {s: None for s in sites}
    synthetic = data.source == "synthetic"
    neg, pos = meta.get("label_names", ["HC", "PD"])
    lines = [
        "# Model card: SAFN",
        "",
        "## Intended use",
        f"Research on classifying {pos} vs {neg} from baseline MRI (cortical thickness, "
        "subcortical volumes), clinical assessments and demographics, and on federated training "
        "across sites. **Not a medical device**: not for diagnosing or managing individual "
        "patients.",
        "",
        "## Model",
        f"- kind: {meta.get('kind')} training; {meta.get('n_parameters', 0):,} parameters; "
        f"decision threshold {meta.get('threshold', 0.5):.3f} (chosen on validation data)",
        f"- gate {config.model.gate}, cross-attention {'on' if config.model.cross_attention else 'off'}, "
        f"loss {config.model.loss} (β {config.model.cb_beta}, γ {config.model.focal_gamma})",
        "",
        "## Training data",
        f"- source: {data.source}{' (synthetic PPMI-style cohort, not real patients)' if synthetic else ''}",
        f"- participants: {training.get('participants', 'n/a')}; class counts used by the loss "
        f"({neg}, {pos}): {meta.get('class_counts')}",
    ]
    if training.get("selected_round") is not None:
        sel = training.get("selection") or {}
        lines.append(f"- federated: {training.get('rounds')} rounds trained; the model is round "
                     f"{training['selected_round']}, selected by pooled validation "
                     f"({sel.get('rule')}, patience {sel.get('patience')}"
                     f"{', stopped early' if sel.get('stopped_early') else ''})")
    if sites:
        lines.append("- sites: " + ", ".join(f"{s} ({n})" if n is not None else str(s)
                                              for s, n in sites.items()))
    lines += ["", "## Features and exclusions"]
    for m in meta.get("modalities", []):
        lines.append(f"- {m['name']} ({m['side']} side): {m['n_features']} features")
    lines += [
        f"- MDS-UPDRS I–III and H&Y {'excluded' if data.exclude_motor else 'included'} "
        "(`data.exclude_motor`)",
        "- never features: cohort/diagnosis, diagnosis dates, disease duration, medication/LEDD, "
        "MDS-UPDRS IV, DaTscan-derived values (leakage guards)",
        f"- participants {'with all modalities only' if data.require_all_modalities else 'with missing modalities masked'}",
        "",
        "## Performance",
    ]
    metric_lines = _metric_lines(meta.get("metrics", {}))
    lines += metric_lines or ["- no evaluation recorded in this bundle"]
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
    if synthetic:
        lines.append("- Trained on synthetic data: its figures say nothing about real patients.")
    return "\n".join(lines) + "\n"
