"""SAFN with K > 2 classes: the ordinal (cumulative link) head, the multinomial and ordinal wide
path, the K-class focal loss, K-class training and scoring, Opacus on the ordinal head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from safn_core.config import ModelConfig, TrainConfig
from safn_core.model import SAFN, total_loss
from safn_core.model.losses import cb_focal_loss, class_balanced_weights
from safn_core.model.ordinal import OrdinalLink, class_probabilities, head_for
from safn_core.targets import HC_PRODROMAL_PD, PD_VS_HC, Target
from safn_core.training import local
from safn_core.training.local import (Arrays, calibrated_log_loss, fit_with_early_stopping,
                                      make_model, modality_weights_by_class, predict, scores,
                                      start_from_logistic, validation_losses,
                                      validation_metrics)
from tests.helpers import TWO_MODALITIES

MODS = TWO_MODALITIES  # a: 3 imaging features, b: 2 clinical
SPECS = [(m.name, len(m.features), m.side) for m in MODS]
TINY = dict(d_model=8, n_heads=2, encoder_hidden=8, ffn_hidden=8, head_hidden=8)
UNORDERED3 = Target("three", ("x", "y", "z"), ordered=False)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, "wide": "off", "ensemble_size": 1, **kw})


def three_class(n: int, seed: int, shift: float = 2.0) -> Arrays:
    """``n`` participants of `MODS` in 3 ordered classes, every feature shifted by ``shift`` per
    class step (an easy, nearly separable ordinal signal)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = rng.normal(size=(n, 5)).astype(np.float32) + shift * y[:, None].astype(np.float32)
    return Arrays(x, np.ones((n, 2), dtype=bool), y)


# ------------------------------------------------------------------------------------------------
# The head
# ------------------------------------------------------------------------------------------------

def test_head_for():
    assert head_for("softmax", 2, True) == "softmax"  # binary: one head
    assert head_for("ordinal", 2, True) == "softmax"
    assert head_for("ordinal", 3, True) == "ordinal"
    assert head_for("softmax", 3, False) == "softmax"
    assert head_for("softmax", 3, True) == "softmax"
    with pytest.raises(ValueError, match="softmax or ordinal"):
        head_for("auto", 3, True)
    with pytest.raises(ValueError, match="not ordered"):
        head_for("ordinal", 3, False)


def test_ordinal_probabilities_valid_and_thresholds_ordered():
    link = OrdinalLink(4)
    with torch.no_grad():
        link.raw.bias.copy_(torch.tensor([0.3, -5.0, 2.0]))  # a tiny gap in the middle
    theta = link.thresholds()
    assert bool((theta[1:] > theta[:-1]).all())
    eta = torch.cat([torch.linspace(-8, 8, 33), torch.tensor([-1e4, 1e4])]).reshape(-1, 1)
    logp = link(eta)
    assert logp.shape == (35, 4) and bool(torch.isfinite(logp).all())
    p = logp.exp()
    assert bool((p >= 0).all())
    assert torch.allclose(p.sum(-1), torch.ones(35), atol=1e-5)
    # the log-space formula equals the plain differences of the cumulative probabilities
    ref = class_probabilities(eta[:33].double(), theta.double())
    assert torch.allclose(p[:33].double(), ref, atol=1e-6)
    # softmax of the "logits" is the class probabilities exactly
    assert torch.allclose(torch.softmax(logp, -1), p, atol=1e-6)
    # initialised at uniform class probabilities for eta = 0
    assert torch.allclose(OrdinalLink(3)(torch.zeros(1, 1)).exp(), torch.full((1, 3), 1 / 3))
    # gradients are finite even far out
    eta = torch.tensor([[-50.0], [50.0]], requires_grad=True)
    link(eta).sum().backward()
    assert bool(torch.isfinite(eta.grad).all()) and bool(torch.isfinite(link.raw.bias.grad).all())


def test_set_thresholds_round_trips_and_checks():
    link = OrdinalLink(4)
    link.set_thresholds([-1.0, 0.5, 3.0])
    assert torch.allclose(link.thresholds().double(), torch.tensor([-1.0, 0.5, 3.0],
                                                                   dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="increase"):
        link.set_thresholds([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="3 thresholds|2 thresholds"):
        OrdinalLink(3).set_thresholds([0.0, 1.0, 2.0])


def test_stochastic_ordering():
    """A larger η gives a larger P(y ≥ k) for every k (the proportional-odds order)."""
    link = OrdinalLink(5)
    with torch.no_grad():
        link.raw.bias.copy_(torch.tensor([-1.0, 0.2, -0.5, 1.0]))
    eta = torch.linspace(-6, 6, 61).reshape(-1, 1)
    p = link(eta).exp().double()
    upper = p.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # P(y >= k), k = 1..K-1
    assert bool((upper[1:] > upper[:-1]).all())
    assert bool((p[-1].argmax() == 4) and (p[0].argmax() == 0))


@pytest.mark.parametrize("kw", [{}, dict(ensemble_size=3, wide="trained"),
                                dict(linear_path=True)])
def test_safn_ordinal_head_shapes(kw):
    model = SAFN(SPECS, cfg(head="ordinal", **kw), seed=0, n_classes=3, ordered=True)
    assert model.head_kind == "ordinal"
    x = torch.randn(6, 5)
    logits = model(x)
    assert logits.shape == (6, 3)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(6), atol=1e-5)
    if model.ensemble_size > 1:
        assert model(x, members=True).shape == (6, 3, 3)


def test_make_model_target_and_binary_unchanged():
    binary = make_model(MODS, cfg(wide="trained", ensemble_size=2), 4)
    same = make_model(MODS, cfg(wide="trained", ensemble_size=2), 4, PD_VS_HC)
    torch.manual_seed(4)  # make_model's seeding, by hand
    plain = SAFN(SPECS, cfg(wide="trained", ensemble_size=2))
    for a, b, c in zip(binary.state_dict().values(), same.state_dict().values(),
                       plain.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    ordinal = make_model(MODS, cfg(head="ordinal"), 0, HC_PRODROMAL_PD)
    assert ordinal.n_classes == 3 and ordinal.head_kind == "ordinal"
    soft = make_model(MODS, cfg(), 0, HC_PRODROMAL_PD)  # the default head: softmax
    assert soft.head_kind == "softmax" and soft.head[-1].out_features == 3
    assert make_model(MODS, cfg(), 0, UNORDERED3).head_kind == "softmax"


# ------------------------------------------------------------------------------------------------
# The wide path: the untrained model equals the regression
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("reference", [False, True])
def test_untrained_wide_model_is_the_multinomial_regression(k, reference):
    data = three_class(120, 0, shift=0.7)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(data.x, data.y)
    coef, intercept = lr.coef_, lr.intercept_
    if reference:  # class 0 as the reference: the same model in K - 1 rows
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    model = make_model(MODS, cfg(wide="trained", ensemble_size=k), 0, UNORDERED3)
    model.set_wide(coef, intercept)
    _, p, _ = scores(model, data)
    assert p.shape == (120, 3)
    assert np.allclose(p, lr.predict_proba(data.x), atol=1e-5)
    parts = model.wide_parts(torch.from_numpy(data.x))
    assert parts.shape == (120, 2, 2)
    shares = model.wide_shares(torch.from_numpy(data.x))
    for c in range(2):
        assert math.isclose(sum(s[c] for s in shares.values()), 1.0, abs_tol=1e-9)


@pytest.mark.parametrize("k", [1, 3])
def test_untrained_wide_model_is_the_ordinal_regression(k):
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    data = three_class(150, 1, shift=0.6)
    res = OrderedModel(data.y, data.x.astype(np.float64), distr="logit").fit(
        method="bfgs", disp=False, maxiter=2000)
    beta = np.asarray(res.params[:5])
    cuts = np.asarray(res.model.transform_threshold_params(res.params))[1:-1]
    model = make_model(MODS, cfg(wide="frozen", ensemble_size=k, head="ordinal"), 0,
                       HC_PRODROMAL_PD)
    model.set_wide(beta, cuts)
    _, p, _ = scores(model, data)
    assert np.allclose(p, res.model.predict(res.params, exog=data.x.astype(np.float64)),
                       atol=1e-5)
    assert torch.allclose(model.link.thresholds().double(), torch.from_numpy(cuts), atol=1e-5)
    shares = model.wide_shares(torch.from_numpy(data.x))  # of η: one share per modality
    assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-9)
    assert model.wide_parts(torch.from_numpy(data.x)).shape == (150, 2)
    with pytest.raises(ValueError, match="cut points"):
        model.set_wide(beta, cuts[:1])


def test_logistic_start_hook():
    tr, va = three_class(90, 2, 0.8), three_class(60, 3, 0.8)
    model = make_model(MODS, cfg(wide="trained"), 0, UNORDERED3)
    lr = LogisticRegression(max_iter=2000).fit(tr.x, tr.y)
    fit, note = start_from_logistic(model, tr, va, lr)
    assert fit is lr and note is None
    assert np.allclose(scores(model, va)[1], lr.predict_proba(va.x), atol=1e-5)
    calls = []

    def fitter(x_tr, y_tr, x_va, y_va):
        calls.append(len(y_tr))
        return LogisticRegression(max_iter=2000).fit(x_tr, y_tr)

    fit, _ = start_from_logistic(make_model(MODS, cfg(wide="trained"), 0, UNORDERED3), tr, va,
                                 fitter)
    assert calls == [90]


@pytest.mark.parametrize("target", [UNORDERED3, HC_PRODROMAL_PD])
def test_default_kclass_start(target, monkeypatch):
    """Without a start: the pooled fit of safn_core.logistic.family where it exists (the
    untrained model then equals it), else no start and a note saying why."""
    tr, va = three_class(90, 2, 0.8), three_class(60, 3, 0.8)
    head = "ordinal" if target.ordered else "softmax"
    model = make_model(MODS, cfg(wide="trained", head=head), 0, target)
    kind = "ordinal" if target.ordered else "multinomial"
    try:
        from safn_core.logistic import family  # noqa: F401
    except ImportError:
        family = None
    if family is not None:
        fit, note = start_from_logistic(model, tr, va)
        assert note is None and fit.kind == kind
        z = va.x.astype(np.float64) @ np.asarray(fit.coef_).T
        if kind == "ordinal":
            from scipy.special import expit
            cum = np.c_[np.zeros(len(z)), expit(np.asarray(fit.thresholds_)[None] - z[:, None]),
                        np.ones(len(z))]
            p = np.diff(cum, axis=1)
        else:
            z = z + fit.intercept_
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
        assert np.allclose(scores(model, va)[1], p, atol=1e-5)
    monkeypatch.setattr(local, "_kclass_start", lambda model: None)
    fresh = make_model(MODS, cfg(wide="trained", head=head), 0, target)
    fit, note = start_from_logistic(fresh, tr, va)
    assert fit is None and kind in note and torch.all(fresh.wide.weight == 0)


# ------------------------------------------------------------------------------------------------
# The K-class class-balanced focal loss, by hand
# ------------------------------------------------------------------------------------------------

def test_k3_focal_loss_against_hand_computation():
    counts, beta, gamma = [10, 5, 2], 0.9, 1.5
    # effective numbers 1 - 0.9^n: 0.6513215599, 0.40951, 0.19; w = 0.1 / them, scaled to sum 3
    raw = [0.1 / 0.6513215599, 0.1 / 0.40951, 0.1 / 0.19]
    w_hand = [3 * r / sum(raw) for r in raw]
    assert np.allclose(w_hand, [0.498459, 0.792800, 1.708741], atol=1e-6)
    assert torch.allclose(class_balanced_weights(counts, beta),
                          torch.tensor(w_hand, dtype=torch.float32), atol=1e-6)
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [-0.5, 0.2, 1.5], [1.0, 1.0, 1.0]]
    y = [0, 2, 1, 2]
    total = 0.0
    for row, c in zip(logits, y):
        e = [math.exp(v) for v in row]
        pt = e[c] / sum(e)
        ce = -math.log(pt)
        total += w_hand[c] * (1 - pt) ** gamma * ce
    hand = total / len(y)
    got = cb_focal_loss(torch.tensor(logits), torch.tensor(y), counts, beta, gamma)
    assert math.isclose(float(got), hand, rel_tol=1e-5)
    # the same through total_loss with ensemble members (each member's loss, averaged)
    cfg_ = ModelConfig(cb_beta=beta, focal_gamma=gamma, sparsity_lambda=0.0)
    members = torch.tensor(logits).unsqueeze(1).expand(4, 2, 3)
    assert math.isclose(float(total_loss(members, torch.tensor(y), None, cfg_, counts)), hand,
                        rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training and scoring with K classes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head,target", [("softmax", UNORDERED3), ("ordinal", HC_PRODROMAL_PD)])
def test_short_fit_beats_chance_on_an_easy_three_class_problem(head, target):
    tr, va, te = three_class(150, 10), three_class(60, 11), three_class(90, 12)
    model_cfg = cfg(head=head, wide="trained", ensemble_size=2)
    train_cfg = TrainConfig(batch_size=32, lr=0.01, max_epochs=12, patience=4)
    fit = fit_with_early_stopping(tr, va, MODS, model_cfg, train_cfg, 0, target=target)
    assert fit.model.head_kind == head
    assert (fit.logistic is None) == (fit.logistic_note is not None)
    z, p, alpha = scores(fit.model, te)
    assert z.shape == (90, 3) and p.shape == (90, 3) and alpha.shape == (90, 2)
    assert np.allclose(p.sum(1), 1.0)
    auc = roc_auc_score(te.y, p, multi_class="ovr", average="macro")
    assert auc > 0.8
    assert np.array_equal(predict(fit.model, te)[0], p)
    assert all(h["val_roc_auc"] is not None for h in fit.history)
    # the losses and their per-participant parts agree
    counts = tr.class_counts(3)
    for loss in ("objective", "cross_entropy", "calibrated"):
        value, vauc = validation_metrics(fit.model, te, model_cfg, counts, loss)
        parts = validation_losses(fit.model, te, model_cfg, counts, loss)
        assert parts.shape == (90,) and math.isclose(parts.mean(), value, rel_tol=1e-4), loss
        assert math.isclose(vauc, auc, rel_tol=1e-6)
    assert calibrated_log_loss(z, te.y) <= math.log(3) + 1e-9
    by_class = modality_weights_by_class(fit.model, te, target.classes)
    assert list(by_class) == list(target.classes)
    for name, w in by_class.items():
        assert set(w) == {"a", "b"} and math.isclose(sum(w.values()), 1.0, abs_tol=1e-5)


def test_class_counts_keep_absent_classes():
    data = Arrays(np.zeros((4, 5), np.float32), np.ones((4, 2), bool), np.array([0, 1, 1, 0]))
    assert data.class_counts() == [2, 2]
    assert data.class_counts(3) == [2, 2, 0]


# ------------------------------------------------------------------------------------------------
# Differential privacy: Opacus' per-sample gradients of the ordinal head
# ------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kw", [{}, dict(ensemble_size=3, wide="trained", linear_path=True)])
def test_opacus_per_sample_gradients_of_the_ordinal_head(kw):
    from opacus import GradSampleModule

    import safn_core.privacy.grad_samplers  # noqa: F401
    model_cfg = cfg(dropout=0.0, sparsity_lambda=0.05, head="ordinal", **kw)
    model = SAFN(SPECS, model_cfg, seed=3, n_classes=3, ordered=True)
    ref = SAFN(SPECS, model_cfg, seed=3, n_classes=3, ordered=True)
    with torch.no_grad():  # off the initial zeros, so that every path carries gradient
        for net in (model, ref):
            torch.manual_seed(1)
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
            net.link.raw.bias.copy_(torch.tensor([-0.4, 0.3]))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[0, 0] = False
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    logits, alpha = gsm(x, mask, return_weights=True, members=True)
    total_loss(logits, y, alpha, model_cfg, [10, 20, 30]).backward()
    for i in range(6):
        ref.zero_grad()
        lo, al = ref(x[i:i + 1], mask[i:i + 1], return_weights=True, members=True)
        total_loss(lo, y[i:i + 1], al, model_cfg, [10, 20, 30]).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if not p.requires_grad:
                continue
            assert p.grad_sample is not None and p.grad_sample.shape[0] == 6, name
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), (name, i)
    assert model.link.raw.bias.grad_sample.abs().sum() > 0
