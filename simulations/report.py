"""The HTML report of a federated simulation: sites, learning curves, comparisons, LOSO."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from safn_core.config import SafnConfig, dump_config
from safn_core.federation.aggregate import selected_entry
from safn_core.federation.run_report import learning_section, rejected_and_privacy
from safn_core.metrics import METRICS
from safn_core.report import Report, interval_text


def kclass_metrics() -> tuple[str, ...]:
    """A K-class comparison's columns (`compare_kclass.SHOWN`)."""
    from safn.simulations.compare_kclass import SHOWN

    return SHOWN


def with_intervals(df: pd.DataFrame, metric: str) -> list[str]:
    """A metric's column with its 95 % interval (``{metric}_ci``) beside each figure."""
    cis = df[f"{metric}_ci"] if f"{metric}_ci" in df else [None] * len(df)
    return [interval_text(v, ci) for v, ci in zip(df[metric], cis)]


def write_sim_report(run_dir: Path, cfg: SafnConfig, source: str, sites: pd.DataFrame,
                     history: list[dict], comparison: pd.DataFrame | None,
                     loso: pd.DataFrame | None) -> Path:
    run_dir = Path(run_dir)
    rep = Report("safn-sim: federated simulation",
                 f"{source}; {cfg.simulation.partition} partition into {len(sites)} sites; "
                 f"{cfg.federation.strategy}, {cfg.federation.rounds} rounds × "
                 f"{cfg.federation.local_epochs} local epochs")
    rep.heading("Virtual sites").table(sites)
    if history:
        last = selected_entry(history)
        learning_section(rep, history, run_dir,
                         "pooled metrics from summed score histograms; per-site ROC-AUC on each "
                         "site's test split (sites below min_cell withhold theirs)",
                         f"selected round {last.get('round')}, pooled test ({last.get('n_test')} participants "
                         "reported)")
        rejected_and_privacy(rep, history, run_dir)
    if comparison is not None and not comparison.empty:
        rep.heading("Pooled vs federated vs local-only (pooled test set)")
        shown = comparison[["model", "n_train", *(["selected_round"] if "selected_round" in
                                                  comparison else [])]].copy()
        metrics = METRICS if "pr_auc_pd" in comparison else kclass_metrics()
        for k in metrics:
            shown[k] = with_intervals(comparison, k)
        rep.table(shown, f"every model selected by {cfg.federation.select} on its own "
                         f"validation data, patience {cfg.federation.patience} rounds of "
                         f"{cfg.federation.local_epochs} epochs; 95 % interval in brackets "
                         "(bootstrap over the pooled test set's participants, resampled within "
                         "each class): where one model's figure lies inside another's interval, "
                         "the difference between them may be chance")
    if loso is not None and not loso.empty:
        rep.heading("Leave-one-site-out external validation")
        binary = "positive" in loso
        counts = ["positive"] if binary else [c for c in loso.columns if c.startswith("n ")]
        metrics = (("roc_auc", "balanced_accuracy", "pr_auc_pd", "pr_auc_hc", "mcc") if binary
                   else ("roc_auc", "balanced_accuracy", "qwk", "macro_f1", "mae"))
        shown = loso[["held_out", "n", *counts]].copy()
        for k in metrics:
            shown[k] = with_intervals(loso, k)
        rep.table(shown, "per held-out site, bootstrap 95 % CI in brackets")
        if "floor_roc_auc" in loso:
            floor = loso[["held_out", "n"]].copy()
            for k in metrics:
                floor[k] = with_intervals(loso, f"floor_{k}")
            rep.table(floor, "the same held-out sites, the federation's logistic regression "
                             "floor (the model SAFN started from, at its round-0 threshold)")
    rep.heading("Configuration").code(dump_config(cfg))
    return rep.write(run_dir / "report.html")
