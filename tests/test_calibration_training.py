"""Temperature scaling on the validation split (``train.temperature_scaling``) and the
learning-rate schedule (``train.lr_schedule``, ``train.warmup_epochs``) of centralised training."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, logit
from sklearn.model_selection import train_test_split

from safn_core.bundle import load_bundle, save_bundle
from safn_core.cli.common import run_main
from safn_core.cli.validate import run as validate
from safn_core.config import TrainConfig, load_config
from safn_core.data.table_loader import load_table
from safn_core.errors import ConfigError, DataError
from safn_core.metrics import calibration_slope, choose_threshold
from safn_core.recalibration import fit_map, fit_training_temperature
from safn_core.training import crossval, local
from safn_core.training.crossval import make_splits, run_fold
from safn_core.training.local import Arrays, fit_by_rounds, predict
from tests.helpers import TINY_MODEL, TWO_MODALITIES, shifted_arrays, toy_cohort, write_toy
from tests.test_training import small_cfg


def _logits(n, b, seed=0):
    """Logits z of a model whose true P(PD) is σ(b·z): b > 1 is an underconfident model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.8, 1.2, n)
    return z, (rng.random(n) < expit(b * z)).astype(int)


# ------------------------------------------------------------------------ temperature scaling

def test_an_underconfident_model_gets_t_below_1_and_a_slope_near_1_on_new_data():
    z, y = _logits(3000, b=2.0)
    t = fit_training_temperature(z, y, min_cell=5)
    assert t.note is None and t.temperature == pytest.approx(0.5, rel=0.1)
    assert t.map == fit_map("temperature", z, y)  # the site's maximum-likelihood fit
    z2, y2 = _logits(3000, b=2.0, seed=1)  # other participants of the same population
    before = calibration_slope(y2, expit(z2))["slope"]
    after = calibration_slope(y2, t.map(z2))["slope"]
    assert before == pytest.approx(2.0, rel=0.15) and after == pytest.approx(1.0, abs=0.1)
    record = t.to_dict()
    assert record["fitted"] and record["fitted_at"] == "training"
    assert record["fitted_on"] == "validation split" and record["validation_split"]["n"] == 3000


def test_a_validation_split_without_a_finite_temperature_keeps_t_1_and_says_why():
    z, y = _logits(200, b=2.0)
    few = fit_training_temperature(z, np.r_[np.zeros(4, int), np.ones(196, int)], min_cell=5)
    assert few.temperature == 1.0 and not few.to_dict()["fitted"]
    assert "holds 4 HC: a temperature needs at least data.min_cell = 5" in few.note
    separated = fit_training_temperature(np.r_[-np.arange(1, 11.0), np.arange(1, 31.0)],
                                         np.r_[np.zeros(10, int), np.ones(30, int)], min_cell=5)
    assert separated.temperature == 1.0 and separated.note.endswith("T = 1 kept")
    assert "separate the validation split's classes completely" in separated.note
    assert "--recalibrate" not in separated.note  # the site's advice is not the trainer's
    wrong = fit_training_temperature(-z, y, min_cell=5)
    assert wrong.temperature == 1.0 and "validation split's participants the wrong way" in \
        wrong.note


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return toy_cohort(tmp_path_factory.mktemp("cohort"))


def _fold(cohort, split=None, **extra):
    split = split or make_splits(cohort, 3, 1, 0.2, 0)[0]
    cfg = small_cfg(**{"train.max_epochs": 12, "train.patience": 12, **extra})
    return split, run_fold(cohort, split, cfg)


def test_temperature_keeps_roc_auc_and_balanced_accuracy_and_scales_the_logits(cohort):
    split, on = _fold(cohort)
    _, off = _fold(cohort, **{"train.temperature_scaling": "false"})
    rows_on, rows_off = pd.DataFrame(on["rows"]), pd.DataFrame(off["rows"])
    safn_on, safn_off = (r[r.model == "SAFN"].iloc[0] for r in (rows_on, rows_off))
    assert safn_on.epochs == safn_off.epochs  # the same fit
    t = safn_on.temperature
    assert safn_on.temperature_fitted and 0 < t < 1  # the focal loss's underconfidence
    for k in ("roc_auc", "pr_auc_pd", "pr_auc_hc", "balanced_accuracy", "sensitivity",
              "specificity", "mcc"):
        assert safn_on[k] == pytest.approx(safn_off[k], abs=1e-12), k
    assert safn_on.brier != safn_off.brier and "temperature" not in rows_off
    # the test fold's P(PD) is σ(z / T) of the model's own σ(z)
    p_on, p_off = (o["preds"][o["preds"].model == "SAFN"].p.to_numpy() for o in (on, off))
    np.testing.assert_allclose(logit(p_on) * t, logit(p_off.astype(float)), rtol=1e-4,
                               atol=1e-4)
    y = on["preds"][on["preds"].model == "SAFN"].y.to_numpy()
    assert safn_on.calibration_slope == pytest.approx(calibration_slope(y, p_on)["slope"])
    assert safn_on.calibration_slope_raw == pytest.approx(safn_off.calibration_slope)
    # the baselines are untouched
    base = ["model", "roc_auc", "balanced_accuracy", "brier"]
    pd.testing.assert_frame_equal(rows_on[rows_on.model != "SAFN"][base],
                                  rows_off[rows_off.model != "SAFN"][base])


def test_the_temperature_sees_the_validation_split_only(cohort, monkeypatch):
    """A spy on the fit's inputs, and a changed test fold: the same temperature."""
    seen = []
    real = crossval.fit_training_temperature

    def spy(z, y, min_cell, *args):
        seen.append((np.asarray(z).copy(), np.asarray(y).copy()))
        return real(z, y, min_cell, *args)

    monkeypatch.setattr(crossval, "fit_training_temperature", spy)
    split, first = _fold(cohort)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][1], cohort.table.loc[split.val, "label"].to_numpy())
    changed = cohort.subset(cohort.ids)
    changed.table = cohort.table.copy()
    feats = cohort.features
    changed.table.loc[split.test, feats] = changed.table.loc[split.test, feats] * 3 + 7
    changed.table.loc[split.test, "label"] = 1 - changed.table.loc[split.test, "label"]
    _, again = _fold(changed, split)
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    t = [next(r["temperature"] for r in res["rows"] if r["model"] == "SAFN")
         for res in (first, again)]
    assert t[0] == t[1]


@pytest.fixture(scope="module")
def final(cohort):
    return crossval.final_model(cohort, small_cfg(**{"train.max_epochs": 12}))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, final):
    cfg = small_cfg(**{"train.max_epochs": 12})
    return save_bundle(tmp_path_factory.mktemp("bundle") / "model", final.fit.model,
                       final.preprocessor, cfg, threshold=final.threshold,
                       class_counts=final.class_counts, kind="centralised",
                       calibration=final.calibration,
                       extra={"training": {"participants": 240, "sites": {"A": 240}}})


def _validation_split(cohort, cfg):
    _, va = train_test_split(cohort.ids, test_size=cfg.train.val_fraction, stratify=cohort.y,
                             random_state=cfg.train.seed)
    return va


def test_the_bundle_carries_the_temperature_and_predicts_with_it(cohort, final, bundle_dir):
    cfg = small_cfg(**{"train.max_epochs": 12})
    b = load_bundle(bundle_dir)
    record = b.meta["calibration"]
    assert record == final.calibration.to_dict() and record["fitted_at"] == "training"
    assert b.calibration_map == final.calibration.map
    t = final.calibration.temperature
    va = Arrays.from_table(b.preprocessor, cohort.table.loc[_validation_split(cohort, cfg)])
    z, p_raw, _ = b.scores(va)
    assert final.calibration.map == fit_map("temperature", z, va.y, at_training=True)
    p, _ = b.predict(va)
    np.testing.assert_allclose(p, expit(z / t))
    assert b.threshold == final.threshold == choose_threshold(va.y, p)  # on calibrated scores
    card = (bundle_dir / "model_card.md").read_text()
    section = card.split("## Calibration\n", 1)[1].split("\n## ", 1)[0]
    assert f"temperature T = {t:.3f} fitted at training on the validation split" in section
    assert f"({len(va)} participants: {int(va.y.sum())} PD / {int(len(va) - va.y.sum())} HC)" \
        in section
    # final_fit's tuple cannot carry T: the same model, its threshold on raw probabilities
    fit, _, threshold, _ = crossval.final_fit(cohort, cfg)
    assert threshold == choose_threshold(va.y, predict(fit.model, va)[0])
    # a broken map is reported when the bundle is loaded
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["calibration"]["map"]["params"]["temperature"] = -1
    broken = bundle_dir.parent / "broken"
    broken.mkdir()
    for f in bundle_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="calibration.map"):
        load_bundle(broken)


def test_recalibration_refits_from_the_raw_logits_and_replaces_the_training_temperature(
        final, bundle_dir, tmp_path):
    csv, mapping = write_toy(tmp_path, seed=7)
    args = ["--data", str(csv), "--mapping", str(mapping), "--bootstrap", "20"]
    assert run_main(validate, ["--model", str(bundle_dir), *args, "--out",
                               str(tmp_path / "plain")]) == 0
    card = (tmp_path / "plain" / "model_card.md").read_text()
    assert "temperature T = " in card and "from its validation split applied" in card
    plain = json.loads((tmp_path / "plain" / "validation.json").read_text())
    assert plain["training_calibration"] == final.calibration.to_dict()
    assert run_main(validate, ["--model", str(bundle_dir), *args, "--recalibrate", "--out",
                               str(tmp_path / "recal")]) == 0
    res = json.loads((tmp_path / "recal" / "validation.json").read_text())
    rec = res["recalibration"]
    assert rec["replaces"] == final.calibration.to_dict()
    assert rec["training_threshold"] == rec["threshold_before"] == final.threshold
    # the site's map is fitted on the model's own logits, as for a bundle without T
    b = load_bundle(bundle_dir)
    split = pd.read_csv(tmp_path / "recal" / "recalibration_split.csv")
    data = load_table(csv, mapping).table
    arrays = Arrays.from_table(b.preprocessor, data.loc[split.participant_id.astype(str)])
    z, _, _ = b.scores(arrays)
    part = (split.part == "recalibration").to_numpy()
    site_map = fit_map("temperature", z[part], arrays.y[part])
    assert rec["map"]["params"]["temperature"] == pytest.approx(site_map.params["temperature"])
    # the site bundle applies the site's map alone, not stacked on the training temperature
    site = load_bundle(tmp_path / "recal" / "site_bundle")
    np.testing.assert_allclose(site.predict(arrays)[0], site_map(z), rtol=1e-9)
    # 'before' is the bundle with its training temperature and threshold
    np.testing.assert_allclose(
        pd.read_csv(tmp_path / "recal" / "predictions.csv").p_before,
        expit(z[~part] / final.calibration.temperature), rtol=1e-6)
    assert "replace it (they are not stacked on it)" in \
        (tmp_path / "recal" / "site_bundle" / "model_card.md").read_text()


def test_safn_train_reports_the_temperature(cohort):
    from safn_core.cli.train import summary_table, temperature_line

    _, res = _fold(cohort)
    folds = pd.DataFrame(res["rows"])
    summary = summary_table(folds).set_index("model")
    assert summary.loc["SAFN", "temperature_mean"] == folds.temperature.iloc[0]
    assert np.isnan(summary.loc["majority", "temperature_mean"])
    line = temperature_line(folds)
    assert "in 1 of 1 SAFN fits" in line and "all" in line and "→" in line


# ------------------------------------------------------------------------ learning-rate schedule

MODS, MODEL = TWO_MODALITIES, TINY_MODEL
TR, VA = shifted_arrays(96, 0), shifted_arrays(40, 1)
STEPS = math.ceil(96 / 32)  # optimizer steps per epoch


def _fit_recording_lr(monkeypatch, epochs=6, **train):
    """fit_by_rounds over ``epochs`` one-epoch rounds (every one trained), and the learning
    rate of every optimizer step as the optimizer saw it."""
    torch.set_num_threads(1)
    lrs = []
    real = local.make_optimizer

    def recording(model, cfg):
        opt = real(model, cfg)
        opt.register_step_pre_hook(lambda o, args, kw: lrs.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(local, "make_optimizer", recording)
    cfg = TrainConfig(batch_size=32, lr=0.01, max_epochs=epochs, **train)
    fit = fit_by_rounds(TR, VA, MODS, MODEL, cfg, 0, rounds=epochs, epochs_per_round=1,
                        select="last", patience=None)
    return fit, np.array(lrs)


def test_cosine_decays_from_lr_to_about_0_over_the_planned_steps(monkeypatch):
    _, lrs = _fit_recording_lr(monkeypatch, lr_schedule="cosine")
    assert len(lrs) == 6 * STEPS
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] < 0.01 * 0.01
    assert np.all(np.diff(lrs) < 0)
    expected = [0.005 * (1 + math.cos(math.pi * s / (6 * STEPS))) for s in range(6 * STEPS)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def test_warmup_rises_linearly_then_follows_the_schedule(monkeypatch):
    _, lrs = _fit_recording_lr(monkeypatch, lr_schedule="cosine", warmup_epochs=2)
    warm = 2 * STEPS
    np.testing.assert_allclose(lrs[:warm], 0.01 * np.arange(1, warm + 1) / warm, rtol=1e-12)
    assert lrs[warm] == pytest.approx(0.01) and np.all(np.diff(lrs[warm:]) < 0)
    assert lrs[-1] < 0.01 * 0.05
    _, flat = _fit_recording_lr(monkeypatch, warmup_epochs=2)  # constant after the warm-up
    np.testing.assert_allclose(flat[:warm], lrs[:warm])
    assert np.all(flat[warm:] == 0.01)


def test_constant_is_the_plain_loop_it_always_was(monkeypatch):
    fit, lrs = _fit_recording_lr(monkeypatch, epochs=3)
    assert np.all(lrs == 0.01)
    cfg = TrainConfig(batch_size=32, lr=0.01)
    model = local.make_model(MODS, MODEL, 0)
    local.start_from_logistic(model, TR, VA)  # the wide path's start (model.wide, default on)
    local.run_epochs(model, local.make_loader(TR, 32, 0), local.make_optimizer(model, cfg), 3,
                     MODEL, TR.class_counts())
    for a, b in zip(fit.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    cosine, _ = _fit_recording_lr(monkeypatch, epochs=3, lr_schedule="cosine")
    assert not all(torch.equal(a, b) for a, b in zip(cosine.model.state_dict().values(),
                                                     model.state_dict().values()))


def test_cosine_and_ema_both_run_after_every_step(monkeypatch):
    ema, lrs = _fit_recording_lr(monkeypatch, lr_schedule="cosine", weight_averaging="ema",
                                 ema_decay=0.7)
    assert np.all(np.diff(lrs) < 0)
    plain, plain_lrs = _fit_recording_lr(monkeypatch, lr_schedule="cosine")
    np.testing.assert_array_equal(lrs, plain_lrs)
    assert not all(torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(),
                                                     plain.model.state_dict().values()))


def test_bad_schedule_settings_are_clear_config_errors():
    cases = [(["train.lr_schedule=linear"], "'train.lr_schedule': Input should be 'constant' "
                                            "or 'cosine'"),
             (["train.warmup_epochs=-1"], "'train.warmup_epochs'"),
             (["train.warmup_epochs=20", "train.max_epochs=20"],
              "train.warmup_epochs (20) must be smaller than train.max_epochs (20)"),
             (["train.temperature_scaling=maybe"], "'train.temperature_scaling'")]
    for sets, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(None, sets)
        assert message in str(err.value), str(err.value)
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.warmup_epochs=5"])
    assert (cfg.train.lr_schedule, cfg.train.warmup_epochs) == ("cosine", 5)
    assert load_config(None).train.temperature_scaling is True
