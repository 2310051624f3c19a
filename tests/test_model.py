"""SAFN model, gating, losses, Opacus compatibility, ablations and determinism (fast, CPU)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from safn_core.config import ModelConfig, SafnConfig, load_config
from safn_core.data.cohort import Modality
from safn_core.errors import ConfigError
from safn_core.model import (SAFN, MultiHeadAttention, cb_focal_loss, class_balanced_weights,
                             entmax15, focal_loss, gate_entropy, masked_softmax, sparsemax,
                             total_loss)

MODS = [("ct", 5, "imaging"), ("vol", 4, "imaging"), ("cli", 6, "clinical"), ("dem", 3, "clinical")]
N_FEAT = sum(n for _, n, _ in MODS)
# the paper's structure (no wide path, one member); the defaults' wide path and ensemble are
# tested as variants here and in tests/test_wide_path.py
SMALL = dict(d_model=16, n_heads=4, encoder_hidden=16, ffn_hidden=16, head_hidden=8, wide="off",
             ensemble_size=1)
# the optional input layers of the modality encoders (safn_core.model.embeddings)
PERIODIC = dict(numeric_embedding="periodic", n_frequencies=3, embedding_dim=4)
ENSEMBLE = dict(ensemble_size=3)
INPUT_LAYERS = [{}, PERIODIC, dict(feature_dropout=0.2), dict(PERIODIC, feature_dropout=0.2),
                dict(linear_path=True), ENSEMBLE, dict(ENSEMBLE, **PERIODIC, linear_path=True),
                dict(feature_noise=0.5)]
# three imaging modalities and one clinical: the grouped cross-attention pads the clinical side
UNEVEN = [("a", 3, "imaging"), ("b", 4, "imaging"), ("c", 2, "imaging"), ("d", 9, "clinical")]


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEAT, generator=g)
    mask = torch.ones(n, len(MODS), dtype=torch.bool)
    mask[0, 0] = False           # missing cortical thickness
    mask[1, :2] = False          # no MRI at all (whole imaging side absent)
    mask[2, 3] = False           # missing demographics
    y = torch.tensor([i % 2 for i in range(n)])
    return x, mask, y


def strip(sd):
    return {k.removeprefix("_module."): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_model_config_defaults_and_validation():
    cfg = SafnConfig().model
    assert (cfg.d_model, cfg.n_heads, cfg.dropout) == (64, 4, 0.2)
    # issue #27: the wide path (trained, fading) and 8 ensemble members by default
    assert (cfg.wide, cfg.ensemble_size) == ("trained", 8)
    assert SafnConfig().train.wide_weight_decay == 30.0 and SafnConfig().train.select == "val_loss"
    with pytest.raises(ValidationError):
        ModelConfig(wide="on")
    assert (cfg.gate, cfg.loss, cfg.cb_beta, cfg.focal_gamma) == ("softmax", "cb_focal", 0.999, 1.5)
    assert cfg.cross_attention is True and cfg.sparsity_lambda == 0.01
    with pytest.raises(ValidationError, match=r"model\.n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValidationError):
        ModelConfig(gate="topk")
    with pytest.raises(ValidationError):
        ModelConfig(cb_beta=1.0)
    with pytest.raises(ValidationError):
        ModelConfig(unknown_key=1)
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        load_config(None, ["model.d_model=30"])
    cfg = load_config(None, ["model.gate=sparsemax", "model.sparsity_lambda=0"]).model
    assert cfg.gate == "sparsemax" and cfg.sparsity_lambda == 0


# --------------------------------------------------------------------------------------------
# Forward, weights, masking
# --------------------------------------------------------------------------------------------


def test_forward_shapes_weights_and_input_forms():
    model = SAFN(MODS, small_cfg(), seed=0).eval()
    x, mask, _ = batch()
    logits, alpha = model(x, mask, return_weights=True)
    assert logits.shape == (8, 2) and alpha.shape == (8, 4)
    assert torch.allclose(alpha.sum(1), torch.ones(8), atol=1e-6)
    assert torch.all(alpha[~mask] == 0) and torch.all(alpha[mask] > 0)
    assert torch.equal(model.last_weights, alpha.detach())
    assert torch.equal(model.modality_weights(x, mask), alpha.detach())

    parts = list(torch.split(x, [n for _, n, _ in MODS], dim=1))
    as_dict = {name: p for (name, _, _), p in zip(MODS, parts)}
    assert torch.equal(model(parts, mask), logits)
    assert torch.equal(model(as_dict, mask), logits)
    # a modality left out of the dict is masked for everyone
    d2 = {k: v for k, v in as_dict.items() if k != "dem"}
    m2 = mask.clone()
    m2[:, 3] = False
    assert torch.equal(model(d2, mask), model(as_dict, m2))
    # cohort Modality objects work as specs; no mask = all present
    cohort_mods = [Modality(n, tuple(f"{n}{i}" for i in range(k)), s) for n, k, s in MODS]
    m3 = SAFN(cohort_mods, small_cfg(), seed=0).eval()
    assert torch.equal(m3(x), model(x))
    with pytest.raises(ValueError, match="side"):
        SAFN([("a", 2, "genetic")], small_cfg())
    with pytest.raises(ValueError, match=r"\(batch, 18\).*got \(8, 5\)"):
        model(x[:, :5], mask)


@pytest.mark.parametrize("kw", INPUT_LAYERS)
def test_masked_modality_input_cannot_change_output(kw):
    model = SAFN(MODS, small_cfg(**kw), seed=1).eval()
    x, mask, _ = batch()
    ref, a_ref = model(x, mask, return_weights=True)
    x2 = x.clone()
    x2[0, 0:5] = 1e3            # sample 0: ct is masked
    x2[1, 0:9] = float("nan")   # sample 1: all imaging masked, values NaN
    x2[2, 15:18] = -7.0         # sample 2: dem masked
    out, a = model(x2, mask, return_weights=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref) and torch.equal(a, a_ref)
    # but an unmasked modality does matter
    x3 = x.clone()
    x3[3, 0:5] += 1.0
    assert not torch.allclose(model(x3, mask)[3], ref[3])


def test_attention_masking_and_all_masked_keys():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).eval()  # one group: inputs (B, T, 1, D), mask (B, Tk, 1)
    q, kv = torch.randn(3, 2, 1, 8), torch.randn(3, 4, 1, 8)
    key_mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out, attn = mha(q, kv, key_mask=key_mask[..., None], return_attention=True)
    assert attn.shape == (3, 1, 2, 2, 4) and torch.isfinite(out).all()
    assert torch.all(attn[~key_mask[:, None, None, None, :].expand_as(attn)] == 0)
    assert torch.allclose(attn[0].sum(-1), torch.ones(1, 2, 2)) and torch.all(attn[1] == 0)
    # every key masked: the attention output is zero, so the result is out_proj's bias
    assert torch.allclose(out[1], mha.out_proj.bias.expand(2, 1, 8))
    kv2 = kv.clone()
    kv2[0, 2] = 100.0
    kv2[2, 1:] = float("nan")
    assert torch.equal(mha(q, kv2, key_mask=key_mask[..., None]), out)
    # no mask = ordinary softmax attention (compare with torch's SDPA on one group's weights)
    k, v = mha.kv_proj(kv).chunk(2, dim=-1)
    ref = F.scaled_dot_product_attention(mha._split(mha.q_proj(q)), mha._split(k), mha._split(v))
    ref = mha.out_proj(ref.movedim(-2, -4).reshape(3, 2, 1, 8))
    assert torch.allclose(mha(q, kv), ref, atol=1e-5)


def test_grouped_attention_is_one_block_per_group():
    """Two groups = two independent attention layers: group g's output depends on group g's
    queries, keys and weights only, and equals a one-group layer holding group g's weights."""
    torch.manual_seed(0)
    both = MultiHeadAttention(8, 2, groups=2).eval()
    q, kv = torch.randn(4, 3, 2, 8), torch.randn(4, 5, 2, 8)
    mask = torch.rand(4, 5, 2) > 0.3
    out = both(q, kv, key_mask=mask)
    for g in range(2):
        one = MultiHeadAttention(8, 2).eval()
        with torch.no_grad():
            for name in ("q_proj", "kv_proj", "out_proj"):
                getattr(one, name).weight.copy_(getattr(both, name).weight[g:g + 1])
                getattr(one, name).bias.copy_(getattr(both, name).bias[g:g + 1])
        ref = one(q[:, :, g:g + 1], kv[:, :, g:g + 1], key_mask=mask[..., g:g + 1])
        assert torch.allclose(out[:, :, g:g + 1], ref, atol=1e-6)
    kv2 = kv.clone()
    kv2[:, :, 1] += 5.0  # the other group's keys change nothing in group 0
    assert torch.equal(both(q, kv2, key_mask=mask)[:, :, 0], out[:, :, 0])


def test_empty_batch_forward():
    model = SAFN(MODS, small_cfg(gate="sparsemax"), seed=0)
    logits, alpha = model(torch.zeros(0, N_FEAT), torch.zeros(0, 4, dtype=torch.bool),
                          return_weights=True)
    assert logits.shape == (0, 2) and alpha.shape == (0, 4)
    loss = total_loss(logits, torch.zeros(0, dtype=torch.long), alpha, small_cfg(), [10, 40])
    assert loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def sparsemax_brute(z: list[float]) -> list[float]:
    """Euclidean projection onto the simplex by trying every support set (KKT conditions)."""
    n = len(z)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            tau = (sum(z[i] for i in support) - 1) / size
            p = [z[i] - tau if i in support else 0.0 for i in range(n)]
            if all(p[i] > 0 for i in support) and all(z[j] <= tau for j in range(n)
                                                     if j not in support):
                return p
    raise AssertionError("no support found")


def test_sparsemax_hand_example_and_brute_force():
    # hand: z = (1, 0.8, -1): support {1, 2}, tau = (1.8 - 1)/2 = 0.4 -> (0.6, 0.4, 0)
    p = sparsemax(torch.tensor([[1.0, 0.8, -1.0]]))
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.0]]), atol=1e-6)
    assert p[0, 2].item() == 0.0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 5, generator=g) * 2
    p = sparsemax(z)
    brute = torch.tensor([sparsemax_brute(row) for row in z.tolist()])
    assert torch.allclose(p, brute, atol=1e-5)
    assert torch.allclose(p.sum(1), torch.ones(50), atol=1e-6)
    assert (p == 0).any(1).float().mean() > 0.5   # dominated scores get exact zeros
    assert torch.all((brute == 0) == (p == 0))
    # with a mask: masked entries are 0 and the rest equals sparsemax of the present scores
    mask = torch.tensor([[True, False, True, True, False]]).expand(50, 5)
    pm = sparsemax(z, mask)
    assert torch.all(pm[:, [1, 4]] == 0)
    assert torch.allclose(pm[:, [0, 2, 3]], sparsemax(z[:, [0, 2, 3]]), atol=1e-6)


def test_sparsemax_gradient_matches_jacobian():
    z = torch.tensor([[1.0, 0.8, -1.0, 0.5]], requires_grad=True)
    gout = torch.tensor([[0.3, -1.0, 2.0, 0.7]])
    p = sparsemax(z)
    (p * gout).sum().backward()
    s = (p > 0).float()
    expected = s * (gout - (gout * s).sum() / s.sum())
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_entmax15_exact_zeros_and_closed_form():
    # hand: z/2 = (0.5, 0.4, -0.5); support {1, 2}: (0.5-t)^2 + (0.4-t)^2 = 1
    # -> 2t^2 - 1.8t - 0.59 = 0 -> t = (1.8 - sqrt(1.8^2 + 8*0.59)) / 4
    t = (1.8 - math.sqrt(1.8 ** 2 + 8 * 0.59)) / 4
    p = entmax15(torch.tensor([[1.0, 0.8, -1.0]]))
    assert torch.allclose(p, torch.tensor([[(0.5 - t) ** 2, (0.4 - t) ** 2, 0.0]]), atol=1e-6)
    assert p[0, 2].item() == 0.0
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(100, 6, generator=g) * 3).requires_grad_()
    p = entmax15(z)
    assert torch.allclose(p.sum(1), torch.ones(100), atol=1e-6)
    assert (p == 0).any(1).float().mean() > 0.5
    # fixed point: p_i = [z_i/2 - tau]_+^2 with one tau per row
    tau = (z / 2 - p.sqrt()).detach()
    tau_row = torch.stack([tau[i][p[i] > 0].mean() for i in range(100)])
    assert torch.allclose(p.detach(), torch.clamp(z.detach() / 2 - tau_row[:, None], min=0) ** 2,
                          atol=1e-5)
    # the gradient equals entmax-1.5's Jacobian (Peters et al. 2019): with r = sqrt(p),
    # dp_i = r_i dz_i - r_i (sum_j r_j dz_j) / sum_j r_j, so dz = g*r - (sum g*r / sum r) * r
    gout = torch.randn(100, 6, generator=g)
    (p * gout).sum().backward()
    r = p.detach().sqrt()
    dz = gout * r
    expected = dz - (dz.sum(1, keepdim=True) / r.sum(1, keepdim=True)) * r
    assert torch.allclose(z.grad, expected, atol=1e-5)
    mask = torch.tensor([[False, True, True, True, True, False]]).expand(100, 6)
    pm = entmax15(z.detach(), mask)
    assert torch.all(pm[:, [0, 5]] == 0)
    assert torch.allclose(pm[:, 1:5], entmax15(z.detach()[:, 1:5]), atol=1e-6)


def test_masked_softmax_and_entropy():
    s = torch.tensor([[0.0, 1.0, 2.0], [5.0, -1.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    a = masked_softmax(s, mask)
    e = math.exp(2.0)
    assert torch.allclose(a[0], torch.tensor([1 / (1 + e), 0.0, e / (1 + e)]))
    assert torch.all(a[1] == 0)   # no modality at all: all weights 0, no NaN
    alpha = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    h = gate_entropy(alpha)
    assert torch.allclose(h, torch.tensor([math.log(2), 0.0]))
    h.sum().backward()
    assert torch.isfinite(alpha.grad).all()


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def test_class_balanced_weights_by_hand():
    beta, counts = 0.999, [133, 570]
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    expected = [2 * w / sum(raw) for w in raw]
    w = class_balanced_weights(counts, beta)
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert abs(w.sum().item() - 2.0) < 1e-6 and w[0] > w[1]   # minority class weighs more
    assert torch.allclose(class_balanced_weights({0: 133, 1: 570}), w)
    assert torch.allclose(class_balanced_weights([50, 50]), torch.ones(2))
    with pytest.raises(ValueError, match="class_counts\\[1\\] = 0"):
        class_balanced_weights([10, 0])
    with pytest.raises(ValueError, match="no training example"):
        cb_focal_loss(torch.zeros(2, 2), torch.tensor([0, 1]), [0, 5])


def test_focal_loss_matches_hand_computation_and_not_the_shortcut():
    logits = [[2.0, -1.0], [0.5, 0.3], [-0.2, 1.7], [1.0, 1.0]]
    y = [0, 1, 1, 0]
    counts, beta, gamma = [20, 80], 0.999, 1.5
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    w = [2 * r / sum(raw) for r in raw]
    terms, shortcut_terms = [], []
    for (a, b), yi in zip(logits, y):
        lse = math.log(math.exp(a) + math.exp(b))
        ce = lse - (a, b)[yi]
        pt = math.exp(-ce)
        terms.append(w[yi] * (1 - pt) ** gamma * ce)
        pt_wrong = math.exp(-w[yi] * ce)   # the shortcut: p_t from the weighted CE
        shortcut_terms.append(w[yi] * (1 - pt_wrong) ** gamma * ce)
    expected, shortcut = sum(terms) / 4, sum(shortcut_terms) / 4
    got = cb_focal_loss(torch.tensor(logits), torch.tensor(y), counts, beta, gamma).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(expected - shortcut) > 1e-3 and got != pytest.approx(shortcut, rel=1e-3)
    # gamma = 0 and no weights is plain cross-entropy
    assert focal_loss(torch.tensor(logits), torch.tensor(y), gamma=0.0).item() == pytest.approx(
        F.cross_entropy(torch.tensor(logits), torch.tensor(y)).item(), rel=1e-6)


def test_total_loss_variants():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    y = torch.tensor([0, 1])
    alpha = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    h = (math.log(2) + math.log(4)) / 2
    cfg = ModelConfig(sparsity_lambda=0.1)
    focal = cb_focal_loss(logits, y, [10, 30], 0.999, 1.5).item()
    assert total_loss(logits, y, alpha, cfg, [10, 30]).item() == pytest.approx(focal + 0.1 * h,
                                                                               rel=1e-6)
    ce_cfg = ModelConfig(loss="ce", sparsity_lambda=0.0)
    assert total_loss(logits, y, None, ce_cfg).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="class counts"):
        total_loss(logits, y, alpha, cfg, None)


# --------------------------------------------------------------------------------------------
# Opacus
# --------------------------------------------------------------------------------------------


def test_opacus_validator_strict():
    from opacus.validators import ModuleValidator
    for cfg in (small_cfg(), ModelConfig(), small_cfg(cross_attention=False, gate="entmax15"),
                ModelConfig(**PERIODIC, feature_dropout=0.1, linear_path=True),
                small_cfg(**ENSEMBLE, feature_noise=0.3)):
        assert ModuleValidator.validate(SAFN(MODS, cfg, seed=0), strict=True) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # benign: inputs need no grad
@pytest.mark.parametrize("kw,mods", [({}, MODS), (PERIODIC, MODS), (dict(linear_path=True), MODS),
                                     (ENSEMBLE, MODS), (dict(ENSEMBLE, **PERIODIC), MODS),
                                     ({}, UNEVEN), (dict(cross_attention=False), UNEVEN)])
def test_opacus_per_sample_gradients_are_exact(kw, mods):
    """GradSampleModule's per-sample grads equal the gradients of each sample run alone (SAFN's
    own layers, grouped, ensemble adapter and periodic, through safn_core.privacy.grad_samplers;
    with ensemble members, on the members' training loss)."""
    from opacus import GradSampleModule

    import safn_core.privacy.grad_samplers  # noqa: F401
    cfg = small_cfg(dropout=0.0, gate="sparsemax", sparsity_lambda=0.05, **kw)
    model = SAFN(mods, cfg, seed=3)
    ref = SAFN(mods, cfg, seed=3)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    x, mask, y = batch(6)
    logits, alpha = gsm(x, mask, return_weights=True, members=True)
    total_loss(logits, y, alpha, cfg, [10, 30]).backward()
    for i in range(6):
        ref.zero_grad()
        lo, al = ref(x[i:i + 1], mask[i:i + 1], return_weights=True, members=True)
        total_loss(lo, y[i:i + 1], al, cfg, [10, 30]).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert p.grad_sample is not None and p.grad_sample.shape[0] == 6, name
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), (name, i)


@pytest.mark.parametrize("kw", [{}, dict(PERIODIC, feature_dropout=0.2, linear_path=True),
                                dict(ENSEMBLE, feature_noise=0.3)])
def test_dp_sgd_step_with_privacy_engine_keeps_layout(kw):
    from opacus import PrivacyEngine

    import safn_core.privacy.grad_samplers  # noqa: F401
    cfg = small_cfg(**kw)
    torch.manual_seed(0)
    x, mask, y = batch(32)
    mask[:, 1] = torch.arange(32) % 3 != 0
    loader = DataLoader(TensorDataset(x, mask, y), batch_size=8)
    model = SAFN(MODS, cfg, seed=0)
    plain = SAFN(MODS, cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=True)
        counts = [int((y == 0).sum()), int((y == 1).sum())]
        dp_model.train()
        for xb, mb, yb in dp_loader:
            if len(yb) == 0:
                continue
            dp_opt.zero_grad()
            logits, alpha = dp_model(xb, mb, return_weights=True, members=True)
            total_loss(logits, yb, alpha, cfg, counts).backward()
            dp_opt.step()
            break
    after = strip(dp_model.state_dict())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)    # noise reaches every parameter
    ref = plain.state_dict()
    assert list(after) == list(ref)
    assert all(after[k].shape == ref[k].shape for k in ref)
    assert engine.get_epsilon(1e-5) > 0
    plain.load_state_dict(after)          # a DP site's weights load into a non-DP model


# --------------------------------------------------------------------------------------------
# Ablations, fallbacks, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(cross_attention=False), dict(sparsity_lambda=0.0), dict(loss="ce"),
    dict(gate="sparsemax"), dict(gate="entmax15"), dict(gate="entmax15", cross_attention=False),
    PERIODIC, dict(feature_dropout=0.3), dict(linear_path=True), ENSEMBLE,
    dict(ENSEMBLE, cross_attention=False, gate="sparsemax"), dict(feature_noise=0.5),
    dict(ffn_hidden=0), dict(ffn_hidden=0, cross_attention=False),
])
def test_ablations_forward_backward(kw):
    cfg = small_cfg(**kw)
    model = SAFN(MODS, cfg, seed=0)
    x, mask, y = batch()
    logits, alpha = model(x, mask, return_weights=True)
    loss = total_loss(logits, y, alpha, cfg, [4, 4])
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.allclose(alpha.sum(1), torch.ones(8), atol=1e-5) and torch.all(alpha[~mask] == 0)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if not cfg.cross_attention:
        assert not any("attn" in n for n, _ in model.named_parameters())
    if cfg.ffn_hidden == 0:
        assert not any("ffn" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("side", ["imaging", "clinical"])
def test_one_sided_modalities_fall_back_to_self_attention(side):
    mods = [(n, k, side) for n, k, _ in MODS]
    model = SAFN(mods, small_cfg(), seed=0)
    assert model.block.attn.groups == 1  # one self-attention block over every token
    x, mask, y = batch()
    logits, alpha = model(x, mask, return_weights=True)
    total_loss(logits, y, alpha, small_cfg(), [4, 4]).backward()
    assert logits.shape == (8, 2) and torch.all(alpha[~mask] == 0)
    # three imaging modalities and one clinical: any number per side
    mods2 = [("a", 3, "imaging"), ("b", 3, "imaging"), ("c", 3, "imaging"), ("d", 9, "clinical")]
    assert SAFN(mods2, small_cfg(), seed=0)(x, mask).shape == (8, 2)


@pytest.mark.parametrize("kw", [{}, dict(PERIODIC, feature_dropout=0.2, linear_path=True),
                                dict(ENSEMBLE, feature_noise=0.3)])
def test_determinism_same_seed_same_weights_and_step(kw):
    cfg = small_cfg(**kw)
    rng_state = torch.get_rng_state()
    a, b = SAFN(MODS, cfg, seed=7), SAFN(MODS, cfg, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)   # seeding leaves the global RNG alone
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = SAFN(MODS, cfg, seed=8).state_dict()
    assert not all(torch.equal(sa[k], c[k]) for k in sa)
    x, mask, y = batch()
    outs = []
    for model in (a, b):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        torch.manual_seed(123)   # dropout masks
        logits, alpha = model(x, mask, return_weights=True)
        total_loss(logits, y, alpha, cfg, [4, 4]).backward()
        opt.step()
        outs.append(model.eval()(x, mask))
    assert torch.equal(outs[0], outs[1])
    assert np.isfinite(outs[0].detach().numpy()).all()


# --------------------------------------------------------------------------------------------
# Input layers: periodic embeddings, feature dropout
# --------------------------------------------------------------------------------------------


def test_periodic_embedding_shapes_and_basis():
    from safn_core.model.embeddings import PeriodicEmbedding, PeriodicFeatures
    torch.manual_seed(0)
    feats = PeriodicFeatures(5, 3, sigma=0.5)
    x = torch.randn(7, 5)
    v = feats(x)
    assert v.shape == (7, 5, 6)
    angle = 2 * math.pi * x[2, 4] * feats.frequencies[4, 1]
    assert torch.allclose(v[2, 4, 1], torch.cos(angle)) and torch.allclose(v[2, 4, 4], torch.sin(angle))
    emb = PeriodicEmbedding(5, 3, 4, sigma=0.5)
    assert emb(x).shape == (7, 20) and emb.out_features == 20
    # each feature's embedding depends on that feature alone
    x2 = x.clone()
    x2[:, 1] += 1.0
    diff = (emb(x2) - emb(x)).reshape(7, 5, 4).abs().sum(dim=(0, 2))
    assert diff[1] > 0 and torch.all(diff[[0, 2, 3, 4]] == 0)
    with pytest.raises(ValueError, match="sigma > 0"):
        PeriodicFeatures(5, 3, sigma=0.0)


def test_feature_dropout_zeroes_features_in_training_only():
    from safn_core.model.embeddings import FeatureDropout
    drop = FeatureDropout(0.25)
    x = torch.randn(4000, 10) + 5.0  # no value is 0 by chance
    torch.manual_seed(0)
    out = drop.train()(x)
    zeroed = out == 0
    assert abs(zeroed.float().mean().item() - 0.25) < 0.02
    assert torch.equal(out[~zeroed], x[~zeroed])  # kept values are not rescaled
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FeatureDropout(1.0)


def test_periodic_embedding_is_off_by_default_and_changes_the_layout_when_on():
    plain = SAFN(MODS, small_cfg(), seed=0)
    periodic = SAFN(MODS, small_cfg(**PERIODIC), seed=0)
    assert not any("frequencies" in n for n, _ in plain.named_parameters())
    freqs = [n for n, _ in periodic.named_parameters() if n.endswith("frequencies")]
    assert len(freqs) == len(MODS)


def test_linear_path_adds_the_gated_linear_scores_to_the_deep_logits():
    cfg = small_cfg(linear_path=True)
    model = SAFN(MODS, cfg, seed=2).eval()
    deep = SAFN(MODS, small_cfg(), seed=2).eval()
    deep.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("linear.")})
    x, mask, _ = batch()
    logits, alpha = model(x, mask, return_weights=True)
    xs = torch.split(torch.where(mask.repeat_interleave(torch.tensor([n for _, n, _ in MODS]), 1),
                                 x, torch.zeros_like(x)), [n for _, n, _ in MODS], dim=1)
    wide = sum(alpha[:, m:m + 1] * model.linear[m](xs[m]) for m in range(len(MODS)))
    assert torch.allclose(logits, deep(x, mask) + wide, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Grouped layers, parameter-efficient ensembling, feature noise
# --------------------------------------------------------------------------------------------


def test_grouped_linear_and_layer_norm_equal_one_layer_per_group():
    from safn_core.model.grouped import GroupedLayerNorm, GroupedLinear
    torch.manual_seed(0)
    lin, norm = GroupedLinear(3, 5, 4), GroupedLayerNorm(3, 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(6, 2, 3, 5)  # batch, extra dimension, groups, features
    out = norm(lin(x))
    for g in range(3):
        ref = F.linear(x[..., g, :], lin.weight[g].T, lin.bias[g])
        ref = F.layer_norm(ref, (4,), norm.weight[g], norm.bias[g])
        assert torch.allclose(out[..., g, :], ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 5\)"):
        lin(torch.randn(6, 2, 5))


def test_fast_dropout_drops_at_rate_p_and_keeps_the_expectation():
    from safn_core.model.grouped import FastDropout
    drop = FastDropout(0.25)
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = drop.train()(x)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.75))
    assert abs(out.mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)


def test_token_routes_pair_each_side_with_the_other_and_pad_the_shorter():
    from safn_core.model.safn import _token_routes
    query, key, back = _token_routes([0, 1, 2], [3], 4)  # UNEVEN's sides
    assert query.tolist() == [[0, 3], [1, 4], [2, 4]]    # 4 = the always-masked pad token
    assert key.tolist() == [[3, 0], [4, 1], [4, 2]]
    assert query.flatten()[back].tolist() == [0, 1, 2, 3]  # back to modality order
    query, key, back = _token_routes([], [0, 1], 2)       # one side: self-attention
    assert query.tolist() == key.tolist() == [[0], [1]] and back.tolist() == [0, 1]


def test_uneven_sides_pad_token_changes_nothing():
    """With 3 imaging and 1 clinical modalities the imaging queries' keys are the clinical token
    and two pads: the pads get zero attention, and the clinical query sees the three imaging
    tokens."""
    model = SAFN(UNEVEN, small_cfg(dropout=0.0), seed=0).eval()
    x, mask, _ = batch()
    logits, alpha = model(x, mask, return_weights=True)
    assert torch.isfinite(logits).all() and torch.all(alpha[~mask] == 0)
    attn = model.block.attn
    t = torch.randn(8, 4, 16)
    tt = torch.cat([t, torch.zeros(8, 1, 16)], dim=1)
    mm = torch.cat([mask, torch.zeros(8, 1, dtype=torch.bool)], dim=1)
    _, weights = attn(tt[:, model._query_route], tt[:, model._key_route],
                      key_mask=mm[:, model._key_route], return_attention=True)
    assert torch.all(weights[:, 0, :, :, 1:] == 0)  # imaging group: the pad keys get 0
    present = mask[:, 3]  # imaging queries of participants with the clinical modality
    assert torch.allclose(weights[present, 0, :, :, 0], torch.ones(1))
    assert torch.allclose(weights[:, 1, :, 0].sum(-1), torch.ones(1))  # over real imaging keys


def test_ensemble_members_mix_into_one_prediction():
    cfg = small_cfg(**ENSEMBLE, dropout=0.0)
    model = SAFN(MODS, cfg, seed=0).eval()
    x, mask, y = batch()
    members, member_alpha = model(x, mask, return_weights=True, members=True)
    assert members.shape == (8, 3, 2) and member_alpha.shape == (8, 3, 4)
    logits, alpha = model(x, mask, return_weights=True)
    assert torch.allclose(torch.softmax(logits, -1), torch.softmax(members, -1).mean(1), atol=1e-6)
    assert torch.allclose(alpha, member_alpha.mean(1)) and torch.all(alpha[~mask] == 0)
    assert not torch.allclose(members[:, 0], members[:, 1])  # the adapters set members apart
    assert model.head[-1].groups == 3  # every member has its own output layer (TabM)
    adapters = [p for n, p in model.named_parameters() if n.startswith("adapters.")]
    assert len(adapters) == 4 and all(torch.all(p.abs() == 1) for p in adapters)
    # training loss = the mean of the members' own losses
    loss = total_loss(members, y, member_alpha, cfg, [4, 4])
    each = [total_loss(members[:, i], y, member_alpha[:, i], cfg, [4, 4]) for i in range(3)]
    assert loss.item() == pytest.approx(sum(e.item() for e in each) / 3, rel=1e-5)
    # one member: `members` changes nothing
    single = SAFN(MODS, small_cfg(dropout=0.0), seed=0).eval()
    assert torch.equal(single(x, mask), single(x, mask, members=True))
    assert not any(n.startswith("adapters.") for n, _ in single.named_parameters())


def test_feature_noise_in_training_only():
    from safn_core.model.embeddings import FeatureNoise
    noise = FeatureNoise(0.5)
    torch.manual_seed(0)
    x = torch.zeros(100_000)
    assert abs(noise.train()(x).std().item() - 0.5) < 0.01
    assert torch.equal(noise.eval()(x), x)
    with pytest.raises(ValueError, match=">= 0"):
        FeatureNoise(-0.1)
