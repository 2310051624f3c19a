"""ComBat in the commands (#14): safn-train fits it inside every training fold on the fold's
training participants only and applies it to the validation and test parts (a site absent from
training adjusts itself); baselines get the same harmonised features; the bundle carries the
final fit (harmonisation.json) and applies it before every prediction; safn-validate harmonises
each site of its data from its own participants; errors are one clean line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.bundle import HarmonisedArrays, load_bundle, save_bundle
from safn_core.cli.common import run_main
from safn_core.cli.train import run as train
from safn_core.cli.validate import run as validate
from safn_core.config import load_config
from safn_core.data.cohort import SITE
from safn_core.data.table_loader import load_table
from safn_core.errors import DataError
from safn_core.harmonisation import (HarmonisationRecord, combat_pooled, harmonise,
                                     harmonise_sites, site_adjustment)
from safn_core.harmonisation import pooled
from safn_core.harmonisation.setup import combat_spec
from safn_core.preprocess import Preprocessor
from safn_core.training import crossval
from safn_core.training.crossval import Split, harmonise_fold, make_splits, run_fold
from safn_core.training.local import Arrays
from tests.helpers import MAPPING, toy_table

IMAGING = [f"ct_{j}" for j in range(6)]
HARMONISE = ["harmonisation.method=combat", "harmonisation.covariates={age: continuous}"]
SMALL = ["train.folds=3", "train.repeats=1", "train.max_epochs=2", "train.patience=2",
         "train.workers=1", "train.feature_sets=[all]", "train.baselines=[logistic_regression]",
         "train.ablations=[]", "model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16",
         "model.ffn_hidden=16", "model.head_hidden=16"]


def cfg_of(*extra: str):
    return load_config(None, SMALL + HARMONISE + list(extra))


def scanner_table(seed: int = 0, centres=("A", "B", "C"), n: int = 240) -> pd.DataFrame:
    """The toy table with a scanner effect per centre on the imaging features: a shift and a
    scale, the kind ComBat removes."""
    df = toy_table(n=n, seed=seed)
    df["centre"] = [centres[i % len(centres)] for i in range(len(df))]
    effect = {c: (0.25 * k, 1.0 + 0.4 * k) for k, c in enumerate(sorted(set(centres)))}
    for c, (shift, scale) in effect.items():
        rows = df.centre == c
        for f in IMAGING:
            mean = df.loc[rows, f].mean()
            df.loc[rows, f] = mean + scale * (df.loc[rows, f] - mean) + shift
    return df


def write(tmp: Path, df: pd.DataFrame, mapping: str = MAPPING) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    csv, yaml = tmp / "cohort.csv", tmp / "mapping.yaml"
    df.to_csv(csv, index=False)
    yaml.write_text(mapping)
    return csv, yaml


def cohort_of(tmp: Path, df: pd.DataFrame, mapping: str = MAPPING):
    return load_table(*write(tmp, df, mapping))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return cohort_of(tmp_path_factory.mktemp("cohort"), scanner_table())


@pytest.fixture(scope="module")
def final(cohort):
    """The final model, trained long enough to rank a new site's participants (recalibration
    refuses a model that ranks them the wrong way round)."""
    return crossval.final_model(cohort, cfg_of("train.max_epochs=15", "train.patience=5"))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, final):
    return save_bundle(tmp_path_factory.mktemp("bundle") / "model", final.fit.model,
                       final.preprocessor, cfg_of(), threshold=final.threshold,
                       class_counts=final.class_counts, kind="centralised",
                       metrics={"cross_validation": {"roc_auc": {"mean": 0.7, "sd": 0.1}}},
                       extra={"training": {"participants": 240,
                                           "sites": {"A": 80, "B": 80, "C": 80}}},
                       harmonisation=final.harmonisation, calibration=final.calibration)


def spec_of(cohort, cfg):
    return combat_spec(cfg.harmonisation, cohort.modalities)


# ------------------------------------------------------------------------- safn-train folds

def test_the_fold_fit_sees_training_rows_only_and_test_rows_change_nothing(cohort, monkeypatch):
    """Leakage spy: the fit is computed from the fold's training rows only, and multiplying
    the test rows' features by 100 changes neither the ComBat fit, nor any training site's
    adjustment, nor the preprocessing fitted after it, nor a harmonised validation value."""
    cfg = cfg_of()
    split = make_splits(cohort, 3, 1, 0.2, 0)[0]
    seen, scalers = [], []
    real_combat, real_fit = pooled.combat_pooled, Preprocessor.fit

    def combat_spy(frame, spec, **kw):
        fit, adjustments = real_combat(frame, spec, **kw)
        seen.append((set(frame.index), fit.to_dict(),
                     {s: a.to_dict() for s, a in adjustments.items()}))
        return fit, adjustments

    def fit_spy(self, frame):
        out = real_fit(self, frame)
        scalers.append((set(frame.index), self.mean_.copy(), self.scale_.copy()))
        return out

    monkeypatch.setattr(pooled, "combat_pooled", combat_spy)
    monkeypatch.setattr(Preprocessor, "fit", fit_spy)
    run_fold(cohort, split, cfg)
    val_before = harmonise_fold(cohort, split, cfg).table.loc[split.val, IMAGING]
    scrambled = cohort.subset(cohort.ids)
    scrambled.table = cohort.table.copy()
    scrambled.table.loc[split.test, IMAGING] = scrambled.table.loc[split.test, IMAGING] * 100
    run_fold(scrambled, split, cfg)
    val_after = harmonise_fold(scrambled, split, cfg).table.loc[split.val, IMAGING]

    assert len(seen) == 4 and len(scalers) == 2  # run_fold, harmonise_fold; twice each
    assert seen[0][0] == set(split.train)
    assert seen[0][1:] == seen[2][1:]
    for (ids_a, mean_a, sd_a), (ids_b, mean_b, sd_b) in zip(scalers[:1], scalers[1:]):
        assert ids_a == ids_b == set(split.train)
        np.testing.assert_array_equal(mean_a, mean_b)
        np.testing.assert_array_equal(sd_a, sd_b)
    pd.testing.assert_frame_equal(val_before, val_after)


def test_validation_test_and_baselines_get_the_training_folds_harmonised_features(cohort,
                                                                                   monkeypatch):
    """What SAFN and every baseline are given in a fold equals ComBat fitted on the training
    rows (pooled, site column as batch), applied per site to every part, then preprocessing
    fitted on the harmonised training rows; and it is not the raw features."""
    cfg = cfg_of()
    split = make_splits(cohort, 3, 1, 0.2, 0)[1]
    given = {}
    real_fp, real_es = crossval.fit_predict, crossval.fit_with_early_stopping

    def fp_spy(name, x, y, xs, seed, val=None, **kw):
        given["baseline"] = (x, xs)
        return real_fp(name, x, y, xs, seed, val=val, **kw)

    def es_spy(tr, va, *args, **kw):
        given["safn"] = (tr.x, va.x)
        return real_es(tr, va, *args, **kw)

    monkeypatch.setattr(crossval, "fit_predict", fp_spy)
    monkeypatch.setattr(crossval, "fit_with_early_stopping", es_spy)
    run_fold(cohort, split, cfg)

    t = cohort.table
    fit, adjustments = combat_pooled(t.loc[split.train], spec_of(cohort, cfg),
                                     min_cell=cfg.data.min_cell)
    parts = [harmonise_sites(fit, adjustments, t.loc[ids])
             for ids in (split.train, split.val, split.test)]
    pre = Preprocessor(cohort.modalities).fit(parts[0])
    expected = [pre.transform_flat(p) for p in parts]
    x_tr, (x_va, x_te) = given["baseline"]
    for got, want in zip((x_tr, x_va, x_te), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(given["safn"][0], x_tr)
    np.testing.assert_array_equal(given["safn"][1], x_va)
    raw = Preprocessor(cohort.modalities).fit(t.loc[split.train]).transform_flat(t.loc[split.test])
    assert np.abs(raw[:, :6] - x_te[:, :6]).max() > 0.1


def test_a_site_absent_from_the_training_part_adjusts_itself_from_its_own_rows(cohort):
    """Site C only in the validation and test parts: each part's C rows are harmonised with the
    fold's global fit and C's own adjustment from that part's rows (no labels), which removes
    C's scanner shift; C's test values do not depend on its validation rows."""
    cfg = cfg_of()
    t = cohort.table
    ab = t.index[t[SITE] != "C"].to_numpy()
    c = t.index[t[SITE] == "C"].to_numpy()
    split = Split(0, 0, ab, c[:30], c[30:])
    fitted = harmonise_fold(cohort, split, cfg)
    assert set(fitted.adjustments) == {"A", "B"}
    assert set(fitted.self_adjusted["validation"]) == set(fitted.self_adjusted["test"]) == {"C"}
    fit = fitted.record.fit
    own = site_adjustment(fit, t.loc[split.test], "C", min_cell=cfg.data.min_cell)
    np.testing.assert_allclose(fitted.self_adjusted["test"]["C"].gamma, own.gamma)
    pd.testing.assert_frame_equal(fitted.table.loc[split.test],
                                  harmonise(fit, own, t.loc[split.test]))
    raw_gap = abs(t.loc[c, IMAGING].mean() - t.loc[t[SITE] == "A", IMAGING].mean()).mean()
    h = fitted.table
    gap = abs(h.loc[split.test, IMAGING].mean() - h.loc[t[SITE] == "A", IMAGING].mean()).mean()
    assert gap < raw_gap / 3
    moved = cohort.subset(cohort.ids)
    moved.table = t.copy()
    moved.table.loc[split.val, IMAGING] += 5.0
    again = harmonise_fold(moved, split, cfg).table
    pd.testing.assert_frame_equal(again.loc[split.test], fitted.table.loc[split.test])
    # and the whole fold runs on it
    rows = run_fold(cohort, split, cfg)["rows"]
    assert {r["model"] for r in rows} == {"SAFN", "logistic_regression"}


def test_the_final_model_carries_the_fit_of_its_own_training_part(cohort, final):
    rec = final.harmonisation
    assert isinstance(rec, HarmonisationRecord)
    assert rec.fit.n == 192 and "192 of the 240" in rec.fitted_on  # 1 - val_fraction 0.2
    with pytest.raises(ValueError, match="final_model"):
        crossval.final_fit(cohort, cfg_of())


# ----------------------------------------------------------------------------------- bundle

def test_the_bundle_round_trips_harmonisation_json_and_an_older_bundle_loads(bundle_dir, final,
                                                                            tmp_path):
    rec = final.harmonisation
    stored = json.loads((bundle_dir / "harmonisation.json").read_text())
    assert stored == json.loads(json.dumps(rec.to_dict()))
    assert stored["empirical_bayes"] is True and stored["parametric"] is True
    b = load_bundle(bundle_dir)
    assert b.harmonisation.fit.to_dict() == rec.fit.to_dict()
    assert (b.harmonisation.empirical_bayes, b.harmonisation.parametric,
            b.harmonisation.fitted_on) == (True, True, rec.fitted_on)
    summary = b.meta["harmonisation"]
    assert summary["fit_id"] == rec.fit.fit_id and summary["modalities"] == ["imaging"]
    assert summary["n_features"] == 6 and summary["covariates"]["continuous"] == ["age"]
    card = (bundle_dir / "model_card.md").read_text()
    section = card.split("## Harmonisation\n", 1)[1].split("\n## ", 1)[0]
    assert "6 MRI features (imaging)" in section and "age (continuous)" in section
    assert "parametric empirical Bayes" in section and "192 of the 240" in section
    assert "inside each training fold" in section
    assert "adjusts itself from its own participants" in section

    old = save_bundle(tmp_path / "old", final.fit.model, final.preprocessor,
                      load_config(None, SMALL), threshold=0.5, class_counts=[1, 1],
                      kind="centralised")
    assert not (old / "harmonisation.json").exists()
    assert load_bundle(old).harmonisation is None
    assert "## Harmonisation" not in (old / "model_card.md").read_text()


def test_a_bundle_missing_or_altering_its_fit_is_refused(bundle_dir, tmp_path):
    import shutil

    gone = shutil.copytree(bundle_dir, tmp_path / "gone")
    (gone / "harmonisation.json").unlink()
    with pytest.raises(DataError, match="harmonisation.json is missing"):
        load_bundle(gone)
    altered = shutil.copytree(bundle_dir, tmp_path / "altered")
    d = json.loads((altered / "harmonisation.json").read_text())
    d["fit"]["alpha"][0] += 1.0
    (altered / "harmonisation.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="damaged.*fit_id"):
        load_bundle(altered)
    with pytest.raises(TypeError, match="HarmonisationRecord"):
        b = load_bundle(bundle_dir)
        save_bundle(tmp_path / "x", b.model, b.preprocessor, b.config, threshold=0.5,
                    class_counts=[1, 1], kind="centralised", harmonisation={"fit": 1})


def test_bundle_harmonise_equals_harmonise_sites_with_each_sites_own_adjustment(bundle_dir,
                                                                                tmp_path):
    b = load_bundle(bundle_dir)
    fit, rec = b.harmonisation.fit, b.harmonisation
    table = cohort_of(tmp_path, scanner_table(seed=3, centres=("X", "Y"))).table
    own = {s: site_adjustment(fit, rows, s, empirical_bayes=rec.empirical_bayes,
                              parametric=rec.parametric, min_cell=b.min_cell)
           for s, rows in table.groupby(SITE)}
    pd.testing.assert_frame_equal(b.harmonise(table), harmonise_sites(fit, own, table))
    # without a site column the table is one site
    flat = table.drop(columns=[SITE])
    whole = site_adjustment(fit, flat, "all", min_cell=b.min_cell)
    pd.testing.assert_frame_equal(b.harmonise(flat), harmonise(fit, whole, flat))
    # every prediction goes through it; raw arrays are refused
    p_table, _ = b.predict(table)
    arrays = b.arrays(table)
    assert isinstance(arrays, HarmonisedArrays)
    np.testing.assert_array_equal(b.predict(arrays)[0], p_table)
    expected = Arrays.from_table(b.preprocessor, harmonise_sites(fit, own, table))
    np.testing.assert_array_equal(arrays.x, expected.x)
    with pytest.raises(DataError, match="harmonised MRI features"):
        b.scores(Arrays.from_table(b.preprocessor, table))


# ----------------------------------------------------------------------------- safn-validate

def test_safn_validate_harmonises_each_site_from_its_own_participants(bundle_dir, tmp_path,
                                                                      capsys):
    df = scanner_table(seed=7, centres=("X", "Y"))
    csv, mapping = write(tmp_path / "data", df)
    out = tmp_path / "val"
    code = run_main(validate, ["--model", str(bundle_dir), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(out), "--bootstrap", "20"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "each site adjusted from its own participants: X from 120, Y from 120" in captured.out
    res = json.loads((out / "validation.json").read_text())
    h = res["harmonisation"]
    assert h["applied"] is True and h["sites"] == {"X": 120, "Y": 120}
    b = load_bundle(bundle_dir)
    assert h["fit_id"] == b.harmonisation.fit.fit_id
    preds = pd.read_csv(out / "predictions.csv", dtype={"participant_id": str})
    table = load_table(csv, mapping).table
    p, _ = b.predict(table.loc[preds.participant_id])
    np.testing.assert_allclose(preds.p.to_numpy(), p, rtol=1e-6)
    assert "harmonised first with the bundle's ComBat fit" in (out / "model_card.md").read_text()

    recal = tmp_path / "recal"
    code = run_main(validate, ["--model", str(bundle_dir), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(recal), "--bootstrap", "20",
                               "--recalibrate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "X from 120, Y from 120" in captured.out
    assert json.loads((recal / "validation.json").read_text())["harmonisation"]["applied"]
    site = recal / "site_bundle"
    assert (site / "harmonisation.json").read_bytes() == \
        (bundle_dir / "harmonisation.json").read_bytes()
    assert load_bundle(site).harmonisation.fit.fit_id == b.harmonisation.fit.fit_id


def test_safn_validate_refuses_a_site_below_min_cell(bundle_dir, tmp_path, capsys):
    df = scanner_table(seed=8, centres=("X", "Y"))
    df.loc[df.index[:3], "centre"] = "Z"
    csv, mapping = write(tmp_path, df)
    code = run_main(validate, ["--model", str(bundle_dir), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "site Z: 3 participant(s)" in err and "min_cell = 5" in err


# ------------------------------------------------------------------------------------ errors

def _train(tmp_path: Path, csv: Path, mapping: Path) -> int:
    argv = ["--out", str(tmp_path / "run"), "--set", "data.source=table",
            "--set", f"data.path={csv}", "--set", f"data.mapping={mapping}"]
    for s in SMALL + HARMONISE:
        argv += ["--set", s]
    return run_main(train, argv)


def test_safn_train_without_a_site_column_is_one_clean_line(tmp_path, capsys):
    no_site = MAPPING.replace("site: centre\n", "")
    csv, mapping = write(tmp_path, scanner_table(), no_site)
    code = _train(tmp_path, csv, mapping)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert "no site column" in err and "harmonisation.method: none" in err
    assert not (tmp_path / "run" / "folds.csv").exists()


def test_safn_train_with_a_small_site_names_fold_and_site(tmp_path, capsys):
    df = scanner_table(centres=("A", "B"))
    df.loc[df.index[:6], "centre"] = "C"
    csv, mapping = write(tmp_path, df)
    code = _train(tmp_path, csv, mapping)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "harmonisation in repeat 1, fold " in err and "site C has" in err and "training participant" in err
    assert "train.folds" in err and "harmonisation.method: none" in err
    assert not (tmp_path / "run" / "folds.csv").exists()
    # the check needs no training: cross_validate refuses before any fold runs
    small = load_table(csv, mapping)
    with pytest.raises(DataError, match="site C"):
        crossval.check_harmonisation(small, cfg_of(), make_splits(small, 3, 1, 0.2, 0))


def test_safn_train_writes_a_bundle_with_its_final_fits_harmonisation(tmp_path, capsys):
    """End to end: the console says what is harmonised, and the run's bundle carries the fit
    of the final model's own training part (equal to final_model's, recomputed here)."""
    csv, mapping = write(tmp_path / "data", scanner_table(seed=2))
    assert _train(tmp_path, csv, mapping) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "harmonisation: ComBat of 6 features (imaging) across the sites A, B, C" in out
    run = tmp_path / "run"
    assert "ComBat of 6 features" in json.loads((run / "results.json").read_text())[
        "harmonisation"]
    b = load_bundle(run / "model")
    cfg = load_config(run / "config.yaml")
    again = crossval.final_model(load_table(csv, mapping), cfg).harmonisation
    assert b.harmonisation.fit.to_dict() == again.fit.to_dict()
    assert b.harmonisation.fit.n == 192
    assert "## Harmonisation" in (run / "model" / "model_card.md").read_text()
