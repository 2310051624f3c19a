"""Baselines on the concatenated features, scored on the same folds as SAFN.

Each baseline sees the features after the fold's own `Preprocessor` (imputation and scaling fitted
on the training fold), so SAFN and the baselines differ only in the model.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

BASELINES = ("majority", "logistic_regression", "random_forest", "hist_gradient_boosting", "mlp")


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
    if name == "mlp":
        # no internal early stopping: its 10 % hold-out of a small fold stops it after a few
        # epochs; a fixed budget with L2 is steadier on a few hundred participants
        return MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-2, early_stopping=False,
                             max_iter=200, random_state=seed)
    raise ValueError(f"unknown baseline '{name}'; choose from {', '.join(BASELINES)}")


def fit_predict(name: str, x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray],
                seed: int) -> list[np.ndarray]:
    """Fit the baseline on the training fold and return P(positive) for each evaluation set."""
    model = make_baseline(name, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    col = list(model.classes_).index(1) if 1 in model.classes_ else None
    out = []
    for x in x_eval:
        proba = model.predict_proba(x)
        out.append(proba[:, col] if col is not None else np.zeros(len(x)))
    return out
