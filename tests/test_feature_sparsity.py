"""The deep path's feature selection (`safn_core.model.feature_sparsity`): a group-lasso
proximal step on each feature's first-layer block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safn_core.model import SAFN
from safn_core.model.feature_sparsity import (feature_blocks, kept_features, lasso_step,
                                              proximal_step)
from safn_core.config import ModelConfig

MODS = [("a", 5, "imaging"), ("b", 3, "clinical")]
NAMES = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)]


@pytest.mark.parametrize("embedding", ["none", "periodic"])
def test_the_step_shrinks_each_feature_block_by_its_strength_and_zeroes_small_ones(embedding):
    model = SAFN(MODS, ModelConfig(d_model=8, n_heads=2, encoder_hidden=8, ffn_hidden=8,
                                   head_hidden=8, numeric_embedding=embedding), seed=0)
    blocks = feature_blocks(model)
    assert [(n, w) for _, n, w in blocks] == [(5, 1 if embedding == "none" else 8),
                                              (3, 1 if embedding == "none" else 8)]
    linear, n, width = blocks[0]
    with torch.no_grad():
        linear.weight.view(linear.out_features, n, width)[:, 1].mul_(1e-3)  # feature a1: tiny
    before = linear.weight.detach().view(linear.out_features, n, width).square().sum(dim=(0, 2)).sqrt()
    strength = float(before[1]) * 2  # more than a1's norm, less than the others'
    assert (before[[0, 2, 3, 4]] > strength).all()
    proximal_step(model, strength)
    after = linear.weight.detach().view(linear.out_features, n, width).square().sum(dim=(0, 2)).sqrt()
    assert after[1] == 0
    np.testing.assert_allclose(after[[0, 2, 3, 4]].numpy(),
                               (before[[0, 2, 3, 4]] - strength).numpy(), rtol=1e-5)
    assert kept_features(model, NAMES) == [f for f in NAMES if f != "a1"]


def test_lasso_training_keeps_the_informative_features_of_many():
    """200 noise features and 3 informative ones: with the step, the deep path keeps the 3 and
    drops most of the noise; without it, it keeps every feature."""
    from safn_core.training.local import Arrays, make_loader, run_epochs

    rng = np.random.default_rng(0)
    n, f = 300, 203
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = (x[:, :3].sum(axis=1) + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    data = Arrays(x, np.ones((n, 1), dtype=bool), y)
    names = [f"x{i}" for i in range(f)]
    kept = {}
    for lam in (0.0, 3.0):
        cfg = ModelConfig(d_model=16, n_heads=2, encoder_hidden=16, ffn_hidden=16,
                          head_hidden=16, dropout=0.0)
        model = SAFN([("x", f, "clinical")], cfg, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        run_epochs(model, make_loader(data, 64, 0), opt, 30, cfg, data.class_counts(),
                   after_step=lasso_step(model, opt, lam))
        kept[lam] = kept_features(model, names)
    assert len(kept[0.0]) == f
    assert {"x0", "x1", "x2"} <= set(kept[3.0])
    assert len(kept[3.0]) < 40, len(kept[3.0])


def test_no_step_without_a_strength():
    model = SAFN(MODS, ModelConfig(d_model=8, n_heads=2), seed=0)
    assert lasso_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.0) is None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proximal_step(model, 0.0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_site_s_round_and_a_centralised_fit_take_the_step():
    """``model.feature_lasso`` reaches every engine: a federated site's round and fit_by_rounds
    (a DP site's goes through the same run_epochs hook, safn_core.privacy.engine)."""
    from safn_core.config import load_config
    from safn_core.data.sources import load_cohort
    from safn_core.federation.aggregate import global_preprocessing
    from safn_core.federation.site import Site
    from safn_core.training.local import fit_by_rounds, make_model

    cfg = load_config(None, ["synth.n_pd=80", "synth.n_hc=60", "synth.n_without_mri=0",
                             "synth.n_swedd=0", "synth.n_prodromal=0", "model.feature_lasso=50",
                             "model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16",
                             "model.ensemble_size=2"])
    cohort = load_cohort(cfg.data, cfg.synth)
    site = Site("s", cohort, cfg)
    stats, counts = site.describe(check_cells=False)
    pre, class_counts = global_preprocessing(cohort.modalities, [stats], [counts])
    names = list(pre.features)
    model = make_model(cohort.modalities, cfg.model, 0)
    weights, _, _ = site.train({k: v.detach().numpy() for k, v in model.state_dict().items()},
                               pre, class_counts, model_cfg=cfg.model, epochs=3, seed=0)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    assert len(kept_features(model, names)) < len(names)
    fit = fit_by_rounds(site.arrays(pre, "train"), site.arrays(pre, "val"), cohort.modalities,
                        cfg.model, cfg.train, 0, rounds=3, epochs_per_round=1)
    assert len(kept_features(fit.model, names)) < len(names)
