"""The coordinator's K-class (K > 2) evaluation: pooled metrics from summed per-class score
histograms and confusion counts (`safn_core.multiclass_federated`).

`safn_core.federation.aggregate` dispatches here when a site's histograms are (K, K, bins);
binary runs never reach this module. The decision rule is argmax (the sites' confusion counts),
so a K-class entry has ``decision_rule`` and no ``threshold``. The macro one-vs-rest ROC-AUC is
``roc_auc`` (pooled, per site) and ``val_roc_auc`` (what a round is selected by), as for K = 2;
the other keys are those of `safn_core.multiclass.multiclass_metrics`.
"""

from __future__ import annotations

import numpy as np

from safn_core.metrics import _percentile_intervals, interval_lists
from safn_core.multiclass import (class_counts_from_histogram, metrics_from_class_histograms,
                                  small_classes, withhold_small_classes)
from safn_core.multiclass_bootstrap import _confusion_rows
from safn_core.targets import Target

RULE = "argmax"


def is_multiclass(hist) -> bool:
    """Whether a site's histogram is K-class ((K, K, bins)) rather than binary ((2, bins))."""
    return np.asarray(hist).ndim == 3


def target_info(target: Target | None, K: int) -> tuple[bool, list[str]]:
    """Whether the classes are ordered, and their names (``class k`` without a target: then QWK
    and MAE are not computed)."""
    if target is None:
        return False, [f"class {k}" for k in range(K)]
    if target.n_classes != K:
        raise ValueError(f"target {target.name!r} has {target.n_classes} classes, the "
                         f"histograms {K}")
    return target.ordered, list(target.classes)


def confusion_intervals(C, ordered: bool, n_boot: int = 500, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float] | None]:
    """95 % intervals of accuracy, balanced accuracy and (ordered) QWK from confusion counts
    alone: resampling participants within each true class draws each row from a multinomial
    over its predicted classes. The macro ROC-AUC has none here (``roc_auc``: None): it would
    need each participant's K scores jointly, which the per-class histograms do not keep."""
    C = np.rint(np.asarray(C, dtype=float)).clip(min=0).astype(np.int64)
    rng = np.random.default_rng(seed)
    rows = C.sum(1)
    draws = np.stack([rng.multinomial(r, C[i] / r, size=n_boot) if r else
                      np.zeros((n_boot, len(C)), dtype=np.int64)
                      for i, r in enumerate(rows)], axis=1).astype(float)  # (draws, K, K)
    found = _confusion_rows(draws, ordered)
    found["accuracy"] = np.trace(draws, axis1=1, axis2=2) / max(rows.sum(), 1)
    if not ordered:
        found.pop("qwk")
    return {"roc_auc": None, **interval_lists(_percentile_intervals(found, level))}


def validation_metrics(val: np.ndarray, loss_sum: float, examples: int,
                       val_confusion=None, target: Target | None = None) -> dict:
    """Pooled validation loss (mean K-class cross-entropy) and macro ROC-AUC, where at least
    two classes are in the pooled validation histogram (else nothing to select by)."""
    counts = class_counts_from_histogram(val)
    if (counts > 0).sum() < 2:
        return {}
    out = {}
    if examples > 0:
        out["val_loss"] = float(loss_sum) / int(examples)
    ordered, names = target_info(target, len(counts))
    C = np.zeros((len(counts),) * 2) if val_confusion is None else val_confusion
    out["val_roc_auc"] = metrics_from_class_histograms(val, C, ordered, names)["roc_auc"]
    return out


def _sum(parts: list[dict], key: str, shape) -> np.ndarray:
    return sum((np.asarray(h[key], dtype=np.int64) for h in parts),
               np.zeros(shape, dtype=np.int64))


def round_metrics(site_hists: dict[str, dict], target: Target | None = None) -> dict:
    """`safn_core.federation.aggregate.round_metrics` for K > 2: site → {"val", "test":
    (K, K, bins), "val_confusion", "test_confusion": (K, K), "withheld", optionally
    "val_loss_sum", "val_examples"}. Pooled metrics from the sums of the sites that did not
    withhold; per-site metrics from each one's own; ``pooled_ci`` from the pooled confusion
    counts (`confusion_intervals`)."""
    reported = [h for h in site_hists.values() if not h["withheld"]]
    shape = np.asarray(next(iter(site_hists.values()))["test"]).shape
    K = shape[0]
    ordered, names = target_info(target, K)
    val, test = _sum(reported, "val", shape), _sum(reported, "test", shape)
    val_c, test_c = _sum(reported, "val_confusion", (K, K)), _sum(reported, "test_confusion",
                                                                    (K, K))
    pooled = metrics_from_class_histograms(test, test_c, ordered, names) if test.sum() else None
    out = {"decision_rule": RULE, "pooled": pooled,
           "sites": {name: None if h["withheld"] else metrics_from_class_histograms(
               h["test"], h["test_confusion"], ordered, names) for name, h in site_hists.items()},
           **({"pooled_ci": confusion_intervals(test_c, ordered)} if pooled else {}),
           "sites_reported": len(reported),
           "sites_withheld": sorted(n for n, h in site_hists.items() if h["withheld"]),
           "n_test": int(class_counts_from_histogram(test).sum()),
           "n_val": int(class_counts_from_histogram(val).sum())}
    out.update(validation_metrics(val, sum(float(h.get("val_loss_sum", 0.0)) for h in reported),
                                  sum(int(h.get("val_examples", 0)) for h in reported), val_c,
                                  target))
    return out


def secure_round_metrics(pooled: dict, site_metrics: dict[str, dict | None], min_cell: int,
                         summed_sites: list[str] | None = None,
                         target: Target | None = None) -> dict:
    """`safn_core.federation.aggregate.secure_round_metrics` for K > 2, ``min_cell`` per class on
    the federation-wide counts of each split: the pooled test metrics with what describes a
    class of 1..min_cell - 1 people withheld (`withhold_small_classes`), None when fewer than
    two classes are present; the validation metrics (model selection) only when no validation
    class is small and at least two are present."""
    val, test = np.asarray(pooled["val"]), np.asarray(pooled["test"])
    K = val.shape[0]
    ordered, names = target_info(target, K)
    val_n, test_n = class_counts_from_histogram(val), class_counts_from_histogram(test)
    val_ok = not small_classes(val_n, min_cell) and (val_n > 0).sum() >= 2
    test_any = (test_n > 0).sum() >= 2
    test_ok = test_any and not small_classes(test_n, min_cell)
    metrics = None
    if test_any:
        metrics = withhold_small_classes(metrics_from_class_histograms(
            test, pooled["test_confusion"], ordered, names), test_n, min_cell)
    out = {"decision_rule": RULE, "pooled": metrics,
           "sites": {name: ({"roc_auc": m["roc_auc"], "n": m["n"]} if m else None)
                     for name, m in site_metrics.items()},
           "sites_reported": int(pooled["sites"]) if test_any else 0,
           "sites_withheld": sorted(n for n, m in site_metrics.items() if not m),
           "n_test": int(test_n.sum()) if test_ok else 0,
           "n_val": int(val_n.sum()) if val_ok else 0, "secure_aggregation": True}
    if test_ok:
        out["pooled_ci"] = confusion_intervals(pooled["test_confusion"], ordered)
    if test_any and summed_sites is not None:
        out["sites_summed"] = sorted(summed_sites)
    if val_ok:
        out.update(validation_metrics(val, float(pooled["val_loss_sum"]),
                                      int(pooled["val_examples"]), pooled.get("val_confusion"),
                                      target))
    return out


def held_out_metrics(site_hists: dict[str, dict], target: Target | None = None) -> dict:
    """External validation for K > 2: each held-out site's metrics on all its participants
    (argmax), with 95 % intervals from its confusion counts; None where it withheld them."""
    out = {}
    for name, h in site_hists.items():
        if h["withheld"]:
            out[name] = None
            continue
        ordered, names = target_info(target, np.asarray(h["test"]).shape[0])
        m = metrics_from_class_histograms(h["test"], h["test_confusion"], ordered, names)
        out[name] = {**m, "n": int(class_counts_from_histogram(h["test"]).sum()),
                     "ci": confusion_intervals(h["test_confusion"], ordered)}
    return out
