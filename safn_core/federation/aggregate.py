"""Server-side aggregation of what sites send: statistics, class counts, weights, histograms.

Everything here is plain NumPy so that the Flower ServerApp, the tests and their in-process
reference loop (`tests/reference_loop.py`) compute exactly the same thing.

A K-class target (K > 2) sends (K, K, bins) histograms and (K, K) confusion counts; the
evaluation functions below hand those to `safn_core.federation.aggregate_multiclass` (``target``:
the run's `safn_core.targets.Target`, for the class names and order) and keep everything binary
exactly as it was.
"""

from __future__ import annotations

import numpy as np

from safn_core.data.cohort import Modality
from safn_core.federation import aggregate_multiclass as kclass
from safn_core.metrics import (bootstrap_histogram_ci, interval_lists, metrics_from_histogram,
                                threshold_from_histogram)
from safn_core.preprocess import FeatureStats, Preprocessor
from safn_core.targets import Target

# ------------------------------------------------------------------ statistics round


def global_preprocessing(modalities: tuple[Modality, ...], stats: list[FeatureStats],
                         class_counts: list[list[int]]) -> tuple[Preprocessor, list[int]]:
    """One preprocessing for the whole federation, from the sum of the sites' statistics.

    Sums of counts, sums and sums of squares are exactly the pooled training split's, so the
    means and SDs equal a centralised fit on all sites' training data (up to float rounding).
    """
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    pre = Preprocessor(modalities).fit_stats(total)
    # noised class counts (privacy.statistics: gaussian) are not integers: round the sum
    summed = np.rint(np.sum(np.asarray(class_counts, dtype=np.float64), axis=0))
    counts = np.maximum(summed, 1).astype(int).tolist()
    return pre, counts


# ------------------------------------------------------------------ weights


def weighted_mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """FedAvg: the examples-weighted mean of the sites' weights (Flower's formula)."""
    total = float(sum(n for _, n in updates))
    keys = updates[0][0].keys()
    return {k: sum(w[k] * (n / total) for w, n in updates).astype(updates[0][0][k].dtype)
            for k in keys}


# ------------------------------------------------------------------ evaluation


def pooled_intervals(test: np.ndarray, threshold: float) -> dict[str, list[float] | None]:
    """95 % intervals of the pooled test metrics (``pooled_ci``: metric → [low, high]): a
    bootstrap over the pooled test histograms' counts (participants resampled within each class,
    `bootstrap_histogram_ci`, fixed seed), so no participant's score is needed; the coordinator
    learns nothing beyond the histograms it already holds."""
    return interval_lists(bootstrap_histogram_ci(test, threshold))


def round_metrics(site_hists: dict[str, dict], target: Target | None = None) -> dict:
    """Pooled metrics (threshold from the pooled validation histogram) and per-site metrics.

    ``site_hists``: site → {"val": (2, bins), "test": (2, bins), "withheld": bool, and
    optionally "val_loss_sum", "val_examples"}. A withheld site (fewer than min_cell people of a
    class in a split) sent zeros and has no per-site metrics. Pooled AUCs come from the SUM of
    the histograms, never from averaging site AUCs; pooled accuracy / sensitivity / specificity
    from the summed confusion counts at the threshold. The pooled validation loss and ROC-AUC
    (``val_loss``, ``val_roc_auc``: what the coordinator selects a round by) come from the same
    reporting sites' sums. ``pooled_ci``: the pooled test metrics' 95 % intervals
    (`pooled_intervals`), where there are pooled test metrics. K > 2:
    `aggregate_multiclass.round_metrics`.
    """
    if kclass.is_multiclass(next(iter(site_hists.values()))["test"]):
        return kclass.round_metrics(site_hists, target)
    reported = {k: h for k, h in site_hists.items() if not h["withheld"]}
    bins = next(iter(site_hists.values()))["test"].shape[1]
    val = sum((h["val"] for h in reported.values()), np.zeros((2, bins), dtype=np.int64))
    test = sum((h["test"] for h in reported.values()), np.zeros((2, bins), dtype=np.int64))
    threshold = threshold_from_histogram(val)
    pooled = metrics_from_histogram(test, threshold) if test.sum() else None
    per_site = {name: (None if h["withheld"] else metrics_from_histogram(h["test"], threshold))
                for name, h in site_hists.items()}
    out = {"threshold": threshold, "pooled": pooled, "sites": per_site,
           **({"pooled_ci": pooled_intervals(test, threshold)} if pooled else {}),
           "sites_reported": len(reported),
           "sites_withheld": sorted(set(site_hists) - set(reported)),
           "n_test": int(test.sum()), "n_val": int(val.sum())}
    out.update(validation_metrics(
        val, sum(float(h.get("val_loss_sum", 0.0)) for h in reported.values()),
        sum(int(h.get("val_examples", 0)) for h in reported.values()), threshold))
    return out


def validation_metrics(val: np.ndarray, loss_sum: float, examples: int,
                       threshold: float) -> dict:
    """The pooled validation loss (mean cross-entropy) and ROC-AUC of a round, where the
    pooled validation histogram has both classes (else neither: nothing to select by)."""
    out = {}
    if val.sum(axis=1).min() <= 0:
        return out
    if examples > 0:
        out["val_loss"] = float(loss_sum) / int(examples)
    out["val_roc_auc"] = metrics_from_histogram(val, threshold)["roc_auc"]
    return out


def secure_round_metrics(pooled: dict, site_metrics: dict[str, dict | None],
                         min_cell: int, summed_sites: list[str] | None = None,
                         target: Target | None = None) -> dict:
    """Pooled metrics from a securely summed evaluation (`safn_core.federation.secure_records`).

    ``pooled``: the federation-wide sums (``val``, ``test`` histograms, ``val_loss_sum``,
    ``val_examples``, ``sites``); ``min_cell`` applies to the federation-wide class counts of
    each split. ``site_metrics``: each site's own ROC-AUC and n, which it reports only where its
    own counts pass ``min_cell`` (None otherwise). No per-site histogram exists here.
    ``summed_sites``: the names of the sites whose values are in the sum (``sites_summed``,
    recorded with the pooled metrics: which sites they rest on, not how many people each has).
    ``pooled_ci``: the pooled test metrics' 95 % intervals from the summed histograms
    (`pooled_intervals`), where the pooled test metrics pass ``min_cell``. K > 2 (``min_cell``
    per class): `aggregate_multiclass.secure_round_metrics`.
    """
    if kclass.is_multiclass(pooled["test"]):
        return kclass.secure_round_metrics(pooled, site_metrics, min_cell, summed_sites, target)
    val, test = np.asarray(pooled["val"]), np.asarray(pooled["test"])
    val_ok = val.sum(axis=1).min() >= min_cell
    test_ok = test.sum(axis=1).min() >= min_cell
    threshold = threshold_from_histogram(val) if val_ok else 0.5
    out = {"threshold": threshold, "threshold_from": "pooled validation" if val_ok else
           "0.5 (pooled validation below min_cell)",
           "pooled": metrics_from_histogram(test, threshold) if test_ok else None,
           "sites": {name: ({"roc_auc": m["roc_auc"], "n": m["n"]} if m else None)
                     for name, m in site_metrics.items()},
           "sites_reported": int(pooled["sites"]) if test_ok else 0,
           "sites_withheld": sorted(n for n, m in site_metrics.items() if not m),
           "n_test": int(test.sum()) if test_ok else 0, "n_val": int(val.sum()) if val_ok else 0,
           "secure_aggregation": True}
    if test_ok:
        out["pooled_ci"] = pooled_intervals(test, threshold)
    if test_ok and summed_sites is not None:
        out["sites_summed"] = sorted(summed_sites)
    if val_ok:
        out.update(validation_metrics(val, float(pooled["val_loss_sum"]),
                                      int(pooled["val_examples"]), threshold))
    return out


def held_out_metrics(site_hists: dict[str, dict], threshold: float,
                     target: Target | None = None) -> dict:
    """External validation: each held-out site's metrics on all its participants at the
    training sites' threshold, with bootstrap 95 % CIs from its histograms (`ci`: metric →
    [low, high]); None where it withheld them for small cells. K > 2 (no threshold: argmax):
    `aggregate_multiclass.held_out_metrics`."""
    if site_hists and kclass.is_multiclass(next(iter(site_hists.values()))["test"]):
        return kclass.held_out_metrics(site_hists, target)
    out = {}
    for name, h in site_hists.items():
        if h["withheld"]:
            out[name] = None
            continue
        ci = bootstrap_histogram_ci(h["test"], threshold)
        out[name] = {**metrics_from_histogram(h["test"], threshold), "n": int(h["test"].sum()),
                     "ci": {k: list(v) for k, v in ci.items()}}
    return out


def selected_entry(history: list[dict]) -> dict:
    """The history entry of the round the run selected as its model (the last round's entry
    says which); the last entry for a run without selection."""
    if not history:
        return {}
    chosen = history[-1].get("selected_round")
    return next((e for e in history if e["round"] == chosen), history[-1])
