"""Centralised evaluation: subject-wise repeated stratified K-fold cross-validation.

For every repeat and outer fold the training fold is split once more (stratified, seeded) into an
inner training part and a validation part. Preprocessing is fitted on the inner training part
only; SAFN early-stops, fits its temperature (``train.temperature_scaling``,
`safn_predictions`) and every model picks its decision threshold on the validation part; the
test fold is touched only to score. SAFN, its ablations and the baselines all see the same splits
and the same preprocessed features, so the table compares models, not data.

With a wide path (``model.wide``) every SAFN fit starts from the exact logistic regression of
its inner training part, penalty chosen on its validation part (`fit_with_early_stopping`),
which can keep it (epoch 0). A SAFN row then also gives the penalty (``lr_penalty``) and the
epoch kept (``best_epoch``; 0 = the logistic regression itself), and the SAFN row of every fold
each modality's share of the wide logit's variance on the test fold (``wide_shares``,
`safn_core.model.SAFN.wide_shares`), next to the deep path's gate weights α.

With ``harmonisation.method: combat``, ComBat comes first, inside each fold: fitted on the inner
training part only with the site column as the batch, applied to the validation and test parts
(a site absent from the training part adjusts itself from its own rows of that part), and the
preprocessing is then fitted on the harmonised training part
(`safn_core.harmonisation.pooled`). The final model is harmonised the same way, on its own
training part, and its bundle carries that fit.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from safn_core.baselines import fit_predict
from safn_core.config import ModelConfig, SafnConfig
from safn_core.data.cohort import SITE, Cohort, Modality
from safn_core.data.ppmi_catalog import MOTOR_FEATURES
from safn_core.harmonisation.pooled import FittedSplit, check_split, fit_split, require_sites
from safn_core.harmonisation.record import HarmonisationRecord
from safn_core.harmonisation.setup import combat_spec
from safn_core.metrics import binary_metrics, calibration_slope, choose_threshold
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import TrainingTemperature, fit_training_temperature
from safn_core.training import kclass_folds
from safn_core.training.local import (Arrays, FitResult, fit_with_early_stopping, predict,
                                      scores)

ABLATIONS: dict[str, dict] = {
    "no_cross_attention": {"cross_attention": False},
    "no_sparsity": {"sparsity_lambda": 0.0},
    "plain_ce": {"loss": "ce"},
}


def feature_set(cohort: Cohort, name: str) -> tuple[Modality, ...] | None:
    """The modalities of a named feature set, or None where it does not apply to this cohort.

    ``all``: every modality. ``no_motor``: without MDS-UPDRS I-III and H&Y (near label-defining
    in PPMI). ``imaging_demographics``: imaging-side modalities plus ``demographics``.
    """
    mods = cohort.modalities
    if name == "all":
        return mods
    if name == "no_motor":
        out = tuple(Modality(m.name, tuple(f for f in m.features if f not in MOTOR_FEATURES),
                             m.side) for m in mods)
        if sum(len(m.features) for m in out) == sum(len(m.features) for m in mods):
            return None  # no motor scale in this cohort: identical to "all"
        return tuple(m for m in out if m.features)
    if name == "imaging_demographics":
        out = tuple(m for m in mods if m.side == "imaging" or m.name == "demographics")
        if not any(m.side == "imaging" for m in out) or len(out) == len(mods):
            return None
        return out
    raise ValueError(f"unknown feature set '{name}'")


@dataclass
class Split:
    repeat: int
    fold: int
    train: np.ndarray  # participant ids, inner training part
    val: np.ndarray  # inner validation part
    test: np.ndarray


def make_splits(cohort: Cohort, folds: int, repeats: int, val_fraction: float,
                seed: int) -> list[Split]:
    """Participant-level stratified splits; the cohort has one row per participant."""
    ids, y = cohort.ids, cohort.y
    splits = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (tr, te) in enumerate(skf.split(ids, y)):
            inner_tr, inner_val = train_test_split(
                tr, test_size=val_fraction, stratify=y[tr], random_state=seed + 1000 * r + k)
            splits.append(Split(r, k, ids[inner_tr], ids[inner_val], ids[te]))
    return splits


def fold_name(split: Split) -> str:
    return f"repeat {split.repeat + 1}, fold {split.fold + 1}"


def check_harmonisation(cohort: Cohort, cfg: SafnConfig, splits: list[Split]) -> None:
    """Before any fold runs: the cohort has sites, and every fold's sites are large enough
    (`safn_core.harmonisation.pooled.check_split`); a no-op without harmonisation."""
    if not cfg.harmonisation.enabled:
        return
    require_sites(cohort.table, cohort.report.source)
    spec = combat_spec(cfg.harmonisation, cohort.modalities)
    for s in splits:
        check_split(cohort.table, spec, s.train, {"validation": s.val, "test": s.test},
                    min_cell=cfg.data.min_cell, where=fold_name(s))


def harmonise_fold(cohort: Cohort, split: Split, cfg: SafnConfig) -> FittedSplit:
    """ComBat fitted on the split's training part, applied to its validation and test parts."""
    require_sites(cohort.table, cohort.report.source)
    where = fold_name(split)
    return fit_split(cohort.table, combat_spec(cfg.harmonisation, cohort.modalities),
                     cfg.harmonisation, split.train, {"validation": split.val, "test": split.test},
                     min_cell=cfg.data.min_cell, where=where,
                     fitted_on=f"the training participants of {where}")


def _score(y, p_val, y_val, p_test) -> tuple[dict, float]:
    t = choose_threshold(y_val, p_val)
    m = binary_metrics(y, p_test, t)
    m["threshold"] = t
    return m, t


def _modality_drop(model, test: Arrays, modalities) -> dict[str, float]:
    """ROC-AUC lost when one modality is replaced by its training mean (0 after scaling), both
    ROC-AUCs of the model's own probabilities."""
    def auc(p):
        if p.ndim == 2:  # K > 2 classes: macro one-vs-rest
            from safn_core.multiclass import macro_roc_auc

            auc = macro_roc_auc(test.y, p)
            return float("nan") if auc is None else auc
        return binary_metrics(test.y, p)["roc_auc"]

    base_auc = auc(predict(model, test)[0])
    out, start = {}, 0
    for m in modalities:
        stop = start + len(m.features)
        x = test.x.copy()
        x[:, start:stop] = 0.0
        p, _ = predict(model, Arrays(x, test.mask, test.y))
        out[m.name] = base_auc - auc(p)
        start = stop
    return out


def _slope(y, p) -> float:
    """The calibration slope of ``p`` (`calibration_slope`), NaN where it is not estimable."""
    slope = calibration_slope(y, p)["slope"]
    return float("nan") if slope is None else float(slope)


def safn_predictions(model, val: Arrays, test: Arrays, temperature_scaling: bool,
                     min_cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A fitted SAFN's validation and test P(PD), test gate weights α, and extra columns of its
    fold row.

    With ``train.temperature_scaling`` both P(PD) are σ(z/T), T fitted on the validation
    split's logits only (`fit_training_temperature`; T = 1 where it cannot be fitted), so the
    threshold is then chosen on calibrated validation scores; T > 0 keeps every ranking, so
    ROC-AUC and the threshold's balanced accuracy do not change. The row gets T, whether it
    was fitted, and the test fold's calibration slope before (``calibration_slope_raw``) and
    after (``calibration_slope``).
    """
    z_val, p_val, _ = scores(model, val)
    z_test, p_test, alpha = scores(model, test)
    if p_test.ndim == 2:  # K > 2 classes: no binary calibration slope, no training temperature
        return p_val, p_test, alpha, {}
    if not temperature_scaling:
        return p_val, p_test, alpha, {"calibration_slope": _slope(test.y, p_test)}
    t = fit_training_temperature(z_val, val.y, min_cell)
    p_cal = t.map(z_test)
    return t.map(z_val), p_cal, alpha, {
        "temperature": t.temperature, "temperature_fitted": t.note is None,
        "calibration_slope_raw": _slope(test.y, p_test), "calibration_slope": _slope(test.y, p_cal)}


def model_variants(cfg: SafnConfig, feature_set_name: str) -> list[tuple[str, ModelConfig]]:
    """SAFN and, on the ``all`` feature set, its configured ablations (``train.ablations``)."""
    variants = [("SAFN", cfg.model)]
    if feature_set_name == "all":
        variants += [(f"SAFN ({a.replace('_', ' ')})", cfg.model.model_copy(update=upd))
                     for a, upd in ABLATIONS.items() if a in cfg.train.ablations]
    return variants


def run_fold(cohort: Cohort, split: Split, cfg: SafnConfig,
             variants: list[tuple] | None = None) -> dict:
    """Every model variant on one split; returns metric rows and test predictions.

    ``variants``: (row name, model config) or (row name, model config, train config) of each
    SAFN variant to fit on every feature set (without a train config: ``cfg.train``); None =
    `model_variants` (what safn-train reports).
    """
    torch.set_num_threads(1)
    # harmonised (fitted on split.train only) before anything is fitted on it
    table = harmonise_fold(cohort, split, cfg).table if cfg.harmonisation.enabled \
        else cohort.table
    rows, preds, weights, drops, shares, by_class = [], [], [], [], [], []
    seed = cfg.train.seed + 7919 * split.repeat + 31 * split.fold
    target = cohort.target
    multi = not target.binary
    majority = int(np.bincount(cohort.table.loc[split.train, "label"].to_numpy(dtype=int),
                               minlength=target.n_classes).argmax())

    def record(model_name, fs_name, p_val, y_val, p_test, y_test, extra=None):
        meta = {"repeat": split.repeat, "fold": split.fold, "feature_set": fs_name,
                "model": model_name}
        if multi:
            rows.append({**meta, **kclass_folds.score_fold(target, p_val, y_val, p_test, y_test,
                                                            majority), **(extra or {})})
            preds.append(kclass_folds.prediction_frame(target, meta, split.test, y_test, p_test))
            return
        m, _ = _score(y_test, p_val, y_val, p_test)
        rows.append({**meta, **m, **(extra or {})})
        preds.append(pd.DataFrame({**meta, "participant_id": split.test, "y": y_test,
                                   "p": p_test}))

    for fs_name in cfg.train.feature_sets:
        mods = feature_set(cohort, fs_name)
        if mods is None:
            continue
        pre = Preprocessor(mods).fit(table.loc[split.train])
        tr, va, te = (Arrays.from_table(pre, table.loc[ids])
                      for ids in (split.train, split.val, split.test))
        for name, model_cfg, *own in (variants or model_variants(cfg, fs_name)):
            train_cfg = own[0] if own else cfg.train
            fit = fit_with_early_stopping(tr, va, mods, model_cfg, train_cfg, seed,
                                          target=target)
            p_val, p_test, alpha, extra = safn_predictions(
                fit.model, va, te, train_cfg.temperature_scaling and not multi,
                cfg.data.min_cell)
            extra = {"epochs": fit.epochs_run, "best_epoch": fit.best_epoch, **extra}
            if fit.logistic is not None:
                extra["lr_penalty"] = fit.logistic.penalty
            record(name, fs_name, p_val, va.y, p_test, te.y, extra)
            if name == "SAFN":
                where = {"repeat": split.repeat, "fold": split.fold, "feature_set": fs_name}
                weights.append({**where, **{m.name: float(a) for m, a in zip(mods, alpha.mean(0))}})
                if multi:
                    by_class.extend({**where, **w} for w in kclass_folds.weights_by_class(
                        alpha, te.y, target, [m.name for m in mods]))
                if model_cfg.wide != "off" and not multi:
                    shares.append({"repeat": split.repeat, "fold": split.fold,
                                   "feature_set": fs_name,
                                   **fit.model.wide_shares(torch.from_numpy(te.x),
                                                           torch.from_numpy(te.mask))})
                if cfg.train.modality_drop:
                    drops.append({"repeat": split.repeat, "fold": split.fold,
                                  "feature_set": fs_name,
                                  **_modality_drop(fit.model, te, mods)})
        for b in cfg.train.baselines:
            if b == "ordinal_logistic" and (target.binary or not target.ordered):
                continue  # a cumulative-link model needs K > 2 ordered classes
            p_val, p_test = fit_predict(b, tr.x, tr.y, [va.x, te.x], seed, val=(va.x, va.y))
            record(b, fs_name, p_val, va.y, p_test, te.y)
    return {"rows": rows, "preds": pd.concat(preds, ignore_index=True), "weights": weights,
            "drops": drops, "wide_shares": shares, "weights_by_class": by_class}


def _worker_init() -> None:
    """One thread per worker process: two workers on two cores, no oversubscription."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


def cross_validate(cohort: Cohort, cfg: SafnConfig,
                   progress: Callable[[int, int], None] | None = None,
                   variants: list[tuple] | None = None) -> dict:
    """Run every split (in parallel worker processes); gather metrics and predictions
    (``folds``, ``predictions``), SAFN's gate weights α (``weights``), the modality-drop
    ablation (``modality_drop``) and, with a wide path, each modality's share of the wide
    logit's variance (``wide_shares``), one row per fold and feature set.

    ``variants``: the SAFN variants of `run_fold` (None: SAFN and its configured ablations).
    """
    splits = make_splits(cohort, cfg.train.folds, cfg.train.repeats, cfg.train.val_fraction,
                         cfg.train.seed)
    check_harmonisation(cohort, cfg, splits)  # a small site is said now, not after some folds
    results = [None] * len(splits)
    if cfg.train.workers > 1 and len(splits) > 1:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(cfg.train.workers, mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(run_fold, cohort, s, cfg, variants): i
                       for i, s in enumerate(splits)}
            for done, fut in enumerate(as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                if progress:
                    progress(done, len(splits))
    else:
        for i, s in enumerate(splits):
            results[i] = run_fold(cohort, s, cfg, variants)
            if progress:
                progress(i + 1, len(splits))
    return {
        "folds": pd.DataFrame([r for res in results for r in res["rows"]]),
        "predictions": pd.concat([res["preds"] for res in results], ignore_index=True),
        "weights": pd.DataFrame([w for res in results for w in res["weights"]]),
        "modality_drop": pd.DataFrame([d for res in results for d in res["drops"]]),
        "wide_shares": pd.DataFrame([w for res in results for w in res["wide_shares"]]),
        "weights_by_class": pd.DataFrame([w for res in results
                                          for w in res["weights_by_class"]]),
        "n_splits": len(splits),
    }


FINAL_HINT = ("pool the site with another of the same scanner and protocol, leave its "
              "participants out, or set harmonisation.method: none")


@dataclass
class FinalModel:
    """What safn-train ships: the fitted SAFN, its preprocessing, threshold and class counts,
    the harmonisation its features went through (None without one) and the temperature fitted
    on its validation split (None without ``train.temperature_scaling``; the threshold is on
    its scale, so a bundle must carry it: ``save_bundle(calibration=...)``)."""

    fit: FitResult
    preprocessor: Preprocessor
    threshold: float | None  # None for a target of K > 2 classes (decision rule: argmax)
    class_counts: list[int]
    harmonisation: HarmonisationRecord | None = None
    calibration: TrainingTemperature | None = None
    cutpoints: list[float] | None = None  # K > 2, train.decision_rule cutpoints


def check_decision_rule(cohort: Cohort, cfg: SafnConfig) -> None:
    """``train.decision_rule: cutpoints`` needs ordered classes (a `DataError` otherwise): said
    before any fold is fitted."""
    if cfg.train.decision_rule == "cutpoints" and not cohort.target.binary \
            and not cohort.target.ordered:
        from safn_core.errors import DataError

        raise DataError(f"train.decision_rule is 'cutpoints' but the target "
                        f"{cohort.target.name!r} has unordered classes; use argmax")


def _cutpoints(cohort: Cohort, cfg: SafnConfig, model, val: Arrays) -> list[float] | None:
    """The ordinal cut points of ``train.decision_rule: cutpoints``, fitted on the final fit's
    validation split (None for argmax)."""
    if cfg.train.decision_rule != "cutpoints":
        return None
    from safn_core.multiclass import fit_cutpoints

    return [float(c) for c in fit_cutpoints(val.y, scores(model, val)[1])]

def _sites_text(table: pd.DataFrame, ids) -> str:
    counts = table.loc[ids, SITE].astype(str).value_counts().sort_index()
    return ", ".join(f"{s} ({n})" for s, n in counts.items())


def final_model(cohort: Cohort, cfg: SafnConfig,
                model_cfg: ModelConfig | None = None) -> FinalModel:
    """The model to ship: SAFN on all participants (validation part for stopping/threshold
    and, with ``train.temperature_scaling``, the temperature, as in every fold).

    With harmonisation, ComBat is fitted on the training part only and applied to the
    validation part first, as in every fold; the returned record is that fit."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    check_decision_rule(cohort, cfg)
    ids, y = cohort.ids, cohort.y
    tr, va = train_test_split(ids, test_size=cfg.train.val_fraction, stratify=y,
                              random_state=cfg.train.seed)
    table, record = cohort.table, None
    if cfg.harmonisation.enabled:
        require_sites(table, cohort.report.source)
        fitted_on = (f"the final fit's training part: {len(tr)} of the {len(ids)} participants, "
                     f"sites {_sites_text(table, tr)}; its validation part (early stopping, "
                     "threshold) was harmonised with it")
        fitted = fit_split(table, combat_spec(cfg.harmonisation, cohort.modalities),
                           cfg.harmonisation, tr, {"validation": va}, min_cell=cfg.data.min_cell,
                           where="the final fit", fitted_on=fitted_on, hint=FINAL_HINT)
        table, record = fitted.table, fitted.record
    pre = Preprocessor(cohort.modalities).fit(table.loc[tr])
    tr_a = Arrays.from_table(pre, table.loc[tr])
    va_a = Arrays.from_table(pre, table.loc[va])
    fit = fit_with_early_stopping(tr_a, va_a, cohort.modalities, model_cfg or cfg.model,
                                  cfg.train, cfg.train.seed, target=cohort.target)
    if not cohort.target.binary:  # K classes: argmax or cut points, no threshold
        return FinalModel(fit, pre, None, tr_a.class_counts(cohort.n_classes), record, None,
                          _cutpoints(cohort, cfg, fit.model, va_a))
    z_val, p_val, _ = scores(fit.model, va_a)
    calibration = None
    if cfg.train.temperature_scaling:
        calibration = fit_training_temperature(z_val, va_a.y, cfg.data.min_cell,
                                               cohort.label_names)
        p_val = calibration.map(z_val)
    threshold = choose_threshold(va_a.y, p_val)
    return FinalModel(fit, pre, threshold, tr_a.class_counts(), record, calibration)


def final_fit(cohort: Cohort, cfg: SafnConfig, model_cfg: ModelConfig | None = None):
    """`final_model` as (fit, preprocessing, threshold, class counts), for a configuration
    without harmonisation (whose record the tuple could not carry: use `final_model`). The
    tuple cannot carry a temperature either: the fit is the same, without temperature scaling,
    and the threshold is on the model's own probabilities."""
    if cfg.harmonisation.enabled:
        raise ValueError("final_fit drops the harmonisation fit its model depends on; call "
                         "final_model and pass its harmonisation to save_bundle")
    raw = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"temperature_scaling": False})})
    m = final_model(cohort, raw, model_cfg)
    return m.fit, m.preprocessor, m.threshold, m.class_counts
