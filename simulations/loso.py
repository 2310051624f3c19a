"""Leave-one-site-out external validation of a federation.

For every site: train the federation on the others (a complete federated run with its own
statistics round, in ``<run>/loso/<site>/``), then evaluate the final model on ALL of the held-out
site's participants, which it never saw, not even for preprocessing or the threshold (both come
from the training sites). Per-site metrics carry bootstrap 95 % CIs (``{metric}_ci``: [low,
high], participants of the held-out site resampled within each class, seed ``train.seed``); the
summary is the mean and SD across held-out sites. Each row also has the federation's logistic
regression floor on the same participants (``floor_{metric}``), the linear model SAFN started
from, where the run fitted one.

A K-class target (K > 2) is scored at the argmax rule by `safn.simulations.compare_kclass`
(`LOSO_KCLASS`: macro ROC-AUC, balanced accuracy, QWK, macro F1, MAE; intervals of the first
three), with each held-out site's class counts instead of its positives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.config import SafnConfig, dump_config
from safn_core.data.cohort import Cohort
from safn_core.federation.run_folder import write_config
from safn.simulations.virtual_sites import write_virtual_sites
from safn_core.metrics import METRICS, binary_metrics, bootstrap_ci
from safn.simulations.compare import interval_columns


LOSO_KCLASS = ("roc_auc", "balanced_accuracy", "qwk", "macro_f1", "mae")
"""A K-class target's leave-one-site-out metrics, in table order."""


def loso_metrics(df: pd.DataFrame) -> tuple[str, ...]:
    """The metrics of a leave-one-site-out table: binary (`METRICS`) or K-class."""
    return METRICS if "sensitivity" in df else LOSO_KCLASS


def _kclass(data, p, target, n_boot: int, seed: int, prefix: str = "") -> dict:
    from safn.simulations.compare_kclass import kclass_row

    row = kclass_row(data.y, p, target, n_boot, seed)
    counts = np.bincount(data.y, minlength=target.n_classes)[:target.n_classes]
    out = {f"{prefix}{k}": row[k] for k in LOSO_KCLASS}
    out.update({f"{prefix}{k}_ci": row[f"{k}_ci"] for k in LOSO_KCLASS if f"{k}_ci" in row})
    if not prefix:
        out = {"n": len(data), **{f"n {c}": int(n) for c, n in zip(target.classes, counts)},
               **out}
    return out


def evaluate_held_out(run_dir: Path, cfg: SafnConfig, table: pd.DataFrame,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics (with CIs) of a finished federation's model bundle (its selected round, at that
    round's threshold) on a held-out table. Under harmonisation the bundle lets the held-out
    site adjust itself from its own participants with the federation's fit."""
    from safn_core.bundle import load_bundle

    bundle = load_bundle(Path(run_dir) / "model")
    data = bundle.arrays(table, min_cell=cfg.data.min_cell)
    p, _ = bundle.predict(data)
    if not bundle.target.binary:  # the argmax rule: no threshold
        return _kclass(data, p, bundle.target, n_boot, seed)
    threshold = float(bundle.threshold)
    point = binary_metrics(data.y, p, threshold)
    ci = bootstrap_ci(data.y, p, threshold, n_boot=n_boot, seed=seed)
    return {"n": len(data), "positive": int(data.y.sum()), "threshold": threshold,
            **{k: point[k] for k in METRICS}, **interval_columns(ci)}


def evaluate_floor_held_out(run_dir: Path, cfg: SafnConfig, table: pd.DataFrame,
                            n_boot: int = 1000, seed: int = 0) -> dict:
    """The same for the federation's logistic regression floor (``floor_{metric}``, with its
    intervals): its probabilities on the bundle's preprocessing of the held-out table, at the
    threshold round 0 chose on the training sites' pooled validation histograms (round 0 is the
    floor itself); {} for a run without a floor."""
    import json

    from safn_core.bundle import load_bundle
    from safn.server.logistic_floor import load_floor

    fit = load_floor(run_dir)
    history = json.loads((Path(run_dir) / "history.json").read_text())
    round0 = next((e for e in history if e.get("round") == 0), None)
    if fit is None or round0 is None:
        return {}
    bundle = load_bundle(Path(run_dir) / "model")
    data = bundle.arrays(table, min_cell=cfg.data.min_cell)
    p = fit.predict_proba(data.x.astype(np.float64))
    if not bundle.target.binary:
        return _kclass(data, p, bundle.target, n_boot, seed, prefix="floor_")
    threshold = float(round0.get("threshold", 0.5))
    point = binary_metrics(data.y, p, threshold)
    ci = bootstrap_ci(data.y, p, threshold, n_boot=n_boot, seed=seed)
    return {"floor_threshold": threshold, **{f"floor_{k}": point[k] for k in METRICS},
            **{f"floor_{k}": v for k, v in interval_columns(ci).items()}}


def leave_one_site_out(cohort: Cohort, parts: dict[str, np.ndarray], cfg: SafnConfig,
                       run_dir: Path, run_federation: Callable[[Path, SafnConfig, int], float],
                       report=print) -> pd.DataFrame:
    """One federated run per held-out site; returns one row per held-out site."""
    rows = []
    for held, ids in parts.items():
        train_parts = {k: v for k, v in parts.items() if k != held}
        sub = Path(run_dir) / "loso" / held
        sub.mkdir(parents=True, exist_ok=False)
        write_config(sub, dump_config(cfg))
        write_virtual_sites(sub, cohort, train_parts)
        report(f"leave-one-site-out: training on {len(train_parts)} sites, holding out {held}")
        run_federation(sub, cfg, len(train_parts))
        res = evaluate_held_out(sub, cfg, cohort.table.loc[ids], seed=cfg.train.seed)
        floor = evaluate_floor_held_out(sub, cfg, cohort.table.loc[ids], seed=cfg.train.seed)
        rows.append({"held_out": held, **res, **floor})
    return pd.DataFrame(rows)


def summarise_loso(df: pd.DataFrame, prefix: str = "") -> dict[str, dict[str, float]]:
    """Mean and SD across held-out sites of each metric (``prefix="floor_"``: the logistic
    regression floor's; {} when the runs had none; K classes: `LOSO_KCLASS`, an undefined
    value (None) left out)."""
    keys = loso_metrics(df)
    if f"{prefix}{keys[0]}" not in df:
        return {}
    out = {}
    for k in keys:
        values = pd.to_numeric(df[f"{prefix}{k}"], errors="coerce")
        out[k] = {"mean": float(values.mean()),
                  "sd": float(values.std(ddof=1)) if len(df) > 1 else 0.0}
    return out
