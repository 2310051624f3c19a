"""safn-validate: a bundle evaluated offline on a site's data, checked against scikit-learn."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, brier_score_loss,
                             matthews_corrcoef, roc_auc_score)

from safn_core.bundle import save_bundle
from safn_core.cli.common import run_main
from safn_core.cli.validate import run as validate
from safn_core.config import load_config
from safn_core.training import crossval
from tests.helpers import toy_table, write_toy


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    csv, mapping = write_toy(tmp, seed=1)
    cfg = load_config(None, ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
                             "train.max_epochs=10", "model.d_model=16", "model.n_heads=2"])
    from safn_core.data.sources import load_cohort
    cohort = load_cohort(cfg.data)
    fit, pre, threshold, counts = crossval.final_fit(cohort, cfg)
    return save_bundle(tmp / "model", fit.model, pre, cfg, threshold=threshold,
                       class_counts=counts, kind="centralised")


def test_metrics_match_sklearn_on_same_predictions(bundle_path, tmp_path, capsys):
    csv, mapping = write_toy(tmp_path, seed=7)  # another site's data
    out = tmp_path / "val"
    code = run_main(validate, ["--model", str(bundle_path), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(out), "--bootstrap", "100"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "validation.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    y, p, t = preds.y.to_numpy(), preds.p.to_numpy(), res["threshold"]
    m = res["metrics"]
    assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc_pd"]["value"] == pytest.approx(average_precision_score(y, p))
    assert m["pr_auc_hc"]["value"] == pytest.approx(average_precision_score(1 - y, 1 - p))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p >= t))
    assert m["mcc"]["value"] == pytest.approx(matthews_corrcoef(y, p >= t))
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    for k, v in m.items():
        if not np.isnan(v["value"]):
            assert v["ci"][0] <= v["value"] + 1e-9 and v["value"] <= v["ci"][1] + 1e-9, k
    assert len(preds) == len(toy_table(seed=7))
    assert set(res["modality_weights"]) == {"imaging", "clinical", "demographics"}
    assert sum(res["modality_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "slope" in res["calibration"] and (out / "report.html").is_file()


def test_missing_features_is_a_clear_error(bundle_path, tmp_path, capsys):
    csv, mapping = write_toy(tmp_path)
    mapping.write_text(mapping.read_text().replace('["cl_*"]', '["cl_0", "cl_1"]'))
    code = run_main(validate, ["--model", str(bundle_path), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks 1 feature" in err and "cl_2" in err and "Traceback" not in err


def test_not_a_bundle(tmp_path, capsys):
    csv, mapping = write_toy(tmp_path)
    code = run_main(validate, ["--model", str(tmp_path), "--data", str(csv), "--mapping",
                               str(mapping)])
    err = capsys.readouterr().err
    assert code == 2 and "not a safn model bundle" in err


def test_validate_sim_and_train_bundles_on_a_fresh_synthetic_site(tmp_path):
    """The issue's path: bundles from safn-sim and safn-train, a new site written by safn-synth."""
    import subprocess
    import sys
    from pathlib import Path

    bin_ = Path(sys.executable).parent
    small = ["--set", "synth.n_pd=90", "--set", "synth.n_hc=60", "--set", "synth.n_without_mri=0",
             "--set", "synth.n_swedd=0", "--set", "synth.n_prodromal=0", "--set", "synth.n_sites=3",
             "--set", "synth.min_site_size=30", "--set", "model.d_model=16",
             "--set", "model.n_heads=2"]

    def ok(*cmd):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    ok(bin_ / "safn-sim", "--out", tmp_path / "sim", *small, "--set", "federation.rounds=2",
       "--set", "federation.local_epochs=1", "--set", "simulation.compare=false")
    # only the bundle matters here: one feature set, no ablation rows, one baseline
    ok(bin_ / "safn-train", "--quick", "--out", tmp_path / "train", *small,
       "--set", "train.max_epochs=5", "--set", "train.workers=1",
       "--set", "train.feature_sets=[all]", "--set", "train.ablations=[]",
       "--set", "train.baselines=[majority]")
    # a fresh site: another seed, its own download
    ok(bin_ / "safn-synth", "--out", tmp_path / "site", "--seed", "42",
       "--set", "synth.n_pd=60", "--set", "synth.n_hc=40", "--set", "synth.n_sites=1")
    for kind in ("sim", "train"):
        out = tmp_path / f"val-{kind}"
        ok(bin_ / "safn-validate", "--model", tmp_path / kind / "model", "--data",
           tmp_path / "site", "--out", out, "--bootstrap", "100")
        res = json.loads((out / "validation.json").read_text())
        preds = pd.read_csv(out / "predictions.csv")
        assert res["n"] == 100 and len(preds) == 100
        assert res["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(preds.y, preds.p))
        assert res["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
            balanced_accuracy_score(preds.y, preds.p >= res["threshold"]))
        assert (out / "report.html").is_file()
