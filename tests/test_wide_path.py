"""SAFN's wide path (`model.wide`): the untrained model is the exact logistic regression (with
ensemble members too), round 0 / epoch 0 is validated and can be kept, the exact logistic
regression baseline, the wide path under Opacus, its per-modality shares, determinism."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, TensorDataset

from safn_core.baselines import fit_predict
from safn_core.config import ModelConfig, TrainConfig, load_config
from safn_core.logistic import fit_pooled
from safn_core.model import SAFN, total_loss
from safn_core.training import local
from safn_core.training.local import (Arrays, fit_by_rounds, fit_with_early_stopping, make_model,
                                      predict, start_from_logistic, validation_metrics)
from safn_core.training.selection import RoundSelection
from tests.helpers import TWO_MODALITIES, shifted_arrays

MODS = TWO_MODALITIES
TINY = dict(d_model=8, n_heads=2, encoder_hidden=8, ffn_hidden=8, head_hidden=8)
TRAIN = TrainConfig(batch_size=32, lr=0.01)
TR, VA, TE = shifted_arrays(96, 0), shifted_arrays(40, 1), shifted_arrays(50, 2)
WIDE = [("frozen", 1), ("trained", 1), ("frozen", 4), ("trained", 4)]


def cfg(wide="frozen", k=1, **kw) -> ModelConfig:
    return ModelConfig(**{**TINY, "wide": wide, "ensemble_size": k, **kw})


def with_absent(data: Arrays, seed: int) -> Arrays:
    """``data`` with modality b absent for about a third of the participants (its features 0,
    the training mean, as the preprocessing gives them)."""
    mask = data.mask.copy()
    mask[np.random.default_rng(seed).random(len(data)) < 0.3, 1] = False
    x = data.x.copy()
    x[~mask[:, 1], 3:] = 0.0
    return Arrays(x, mask, data.y)


# ---- the untrained model is the logistic regression ---------------------------------------------

@pytest.mark.parametrize("wide,k", WIDE)
def test_safn_at_epoch_0_predicts_the_logistic_regressions_probabilities(wide, k):
    tr, va, te = with_absent(TR, 0), with_absent(VA, 1), with_absent(TE, 2)
    model = make_model(MODS, cfg(wide, k), seed=0)
    fit, note = start_from_logistic(model, tr, va)
    assert note is None and fit.converged
    reference = fit_pooled(tr.x, tr.y, va.x, va.y)
    np.testing.assert_array_equal(fit.coef, reference.coef)
    p, _ = predict(model, te)
    np.testing.assert_allclose(p, reference.predict_proba(te.x), atol=2e-6, rtol=0)
    if k > 1:  # every member starts at the regression, not just their mixture
        model.eval()
        members = model(torch.from_numpy(te.x), torch.from_numpy(te.mask), members=True)
        member_p = torch.softmax(members, -1)[..., 1].detach().numpy()
        np.testing.assert_allclose(member_p, np.repeat(p[:, None], k, axis=1), atol=2e-6)


@pytest.mark.parametrize("wide,k", WIDE)
def test_an_absent_modalitys_values_never_reach_the_wide_path(wide, k):
    model = SAFN(MODS, cfg(wide, k), seed=0).eval()
    model.set_wide([0.4, -0.2, 0.1, 0.9, -0.3], 0.2)
    x, mask = torch.from_numpy(TE.x[:6]).float(), torch.ones(6, 2, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = False
    ref = model(x, mask)
    garbage = x.clone()
    garbage[0, 3:] = float("nan")
    garbage[1, :3] = 1e3
    assert torch.equal(model(garbage, mask), ref)
    moved = x.clone()
    moved[2, 3:] += 1.0  # a present modality does count
    assert not torch.allclose(model(moved, mask)[2], ref[2])


@pytest.mark.parametrize("wide,k", WIDE)
def test_fit_by_rounds_validates_round_0_and_keeps_it_when_nothing_improves(wide, k, monkeypatch):
    """Scripted validation: round 0 has the best loss, so the selection keeps it; the returned
    model is the untrained one (the logistic regression), and the history says so."""
    real = local.validation_metrics
    scripted = iter([0.40, 0.45, 0.50, 0.41, 0.60])

    def fake(model, data, model_cfg, counts, loss="objective"):
        _, auc = real(model, data, model_cfg, counts, loss)
        return next(scripted), auc

    monkeypatch.setattr(local, "validation_metrics", fake)
    fit = fit_by_rounds(TR, VA, MODS, cfg(wide, k), TRAIN, 0, rounds=10, epochs_per_round=2,
                        select="val_loss", patience=4)
    assert fit.selected_round == 0 and fit.best_epoch == 0 and fit.best_val_loss == 0.40
    assert [h["round"] for h in fit.history] == [0, 1, 2, 3, 4]
    assert fit.history[0]["epoch"] == 0 and fit.history[0]["train_loss"] is None
    assert all(h["train_loss"] is not None for h in fit.history[1:])
    assert fit.epochs_run == 8
    p, _ = predict(fit.model, TE)
    np.testing.assert_allclose(p, fit.logistic.predict_proba(TE.x), atol=2e-6)


def test_round_0_is_the_real_validation_of_the_untrained_model():
    fit = fit_by_rounds(TR, VA, MODS, cfg("frozen", 4), TRAIN, 0, rounds=3, epochs_per_round=1,
                        select="last", patience=None)
    start = make_model(MODS, cfg("frozen", 4), 0)
    start.set_wide(fit.logistic.coef, fit.logistic.intercept)
    loss, auc = validation_metrics(start, VA, start.cfg, TR.class_counts())
    assert fit.history[0] == {"round": 0, "epoch": 0, "train_loss": None, "val_loss": loss,
                              "val_roc_auc": auc}
    assert fit.selected_round == 3 and fit.epochs_run == 3 and len(fit.history) == 4
    # the frozen wide path is still the regression after training; the deep path moved
    np.testing.assert_allclose(fit.model.wide.weight[1].detach().numpy(), fit.logistic.coef,
                               atol=1e-6)
    assert not torch.equal(fit.model.head[-1].weight, torch.zeros_like(fit.model.head[-1].weight))


def test_trained_wide_path_moves_and_the_logistic_fit_is_reported():
    fit = fit_with_early_stopping(TR, VA, MODS, cfg("trained", 1),
                                  TRAIN.model_copy(update={"max_epochs": 4, "patience": 4,
                                                           "select": "last"}), 0)
    assert fit.logistic is not None and fit.logistic_note is None
    assert fit.history[0]["round"] == 0 and fit.selected_round == fit.best_epoch == 4
    assert not np.allclose(fit.model.wide.weight[1].detach().numpy(), fit.logistic.coef)


def test_round_selection_accepts_round_0():
    sel = RoundSelection("val_loss", patience=2)
    assert sel.update(0, val_loss=0.5)
    assert not sel.update(1, val_loss=0.6) and not sel.update(2, val_loss=0.55)
    assert sel.selected_round == 0 and sel.should_stop
    auc = RoundSelection("val_roc_auc", patience=3)
    assert auc.update(0, val_roc_auc=0.8) and auc.update(1, val_roc_auc=0.81)
    assert auc.selected_round == 1
    back = RoundSelection.from_state(copy.deepcopy(sel.state_dict()))
    assert back.best_round_ == 0 and back.should_stop


def test_without_a_wide_path_nothing_changes():
    """model.wide off: no round 0, no regression, the deep output is initialised as before."""
    fit = fit_by_rounds(TR, VA, MODS, cfg("off"), TRAIN, 0, rounds=3, epochs_per_round=1,
                        select="last", patience=None)
    assert [h["round"] for h in fit.history] == [1, 2, 3] and fit.logistic is None
    assert not hasattr(fit.model, "wide")
    off, on = SAFN(MODS, cfg("off"), seed=5), SAFN(MODS, cfg("frozen"), seed=5)
    a, b = off.state_dict(), on.state_dict()
    assert set(b) - set(a) == {"wide.weight", "wide.bias"}
    for name in a:  # every other layer draws the same initial weights
        if name.startswith(("head.3.", "gate.score.")):  # the deep output and the gate's scores
            assert torch.all(b[name] == 0) and not torch.all(a[name] == 0), name
        else:
            assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="no wide path"):
        off.set_wide(np.zeros(5), 0.0)


def test_a_training_split_with_one_class_starts_from_a_zero_wide_path():
    one = Arrays(TR.x, TR.mask, np.ones_like(TR.y))
    model = make_model(MODS, cfg("frozen"), 0)
    fit, note = start_from_logistic(model, one, VA)
    assert fit is None and "class counts" in note
    assert torch.all(model.wide.weight == 0) and torch.all(model.wide.bias == 0)


def test_set_wide_checks_its_input():
    model = SAFN(MODS, cfg("trained"), seed=0)
    with pytest.raises(ValueError, match="5 features"):
        model.set_wide(np.zeros(4), 0.0)
    with pytest.raises(ValueError, match="finite"):
        model.set_wide(np.full(5, np.nan), 0.0)
    three = SAFN(MODS, cfg("trained"), seed=0, n_classes=3)
    with pytest.raises(ValueError, match="3 classes"):
        three.set_wide(np.zeros(5), 0.0)
    model.set_wide(np.arange(5.0), -1.5)
    assert model.wide.weight.requires_grad  # trained stays trainable, frozen stays frozen
    assert torch.equal(model.wide.weight[0], torch.zeros(5))
    assert model.wide.bias.tolist() == [0.0, -1.5]
    frozen = SAFN(MODS, cfg("frozen"), seed=0)
    frozen.set_wide(np.arange(5.0), 1.0)
    assert not frozen.wide.weight.requires_grad and not frozen.wide.bias.requires_grad


# ---- what the wide path contributes per modality -------------------------------------------------

def test_wide_shares_add_up_to_1_and_follow_the_coefficients():
    model = SAFN(MODS, cfg("frozen"), seed=0)
    x, mask = torch.from_numpy(TE.x), torch.from_numpy(TE.mask)
    assert model.wide_shares(x, mask) == {"a": 0.0, "b": 0.0}  # still zero: no variance
    model.set_wide([1.0, 1.0, 1.0, 0.0, 0.0], 0.3)
    assert model.wide_shares(x, mask) == pytest.approx({"a": 1.0, "b": 0.0})
    model.set_wide([0.5, -1.0, 2.0, 1.5, 0.7], 0.3)
    shares = model.wide_shares(x, mask)
    assert sum(shares.values()) == pytest.approx(1.0)
    parts = model.wide_parts(x, mask).double()
    logit = torch.from_numpy(TE.x).double() @ torch.tensor([0.5, -1.0, 2.0, 1.5, 0.7]).double()
    assert torch.allclose(parts.sum(1), logit, atol=1e-5)
    total = parts.sum(1)
    expected = [float(np.cov(parts[:, m], total)[0, 1] / total.var()) for m in range(2)]
    assert list(shares.values()) == pytest.approx(expected, rel=1e-6)
    # an absent modality contributes nothing, whatever its features hold
    absent = mask.clone()
    absent[:, 1] = False
    assert torch.all(model.wide_parts(x * 7, absent)[:, 1] == 0)


# ---- the baseline --------------------------------------------------------------------------------

def baseline_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] - 0.7 * x[:, 1] + rng.normal(size=300) > 0.6).astype(np.int64)
    return x[:180], y[:180], x[180:240], y[180:240], x[240:], y[240:]


def test_exact_logistic_regression_baseline_equals_sklearn_at_its_penalty():
    x, y, xv, yv, xt, yt = baseline_data()
    p_val, p_test = fit_predict("exact_logistic_regression", x, y, [xv, xt], 0, val=(xv, yv))
    penalty = fit_pooled(x, y, xv, yv).penalty
    sk = LogisticRegression(C=1 / penalty, class_weight="balanced", solver="newton-cholesky",
                            tol=1e-12, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(p_val, sk.predict_proba(xv)[:, 1], atol=1e-6)
    np.testing.assert_allclose(p_test, sk.predict_proba(xt)[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="validation split"):
        fit_predict("exact_logistic_regression", x, y, [xt], 0)
    with pytest.raises(ValueError, match="both classes"):
        fit_predict("exact_logistic_regression", x, y, [xt], 0, val=(xv, np.ones_like(yv)))


def test_exact_logistic_regression_chooses_its_penalty_on_validation_only():
    """Leakage spy: other test rows change nothing; validation labels can change the penalty."""
    x, y, xv, yv, xt, yt = baseline_data()
    _, p_test = fit_predict("exact_logistic_regression", x, y, [xv, xt], 0, val=(xv, yv))
    other = np.random.default_rng(9).normal(size=xt.shape) * 5
    _, p_other = fit_predict("exact_logistic_regression", x, y, [xv, np.r_[xt[:10], other]], 0,
                             val=(xv, yv))
    np.testing.assert_array_equal(p_other[:10], p_test[:10])
    penalties = {fit_pooled(x, y, xv, labels).penalty
                 for labels in (yv, 1 - yv, np.roll(yv, 7))}
    assert len(penalties) > 1


def test_exact_logistic_regression_is_a_configured_baseline():
    cfg = load_config(None, ["train.baselines=[exact_logistic_regression]"])
    assert cfg.train.baselines == ["exact_logistic_regression"]
    assert "exact_logistic_regression" in TrainConfig().baselines
    from pathlib import Path
    train_yaml = load_config(Path(__file__).resolve().parents[1] / "configs" / "train.yaml")
    assert "exact_logistic_regression" in train_yaml.train.baselines


def test_cross_validation_reports_the_wide_path(tmp_path):
    from safn_core.training.crossval import run_fold, make_splits
    from tests.helpers import toy_cohort

    cohort = toy_cohort(tmp_path, n=120)
    conf = load_config(None, ["model.d_model=8", "model.n_heads=2", "model.encoder_hidden=8",
                              "model.ffn_hidden=8", "model.head_hidden=8", "model.wide=frozen",
                              "train.max_epochs=3", "train.patience=2", "train.feature_sets=[all]",
                              "train.baselines=[exact_logistic_regression]",
                              "train.ablations=[]", "train.modality_drop=false",
                              "data.min_cell=3"])
    split = make_splits(cohort, 2, 1, 0.25, 0)[0]
    out = run_fold(cohort, split, conf)
    safn = [r for r in out["rows"] if r["model"] == "SAFN"][0]
    assert 0 <= safn["best_epoch"] <= 3 and safn["lr_penalty"] > 0
    assert set(out["wide_shares"][0]) == {"repeat", "fold", "feature_set",
                                          *(m.name for m in cohort.modalities)}
    shares = [v for k, v in out["wide_shares"][0].items() if k not in ("repeat", "fold",
                                                                         "feature_set")]
    assert sum(shares) == pytest.approx(1.0)
    assert any(r["model"] == "exact_logistic_regression" for r in out["rows"])


# ---- differential privacy ------------------------------------------------------------------------

def dp_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[0, 1] = False
    y = torch.tensor([i % 2 for i in range(n)])
    return x, mask, y


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # benign: inputs need no grad
@pytest.mark.parametrize("wide,k", WIDE)
def test_opacus_validator_and_exact_per_sample_gradients_with_the_wide_path(wide, k):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    import safn_core.privacy.grad_samplers  # noqa: F401
    conf = cfg(wide, k, dropout=0.0)
    model, ref = SAFN(MODS, conf, seed=3), SAFN(MODS, conf, seed=3)
    for m in (model, ref):  # a regression in the wide path and a deep path that is not zero
        m.set_wide([0.4, -0.2, 0.1, 0.9, -0.3], 0.2)
        with torch.no_grad():
            m.head[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    assert ModuleValidator.validate(model, strict=True) == []
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    x, mask, y = dp_batch()
    logits, alpha = gsm(x, mask, return_weights=True, members=True)
    total_loss(logits, y, alpha, conf, [10, 30]).backward()
    for i in range(6):
        ref.zero_grad()
        lo, al = ref(x[i:i + 1], mask[i:i + 1], return_weights=True, members=True)
        total_loss(lo, y[i:i + 1], al, conf, [10, 30]).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if not p.requires_grad:  # the frozen wide path: no gradient, no per-sample one
                assert wide == "frozen" and name.startswith("wide.")
                assert getattr(p, "grad_sample", None) is None and q.grad is None
                continue
            assert p.grad_sample is not None and p.grad_sample.shape[0] == 6, name
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), (name, i)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ("wide.weight" in names) == (wide == "trained")


@pytest.mark.parametrize("wide,k", WIDE)
def test_one_dp_step_with_privacy_engine_keeps_the_layout(wide, k):
    from opacus import PrivacyEngine

    import safn_core.privacy.grad_samplers  # noqa: F401
    conf = cfg(wide, k)
    torch.manual_seed(0)
    x, mask, y = dp_batch(32)
    loader = DataLoader(TensorDataset(x, mask, y), batch_size=8)
    model, plain = SAFN(MODS, conf, seed=0), SAFN(MODS, conf, seed=0)
    model.set_wide([0.4, -0.2, 0.1, 0.9, -0.3], 0.2)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    # the wide path in a parameter group of its own (train.wide_weight_decay)
    opt = local.make_optimizer(model, TRAIN.model_copy(update={"wide_weight_decay": 30.0}))
    assert len(opt.param_groups) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=True)
        dp_model.train()
        for xb, mb, yb in dp_loader:
            if len(yb) == 0:
                continue
            dp_opt.zero_grad()
            logits, alpha = dp_model(xb, mb, return_weights=True, members=True)
            total_loss(logits, yb, alpha, conf, [16, 16]).backward()
            dp_opt.step()
            break
    after = {k_.removeprefix("_module."): v for k_, v in dp_model.state_dict().items()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = {"wide.weight", "wide.bias"} if wide == "frozen" else set()
    assert changed == set(before) - frozen  # noise reaches every trained parameter
    ref = plain.state_dict()
    assert list(after) == list(ref) and all(after[n].shape == ref[n].shape for n in ref)
    plain.load_state_dict(after)  # a DP site's weights load into a non-DP model
    assert engine.get_epsilon(1e-5) > 0


# ---- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("wide,k", [("frozen", 4), ("trained", 1)])
def test_a_seed_gives_the_same_fit(wide, k):
    runs = [fit_by_rounds(TR, VA, MODS, cfg(wide, k), TRAIN, 7, rounds=3, epochs_per_round=1,
                          select="val_loss", patience=None) for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert runs[0].history == runs[1].history
    assert runs[0].logistic.to_dict() == runs[1].logistic.to_dict()
    other = fit_by_rounds(TR, VA, MODS, cfg(wide, k), TRAIN, 8, rounds=3, epochs_per_round=1,
                          select="val_loss", patience=None).model.state_dict()
    assert not all(torch.equal(a[n], other[n]) for n in a)


# ---- the fading wide path and the calibrated selection loss -----------------------------------

def test_a_trained_wide_path_gets_its_own_weight_decay():
    model = make_model(MODS, cfg("trained", 4), 0)
    same = local.make_optimizer(model, TRAIN.model_copy(update={"wide_weight_decay": None}))
    assert len(same.param_groups) == 1 and same.param_groups[0]["weight_decay"] == 1e-4
    assert len(local.make_optimizer(make_model(MODS, cfg("off"), 0), TRAIN).param_groups) == 1
    opt = local.make_optimizer(model, TRAIN.model_copy(update={"wide_weight_decay": 30.0}))
    wide, rest = opt.param_groups[1], opt.param_groups[0]
    assert wide["weight_decay"] == 30.0 and rest["weight_decay"] == TRAIN.weight_decay
    assert {id(p) for p in wide["params"]} == {id(model.wide.weight), id(model.wide.bias)}
    assert len(rest["params"]) + 2 == len(list(model.parameters()))
    # decoupled decay: with no gradient reaching the wide path, one step shrinks it by lr * wd
    model.set_wide(np.ones(5), 1.0)
    model.wide.weight.grad = torch.zeros_like(model.wide.weight)
    model.wide.bias.grad = torch.zeros_like(model.wide.bias)
    opt.step()
    assert torch.allclose(model.wide.weight[1], torch.full((5,), 1 - 0.01 * 30.0))


def test_the_fading_wide_path_shrinks_as_training_goes_on():
    conf = TRAIN.model_copy(update={"wide_weight_decay": 30.0, "select": "last",
                                    "max_epochs": 6})
    fit = fit_with_early_stopping(TR, VA, MODS, cfg("trained", 1), conf, 0)
    start = np.linalg.norm(fit.logistic.coef)
    assert np.linalg.norm(fit.model.wide.weight[1].detach().numpy()) < 0.5 * start


def test_calibrated_log_loss_is_blind_to_the_scale_of_the_logits():
    from safn_core.training.local import calibrated_log_loss

    rng = np.random.default_rng(0)
    z = rng.normal(size=200)
    y = (z + rng.normal(size=200) > 0.3).astype(int)
    base = calibrated_log_loss(z, y)
    assert calibrated_log_loss(5 * z, y) == pytest.approx(base, rel=1e-6)
    # it is the class-balanced log loss at the best scale found by brute force
    grid = np.linspace(0, 10, 20001)
    brute = min(np.mean([np.logaddexp(0, -s * np.where(y == 1, 1, -1) * z)[y == c].mean()
                         for c in (0, 1)]) for s in grid)
    assert base == pytest.approx(brute, abs=1e-6)
    assert calibrated_log_loss(-z, y) == pytest.approx(np.log(2))  # ranked the wrong way: s = 0
    assert np.isnan(calibrated_log_loss(z, np.ones_like(y)))


def test_select_val_loss_calibrated_is_the_val_loss_rule_on_the_calibrated_loss():
    from safn_core.training.local import calibrated_log_loss

    conf = TRAIN.model_copy(update={"select": "val_loss_calibrated", "max_epochs": 4,
                                    "patience": 4})
    fit = fit_with_early_stopping(TR, VA, MODS, cfg("frozen", 1), conf, 0)
    losses = [h["val_loss"] for h in fit.history]
    assert fit.best_val_loss == min(losses) and fit.history[0]["round"] == 0
    z = local.scores(fit.model, VA)[0]
    assert calibrated_log_loss(z, VA.y) == pytest.approx(fit.best_val_loss, abs=1e-6)


# ---- the gate at the start, and the margin round 0 must be beaten by ---------------------------

@pytest.mark.parametrize("k", [1, 4])
def test_the_gate_starts_uniform_and_nothing_moves_it_before_the_deep_output_grows(k):
    """With the deep output at zero the task sends the gate no gradient; the gate's scores start
    at zero, where the entropy penalty's gradient is zero as well (it would otherwise collapse
    the gate onto whichever modality its first steps favour)."""
    conf = cfg("trained", k, sparsity_lambda=0.5)
    model = SAFN(MODS, conf, seed=0)
    assert torch.all(model.gate.score.weight == 0)
    x, mask = torch.from_numpy(TE.x[:8]).float(), torch.ones(8, 2, dtype=torch.bool)
    mask[0, 1] = False
    logits, alpha = model(x, mask, return_weights=True, members=True)
    expected = mask.float() / mask.sum(1, keepdim=True)  # uniform over present modalities
    assert torch.allclose(alpha if k == 1 else alpha[:, 0], expected)
    total_loss(logits, torch.from_numpy(TE.y[:8]), alpha, conf, [30, 60]).backward()
    for p in model.gate.parameters():
        assert torch.all(p.grad == 0)
    assert not torch.all(model.head[-1].weight.grad == 0)  # the output layer learns first
    # without a wide path the gate is initialised as before
    assert not torch.all(SAFN(MODS, cfg("off", k), seed=0).gate.score.weight == 0)


@pytest.mark.parametrize("loss", ["objective", "cross_entropy", "calibrated"])
def test_validation_losses_are_each_participants_part(loss):
    from safn_core.training.local import validation_losses

    model = make_model(MODS, cfg("trained", 4), 0)
    start_from_logistic(model, TR, VA)
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    each = validation_losses(model, VA, model.cfg, TR.class_counts(), loss)
    mean, _ = validation_metrics(model, VA, model.cfg, TR.class_counts(), loss)
    assert each.shape == (len(VA),) and float(each.mean()) == pytest.approx(mean, rel=1e-5)


def test_a_margin_keeps_round_0_unless_a_trained_round_beats_it_beyond_noise():
    conf = TRAIN.model_copy(update={"max_epochs": 6, "patience": 6})
    plain = fit_with_early_stopping(TR, VA, MODS, cfg("trained", 4), conf, 0)
    assert plain.round0_test is None and plain.selected_round > 0
    strict = fit_with_early_stopping(TR, VA, MODS, cfg("trained", 4),
                                     conf.model_copy(update={"round0_margin": 1e6}), 0)
    test = strict.round0_test
    assert test["round"] == plain.selected_round and test["keep_round0"]
    assert test["margin"] == 1e6 and test["se"] > 0
    assert strict.selected_round == strict.best_epoch == 0
    assert strict.best_val_loss == strict.history[0]["val_loss"]
    p, _ = predict(strict.model, TE)
    np.testing.assert_allclose(p, strict.logistic.predict_proba(TE.x), atol=2e-6)
    loose = fit_with_early_stopping(TR, VA, MODS, cfg("trained", 4),
                                    conf.model_copy(update={"round0_margin": 1e-9}), 0)
    if loose.round0_test["gain"] > 0:  # a real improvement passes a tiny margin
        assert loose.selected_round == plain.selected_round
        assert not loose.round0_test["keep_round0"]
