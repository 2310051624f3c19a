"""Exact K-class logistic regression from summed statistics (`safn_core.logistic.multinomial`,
`safn_core.logistic.ordinal`, `safn_core.logistic.family`): the pooled multinomial fit equals
scikit-learn's for every penalty of the grid, the unpenalised, unweighted ordinal fit equals
statsmodels' ``OrderedModel``, sites' sums add up to the pooled fit, plainly and through the
fixed-point packing of a secure sum, and the penalty is chosen on validation only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from safn_core.federation.site_logistic import betas_from, zero_values
from safn_core.logistic import PENALTIES, add_sums, family, multinomial, newton, ordinal
from safn_core.logistic.engine import balanced_weights, full_hessian
from safn_core.logistic.packing import clipped_features, kclass_packing


def cohort(n: int, seed: int, kind: str, n_features: int = 5):
    """A learnable, not separable 3-class problem with unbalanced classes (ordinal: latent
    logistic score cut at two thresholds; multinomial: softmax of class-specific scores)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    if kind == "ordinal":
        score = x @ np.linspace(1.0, -0.6, n_features) + rng.logistic(size=n)
        return x, np.digitize(score, [-0.3, 1.4]).astype(np.int64)
    w = np.zeros((3, n_features))
    w[1, :3], w[2, :3] = [1.0, -1.0, 0.5], [2.0, 0.0, -1.0]
    z = x @ w.T + [0.0, -0.5, -1.0]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return x, np.array([rng.choice(3, p=pi) for pi in p], dtype=np.int64)


DATA = {kind: (*cohort(240, 0, kind), *cohort(90, 1, kind)) for kind in ("multinomial", "ordinal")}
MODULES = {"multinomial": multinomial, "ordinal": ordinal}


def test_pooled_multinomial_equals_sklearn_for_every_penalty_of_the_grid():
    x, y, xv, yv = DATA["multinomial"]
    fit = multinomial.fit_pooled(x, y, xv, yv)
    assert fit.converged and fit.penalties == PENALTIES and fit.coefs_all.shape == (9, 2 * 6)
    assert fit.coef_.shape == (3, 5) and fit.intercept_.shape == (3,)
    assert not fit.coef_[0].any() and fit.intercept_[0] == 0
    for k, lam in enumerate(PENALTIES):
        sk = LogisticRegression(C=1 / lam, class_weight="balanced", solver="newton-cholesky",
                                tol=1e-12, max_iter=1000).fit(x, y)
        b = fit.coefs_all[k].reshape(2, 6)
        z = xv @ np.vstack([np.zeros(5), b[:, 1:]]).T + np.r_[0.0, b[:, 0]]
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(p, sk.predict_proba(xv), atol=1e-8, rtol=0)
        # the symmetric penalty: sklearn's coefficients are ours centred over the classes
        w = np.vstack([np.zeros(5), b[:, 1:]])
        np.testing.assert_allclose(w - w.mean(axis=0), sk.coef_, atol=1e-7)
    sk = LogisticRegression(C=1 / fit.penalty, class_weight="balanced", solver="newton-cholesky",
                            tol=1e-12, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(fit.predict_proba(xv), sk.predict_proba(xv), atol=1e-8)
    assert fit.n_train == tuple(np.bincount(y).tolist())
    assert fit.class_weight == pytest.approx(len(y) / (3 * np.bincount(y)))


def test_unpenalised_unweighted_ordinal_equals_statsmodels_ordered_model():
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    x, y, xv, yv = DATA["ordinal"]
    fit = ordinal.fit_pooled(x, y, xv, yv, weights=(1.0, 1.0, 1.0), penalties=(0.0,))
    model = OrderedModel(y, x, distr="logit")
    res = model.fit(method="newton", disp=False, maxiter=2000, tol=1e-10)
    assert res.mle_retvals["converged"]
    np.testing.assert_allclose(fit.coef_, res.params[:5], atol=1e-6)
    np.testing.assert_allclose(fit.thresholds_, model.transform_threshold_params(res.params)[1:-1],
                               atol=1e-6)
    np.testing.assert_allclose(fit.predict_proba(xv), res.model.predict(res.params, exog=xv),
                               atol=1e-7)
    assert fit.coef_.shape == (5,) and fit.thresholds_.shape == (2,)


def test_ordinal_gradient_and_hessian_are_the_objective_s_derivatives():
    x, y, xv, yv = DATA["ordinal"]
    weights, beta, eps = (0.7, 1.1, 1.9), np.r_[-0.3, 0.8, 0.2, -0.1, 0.5, 0.0, 0.3], 1e-6
    sums = ordinal.site_sums(x, y, xv, yv, beta[None], weights)

    def at(b, key):
        return ordinal.site_sums(x, y, xv, yv, b[None], weights)[key][0]

    steps = np.eye(7) * eps
    grad = [(at(beta + e, "objective") - at(beta - e, "objective")) / (2 * eps) for e in steps]
    hess = np.stack([(at(beta + e, "grad") - at(beta - e, "grad")) / (2 * eps) for e in steps])
    np.testing.assert_allclose(sums["grad"][0], grad, atol=1e-5)
    np.testing.assert_allclose(full_hessian(sums["hess"][0], 7), hess, atol=1e-5)


@pytest.mark.parametrize("kind", ["multinomial", "ordinal"])
def test_probabilities_are_valid_and_ordinal_thresholds_ordered(kind):
    x, y, xv, yv = DATA[kind]
    fit = MODULES[kind].fit_pooled(x, y, xv, yv)
    p = fit.predict_proba(xv)
    assert p.shape == (len(xv), 3) and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    if kind == "ordinal":
        assert fit.coef_.shape == (5,) and (np.diff(fit.thresholds_) > 0).all()
        assert (np.diff(fit.cumulative(xv), axis=1) >= 0).all()
        for row in fit.coefs_all:  # every candidate's thresholds stayed ordered
            assert (np.diff(row[:2]) > 0).all()
    again = family.fit_from_dict(json.loads(json.dumps(fit.to_dict())))
    assert type(again) is type(fit) and again.penalty == fit.penalty
    np.testing.assert_allclose(again.predict_proba(xv), p)
    with pytest.raises(ValueError, match="not a"):
        type(fit).from_dict({"kind": kind})


@pytest.mark.parametrize("kind", ["multinomial", "ordinal"])
def test_penalty_is_the_lowest_balanced_validation_loss_and_sees_validation_only(kind):
    x, y, xv, yv = DATA[kind]
    fit = MODULES[kind].fit_pooled(x, y, xv, yv)
    losses = []
    for k in range(len(PENALTIES)):
        row = fit.coefs_all[k]
        if kind == "multinomial":
            b = row.reshape(2, 6)
            z = xv @ np.vstack([np.zeros(5), b[:, 1:]]).T + np.r_[0.0, b[:, 0]]
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        else:
            c = 1 / (1 + np.exp(-(row[:2][None, :] - (xv @ row[2:])[:, None])))
            p = np.diff(np.c_[np.zeros(len(xv)), c, np.ones(len(xv))], axis=1)
        loss = -np.log(p[np.arange(len(yv)), yv])
        losses.append(np.mean([loss[yv == c].mean() for c in range(3)]))
    np.testing.assert_allclose(fit.val_loss, losses, rtol=1e-9)
    assert fit.penalty == PENALTIES[int(np.argmin(losses))]
    shuffled = MODULES[kind].fit_pooled(x, y, xv, np.random.default_rng(3).permutation(yv))
    np.testing.assert_array_equal(shuffled.coefs_all, fit.coefs_all)


def _sites(kind):
    x, y, xv, yv = DATA[kind]
    cuts, vcuts = [0, 50, 150, 240], [0, 25, 60, 90]
    return [(x[a:b], y[a:b], xv[c:d], yv[c:d])
            for a, b, c, d in zip(cuts, cuts[1:], vcuts, vcuts[1:])]


@pytest.mark.parametrize("kind", ["multinomial", "ordinal"])
def test_three_sites_sums_add_up_to_the_pooled_fit(kind):
    x, y, xv, yv = DATA[kind]
    pooled = family.fit_pooled(kind, x, y, xv, yv, 3)
    weights = family.class_weights(kind, np.bincount(y))  # the federation's training counts
    fed = family.solve(kind, lambda betas: add_sums(
        family.site_sums(kind, *s, betas, weights) for s in _sites(kind)), 5, weights)
    assert fed.penalty == pooled.penalty and fed.iterations == pooled.iterations
    np.testing.assert_allclose(fed.coefs_all, pooled.coefs_all, atol=1e-8)
    assert fed.val_loss == pytest.approx(pooled.val_loss, rel=1e-10)
    assert fed.n_train == pooled.n_train


@pytest.mark.parametrize("kind", ["multinomial", "ordinal"])
def test_secure_sums_through_the_packing_equal_the_pooled_fit(kind):
    """Every site encodes its round in `kclass_packing`'s fixed point (a refusing site's
    `zero_values` fit the same layout), the vectors add modulo 2^64 as the masked sum does."""
    x, y, xv, yv = DATA[kind]
    pooled = family.fit_pooled(kind, x, y, xv, yv, 3)
    weights = balanced_weights(np.bincount(y))
    n_params = family.n_params(kind, 5, 3)
    packing = family.packing(kind, 5, len(PENALTIES), weights, max_site_examples=200, parties=4)
    assert packing.names == kclass_packing(n_params, len(PENALTIES), weights, 200, 4).names
    clips = []

    def secure(betas):
        vectors = []
        for xs, ys, xvs, yvs in _sites(kind):
            xs, n_clipped = clipped_features(xs)
            values = family.site_sums(kind, xs, ys, xvs, yvs, betas, weights)
            values["clipped"] = np.array([n_clipped])
            encoded = packing.encode(values)
            clips.append(encoded.clipped)
            vectors.append(encoded.vector)
        vectors.append(packing.encode(zero_values(len(betas), 5, kind, 3)).vector)
        total = np.zeros(packing.size, dtype=np.uint64)
        for v in vectors:
            total = total + v
        return packing.decode(total)

    fed = family.solve(kind, secure, 5, weights,
                       gradient_floor=10 * packing.error_bound("grad"))
    assert fed.penalty == pooled.penalty and fed.converged
    np.testing.assert_allclose(fed.coefs_all, pooled.coefs_all, atol=1e-6)
    assert fed.n_train == pooled.n_train
    assert all(v == 0 for c in clips for v in c.values())


def test_kinds_layouts_and_the_binary_path_unchanged():
    assert family.kind_for(2, True, "ordinal") == "binary"
    assert family.kind_for(3, True) == "multinomial"  # the default head: softmax
    assert family.kind_for(3, True, "ordinal") == "ordinal"
    assert family.kind_for(3, False) == "multinomial"
    assert family.kind_for(3, True, "softmax") == "multinomial"
    assert family.kind_for(3, False, "ordinal") == "ordinal"
    assert [family.n_params(k, 5, 3) for k in family.KINDS] == [6, 12, 7]
    assert betas_from(np.zeros(2 * 12), 5, "multinomial", 3).shape == (2, 12)
    with pytest.raises(ValueError, match="multiple of 7"):
        betas_from(np.zeros(12), 5, "ordinal", 3)
    zeros = zero_values(4, 5, "ordinal", 3)
    assert zeros["hess"].shape == (4, 28) and zeros["val_loss"].shape == (4, 3)
    # K = 2: the family's binary path is newton's, bit for bit
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(80, 3)), rng.normal(size=(40, 3))
    y, yv = (x[:, 0] + rng.normal(size=80) > 0).astype(int), (xv[:, 0] > 0).astype(int)
    a, b = family.fit_pooled("binary", x, y, xv, yv), newton.fit_pooled(x, y, xv, yv)
    np.testing.assert_array_equal(a.coefs_all, b.coefs_all)
    assert family.fit_from_dict(a.to_dict()).penalty == a.penalty


class _Site:
    """What `site_logistic` reads of a site: its settings, its labels and its arrays."""

    def __init__(self, x, y, xv, yv, min_cell=2):
        import pandas as pd
        from types import SimpleNamespace as NS

        from safn_core.data.cohort import LABEL

        self.cfg = NS(privacy=NS(dp=False))
        self.min_cell = min_cell
        ids = [f"p{i}" for i in range(len(y))]
        self.cohort = NS(table=pd.DataFrame({LABEL: y}, index=ids))
        self.split = NS(train=ids)
        self.parts = {"train": NS(x=x, y=y), "val": NS(x=xv, y=yv)}

    def arrays(self, pre, part):
        return self.parts[part]


@pytest.mark.parametrize("kind", ["multinomial", "ordinal"])
def test_sites_floor_values_add_up_to_the_pooled_fit(kind):
    """The sites' side of the federated floor (`site_logistic.logistic_values`, what a site's
    ClientApp replies, plain) at the coordinator's flat request (`server/logistic_floor`'s
    `_request`, which names the kind) sums to the pooled fit; a site with a class below
    ``min_cell`` refuses."""
    from safn.server.logistic_floor import _request, floor_kind
    from safn_core.config import load_config
    from safn_core.federation.protocol import Config
    from safn_core.federation.site_logistic import KIND, logistic_values, refusal

    cfg = load_config(None, ["data.target=hc_prodromal_pd", "model.head=ordinal"])
    assert floor_kind(cfg, 3) == "ordinal" and floor_kind(cfg, 2) == "binary"
    assert floor_kind(load_config(None, ["data.target=hc_prodromal_pd", "model.head=softmax"]),
                      3) == "multinomial"
    x, y, xv, yv = DATA[kind]
    sites = [_Site(*s) for s in _sites(kind)]
    assert all(refusal(s, secure=False, n_classes=3) is None for s in sites)
    weights = family.class_weights(kind, np.bincount(y))
    pre = type("Pre", (), {"mean_": np.zeros(5), "scale_": np.ones(5)})()

    def round_sums(betas):
        request = _request(pre, betas, weights, kind)
        assert request[KIND] == kind
        w = request[Config.LOGISTIC_WEIGHTS]
        flat = betas_from(request[Config.LOGISTIC_BETAS], 5, kind, len(w))
        return add_sums(logistic_values(s, pre, flat, w, False, kind)
                        for s in sites)

    fed = family.solve(kind, round_sums, 5, weights)
    pooled = family.fit_pooled(kind, x, y, xv, yv, 3)
    np.testing.assert_allclose(fed.coefs_all, pooled.coefs_all, atol=1e-8)
    assert KIND not in _request(pre, np.zeros((1, 6)), (1.0, 1.0))  # binary: as before
    few = _Site(x[:12], y[:12], xv[:5], yv[:5], min_cell=5)
    assert "fewer than min_cell" in refusal(few, secure=False, n_classes=3)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("secure,head", [(True, "ordinal"), (False, "softmax")],
                         ids=["secure-ordinal", "plain-multinomial"])
def test_a_flower_federation_fits_the_k_class_floor_equal_to_the_pooled_fit(tmp_path, secure,
                                                                            head):
    """``hc_prodromal_pd`` (3 ordered classes) on 5 natural synthetic sites through a real
    Flower simulation: the floor is the head's kind, and equals the pooled fit on the union of
    the training splits (penalty chosen on the pooled validation splits)."""
    from safn_core.config import load_config
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.site import Site
    from safn_core.preprocess import Preprocessor
    from tests.helpers import SMALL_MODEL
    from tests.test_logistic_floor import _run

    cfg = load_config(None, [
        "synth.n_pd=260", "synth.n_hc=140", "synth.n_prodromal=120", "synth.n_without_mri=0",
        "synth.n_swedd=0", "synth.min_site_size=60", "federation.rounds=1", "model.wide=trained",
        "data.target=hc_prodromal_pd", f"model.head={head}",
        f"federation.secure_aggregation={str(secure).lower()}",
        f"simulation.site_state_dir={tmp_path / 'state'}", *SMALL_MODEL])
    run_dir, cfg, cohort, parts = _run(tmp_path, cfg)
    record = json.loads((run_dir / "logistic.json").read_text())
    kind = "ordinal" if head == "ordinal" else "multinomial"
    assert record["kind"] == kind and record["secure_aggregation"] is secure
    fed = family.fit_from_dict(record["fit"])
    pre = Preprocessor.from_state(load_checkpoint(run_dir).preprocessing)
    sites = [Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()]
    train = [s.arrays(pre, "train") for s in sites]
    val = [s.arrays(pre, "val") for s in sites]
    x = np.concatenate([a.x for a in train]).astype(np.float64)
    pooled = family.fit_pooled(kind, x, np.concatenate([a.y for a in train]),
                               np.concatenate([a.x for a in val]).astype(np.float64),
                               np.concatenate([a.y for a in val]), 3)
    assert fed.converged and fed.penalty == pooled.penalty and fed.n_train == pooled.n_train
    np.testing.assert_allclose(fed.coef_, pooled.coef_, atol=1e-6)
    np.testing.assert_allclose(fed.predict_proba(x), pooled.predict_proba(x), atol=1e-6)
