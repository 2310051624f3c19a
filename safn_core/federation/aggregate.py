"""Server-side aggregation of what sites send: statistics, class counts, score histograms."""

from __future__ import annotations

import numpy as np

from safn_core.data.cohort import Modality
from safn_core.metrics import metrics_from_histogram, threshold_from_histogram
from safn_core.preprocess import FeatureStats, Preprocessor


def global_preprocessing(modalities: tuple[Modality, ...], stats: list[FeatureStats],
                         class_counts: list[list[int]]) -> tuple[Preprocessor, list[int]]:
    """One preprocessing for the whole federation, from the sum of the sites' statistics."""
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    pre = Preprocessor(modalities).fit_stats(total)
    counts = np.sum(np.asarray(class_counts), axis=0).astype(int).tolist()
    return pre, counts


def round_metrics(site_hists: dict[str, dict]) -> dict:
    """Pooled metrics (threshold from the pooled validation histogram) and per-site metrics.

    ``site_hists``: site → {"val": (2, bins), "test": (2, bins), "val_withheld", "test_withheld"}.
    Pooled AUCs come from the SUM of the sites' histograms, never from averaging site AUCs.
    """
    first = next(iter(site_hists.values()))
    val = sum((h["val"] for h in site_hists.values()), np.zeros_like(first["val"]))
    test = sum((h["test"] for h in site_hists.values()), np.zeros_like(first["test"]))
    threshold = threshold_from_histogram(val)
    pooled = metrics_from_histogram(test, threshold)
    per_site = {name: (None if h["test_withheld"] else metrics_from_histogram(h["test"], threshold))
                for name, h in site_hists.items()}
    return {"threshold": threshold, "pooled": pooled, "sites": per_site,
            "n_test": int(test.sum()), "n_val": int(val.sum())}
