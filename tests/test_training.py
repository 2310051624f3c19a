"""Centralised evaluation: leakage guards, participant-level splits, determinism, bundles."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.bundle import load_bundle, save_bundle
from safn_core.config import load_config
from safn_core.errors import DataError
from safn_core.preprocess import FeatureStats, Preprocessor
from safn_core.training import crossval
from safn_core.training.crossval import cross_validate, make_splits, run_fold
from safn_core.training.local import Arrays, predict
from tests.helpers import toy_cohort, write_toy


def small_cfg(**extra):
    sets = ["train.folds=3", "train.repeats=1", "train.max_epochs=8", "train.patience=3",
            "train.workers=1", "train.feature_sets=[all]", "train.baselines=[majority, logistic_regression]",
            "train.ablations=[]", "model.d_model=16", "model.n_heads=2",
            "model.encoder_hidden=16", "model.ffn_hidden=16", "model.head_hidden=16"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


def test_stats_of_parts_add_up_to_pooled(tmp_path):
    cohort = toy_cohort(tmp_path)
    t = cohort.table
    halves = [t.iloc[:100], t.iloc[100:170], t.iloc[170:]]
    summed = sum((FeatureStats.from_frame(h, cohort.features) for h in halves[1:]),
                 FeatureStats.from_frame(halves[0], cohort.features))
    pre = Preprocessor(cohort.modalities).fit_stats(summed)
    np.testing.assert_allclose(pre.mean_, t[cohort.features].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(pre.scale_, t[cohort.features].std(ddof=1).to_numpy(), rtol=1e-9)


def test_transform_imputes_training_mean_and_masks_absent_modality(tmp_path):
    cohort = toy_cohort(tmp_path)
    pre = Preprocessor(cohort.modalities).fit(cohort.table)
    row = cohort.table.iloc[[0]].copy()
    row[[f"ct_{j}" for j in range(6)]] = np.nan
    row["cl_0"] = np.nan
    blocks, mask = pre.transform(row)
    assert mask.tolist() == [[False, True, True]]
    np.testing.assert_allclose(blocks[0], 0.0)  # imputed with the mean → 0 after scaling
    assert blocks[1][0, 0] == 0.0


def test_preprocessor_state_round_trip(tmp_path):
    cohort = toy_cohort(tmp_path)
    pre = Preprocessor(cohort.modalities).fit(cohort.table)
    again = Preprocessor.from_state(pre.state_dict())
    np.testing.assert_array_equal(pre.transform_flat(cohort.table), again.transform_flat(cohort.table))


def test_splits_are_by_participant_and_stratified(tmp_path):
    cohort = toy_cohort(tmp_path)
    splits = make_splits(cohort, folds=5, repeats=2, val_fraction=0.2, seed=0)
    assert len(splits) == 10
    for r in (0, 1):
        tests = np.concatenate([s.test for s in splits if s.repeat == r])
        assert sorted(tests) == sorted(cohort.ids)  # every participant tested once per repeat
    prevalence = cohort.y.mean()
    for s in splits:
        assert not set(s.train) & set(s.test) and not set(s.val) & set(s.test)
        assert not set(s.train) & set(s.val)
        y_test = cohort.table.loc[s.test, "label"]
        assert abs(y_test.mean() - prevalence) < 0.06


def test_test_fold_never_influences_preprocessing(tmp_path, monkeypatch):
    """Scramble the test fold's values: every fitted scaler must stay bit-identical."""
    cohort = toy_cohort(tmp_path)
    cfg = small_cfg()
    split = make_splits(cohort, 3, 1, 0.2, 0)[0]
    fitted = []
    real_fit = Preprocessor.fit

    def spy(self, frame):
        out = real_fit(self, frame)
        fitted.append((set(frame.index), self.mean_.copy(), self.scale_.copy()))
        return out

    monkeypatch.setattr(Preprocessor, "fit", spy)
    run_fold(cohort, split, cfg)
    first = list(fitted)
    fitted.clear()
    scrambled = cohort.subset(cohort.ids)
    scrambled.table = cohort.table.copy()
    feats = cohort.features
    scrambled.table.loc[split.test, feats] = scrambled.table.loc[split.test, feats] * 100 + 1e4
    run_fold(scrambled, split, cfg)
    assert first and len(first) == len(fitted)
    for (ids_a, mean_a, sd_a), (ids_b, mean_b, sd_b) in zip(first, fitted):
        assert not ids_a & set(split.test)
        np.testing.assert_array_equal(mean_a, mean_b)
        np.testing.assert_array_equal(sd_a, sd_b)


def test_cross_validation_is_deterministic(tmp_path):
    cohort = toy_cohort(tmp_path)
    cfg = small_cfg()
    a = cross_validate(cohort, cfg)["folds"]
    b = cross_validate(cohort, cfg)["folds"]
    pd.testing.assert_frame_equal(a, b)
    assert set(a.model) == {"SAFN", "majority", "logistic_regression"}
    c = cross_validate(cohort, small_cfg(**{"train.seed": 5}))["folds"]
    assert not np.allclose(a.roc_auc.to_numpy(), c.roc_auc.to_numpy())


def test_feature_sets_apply_to_ppmi_style_modalities(tmp_path):
    from safn_core.data.cohort import Cohort, LoadReport, Modality
    table = pd.DataFrame({"site": ["a"], "label": [1], "lh_x": [2.0], "NP3TOT": [3.0],
                          "UPSIT": [20.0], "AGE": [60.0]}, index=pd.Index(["1"], name="participant_id"))
    mods = (Modality("thickness", ("lh_x",), "imaging"),
            Modality("clinical", ("NP3TOT", "UPSIT"), "clinical"),
            Modality("demographics", ("AGE",), "clinical"))
    c = Cohort(table, mods, LoadReport("x"))
    assert [m.features for m in crossval.feature_set(c, "no_motor")] == [("lh_x",), ("UPSIT",), ("AGE",)]
    assert [m.name for m in crossval.feature_set(c, "imaging_demographics")] == ["thickness", "demographics"]
    assert crossval.feature_set(c, "all") == mods


def test_bundle_round_trip_and_no_overwrite(tmp_path):
    cohort = toy_cohort(tmp_path)
    cfg = small_cfg()
    fit, pre, threshold, counts = crossval.final_fit(cohort, cfg)
    dest = save_bundle(tmp_path / "model", fit.model, pre, cfg, threshold=threshold,
                       class_counts=counts, kind="centralised")
    bundle = load_bundle(dest)
    arrays = Arrays.from_table(bundle.preprocessor, cohort.table)
    p1, w1 = predict(fit.model, arrays)
    p2, w2 = predict(bundle.model, arrays)
    np.testing.assert_allclose(p1, p2, rtol=1e-6)
    assert bundle.threshold == threshold
    with pytest.raises(DataError, match="already exists"):
        save_bundle(dest, fit.model, pre, cfg, threshold=threshold, class_counts=counts,
                    kind="centralised")
    (dest / "weights.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="damaged"):
        load_bundle(dest)
    with pytest.raises(DataError, match="not a safn model bundle"):
        load_bundle(tmp_path)


def test_safn_train_cli_end_to_end(tmp_path):
    csv, mapping = write_toy(tmp_path)
    out = tmp_path / "run"
    exe = Path(sys.executable).parent / "safn-train"
    cmd = [str(exe), "--quick", "--out", str(out), "--set", "data.source=table",
           "--set", f"data.path={csv}", "--set", f"data.mapping={mapping}",
           "--set", "train.workers=1", "--set", "train.max_epochs=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = pd.read_csv(out / "results.csv")
    assert {"SAFN", "majority", "random_forest"} <= set(results.model)
    assert (out / "roc_pr.png").stat().st_size > 1000
    bundle = load_bundle(out / "model")
    assert bundle.meta["kind"] == "centralised"
    # train.temperature_scaling (on by default): T per fold in the results, the final fit's in
    # the bundle (fitted, or T = 1 with the reason) and its card
    safn = results.set_index("model").loc["SAFN"]
    assert safn.temperature_mean > 0 and "calibration_slope_mean" in results.columns
    assert bundle.meta["calibration"]["fitted_at"] == "training"
    assert bundle.calibration_map.method == "temperature"
    assert "## Calibration" in (out / "model" / "model_card.md").read_text()
    assert "temperature scaling (train.temperature_scaling" in proc.stdout
    # the same --out again must refuse and leave the run untouched
    before = (out / "results.csv").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert (out / "results.csv").read_bytes() == before
