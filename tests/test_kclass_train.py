"""safn-train with a target of K > 2 classes (#32): the K-class folds, summary, report and bundle
(configs/severity.yaml, shrunk), and the decision rule the bundle carries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from safn_core.cli.common import run_main
from safn_core.cli.train import run as train
from safn_core.config import load_config
from safn_core.data.sources import load_cohort
from safn_core.training.crossval import final_model

SMALL = ["train.folds=2", "train.repeats=1", "train.max_epochs=4", "train.patience=2",
         "train.workers=1", "model.ensemble_size=2", "model.d_model=16", "model.n_heads=2",
         "model.encoder_hidden=16", "model.ffn_hidden=16", "model.head_hidden=8",
         "train.baselines=[majority,exact_logistic_regression,ordinal_logistic]",
         "train.feature_sets=[all]", "train.modality_drop=false"]


def _run(tmp_path, *extra: str) -> int:
    argv = ["--config", "configs/severity.yaml", "--out", str(tmp_path / "run")]
    for s in (*SMALL, *extra):
        argv += ["--set", s]
    return run_main(train, argv)


def test_safn_train_hy_stage_reports_k_class_metrics_and_ships_its_cut_points(tmp_path):
    assert _run(tmp_path, "data.target=hy_stage", "train.decision_rule=cutpoints") == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["target"]["name"] == "hy_stage" and results["target"]["ordered"]
    assert list(results["class_counts"]) == ["HC", "H&Y 1", "H&Y >=2"]
    rows = {r["model"]: r for r in results["summary"]}
    assert set(rows) == {"SAFN", "majority", "exact_logistic_regression", "ordinal_logistic"}
    # the majority class predicts one class for everyone: chance balanced accuracy, kappa 0
    assert rows["majority"]["balanced_accuracy_mean"] == pytest.approx(1 / 3)
    assert rows["majority"]["qwk_mean"] == pytest.approx(0.0)
    assert rows["SAFN"]["roc_auc_mean"] > 0.6  # H&Y is staged from the motor scales it keeps
    folds = pd.read_csv(run / "folds.csv")
    assert {"qwk", "mae", "qwk_cut", "majority_balanced_accuracy"} <= set(folds.columns)
    preds = pd.read_csv(run / "predictions.csv")
    p = preds[["p_HC", "p_H&Y 1", "p_H&Y >=2"]].to_numpy()
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    html = (run / "report.html").read_text()
    assert "confusion matrix" in html and "NHY define(s) the target" in html
    assert "modality weights per class" in html
    bundle = json.loads((run / "model" / "bundle.json").read_text())
    assert bundle["target"]["name"] == "hy_stage"
    cuts = bundle["decision"]["cutpoints"]
    assert len(cuts) == 2 and cuts[0] < cuts[1]


def test_cutpoints_are_refused_for_unordered_classes_before_any_fit(tmp_path, monkeypatch):
    cfg = load_config("configs/severity.yaml", [*SMALL, "train.decision_rule=cutpoints"])
    cohort = load_cohort(cfg.data, cfg.synth)
    from safn_core.targets import Target

    cohort.target = Target("label", cohort.target.classes, ordered=False)
    from safn_core.errors import DataError
    from safn_core.training import crossval

    def no_fit(*a, **k):
        raise AssertionError("fitted before the rule was checked")

    monkeypatch.setattr(crossval, "fit_with_early_stopping", no_fit)
    with pytest.raises(DataError, match="unordered classes; use argmax"):
        final_model(cohort, cfg)
