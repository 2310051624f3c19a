"""A site's personal model against the global model on the site's own test split (no Flower
here). Training the personal model is `personal_training`; what of the comparison goes on the
wire is `personal_wire`.

`personalise` ends a personalised run at a site: its personal model (fine-tuned now, or Ditto's
kept one, or the global model where its validation split is too small to choose one), the
personal model's threshold, and both models evaluated on the site's test split
(`compare_on_test`). The site keeps every figure (`personal_store`); only the metrics of a test
split whose classes both have at least ``min_cell`` people may leave it, and the confusion
counts behind the pooled comparison (`pooled_from_confusion`) go through secure aggregation
where the run uses it.

The personal model's threshold (``personalisation.threshold``) is recorded with a code of where
it comes from (``threshold_from``):

==========================  ===============================================================
``site_validation``         maximum balanced accuracy on the site's validation split (``site``)
``federation``              the federation's (``global``)
``federation_one_class``    the federation's: the site's validation split has one class
``federation_kept_global``  the federation's: the site keeps the global model
                            (`personal_training.unfit_validation`)
``argmax``                  a K-class target (K > 2): no threshold, the most probable class
==========================  ===============================================================

With K > 2 classes both models are compared at the argmax rule by `COMPARED_K` (macro
one-vs-rest ROC-AUC, balanced accuracy, accuracy, and QWK for an ordered target), and the
confusion counts are the K × K matrix (rows = true class), flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from safn_core.config import PrivacyConfig
from safn_core.federation.personal_store import PersonalStore
from safn_core.federation.personal_training import (PersonalRefused, fine_tune, load_model,
                                                    unfit_validation)
from safn_core.federation.site import Site
from safn_core.metrics import binary_metrics, choose_threshold
from safn_core.preprocess import Preprocessor
from safn_core.training.local import predict

COMPARED = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")
"""The metrics of the global-vs-personal comparison."""

COMPARED_K = ("balanced_accuracy", "accuracy", "qwk", "roc_auc")
"""The metrics of a K-class target's comparison (K > 2; ``qwk`` only for an ordered one)."""


def compared(n_classes: int) -> tuple[str, ...]:
    """The comparison's metrics for a target of ``n_classes`` classes."""
    return COMPARED if n_classes == 2 else COMPARED_K


def confusion_size(n_classes: int) -> int:
    """Length of a model's confusion counts: [TP, FN, TN, FP], or the K × K matrix flat."""
    return 4 if n_classes == 2 else n_classes * n_classes

SELECTED_KEYS = ("epoch", "round", "epochs_trained", "kept", "because", "stopped")
"""What a comparison keeps of the personal model's choice (`fine_tune`'s or Ditto's record)."""


@dataclass
class Comparison:
    """The global and the personal model on a site's test split.

    ``reported``: both classes of the test split have at least ``min_cell`` people, so the
    metrics may leave the site. ``confusion``: [TP, FN, TN, FP] of each model at its threshold
    (for the pooled comparison). ``selected``: the choice of the personal model (``epoch`` or
    ``round``; ``kept: "global"`` with the code ``because`` where the site keeps the global
    model). ``refusal``: the one line a site without a personal model sends the coordinator.
    `record`: everything, for the site's own disk.
    """

    site: str
    method: str
    class_counts: list[int]
    reported: bool
    metrics: dict[str, dict[str, float]]
    confusion: dict[str, list[int]]
    thresholds: dict[str, float]
    selected: dict = field(default_factory=dict)
    refusal: str | None = None

    @classmethod
    def refused(cls, site: str, method: str, reason: str, n_classes: int = 2) -> "Comparison":
        """A site without a personal model: nothing compared, its one-line reason."""
        size = confusion_size(n_classes)
        return cls(site, method, [0] * n_classes, False, {},
                   {"global": [0] * size, "personal": [0] * size}, {}, refusal=reason)

    @property
    def kept_global(self) -> bool:
        return self.selected.get("kept") == "global"

    def record(self) -> dict:
        return {"site": self.site, "method": self.method, "test_class_counts": self.class_counts,
                "reported": self.reported, "metrics": self.metrics, "confusion": self.confusion,
                "thresholds": self.thresholds, "selected": self.selected,
                "refusal": self.refusal}


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> list[int]:
    """[TP, FN, TN, FP] of scores ``p`` at ``threshold``."""
    pred = np.asarray(p) >= threshold
    y = np.asarray(y).astype(bool)
    return [int((pred & y).sum()), int((~pred & y).sum()), int((~pred & ~y).sum()),
            int((pred & ~y).sum())]


def compare_on_test(site: Site, pre: Preprocessor, global_weights: dict, personal_weights: dict,
                    thresholds: dict[str, float]) -> tuple[dict, dict, list[int]]:
    """Both models' metrics and confusion counts on the site's test split."""
    data = site.arrays(pre, "test")
    if site.cohort.n_classes > 2:
        return _compare_kclass(site, pre, data, global_weights, personal_weights)
    metrics, counts = {}, {}
    for which, weights in (("global", global_weights), ("personal", personal_weights)):
        p, _ = predict(load_model(site, pre, weights), data)
        full = binary_metrics(data.y, p, thresholds[which])
        metrics[which] = {k: float(full[k]) for k in COMPARED}
        counts[which] = confusion(data.y, p, thresholds[which])
    return metrics, counts, np.bincount(data.y, minlength=2).tolist()


def _compare_kclass(site: Site, pre: Preprocessor, data, global_weights: dict,
                    personal_weights: dict) -> tuple[dict, dict, list[int]]:
    from safn_core.multiclass import multiclass_metrics

    target, k = site.cohort.target, site.cohort.n_classes
    metrics, counts = {}, {}
    for which, weights in (("global", global_weights), ("personal", personal_weights)):
        p, _ = predict(load_model(site, pre, weights), data)
        full = multiclass_metrics(data.y, p, target.ordered, site.cohort.label_names)
        metrics[which] = {m: (None if full[m] is None else float(full[m])) for m in COMPARED_K}
        counts[which] = [int(c) for c in np.asarray(full["confusion"]).ravel()]
    return metrics, counts, np.bincount(data.y, minlength=k)[:k].tolist()


def personal_threshold(site: Site, pre: Preprocessor, weights: dict,
                       federation_threshold: float) -> tuple[float, str]:
    """The personal model's decision threshold and the code of where it comes from."""
    if site.cohort.n_classes > 2:  # the argmax rule: no threshold
        return float(federation_threshold), "argmax"
    if site.cfg.personalisation.threshold == "global":
        return float(federation_threshold), "federation"
    data = site.arrays(pre, "val")
    if len(np.unique(data.y)) < 2:
        return float(federation_threshold), "federation_one_class"
    p, _ = predict(load_model(site, pre, weights), data)
    return float(choose_threshold(data.y, p)), "site_validation"


def personalise(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int], *,
                federation_threshold: float, privacy: PrivacyConfig, state_dir: Path | None,
                run_id: str, seed: int) -> Comparison:
    """The end of a personalised run at a site: its personal model (fine-tuned now, or Ditto's
    kept one), its threshold, and the comparison with the global model on the test split. The
    personal model and the full comparison are written to the site's state folder."""
    method = site.cfg.personalisation.method
    store = PersonalStore(state_dir, run_id)
    unfit = unfit_validation(site)
    try:
        if unfit is not None:  # nothing to choose with: the global model, its threshold
            weights, chosen = global_weights, {"method": method, "epoch": 0,
                                               "kept": "global", "because": unfit}
        elif method == "fine_tune":
            weights, chosen = fine_tune(site, global_weights, pre, class_counts,
                                        privacy=privacy, state_dir=state_dir, run_id=run_id,
                                        seed=seed)
        else:
            weights, chosen = store.selected()
            if weights is None:
                raise PersonalRefused("no personal model: the site trained its personal model "
                                      "in no round of this run")
    except PersonalRefused as exc:
        out = Comparison.refused(site.name, method, str(exc), site.cohort.n_classes)
        store.save_evaluation(out.record())
        return out
    if unfit is not None:
        threshold, source = float(federation_threshold), "federation_kept_global"
    else:
        threshold, source = personal_threshold(site, pre, weights, federation_threshold)
    chosen = {**chosen, "threshold": threshold, "threshold_from": source}
    if method == "fine_tune" or unfit is not None:
        store.save_selected(weights, chosen)
    thresholds = {"global": float(federation_threshold), "personal": threshold}
    metrics, counts, n = compare_on_test(site, pre, global_weights, weights, thresholds)
    reported = min(n) >= site.cfg.data.min_cell
    out = Comparison(site.name, method, n, reported, metrics, counts, thresholds,
                     {k: chosen[k] for k in SELECTED_KEYS if chosen.get(k) is not None})
    store.save_evaluation(out.record())
    return out


def pooled_from_confusion(total: dict[str, list[int]], min_cell: int,
                          ordered: bool = False) -> dict | None:
    """Pooled balanced accuracy, sensitivity and specificity of each model from summed
    confusion counts; None when a class of the pooled test participants is below min_cell.
    K × K counts (K > 2, flat): balanced accuracy, accuracy, and QWK and MAE when ``ordered``
    (`safn_core.multiclass.confusion_metrics`)."""
    if len(total["global"]) != 4:
        return _pooled_kclass(total, min_cell, ordered)
    g = np.asarray(total["global"], dtype=float)
    pos, neg = g[0] + g[1], g[2] + g[3]
    if min(pos, neg) < min_cell:
        return None
    out = {"n": int(pos + neg)}
    for which in ("global", "personal"):
        tp, fn, tn, fp = (float(x) for x in total[which])
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        out[which] = {"balanced_accuracy": (sens + spec) / 2, "sensitivity": sens,
                      "specificity": spec}
    return out


def _pooled_kclass(total: dict[str, list[int]], min_cell: int, ordered: bool) -> dict | None:
    from safn_core.multiclass import confusion_metrics

    k = int(round(np.sqrt(len(total["global"]))))
    matrices = {w: np.asarray(total[w], dtype=float).reshape(k, k) for w in ("global", "personal")}
    counts = matrices["global"].sum(1)
    if counts.min() < min_cell:
        return None
    out = {"n": int(counts.sum())}
    for which, c in matrices.items():
        m = confusion_metrics(c, ordered)
        out[which] = {key: m[key] for key in ("balanced_accuracy", "accuracy", "qwk", "mae")}
    return out
