"""Validation and recalibration of a K-class bundle (K > 2) at a site: the K-class half of
`safn_core.validation` (which dispatches here on ``bundle.n_classes``).

- `check_target`: the site's data must carry the bundle's target: the same K classes, by name
  and in the same order (labels 0..K-1 mean the same classes). Anything else is one
  `DataError` naming both and what to do. Every bundle (binary too) goes through it.
- `validate_multiclass`: the class probabilities of every participant (through the bundle's
  calibration map), the predicted class by the bundle's decision rule (argmax, or its ordinal
  cut points where it carries them), `multiclass.multiclass_metrics` with bootstrap 95 % CIs
  and the majority-class baseline.
- `recalibrate_multiclass`: the participants split as for a binary bundle (by participant,
  stratified by class), a temperature or vector scaling map fitted on the recalibration part's
  K logits (`safn_core.recalibration_multiclass`) and, for a bundle with ordinal cut points,
  the cut points refitted on its calibrated probabilities; before/after on the evaluation part.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.errors import DataError
from safn_core.recalibration import RecalibrationOptions, counts
from safn_core.recalibration_parts import SplitParts, split_site, validation_record
from safn_core.recalibration_multiclass import MultiClassMap, fit_multiclass_map
from safn_core.targets import Target
from safn_core.validation_scope import modality_weights, scope_record


def check_target(bundle_target: Target, cohort, model: Path) -> None:
    """Refuse data whose classes are not the bundle's: another K, other class names, a class
    the bundle does not know, or the same classes in another order."""
    data_classes = tuple(cohort.label_names)
    data_name = getattr(getattr(cohort, "target", None), "name", "label")
    if data_classes == bundle_target.classes:
        return
    unknown = [c for c in data_classes if c not in bundle_target.classes]
    why = (f"class(es) {', '.join(map(repr, unknown))} the bundle does not know" if unknown
           else f"{len(data_classes)} classes instead of {bundle_target.n_classes}"
           if len(data_classes) != bundle_target.n_classes
           else "the same classes in another order")
    how = (f"load it with data.target: {bundle_target.name}" if bundle_target.name in
           ("pd_vs_hc", "hc_prodromal_pd", "hy_stage") else "")
    how = " or ".join(filter(None, [how, "give a table a mapping whose label.values are "
                                         f"{list(bundle_target.classes)} in that order"]))
    raise DataError(
        f"{cohort.report.source}: the data's target {data_name!r} has classes "
        f"{list(data_classes)}, but the model bundle {model} predicts {bundle_target.name!r} "
        f"with classes {list(bundle_target.classes)} ({why}); {how}, or validate a bundle "
        "trained for this target")


def rule_text(cutpoints) -> str:
    """The decision rule in words."""
    if cutpoints is None:
        return "argmax (the most probable class)"
    return ("ordinal cut points " + ", ".join(f"{c:.3f}" for c in cutpoints)
            + " on the expected class index Σ k·P_k (fitted on validation data)")


def _bootstrap(y, p, target: Target, cutpoints, n_boot: int, seed: int) -> dict:
    """95 % stratified bootstrap intervals (`multiclass.bootstrap_ci_multiclass`: macro
    ROC-AUC, balanced accuracy and, for an ordered target, QWK); None where undefined."""
    from safn_core.multiclass import bootstrap_ci_multiclass

    ci = bootstrap_ci_multiclass(y, p, ordered=target.ordered,
                                 rule="argmax" if cutpoints is None else "cutpoints",
                                 cutpoints=cutpoints, n_boot=n_boot, seed=seed)
    return {k: None if v is None or any(np.isnan(b) for b in v) else [float(b) for b in v]
            for k, v in ci.items()}


def kclass_figures(y: np.ndarray, p: np.ndarray, target: Target, cutpoints=None,
                   n_boot: int = 1000, seed: int = 0, majority_class: int | None = None) -> dict:
    """Every reported figure of labels ``y`` and class probabilities ``p`` (n, K): the scalar
    metrics (with bootstrap 95 % CIs where `_bootstrap` gives them), the confusion matrix, per-class figures, the
    majority-class baseline and the decision rule."""
    from safn_core.multiclass import SCALARS, multiclass_metrics

    rule = "argmax" if cutpoints is None else "cutpoints"
    point = multiclass_metrics(y, p, target.ordered, list(target.classes), rule=rule,
                               cutpoints=cutpoints, majority_class=majority_class)
    ci = _bootstrap(y, p, target, cutpoints, n_boot, seed) if n_boot else {}
    return {"metrics": {k: {"value": point[k], "ci": ci.get(k)} for k in SCALARS
                        if point.get(k) is not None},
            "confusion": point["confusion"], "per_class": point["per_class"],
            "majority": {**point["majority"],
                         "class_name": target.classes[point["majority"]["class"]]},
            "rule": rule, "cutpoints": cutpoints, "rule_text": rule_text(cutpoints),
            "classes": list(target.classes)}


def probability_columns(p: np.ndarray, classes) -> dict:
    """One probability column per class, named ``p_<class>``."""
    return {f"p_{name}": p[:, k] for k, name in enumerate(classes)}


@dataclass(frozen=True)
class MultiClassValidation:
    """A K-class bundle on the site's data: labels ``y``, class probabilities ``p`` (n, K),
    the predicted classes, ``figures`` (`kclass_figures`) and the modality weights."""

    site: object  # validation.SiteData
    participant_ids: np.ndarray
    y: np.ndarray
    p: np.ndarray
    predicted: np.ndarray
    figures: dict
    modality_weights: dict[str, float]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.site.bundle.label_names

    def class_counts(self) -> dict:
        return counts(self.y, self.classes)

    def record(self) -> dict:
        """``validation.json``."""
        bundle = self.site.bundle
        return {**scope_record(self.site), "n": len(self.y), "target": bundle.target.to_dict(),
                "class_counts": self.class_counts(), "decision_rule": self.figures["rule"],
                "cutpoints": self.figures["cutpoints"], "metrics": self.figures["metrics"],
                "confusion": self.figures["confusion"], "per_class": self.figures["per_class"],
                "majority": self.figures["majority"], "modality_weights": self.modality_weights,
                "recalibration": bundle.meta.get("recalibration"),
                "training_calibration": bundle.meta.get("calibration"),
                "harmonisation": self.site.harmonisation}

    def predictions(self) -> pd.DataFrame:
        """``predictions.csv`` (stays at the site): the label, one probability per class and
        the predicted class (by name)."""
        names = np.asarray(self.classes, dtype=object)
        return pd.DataFrame({"participant_id": self.participant_ids, "y": self.y,
                             "class": names[self.y], **probability_columns(self.p, self.classes),
                             "predicted": names[self.predicted]})


def validate_multiclass(site, *, n_boot: int = 1000, seed: int = 0) -> MultiClassValidation:
    """The K-class bundle's predictions on the site's data and every reported figure."""
    bundle = site.bundle
    arrays = bundle.arrays(site.table, adjustments=site.adjustments)
    p, alpha = bundle.predict(arrays)
    return MultiClassValidation(site, site.table.index.to_numpy(), arrays.y, p,
                                bundle.decide(p),
                                kclass_figures(arrays.y, p, bundle.target, bundle.cutpoints,
                                               n_boot, seed),
                                modality_weights(bundle, alpha))


# ------------------------------------------------------------------------------ recalibration


@dataclass(frozen=True)
class MultiClassRecalibration(SplitParts):
    """A K-class recalibration at the site: the split, the fitted ``cmap`` (and refitted cut
    points, None: argmax), ``before`` / ``after`` figures on the evaluation part only (each
    with the majority-class baseline: the recalibration part's majority class), their
    probabilities, the modality weights and the site bundle's ``recalibration`` record."""

    site: object
    options: RecalibrationOptions
    participant_ids: np.ndarray
    y: np.ndarray
    in_recal: np.ndarray
    cmap: MultiClassMap
    cutpoints: list[float] | None
    before: dict
    after: dict
    p_before: np.ndarray
    p_after: np.ndarray
    modality_weights: dict[str, float]
    record: dict

    @property
    def majority(self) -> dict:
        return self.after["majority"]

    def site_meta(self) -> dict:
        """The site bundle's ``bundle.json``: the bundle's, with the ``recalibration`` record
        and the decision rule in force after it."""
        meta = {**self.site.bundle.meta, "recalibration": self.record}
        meta["decision"] = {"rule": "argmax" if self.cutpoints is None else "cutpoints",
                            "cutpoints": self.cutpoints}
        return meta

    def record_for(self, site_bundle: Path) -> dict:
        """``validation.json``, naming the site bundle written at ``site_bundle``."""
        return validation_record(self, site_bundle, target=self.site.bundle.target.to_dict())

    def predictions(self) -> pd.DataFrame:
        """``predictions.csv``: the evaluation part's class probabilities before and after."""
        ev, classes = self.evaluated, self.site.bundle.label_names
        before = {f"{k}_before": v for k, v in probability_columns(self.p_before,
                                                                  classes).items()}
        after = {f"{k}_after": v for k, v in probability_columns(self.p_after, classes).items()}
        return pd.DataFrame({"participant_id": self.participant_ids[ev], "y": self.y[ev],
                             **before, **after})


def recalibrate_multiclass(site, options: RecalibrationOptions, *,
                           n_boot: int = 1000) -> MultiClassRecalibration:
    """Split the site's participants, fit the K-class map (and the ordinal cut points, where
    the bundle has them) on one part, and report before/after on the other."""
    from safn_core.multiclass import fit_cutpoints

    bundle = site.bundle
    target, names = bundle.target, bundle.label_names
    z, p_raw, alpha, y, ids, in_recal = split_site(site, options)
    cmap = fit_multiclass_map(options.method, z[in_recal], y[in_recal], target.n_classes)
    p_before, p_after = bundle.calibrate(z, p_raw), cmap(z)
    cuts = (None if bundle.cutpoints is None
            else fit_cutpoints(y[in_recal], p_after[in_recal]))
    ev = ~in_recal
    majority = int(np.argmax(np.bincount(y[in_recal], minlength=target.n_classes)))
    record = {
        "method": cmap.method, "map": cmap.to_dict(), "n_classes": target.n_classes,
        "decision_rule": "argmax" if cuts is None else "cutpoints", "cutpoints": cuts,
        "cutpoints_before": bundle.cutpoints, "threshold": bundle.meta.get("threshold"),
        "threshold_before": bundle.meta.get("threshold"),
        "site": site.site, "data": site.source, "validation": site.scope["validation"],
        "recalibration_part": counts(y[in_recal], names), "evaluation_part": counts(y[ev], names),
        "fraction": options.fraction, "split_seed": options.split_seed,
        "stratified_by": "class", "split_by": "participant",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_bundle": str(site.model),
        "replaces": bundle.meta.get("recalibration") or bundle.meta.get("calibration")}
    return MultiClassRecalibration(
        site, options, ids, y, in_recal, cmap, cuts,
        before=kclass_figures(y[ev], p_before[ev], target, bundle.cutpoints, n_boot,
                              majority_class=majority),
        after=kclass_figures(y[ev], p_after[ev], target, cuts, n_boot,
                             majority_class=majority),
        p_before=p_before[ev], p_after=p_after[ev],
        modality_weights=modality_weights(bundle, alpha[ev]), record=record)

