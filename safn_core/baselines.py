"""Baselines on the concatenated features, scored on the same folds as SAFN.

Each baseline sees the features after the fold's own `Preprocessor` (imputation and scaling fitted
on the training fold), so SAFN and the baselines differ only in the model. A declared categorical
column reaches them as its one-hot indicators (`safn_core.data.table_loader`).

``hist_gradient_boosting_es`` is gradient boosting with the budget chosen the way SAFN's is: trees
are added until the class-balanced log loss on the *same* validation split that stops SAFN has not
improved for `ES_PATIENCE` trees (scikit-learn's ``X_val``; its default would carve a hold-out
out of the training part instead), and the ensemble of the best iteration is kept.

``exact_logistic_regression`` is the solver SAFN's wide path starts from and the federation fits
across sites (`safn_core.logistic`): L2-penalised, class-balanced logistic regression by Newton's
method, pooled, its penalty λ chosen from `safn_core.logistic.PENALTIES` by the class-balanced
log loss of the same validation split (equal to scikit-learn's
``LogisticRegression(C=1/λ, class_weight="balanced")``). ``logistic_regression`` keeps its fixed
C = 0.1 (λ = 10).

K classes (labels 0..K−1; ``n_classes``): every baseline returns the (n, K) class probabilities
instead of P(class 1) (a binary target's outputs are as they were). ``logistic_regression`` is
then scikit-learn's multinomial fit, ``exact_logistic_regression`` the exact multinomial one
(`safn_core.logistic.multinomial`, equal to scikit-learn's multinomial
``LogisticRegression(C=1/λ, class_weight="balanced")``), gradient boosting and the MLP their
multi-class forms, gradient boosting stopped on the class-balanced multi-class log loss.
``ordinal_logistic`` (ordered targets only, `baselines_for`) is safn's own proportional-odds
fit (`safn_core.logistic.ordinal`: cumulative logit, class-balanced, L2 on the coefficients
with λ chosen on the same validation split as ``exact_logistic_regression``'s; it equals
statsmodels' ``OrderedModel(distr="logit")`` when unpenalised and unweighted).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

BASELINES = ("majority", "logistic_regression", "exact_logistic_regression", "random_forest",
             "hist_gradient_boosting", "hist_gradient_boosting_es", "mlp", "ordinal_logistic")
NEEDS_VALIDATION = ("exact_logistic_regression", "hist_gradient_boosting_es", "ordinal_logistic")
ORDERED_ONLY = ("ordinal_logistic",)
ES_MAX_ITER = 2000  # upper bound on trees of hist_gradient_boosting_es
ES_PATIENCE = 50  # trees without validation improvement before it stops


def make_baseline(name: str, seed: int):
    """A scikit-learn estimator for the named baseline (class-balanced where it applies)."""
    if name == "majority":
        return DummyClassifier(strategy="prior")
    if name == "logistic_regression":
        return LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
    if name == "random_forest":
        return RandomForestClassifier(n_estimators=300, min_samples_leaf=2,
                                      class_weight="balanced_subsample", random_state=seed,
                                      n_jobs=1)
    if name == "hist_gradient_boosting":
        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                              class_weight="balanced", random_state=seed)
    if name == "hist_gradient_boosting_es":
        return HistGradientBoostingClassifier(max_iter=ES_MAX_ITER, learning_rate=0.05,
                                              max_leaf_nodes=15, l2_regularization=1.0,
                                              class_weight="balanced", early_stopping=True,
                                              scoring="loss", n_iter_no_change=ES_PATIENCE,
                                              random_state=seed)
    if name in ("exact_logistic_regression", "ordinal_logistic"):
        return None  # not an estimator: fit_predict runs safn_core.logistic's exact fits
    if name == "mlp":
        # no internal early stopping: its 10 % hold-out of a small fold stops it after a few
        # epochs; a fixed budget with L2 is steadier on a few hundred participants
        return MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-2, early_stopping=False,
                             max_iter=200, random_state=seed)
    raise ValueError(f"unknown baseline '{name}'; choose from {', '.join(BASELINES)}")


def baselines_for(ordered: bool) -> tuple[str, ...]:
    """The baselines of a target: all of them for an ordered one, the ordinal ones left out
    otherwise."""
    return tuple(b for b in BASELINES if ordered or b not in ORDERED_ONLY)


def _balanced_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean log loss with each class weighted to the same total (what class_weight balances);
    ``p``: P(class 1) (n,) for a binary target, the class probabilities (n, K) otherwise."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        losses = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))
    else:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        losses = np.where(y == 1, -np.log(p), -np.log(1 - p))
    return float(np.mean([losses[y == c].mean() for c in np.unique(y)]))


def _columns(proba: np.ndarray, classes, n_classes: int) -> np.ndarray:
    """``proba`` (n, len(classes)) as (n, K) in the order 0..K−1 (0 for a class not seen)."""
    out = np.zeros((len(proba), n_classes))
    out[:, np.asarray(classes, dtype=np.int64)] = proba
    return out


def _boost_until_validation_stops(model, x_train, y_train, x_val, y_val) -> int:
    """Fit ``model``, stopping on the validation split; return the best iteration's tree count.

    scikit-learn stops once ``n_iter_no_change`` trees have not improved the validation loss but
    keeps those last trees; the staged pass finds the best iteration, which is what is kept.
    """
    classes, counts = np.unique(y_val, return_counts=True)
    weight_val = (len(y_val) / (len(classes) * counts))[np.searchsorted(classes, y_val)]
    model.fit(x_train, y_train, X_val=x_val, y_val=y_val, sample_weight_val=weight_val)
    if len(model.classes_) == 2:
        col = list(model.classes_).index(1)
        losses = [_balanced_log_loss(y_val, p[:, col])
                  for p in model.staged_predict_proba(x_val)]
    else:
        k = int(max(model.classes_.max(), y_val.max())) + 1
        losses = [_balanced_log_loss(y_val, _columns(p, model.classes_, k))
                  for p in model.staged_predict_proba(x_val)]
    return int(np.argmin(losses)) + 1


def fit_predict(name: str, x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray],
                seed: int, val: tuple[np.ndarray, np.ndarray] | None = None,
                n_classes: int | None = None) -> list[np.ndarray]:
    """Fit the baseline on the training fold and return, for each evaluation set, P(positive)
    (n,) for a binary target or the class probabilities (n, K) for K > 2 classes.

    ``val``: the validation split (features, labels) that early-stops SAFN; needed by
    ``hist_gradient_boosting_es``, which stops on it, and ``exact_logistic_regression`` and
    ``ordinal_logistic``, which choose their penalty on it; unused by the others.
    ``n_classes``: the target's K (default: the largest label seen + 1, at least 2).
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    seen = [y_train.max(initial=1)] + ([np.max(val[1], initial=1)] if val is not None else [])
    k = int(n_classes) if n_classes is not None else max(2, int(max(seen)) + 1)
    model = make_baseline(name, seed)
    if name in NEEDS_VALIDATION:
        if val is None:
            raise ValueError(f"{name} needs the validation split (val=...)")
        need = 2 if name == "hist_gradient_boosting_es" else k
        if len(np.unique(y_train)) < need or len(np.unique(val[1])) < need:
            which = "every class" if need > 2 else "both classes"
            raise ValueError(f"{name} needs {which} in the training and the validation split")
    if k > 2:
        return _fit_predict_k(name, model, x_train, y_train, x_eval, val, k)
    if name == "ordinal_logistic":
        from safn_core.logistic import ordinal

        fit = ordinal.fit_pooled(x_train, y_train, *val, n_classes=2)
        return [fit.predict_proba(x)[:, 1] for x in x_eval]
    if name == "exact_logistic_regression":
        from safn_core.logistic import fit_pooled

        fit = fit_pooled(x_train, y_train, *val)
        return [fit.predict_proba(x) for x in x_eval]
    if name == "hist_gradient_boosting_es":
        best = _boost_until_validation_stops(model, x_train, y_train, *val)
        col = list(model.classes_).index(1)
        return [_staged(model, x, best)[:, col] for x in x_eval]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    col = list(model.classes_).index(1) if 1 in model.classes_ else None
    out = []
    for x in x_eval:
        proba = model.predict_proba(x)
        out.append(proba[:, col] if col is not None else np.zeros(len(x)))
    return out


def _fit_predict_k(name: str, model, x_train, y_train, x_eval, val, k: int) -> list:
    """`fit_predict` for K > 2 classes: (n, K) class probabilities per evaluation set."""
    if name in ("exact_logistic_regression", "ordinal_logistic"):
        from safn_core.logistic import multinomial, ordinal

        solver = ordinal if name == "ordinal_logistic" else multinomial
        fit = solver.fit_pooled(x_train, y_train, *val, n_classes=k)
        return [fit.predict_proba(x) for x in x_eval]
    if name == "hist_gradient_boosting_es":
        best = _boost_until_validation_stops(model, x_train, y_train, *val)
        return [_columns(_staged(model, x, best), model.classes_, k) for x in x_eval]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    return [_columns(model.predict_proba(x), model.classes_, k) for x in x_eval]


def _staged(model, x: np.ndarray, n_trees: int) -> np.ndarray:
    """Class probabilities of the first ``n_trees`` iterations of a boosted ``model``."""
    for i, proba in enumerate(model.staged_predict_proba(x), 1):
        if i == n_trees:
            return proba
    raise ValueError(f"the model has fewer than {n_trees} iterations")
