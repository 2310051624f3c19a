"""The simulation's comparison: pooled, federated and local-only models on the same splits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.config import SafnConfig
from safn_core.metrics import interval_lists

N_BOOT = 1000
"""Bootstrap resamples of the pooled test set behind each row's 95 % intervals."""


def interval_columns(ci: dict[str, tuple[float, float]]) -> dict[str, list | None]:
    """``{metric}_ci``: [low, high] of each metric (None for an interval that is undefined)."""
    return {f"{k}_ci": v for k, v in interval_lists(ci).items()}


def flat_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """A table as its CSV file holds it (``comparison.csv``, ``loso.csv``): each
    ``{metric}_ci`` ([low, high]) as two columns, ``{metric}_ci_low`` and ``{metric}_ci_high``."""
    out = df.copy()
    for col in [c for c in out.columns if str(c).endswith("_ci")]:  # floor_{metric}_ci too
        bounds = [(c[0], c[1]) if isinstance(c, (list, tuple)) else (np.nan, np.nan)
                  for c in out[col]]
        at = out.columns.get_loc(col)
        out = out.drop(columns=col)
        out.insert(at, f"{col}_high", [b[1] for b in bounds])
        out.insert(at, f"{col}_low", [b[0] for b in bounds])
    return out


def build_sites(cohort, cfg: SafnConfig) -> dict[str, np.ndarray]:
    from safn.simulations.partition import partition

    s = cfg.simulation
    return partition(cohort, s.partition, s.n_sites, alpha=s.dirichlet_alpha,
                     size_alpha=s.size_skew, seed=s.seed)


def compare(cohort, parts: dict, cfg: SafnConfig, federated=None,
            floor=None) -> tuple[pd.DataFrame, int]:
    """Pooled, federated and local-only models scored on the pooled test set.

    All use the sites' own train/validation/test splits (the federation's): the pooled model
    trains on the union of the training splits with preprocessing fitted there, each local-only
    model on one site's training split with its own preprocessing. Pooled and local-only models
    get the federated model's protocol and budget (`fit_by_rounds`): up to
    ``federation.rounds`` rounds of ``federation.local_epochs`` epochs, the round kept by
    ``federation.select`` and early stopping after ``federation.patience`` rounds without
    improvement, the rule the coordinator applies (`RoundSelection`), so that the comparison
    measures federation and not training recipes (``train.max_epochs`` / ``train.patience`` are
    cross-validation's, not used here). Each selects its round and picks its threshold on its
    own validation data (pooled: all sites'; local: its site's; federated: all sites', the
    threshold the federation also picks from pooled validation histograms).

    Every metric has a 95 % interval beside it (``{metric}_ci``: [low, high]): a percentile
    bootstrap over the pooled test set's participants, resampled within each class
    (`bootstrap_ci`, ``N_BOOT`` resamples, seed ``train.seed``). All rows are scored on the same
    test set with the same seed, so every model is resampled on the same participants.

    Logistic regression rows, by the exact solver SAFN's wide path starts from
    (`safn_core.logistic`, the penalty chosen on each model's own validation data): the
    federation's floor (``floor``, a `LogisticFit` on the federated model's preprocessing: it
    equals the pooled one), the pooled one and one per site (local-only), so that every SAFN
    row has the linear model it must beat beside it.

    ``federated``: ``(model, preprocessor)`` or ``(model, preprocessor, selected_round)``.
    Each row has the selected round (``selected_round``; ``None`` for a federated model given
    without it). With ``harmonisation.method: combat`` every model trains and is scored on the
    data as the federation harmonised it (`harmonised_table`): the same fit, the same per-site
    adjustments from the training splits, preprocessing fitted on harmonised training data.

    A K-class target (K > 2) trains K-output models and scores every row by
    `safn.simulations.compare_kclass` (argmax rule, no threshold); a binary one as above.
    """
    import torch

    from safn_core.federation.site import Site
    from safn_core.logistic import fit_pooled
    from safn_core.metrics import binary_metrics, bootstrap_ci, choose_threshold
    from safn_core.preprocess import Preprocessor
    from safn_core.training.local import Arrays, fit_by_rounds, predict

    torch.set_num_threads(1)
    target = cohort.target
    kclass = cohort.n_classes > 2
    sites = {name: Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()}
    ids = {part: np.concatenate([getattr(s.split, part) for s in sites.values()])
           for part in ("train", "val", "test")}
    table = harmonised_table(cohort, sites, cfg) if cfg.harmonisation.enabled else cohort.table
    rows = []

    fed = cfg.federation

    def fit(train, val):
        return fit_by_rounds(train, val, cohort.modalities, cfg.model, cfg.train, cfg.train.seed,
                             rounds=fed.rounds, epochs_per_round=fed.local_epochs,
                             select=fed.select, patience=fed.patience,
                             val_loss="cross_entropy",  # the federation's validation loss
                             **({"target": target} if kclass else {}))

    def lr(tr, va):
        if kclass:
            from safn.simulations.compare_kclass import fit_logistic

            return fit_logistic(target, cfg.model.head, tr, va)
        return fit_pooled(tr.x, tr.y, va.x, va.y)

    def score(name, kind, model, pre, val_ids, n_train, sites_used, selected_round):
        """A row for ``model``: SAFN, or a `LogisticFit` (its probabilities on the same
        preprocessed features)."""
        val = Arrays.from_table(pre, table.loc[val_ids])
        test = Arrays.from_table(pre, table.loc[ids["test"]])
        if not isinstance(model, torch.nn.Module):  # a logistic regression (`LogisticFit`, …)
            p_val, p_test = (model.predict_proba(a.x.astype(np.float64)) for a in (val, test))
        else:
            p_val, p_test = predict(model, val)[0], predict(model, test)[0]
        if kclass:
            from safn.simulations.compare_kclass import kclass_row

            rows.append({"model": name, "kind": kind, "n_train": int(n_train),
                         "sites": sites_used, "selected_round": selected_round,
                         **kclass_row(test.y, p_test, target, N_BOOT, cfg.train.seed)})
            return
        t = choose_threshold(val.y, p_val)
        ci = bootstrap_ci(test.y, p_test, t, n_boot=N_BOOT, seed=cfg.train.seed)
        rows.append({"model": name, "kind": kind, "n_train": int(n_train), "sites": sites_used,
                     "threshold": t, "selected_round": selected_round,
                     **binary_metrics(test.y, p_test, t), **interval_columns(ci)})

    pooled_pre = Preprocessor(cohort.modalities).fit(table.loc[ids["train"]])
    tr = Arrays.from_table(pooled_pre, table.loc[ids["train"]])
    va = Arrays.from_table(pooled_pre, table.loc[ids["val"]])
    pooled = fit(tr, va)
    score("pooled (all training splits together)", "pooled", pooled.model, pooled_pre, ids["val"],
          len(tr), len(sites), pooled.selected_round)
    if federated is not None:
        model, pre, *selected = federated
        score("federated", "federated", model, pre, ids["val"], len(tr), len(sites),
              selected[0] if selected else None)
        if floor is not None:
            score("federated logistic regression (the floor)", "federated-lr", floor, pre,
                  ids["val"], len(tr), len(sites), None)
    score("pooled logistic regression", "pooled-lr", lr(tr, va),
          pooled_pre, ids["val"], len(tr), len(sites), None)
    for name, site in sites.items():
        counts = np.bincount(table.loc[site.split.train, "label"], minlength=cohort.n_classes)
        if counts.min() < 2 or len(np.unique(table.loc[site.split.val, "label"])) < 2:
            continue
        pre = Preprocessor(cohort.modalities).fit(table.loc[site.split.train])
        tr_s = Arrays.from_table(pre, table.loc[site.split.train])
        va_s = Arrays.from_table(pre, table.loc[site.split.val])
        own = fit(tr_s, va_s)
        score(f"local-only {name}", "local", own.model, pre, site.split.val, len(tr_s), 1,
              own.selected_round)
        score(f"local-only logistic regression {name}", "local-lr",
              lr(tr_s, va_s), pre, site.split.val, len(tr_s), 1,
              None)
    df = pd.DataFrame(rows)
    for kind, best_kind, prefix, label in (
            ("local", "best-local", "local-only ", "best local-only"),
            ("local-lr", "best-local-lr", "local-only logistic regression ",
             "best local-only logistic regression")):
        local = df[df.kind == kind]
        if not local.empty:
            best = local.loc[local.roc_auc.astype(float).idxmax()].copy()
            best["model"] = f"{label} ({best['model'].removeprefix(prefix)})"
            best["kind"] = best_kind
            df = pd.concat([df, best.to_frame().T], ignore_index=True)
    return df, len(ids["test"])


def harmonised_table(cohort, sites: dict, cfg: SafnConfig) -> pd.DataFrame:
    """The cohort's table as the federation harmonised it: ComBat fitted from the training
    sites' training splits (the coordinator's fit, `site_harmonisation.fit_from_sites`), each
    site adjusted from its own training split (a held-out site from all its participants)."""
    from safn_core.federation.site_harmonisation import fit_from_sites, harmonise_site
    from safn_core.harmonisation.setup import combat_spec

    held = set(cfg.server.held_out_sites)
    spec = combat_spec(cfg.harmonisation, cohort.modalities)
    fit = fit_from_sites([s for n, s in sites.items() if n not in held], spec)
    parts = [harmonise_site(s, fit, cfg.harmonisation, held_out=n in held).cohort.table
             for n, s in sites.items()]
    return pd.concat(parts).reindex(cohort.table.index)
