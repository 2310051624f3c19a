"""The HTML report of a federated run (`safn-server`), and the sections a simulation's report
shares with it: learning curves, rejected updates, differential privacy.

A K-class run (K > 2; its history entries carry ``decision_rule`` and K-class ``pooled``
figures, `federation.aggregate_multiclass`) gets the K-class block instead of the binary
table (`kclass_block`): the scalar metrics with their intervals beside the majority-class
baseline, the confusion matrix (counts and row-normalised) and the per-class figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from safn_core import plots
from safn_core.config import SafnConfig, dump_config
from safn_core.federation.aggregate import selected_entry
from safn_core.federation.provenance import (basis_lines, evaluation_basis, source_name,
                                             synthetic_sites)
from safn_core.federation.run_folder import data_sources, run_identity
from safn_core.report import Report, interval_text


def learning_section(rep: Report, history: list[dict], run_dir: Path, curves_caption: str,
                     final_caption: str) -> None:
    """Learning curves per round (pooled and per site), which round the run selected and by
    which rule, and the selected round's pooled test metrics with their 95 % intervals
    (``pooled_ci`` of its history entry, where the run recorded them)."""
    plots.learning_curves(history, Path(run_dir) / "learning_curves.png")
    rep.heading("Learning curves")
    rep.figure(Path(run_dir) / "learning_curves.png", curves_caption)
    chosen = selected_entry(history)
    if chosen.get("round") is not None and history[-1].get("selected_round") is not None:
        rep.text(f"The model is round {chosen['round']} of the {len(history)} trained, selected "
                 f"by pooled validation (val loss {chosen.get('val_loss', float('nan')):.4f}, "
                 f"val ROC-AUC {chosen.get('val_roc_auc', float('nan')):.3f}); its test metrics "
                 "below are reported, not used to choose it.")
    if chosen.get("pooled") and is_kclass(chosen["pooled"]):
        kclass_block(rep, chosen["pooled"], chosen.get("pooled_ci") or {}, run_dir,
                     final_caption)
    elif chosen.get("pooled"):
        cis = chosen.get("pooled_ci") or {}
        rep.table({k: interval_text(v, cis.get(k)) if k in cis else v
                   for k, v in chosen["pooled"].items()},
                  final_caption + ("; 95 % interval in brackets (bootstrap over the pooled test "
                                   "histograms' counts: participants resampled within each "
                                   "class)" if cis else ""))
    floor_comparison(rep, history)


def is_kclass(m: dict | None) -> bool:
    """Whether a figure dict is K-class (it has per-class figures)."""
    return isinstance(m, dict) and isinstance(m.get("per_class"), dict)


KCLASS_KEYS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "macro_f1", "qwk", "mae",
               "log_loss", "brier")


def kclass_block(rep: Report, m: dict, cis: dict, run_dir: Path, caption: str,
                 stem: str = "confusion") -> None:
    """The K-class figures of a run: metrics with intervals beside the majority class, the
    confusion matrix (table and figure, counts and row-normalised), the per-class figures."""
    classes = list(m["per_class"])
    maj = m.get("majority") or {}
    cls = maj.get("class")
    who = classes[cls] if isinstance(cls, int) and cls < len(classes) else cls
    rows = [{"metric": k, "value": interval_text(m[k], cis.get(k)),
             "majority class": maj.get(k) if maj.get(k) is not None else "—"}
            for k in KCLASS_KEYS if m.get(k) is not None]
    rep.table(pd.DataFrame(rows), caption + f"; decision rule argmax; majority class: always "
                                            f"{who}" + ("; 95 % interval in brackets" if cis
                                                        else ""))
    confusion = m.get("confusion")
    if confusion:
        rep.table(pd.DataFrame([{"true \\ predicted": name, **dict(zip(classes, map(int, row)))}
                                for name, row in zip(classes, confusion)]),
                  "confusion matrix (counts): rows true class, columns predicted class")
        png = plots.confusion_matrices(confusion, classes, Path(run_dir) / f"{stem}.png")
        rep.figure(png, "confusion matrix: counts and row-normalised")
    rep.table(pd.DataFrame([{"class": name, **{k: v.get(k) for k in ("n", "roc_auc", "pr_auc",
                                                                       "recall", "precision")}}
                            for name, v in m["per_class"].items()]),
              "per class, one vs rest")


FLOOR_METRICS = ("roc_auc", "balanced_accuracy", "pr_auc_pd", "sensitivity", "specificity")


def floor_comparison(rep: Report, history: list[dict]) -> None:
    """The selected model beside the logistic regression floor it started from (round 0, where
    the run had one), on the same pooled test histograms, with their intervals."""
    round0 = next((e for e in history if e.get("round") == 0), None)
    chosen = selected_entry(history)
    if not round0 or not round0.get("pooled") or not chosen.get("pooled"):
        return
    rows = []
    for label, e in ((f"SAFN (selected round {chosen['round']})", chosen),
                     ("logistic regression floor (round 0)", round0)):
        cis = e.get("pooled_ci") or {}
        rows.append({"model": label, **{k: interval_text(e["pooled"][k], cis.get(k))
                                        for k in FLOOR_METRICS if k in e["pooled"]}})
    rep.heading("SAFN against the logistic regression it started from")
    rep.table(pd.DataFrame(rows),
              "both on the pooled test histograms of the training sites, each at the threshold "
              "its round chose on pooled validation; the floor is the exact federated logistic "
              "regression (SAFN's wide path before any training): round 0 is kept unless a "
              "training round beats it on validation")


def rejected_and_privacy(rep: Report, history: list[dict], run_dir: Path) -> None:
    """Updates the coordinator rejected, by site and round; then ε per site (when DP was on)."""
    from safn_core.federation.event_text import rejection_text

    rejected = [{"round": x.get("round"), "site": x.get("site"), "reason": rejection_text(x)}
                for h in history for x in h.get("rejected", [])]
    if rejected:
        rep.heading("Rejected updates").table(pd.DataFrame(rejected))
    privacy_section(rep, history, run_dir)
    personalisation_section(rep, run_dir)


def personalisation_section(rep: Report, run_dir: Path) -> None:
    """Global vs personal model per training site and pooled (``personalisation.json``)."""
    import json

    path = Path(run_dir) / "personalisation.json"
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    rep.heading(f"Personalisation ({record['method']})")
    rows = []
    for name, s in record["sites"].items():
        row = {"site": name, "test participants": s.get("n") or "-",
               "kept": "the global model (validation split below min_cell)"
               if s.get("kept_global") else "-" if s.get("selected") is None else
               (f"epoch {s['selected']}" if record["method"] == "fine_tune"
                else f"round {s['selected']}")}
        for which in ("global", "personal"):
            m = s.get(which)
            for k in ("balanced_accuracy", "sensitivity", "specificity", "roc_auc"):
                row[f"{which} {k.replace('_', ' ')}"] = (
                    f"{m[k]:.3f}" if m and m.get(k) is not None else
                    ("no personal model" if s.get("refused") else "withheld (min_cell)"))
        rows.append(row)
    pooled = record.get("pooled")
    if pooled:
        rows.append({"site": "pooled", "test participants": pooled["n"], "kept": "-",
                     **{f"{w} {k.replace('_', ' ')}": (f"{pooled[w][k]:.3f}" if pooled[w].get(k)
                                                       is not None else "-")
                        for w in ("global", "personal")
                        for k in ("balanced_accuracy", "sensitivity", "specificity")}})
    rep.table(pd.DataFrame(rows),
              "each training site's test split: the selected global model at the federation's "
              f"threshold ({record['threshold']:.3f}) against the site's personal model at "
              + ("the threshold from its own validation split" if
                 record.get("personal_threshold") == "site" else "the federation's threshold")
              + f"; pooled: {record.get('pooled_basis')}. The personal models never left "
                "the sites.")
    for name, why in record.get("refused", {}).items():
        rep.text(f"Site {name} has no personal model: {why}")
    if record.get("no_answer"):
        rep.text("Sites that did not answer: " + ", ".join(record["no_answer"]) + ".")


def privacy_section(rep: Report, history: list[dict], run_dir: Path) -> None:
    """The mode (distributed DP: σ, t, its guarantee and each round's step), ε per site per
    round (table and plot), refusals and central DP, when the run used DP."""
    from safn_core.federation.privacy_report import (CENTRAL_DP, distributed_applied,
                                                     epsilon_table, epsilon_wide,
                                                     privacy_summary)

    summary = privacy_summary(history)
    if not summary:
        return
    rep.heading("Differential privacy")
    distributed = summary.get("distributed_dp")
    if distributed:
        t = distributed["colluding"]
        rep.text(f"Mode: distributed DP (privacy.mode: distributed), {distributed['mechanism']}. "
                 f"Every round is one DP-SGD step over the union of the sites' Poisson samples: "
                 f"each site clips every sampled participant's gradient to C = "
                 f"{distributed['clipping_norm']:g} and adds its share of the noise inside the "
                 f"secure sum, with noise multiplier σ = {distributed['noise_multiplier']:.4g} "
                 f"(the largest any taking-part site's remaining budget needed), sampling rate "
                 f"q = {distributed['sample_rate']:g}, t = {t} colluding or dropped-out "
                 f"site{'' if t == 1 else 's'}; {distributed['rounds_applied']} of "
                 f"{distributed['rounds']} rounds took their step. Guarantee: "
                 f"{distributed['guarantee']}. ε per site is what each site reports from its "
                 "own ledger (every round recorded as (σ, q, 1 step)): spent so far over every "
                 "run recorded in it, at its δ (Opacus accountant). The statistics round and the "
                 "evaluation histograms are outside the guarantee by default (docs/privacy.md).")
        records = [h for h in history if h.get("distributed_dp")]
        keys = ["noise_multiplier", "sample_rate", "clipping_norm", "effective_clipping_norm",
                "colluding", "sites_asked", "shares", "participants", "expected_batch"]
        if any("sites_with_data" in h["distributed_dp"] for h in records):
            keys.insert(keys.index("shares") + 1, "sites_with_data")
        steps = [{"round": h["round"], **{k: h["distributed_dp"].get(k) for k in keys},
                  "noise_sd": f"{h['distributed_dp']['noise_sd']:.3g}",
                  "step taken": "yes" if distributed_applied(h["distributed_dp"])
                  else "no (fewer than n − t shares)"} for h in records]
        rep.table(pd.DataFrame(steps),
                  "distributed DP per round: σ, q, C and C_eff (C plus the fixed-point grid's "
                  "rounding), t, the sites asked (n) and the noise shares in the sum"
                  + (" (sites_with_data: those whose clipped gradients are in it; a site that "
                     "does not train sends its share of the noise only)"
                     if "sites_with_data" in keys else "")
                  + ", the training participants N, the expected batch q·N and the SD of the "
                  "noise on the mean gradient; a round with fewer than n − t shares takes no "
                  "step")
    else:
        rep.text("ε per site is what each DP-SGD site reports: spent so far over every run "
                 "recorded in its own ledger, at its δ (Opacus accountant). The statistics round "
                 "and the evaluation histograms are outside the guarantee by default "
                 "(docs/privacy.md).")
    png = plots.epsilon_per_round(history, Path(run_dir) / "epsilon.png")
    if png is not None:
        rep.figure(png, "ε spent so far per site and round; × marks a refused round; dotted "
                        "lines are the sites' budgets")
    wide = epsilon_wide(history)
    if not wide.empty:
        rep.table(wide, "ε per site per round ('off': no DP at that site)")
        rep.table(epsilon_table(history), "per site and round: the mechanism (dp: dp-sgd or "
                                          "distributed), δ, budget, noise multiplier σ, "
                                          "DP-SGD steps, refusals")
    refused = [{"round": h["round"], **x} for h in history for x in h.get("refused", [])]
    if refused:
        rep.table(pd.DataFrame(refused), "rounds a site did not train, with its reason")
    central = [{"round": h["round"], **{k: h["central_dp"][k] for k in (
        "noise_multiplier", "clipping_norm", "sites_aggregated", "effective_noise_multiplier",
        "epsilon", "delta")}} for h in history if h.get("central_dp")]
    if central:
        rep.table(pd.DataFrame(central), f"{CENTRAL_DP}: site-level ε of the released model "
                                         "after each round (Opacus RDP, no sampling "
                                         "amplification)")


def write_server_report(run_dir: Path, cfg: SafnConfig, history: list[dict],
                        sites: list[str], flower: dict | None = None) -> Path:
    """The HTML report of a deployed run (`safn-server`): sites, learning curves per round
    (pooled and per site), the final metrics, external validation at held-out sites, ε per
    site where DP is on, rejected updates, Flower's account of traffic and compute."""
    run_dir = Path(run_dir)
    fed = cfg.federation
    rep = Report("safn-server: federated run",
                 f"{len(sites)} sites ({', '.join(sites)}); {fed.strategy}, "
                 f"{len(history)} of {fed.rounds} rounds × {fed.local_epochs} local epochs")
    held = cfg.server.held_out_sites
    # the kind of data each site said it has (statistics round), never this coordinator's own
    # data.source, which describes no site's data
    sources = data_sources(run_dir)
    rows = [{"site": s, "role": "held out (evaluation only)" if s in held else "training",
             "data (as the site described it)": source_name(sources[s]) if s in sources
             else "did not describe it",
             "rounds trained": sum(s in (h.get("sites_trained") or []) for h in history)}
            for s in sites]
    rep.heading("Sites").table(pd.DataFrame(rows))
    fake = synthetic_sites(sources)
    if fake:
        rep.text(f"Synthetic data (not real patients) at {', '.join(fake)}: the figures that "
                 "rest on those sites say nothing about real patients.")
    if history:
        last = selected_entry(history)
        learning_section(rep, history, run_dir,
                         "pooled metrics from summed score histograms of the training sites' "
                         "test splits; per-site ROC-AUC (sites below min_cell withhold theirs)",
                         f"selected round {last.get('round')}, pooled test "
                         f"({last.get('n_test')} participants at {last.get('sites_reported')} "
                         f"sites), threshold {last.get('threshold')}")
        rep.text(" ".join(line[0].upper() + line[1:] + "." for line in basis_lines(
            evaluation_basis(last, [s for s in (sorted(sources) or sites) if s not in held],
                             cfg.data.min_cell))))
        external = last.get("held_out") or {}
        if external:
            rep.heading("External validation at held-out sites")
            rows = []
            kclass = any(is_kclass(m) for m in external.values())
            keys = (("roc_auc", "balanced_accuracy", "qwk", "mae", "macro_f1") if kclass else
                    ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "pr_auc_pd",
                     "mcc"))
            for site, m in external.items():
                row = {"site": site, "n": (m or {}).get("n")}
                for k in keys:
                    if m and m.get(k) is None and kclass:
                        row[k] = "—"
                        continue
                    row[k] = (interval_text(m[k], (m.get("ci") or {}).get(k)) if m
                              else "withheld (min_cell)")
                rows.append(row)
            rep.table(pd.DataFrame(rows),
                      "all participants of each held-out site, at the training sites' "
                      "threshold; bootstrap 95 % CI in brackets (participants resampled within "
                      "each class, from the site's score histograms)")
        rejected_and_privacy(rep, history, run_dir)
    if flower:
        traffic = flower.get("network-traffic") or {}
        compute = flower.get("compute-time") or {}
        rep.heading("Flower's account of the run").table(
            {"status": flower.get("status"), "Flower run id": flower.get("run-id"),
             "run id (bundle.json, the sites' ledgers and audit logs)": run_identity(run_dir),
             "app sha256": flower.get("fab-hash"), **{f"traffic {k}": v for k, v in
                                                       traffic.items()},
             **{f"compute {k}": v for k, v in compute.items()}})
    rep.heading("Configuration")
    rep.text("The coordinator's configuration. Its data section describes no site's data: each "
             "site's own site.yaml does (the Sites table above says what each site described).")
    rep.code(dump_config(cfg))
    return rep.write(run_dir / "report.html")
