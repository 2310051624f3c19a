"""Validation of a model bundle on one site's own data, offline: the library behind
``safn-validate`` (`safn_core.cli.validate` parses arguments, prints and writes files).

No server, no network: the site's data is loaded with the bundle's data settings, checked by
the same data contract as training, aligned to the bundle's features and put through the
bundle's preprocessing (never refitted on the site's data) and, for a bundle whose model takes
ComBat-harmonised MRI features, its harmonisation: each site of the data adjusted from its own
participants with the bundle's fit, without labels (`load_site_data`).

- `validate`: the full metric set with bootstrap 95 % CIs, calibration and the modality weights
  on the site's population, at the bundle's threshold and through its calibration map
  (`Bundle.predict`), as a frozen `Validation`.
- a bundle of K > 2 classes (`safn_core.validation_multiclass`): the same, with the K-class
  metrics, the majority-class baseline and the decision rule (argmax or the bundle's ordinal
  cut points); data whose classes are not the bundle's target's is refused (`check_target`).
- `recalibrate_at_site`: the site's participants split into a recalibration and an evaluation
  part, a calibration map and threshold fitted on the first only (`safn_core.recalibration`),
  before/after figures on the second only, as a frozen `Recalibration` whose `site_meta` is
  the site bundle's ``bundle.json``.

Every result carries the evaluation's scope: internal, external, mixed or unknown
(`safn_core.validation_scope`). Bad input raises a one-line `SafnError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.bundle import Bundle, load_bundle
from safn_core.config import load_config
from safn_core.data.cohort import LABEL, SITE, Cohort
from safn_core.data.contract import check_cohort
from safn_core.errors import DataError, SafnError
from safn_core.metrics import METRICS, binary_metrics, bootstrap_ci, calibration
from safn_core.recalibration import (CalibrationMap, RecalibrationOptions, counts, recalibrate,
                                     recalibration_record)
from safn_core.recalibration_parts import SplitParts, split_site, validation_record
from safn_core.validation_multiclass import (check_target, recalibrate_multiclass,
                                             validate_multiclass)
from safn_core.validation_scope import (is_no_site, modality_weights, scope_record,
                                        validation_scope)


# ------------------------------------------------------------------------------ the site's data


@dataclass(frozen=True)
class DataSource:
    """Where a site's data is: a PPMI folder or a table (``data``, with ``mapping``), or a
    site file (``site``) whose ``data`` section says where. ``config`` and ``overrides`` are
    the command's ``--config`` / ``--set`` (a site file is the config where given)."""

    data: Path | None = None
    mapping: Path | None = None
    site: Path | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.data is None) == (self.site is None):
            raise SafnError("give the site's data either as a path (--data) or as a site file "
                            "(--site), not both or neither")


@dataclass(frozen=True)
class SiteData:
    """A bundle and the site's data it is validated on, ready to predict.

    ``table``: the bundle's feature columns (and label, and what its harmonisation needs).
    ``site``: the name a recalibration record gives the site. ``adjustments``: each site's own
    ComBat adjustment (None for a bundle without harmonisation), ``harmonisation`` the record
    of it. ``scope``: `validation_scope`'s answer."""

    model: Path
    bundle: Bundle
    source: str
    table: pd.DataFrame
    site: str
    scope: dict
    min_cell: int
    adjustments: dict | None
    harmonisation: dict


def align_to_bundle(cohort: Cohort, features: list[str], source: str,
                    harmonised: tuple[str, ...] = ()) -> pd.DataFrame:
    """The cohort's table with exactly the bundle's feature columns (and, for a harmonising
    bundle, the site and every column its harmonisation needs), or a clear error."""
    needed = list(dict.fromkeys([*features, *harmonised]))
    missing = [f for f in needed if f not in cohort.table.columns]
    if missing:
        raise DataError(f"{source}: the data lacks {len(missing)} feature(s) the model was trained "
                        f"on (e.g. {', '.join(missing[:5])}); load it with the same modalities "
                        "and column names as the training data")
    site = [SITE] if harmonised and SITE in cohort.table.columns else []
    return cohort.table[[LABEL, *site] + needed]


def harmonise_sites_of(bundle: Bundle, table: pd.DataFrame, min_cell: int
                       ) -> tuple[dict | None, dict]:
    """A harmonising bundle's adjustment of every site of ``table`` from its own participants
    (no labels), and its record: ``sites_from`` is ``site_column``, or ``whole_table`` where
    the data has no site column (all its participants are one site)."""
    record = bundle.harmonisation
    if record is None:
        return None, {"applied": False}
    adjustments = bundle.adjust(table, min_cell=min_cell)
    sites = {s: int(a.n) for s, a in adjustments.items()}
    whole = SITE not in table.columns or set(sites) == {"all"}
    return adjustments, {
        "applied": True, "method": record.method, "fit_id": record.fit.fit_id,
        "fitted_on": record.fitted_on, "n_features": len(record.spec.features),
        "adjustment": record.adjustment_method, "estimated_from": "own_participants_unlabelled",
        "sites_from": "whole_table" if whole else "site_column", "sites": sites}


def _validated_sites(source: DataSource, site_cfg, bundle: Bundle, cohort: Cohort
                     ) -> tuple[list[str] | None, bool]:
    """The names the evaluated data goes by, and whether it is the site file's name: a
    federated bundle validated with a site file knows the site by its site.yaml name;
    otherwise the data's site column values (None without one)."""
    if source.site and site_cfg.site is not None and bundle.meta.get("kind") == "federated":
        return [site_cfg.site.name], True
    values = sorted(str(v) for v in set(cohort.sites) if not is_no_site(v))
    return values or None, False


def load_site_data(model: Path, source: DataSource, bundle: Bundle | None = None) -> SiteData:
    """Load, check and align the site's data for the bundle at ``model`` (``bundle``: already
    loaded from there), harmonise it where the bundle does, and say the evaluation's scope."""
    from safn_core.data.sources import load_path

    bundle = bundle if bundle is not None else load_bundle(model)
    site_cfg = load_config(source.site if source.site else source.config, list(source.overrides))
    # the site's own location of its data; how it is read (motor exclusion, eTIV) is the model's
    if source.site:
        if site_cfg.data.path is None:
            raise SafnError(f"{source.site}: data.path is not set; say where the site's data is")
        path, mapping = Path(site_cfg.data.path), site_cfg.data.mapping
    else:
        path, mapping = source.data, source.mapping or site_cfg.data.mapping
    data_cfg = bundle.config.data.model_copy(update={"mapping": mapping, "path": path,
                                                     "min_cell": site_cfg.data.min_cell})
    cohort = load_path(path, data_cfg)
    check_target(bundle.target, cohort, Path(model))
    check_cohort(cohort, data_cfg.min_cell).raise_if_failed("run safn-check for the full report")
    table = align_to_bundle(cohort, bundle.preprocessor.features, cohort.report.source,
                            bundle.harmonisation.columns if bundle.harmonisation else ())
    trained_on = bundle.config.data.path
    validated, by_site_file = _validated_sites(source, site_cfg, bundle, cohort)
    scope = validation_scope(
        bundle, validated, by_site_file=by_site_file,
        same_data=trained_on is not None and Path(trained_on).resolve() == Path(path).resolve())
    adjustments, harmonisation = harmonise_sites_of(bundle, table, data_cfg.min_cell)
    site = (site_cfg.site.name if source.site and site_cfg.site is not None
            else ", ".join(validated or []) or cohort.report.source)
    return SiteData(Path(model), bundle, cohort.report.source, table, site, scope,
                    data_cfg.min_cell, adjustments, harmonisation)


# ------------------------------------------------------------------------------ validation


def figures(y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000,
            seed: int = 0) -> dict:
    """Every reported figure for labels ``y`` and scores ``p`` at ``threshold``: the metrics
    with bootstrap 95 % CIs, and calibration."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed)
    return {"metrics": {k: {"value": point[k], "ci": list(ci[k])} for k in METRICS},
            "calibration": calibration(y, p), "threshold": float(threshold)}




@dataclass(frozen=True)
class Validation:
    """The bundle on the site's data as it is: labels ``y`` and scores ``p`` of every
    participant (``participant_ids``), ``figures`` (metrics with CIs, calibration, threshold)
    and the modality weights on this population."""

    site: SiteData
    participant_ids: np.ndarray
    y: np.ndarray
    p: np.ndarray
    figures: dict
    modality_weights: dict[str, float]

    @property
    def n_positive(self) -> int:
        return int(self.y.sum())

    def record(self) -> dict:
        """``validation.json``."""
        bundle, n, n_pos = self.site.bundle, len(self.y), self.n_positive
        return {**scope_record(self.site), "n": n, "positive": n_pos,
                "threshold": bundle.threshold, "metrics": self.figures["metrics"],
                "calibration": self.figures["calibration"],
                "modality_weights": self.modality_weights,
                "majority_accuracy": max(n_pos, n - n_pos) / n,
                "recalibration": bundle.meta.get("recalibration"),
                "training_calibration": bundle.meta.get("calibration"),
                "harmonisation": self.site.harmonisation}

    def predictions(self) -> pd.DataFrame:
        """``predictions.csv`` (stays at the site)."""
        return pd.DataFrame({"participant_id": self.participant_ids, "y": self.y, "p": self.p})


def validate(site: SiteData, *, n_boot: int = 1000, seed: int = 0) -> Validation:
    """The bundle's predictions on the site's data (through its harmonisation and calibration
    map, where it has them) and every reported figure."""
    bundle = site.bundle
    if bundle.n_classes > 2:
        return validate_multiclass(site, n_boot=n_boot, seed=seed)
    arrays = bundle.arrays(site.table, adjustments=site.adjustments)
    p, alpha = bundle.predict(arrays)
    return Validation(site, site.table.index.to_numpy(), arrays.y, p,
                      figures(arrays.y, p, bundle.threshold, n_boot, seed),
                      modality_weights(bundle, alpha))


# ------------------------------------------------------------------------------ recalibration


@dataclass(frozen=True)
class Recalibration(SplitParts):
    """A recalibration at the site (`recalibrate_at_site`): who went to which part
    (``in_recal`` over ``participant_ids``), the fitted ``cmap`` and ``threshold``, and on the
    evaluation part only: ``before`` (the bundle as it is) and ``after`` (map + threshold)
    figures, their scores, the majority-class baseline and the modality weights. ``record``:
    the site bundle's ``recalibration`` record."""

    site: SiteData
    options: RecalibrationOptions
    participant_ids: np.ndarray
    y: np.ndarray
    in_recal: np.ndarray
    cmap: CalibrationMap
    threshold: float
    before: dict
    after: dict
    majority: dict
    p_before: np.ndarray
    p_after: np.ndarray
    modality_weights: dict[str, float]
    record: dict

    def site_meta(self) -> dict:
        """The site bundle's ``bundle.json``: the bundle's, with the new threshold and the
        ``recalibration`` record."""
        return {**self.site.bundle.meta, "threshold": self.threshold,
                "recalibration": self.record}

    def record_for(self, site_bundle: Path) -> dict:
        """``validation.json``, naming the site bundle written at ``site_bundle``."""
        return validation_record(self, site_bundle)

    def predictions(self) -> pd.DataFrame:
        """``predictions.csv``: the evaluation part's scores before and after."""
        ev = self.evaluated
        return pd.DataFrame({"participant_id": self.participant_ids[ev], "y": self.y[ev],
                             "p_before": self.p_before, "p_after": self.p_after})


def majority_baseline(y_recal: np.ndarray, y_eval: np.ndarray, names) -> dict:
    """The class the site would guess for everyone (its recalibration part's majority) and
    that guess's metrics on the evaluation part."""
    prevalence = float(np.mean(y_recal))
    return {"class": names[int(prevalence >= 0.5)],
            "metrics": binary_metrics(y_eval, np.full(len(y_eval), prevalence), 0.5)}


def recalibrate_at_site(site: SiteData, options: RecalibrationOptions, *,
                        n_boot: int = 1000) -> Recalibration:
    """Split the site's participants, fit the map and threshold on one part, and report
    before/after on the other. A harmonising bundle's features are harmonised first by the
    site's own adjustments (from all its participants here, without labels; as a plain
    validation). Too few participants of a class in a part is a one-line `DataError`.
    A K-class bundle: `validation_multiclass.recalibrate_multiclass`."""
    bundle = site.bundle
    if bundle.n_classes > 2:
        return recalibrate_multiclass(site, options, n_boot=n_boot)
    z, p_raw, alpha, y, ids, in_recal = split_site(site, options)
    names = bundle.label_names
    cmap, threshold = recalibrate(z, y, in_recal, options.method)
    ev = ~in_recal
    p_before, p_after = bundle.calibrate(z, p_raw), cmap(z)
    record = recalibration_record(
        cmap, threshold, bundle.meta, site=site.site, data=site.source,
        validation=site.scope["validation"], options=options, source_bundle=str(site.model),
        parts={"recalibration": counts(y[in_recal], names), "evaluation": counts(y[ev], names)})
    return Recalibration(
        site, options, ids, y, in_recal, cmap, float(threshold),
        before=figures(y[ev], p_before[ev], bundle.threshold, n_boot),
        after=figures(y[ev], p_after[ev], threshold, n_boot),
        majority=majority_baseline(y[in_recal], y[ev], names),
        p_before=p_before[ev], p_after=p_after[ev],
        modality_weights=modality_weights(bundle, alpha[ev]), record=record)
