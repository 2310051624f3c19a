"""Distributed ComBat (safn_core.harmonisation): equal to pooled neuroCombat, fitted on training
rows only, usable by a site outside the fit, summable in any order, clear errors, round trips."""

from __future__ import annotations

import contextlib
import io
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from safn_core.config import SynthConfig
from safn_core.data import ppmi_catalog as cat
from safn_core.data.cohort import LABEL, SITE
from safn_core.errors import ConfigError, DataError
from safn_core.harmonisation import (
    CombatFit,
    CombatMeans,
    CombatSpec,
    MeanSums,
    ResidualSums,
    SiteAdjustment,
    combat_pooled,
    harmonise,
    harmonise_sites,
    site_adjustment,
    site_mean_sums,
    site_residual_sums,
    solve_means,
    solve_variance,
)
from safn_core.synth import generate_truth

neurocombat = pytest.importorskip("neuroCombat")

FEATURES = tuple(cat.THICKNESS_FEATURES + cat.VOLUME_FEATURES)
SPEC = CombatSpec(FEATURES, continuous=("AGE",), categorical={"SEX": (0.0, 1.0)})


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    """The synthetic cohort's complete participants (4 sites with scanner effects) as a cohort
    table: indexed by participant id, with site, label, AGE, SEX and the 90 imaging features.

    neuroCombat casts continuous covariates to float32; AGE is rounded to float32 here so that
    both implementations see the same numbers."""
    truth = generate_truth(SynthConfig(seed=1, n_pd=240, n_hc=120, n_without_mri=0, n_swedd=0,
                                       n_prodromal=0, n_sites=4, min_site_size=40))
    t = truth[truth["complete"]].copy()
    t.index = pd.Index(t["PATNO"].astype(str), name="participant_id")
    t[LABEL] = t[LABEL].astype(int)
    t["AGE"] = t["AGE"].astype(np.float32).astype(np.float64)
    return t[[SITE, LABEL, "AGE", "SEX", *FEATURES]]


def by_site(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {s: part for s, part in frame.groupby(SITE, sort=True)}


def secure_sum(parts):
    """What a secure aggregation of the sites' arrays reveals: their element-wise sum."""
    arrays = [p.to_arrays() for p in parts]
    return {k: sum(a[k] for a in arrays) for k in arrays[0]}


def federated(frame: pd.DataFrame, spec: CombatSpec, **kw):
    """The federation's steps, each site's message through to_arrays / a secure sum /
    from_arrays, as a coordinator would receive it."""
    sites = by_site(frame)
    total = MeanSums.from_arrays(
        secure_sum([site_mean_sums(spec, part, s) for s, part in sites.items()]), spec)
    means = CombatMeans.from_arrays(solve_means(spec, total).to_arrays(), spec)  # broadcast
    total2 = ResidualSums.from_arrays(
        secure_sum([site_residual_sums(means, part, s) for s, part in sites.items()]), spec)
    fit = solve_variance(means, total2)
    adjustments = {s: site_adjustment(fit, part, s, **kw) for s, part in sites.items()}
    return fit, adjustments


def run_neurocombat(frame: pd.DataFrame, covariates: bool, **kw) -> dict:
    cont, categ = (["AGE"], ["SEX"]) if covariates else ([], [])
    with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints its progress
        return neurocombat.neuroCombat(
            frame[list(FEATURES)].to_numpy(np.float64).T, frame[[SITE, *cont, *categ]], SITE,
            categorical_cols=categ, continuous_cols=cont, **kw)


@pytest.mark.parametrize("eb, parametric, covariates", [
    (True, True, True), (True, False, True), (False, True, True), (True, True, False)])
def test_federated_combat_equals_pooled_neurocombat(cohort, eb, parametric, covariates):
    spec = SPEC if covariates else CombatSpec(FEATURES)
    fit, adjustments = federated(cohort, spec, empirical_bayes=eb, parametric=parametric)
    ours = harmonise_sites(fit, adjustments, cohort)[list(FEATURES)].to_numpy().T
    ref = run_neurocombat(cohort, covariates, eb=eb, parametric=parametric)
    est = ref["estimates"]
    sd = np.sqrt(est["var.pooled"])  # compare in units of each feature's pooled SD
    assert np.abs(ours - ref["data"]).max(axis=1, keepdims=True).__le__(1e-6 * sd).all()
    np.testing.assert_allclose(fit.sigma2, est["var.pooled"][:, 0], rtol=1e-9)
    np.testing.assert_allclose(fit.alpha, est["stand.mean"][:, 0], rtol=1e-9)
    x = np.column_stack([cohort["AGE"], cohort["SEX"] == 1.0]) if covariates else \
        np.zeros((len(cohort), 0))
    assert (np.abs(x @ fit.beta - est["mod.mean"].T) <= 1e-9 * sd.T).all()
    for i, s in enumerate(est["batches"]):
        np.testing.assert_allclose(adjustments[s].gamma, est["gamma.star"][i], atol=1e-9)
        np.testing.assert_allclose(adjustments[s].delta2, est["delta.star"][i], rtol=1e-9)
    # harmonisation did something: the site effects were a sizeable part of the data
    raw = cohort[list(FEATURES)].to_numpy().T
    assert (np.abs(ours - raw) / sd).max() > 0.5
    # the pooled shortcut is the same code path
    pooled_fit, pooled_adj = combat_pooled(cohort, spec, empirical_bayes=eb,
                                           parametric=parametric)
    np.testing.assert_allclose(pooled_fit.beta, fit.beta, rtol=1e-12, atol=0)
    for s, adj in pooled_adj.items():
        np.testing.assert_allclose(adj.gamma, adjustments[s].gamma, rtol=1e-10, atol=1e-14)


def test_secure_parts_summed_in_any_order_give_the_same_fit(cohort):
    sites = by_site(cohort)
    parts = [site_mean_sums(SPEC, part, s) for s, part in sites.items()]
    fits = []
    for order in itertools.permutations(range(len(parts))):
        total = MeanSums.from_arrays(secure_sum([parts[i] for i in order]), SPEC)
        means = solve_means(SPEC, total)
        res = [site_residual_sums(means, part, s) for s, part in sites.items()]
        fits.append(solve_variance(means, ResidualSums.total(res[::-1])))
    tree = solve_means(SPEC, (parts[0] + parts[3]) + (parts[2] + parts[1]))
    for fit in fits[1:]:
        for name in ("alpha", "beta", "sigma2"):
            np.testing.assert_allclose(getattr(fit, name), getattr(fits[0], name), rtol=1e-12)
    np.testing.assert_allclose(tree.beta, fits[0].beta, rtol=1e-12)


def test_what_a_site_sends_has_no_participant_dimension(cohort):
    """The arrays' shapes depend on the spec only, never on how many participants a site has:
    no per-participant row (design matrix, residual) can travel."""
    site, part = next(iter(by_site(cohort).items()))
    means = solve_means(SPEC, MeanSums.total(site_mean_sums(SPEC, p, s)
                                             for s, p in by_site(cohort).items()))
    shapes = []
    for rows in (part, part.iloc[:-7]):
        sent = {**site_mean_sums(SPEC, rows, site).to_arrays(),
                **{f"r2_{k}": v for k, v in site_residual_sums(means, rows, site)
                   .to_arrays().items()}}
        shapes.append({k: v.shape for k, v in sent.items()})
    assert shapes[0] == shapes[1]
    p, v = len(SPEC.design_columns), len(FEATURES)
    assert shapes[0] == {"n": (1,), "x_sum": (p,), "y_sum": (v,), "xx": (p, p), "xy": (p, v),
                         "r2_n": (1,), "r2_rss": (v,)}


def split(frame: pd.DataFrame, fraction: float = 0.3, seed: int = 0) -> pd.Series:
    """True for the test participants: a seeded fraction of every site."""
    rng = np.random.default_rng(seed)
    return pd.Series(rng.random(len(frame)) < fraction, index=frame.index)


def test_leakage_spy_test_rows_do_not_change_fit_or_adjustments(cohort):
    test = split(cohort)
    fit, adj = combat_pooled(cohort[~test], SPEC)
    before = harmonise_sites(fit, adj, cohort)

    spied = cohort.copy()  # the test rows change completely
    rng = np.random.default_rng(1)
    spied.loc[test, list(FEATURES)] *= rng.uniform(0.5, 2.0, (int(test.sum()), len(FEATURES)))
    spied.loc[test, "AGE"] = rng.permutation(spied.loc[test, "AGE"].to_numpy())
    fit2, adj2 = combat_pooled(spied[~test], SPEC)
    assert fit2.to_dict() == fit.to_dict()
    assert {s: a.to_dict() for s, a in adj2.items()} == {s: a.to_dict() for s, a in adj.items()}
    after = harmonise_sites(fit2, adj2, spied)
    pd.testing.assert_frame_equal(after[~test], before[~test])
    # each row is harmonised on its own: the test rows alone give the same values
    pd.testing.assert_frame_equal(harmonise_sites(fit2, adj2, spied[test]), after[test])
    # the spy would see a leak: fitting with the changed test rows does change the fit
    leaked, _ = combat_pooled(spied, SPEC)
    assert not np.allclose(leaked.sigma2, fit.sigma2, rtol=1e-3)


def test_a_site_outside_the_fit_harmonises_itself_without_labels(cohort):
    sites = by_site(cohort)
    new = "201"
    others = cohort[cohort[SITE] != new]
    fit, adj = combat_pooled(others, SPEC)
    frozen = json.dumps(fit.to_dict())
    others_before = harmonise_sites(fit, adj, others)

    own = sites[new].drop(columns=[LABEL])  # no labels at the new site
    x = np.column_stack([own["AGE"], own["SEX"] == 1.0])
    z_raw = fit.standardise(x, own[list(FEATURES)].to_numpy())
    for eb in (True, False):
        mine = site_adjustment(fit, own, new, empirical_bayes=eb)
        z = fit.standardise(x, harmonise(fit, mine, own)[list(FEATURES)].to_numpy())
        assert np.abs(z_raw.mean(axis=0)).mean() > 0.15  # its scanner effect before
        assert np.abs(z.mean(axis=0)).max() < (0.05 if eb else 1e-10)
        assert np.abs(z.var(axis=0, ddof=1) - 1).max() < (0.25 if eb else 1e-10)
    assert json.dumps(fit.to_dict()) == frozen  # nobody refits
    pd.testing.assert_frame_equal(harmonise_sites(fit, adj, others), others_before)


def test_the_site_cannot_be_predicted_from_harmonised_features(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test = split(cohort)
    train, held = cohort[~test], cohort[test]
    fit, adj = combat_pooled(train, SPEC)
    chance = held[SITE].value_counts(normalize=True).max()
    accuracy = {}
    for name, (a, b) in {"raw": (train, held), "harmonised": (
            harmonise_sites(fit, adj, train), harmonise_sites(fit, adj, held))}.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(a[list(FEATURES)].to_numpy(), a[SITE])
        accuracy[name] = model.score(b[list(FEATURES)].to_numpy(), b[SITE])
    assert accuracy["raw"] > 0.9
    assert accuracy["harmonised"] < chance + 0.05, accuracy


def test_nonparametric_weights_stay_finite_for_a_large_site():
    """neuroCombat's product of densities underflows to 0/0 beyond about 500 participants; the
    logarithmic weights agree with it below that and stay finite above."""
    from neuroCombat.neuroCombat import int_eprior

    from safn_core.harmonisation import bayes

    rng = np.random.default_rng(0)
    for n in (300, 600):
        z = rng.normal(0.2, 1.1, (n, 20)) * rng.uniform(0.8, 1.2, 20)
        g, d = bayes.location_scale(z)
        ours = bayes.nonparametric(z, g, d)
        with np.errstate(all="ignore"):
            ref = np.array(int_eprior(z.T.copy(), g, d)[0])
        assert np.isfinite(ours[0]).all() and np.isfinite(ours[1]).all()
        if n == 300:
            np.testing.assert_allclose(ours[0], ref, rtol=1e-10)
        else:
            assert np.isnan(ref).all()


# ---------------------------------------------------------------------------------------------
# Errors: one message naming the site, column, feature or participant, and what to do
# ---------------------------------------------------------------------------------------------


def test_the_diagnosis_label_is_refused_as_a_covariate():
    with pytest.raises(ConfigError, match=r"'label' \(the diagnosis\).*test participants"):
        CombatSpec(FEATURES, continuous=("AGE",), categorical={LABEL: (0, 1)})


@pytest.mark.parametrize("kw, words", [
    (dict(continuous=(SITE,)), "'site' is the batch"),
    (dict(continuous=(FEATURES[0],)), f"'{FEATURES[0]}' is both a harmonised feature"),
    (dict(categorical={"SEX": (1.0,)}), "'SEX': declare at least two distinct levels"),
    (dict(categorical={"SEX": (0.0, float("nan"))}), "'SEX': level nan"),
    (dict(continuous=("AGE", "AGE")), r"\['AGE'\] named twice"),
])
def test_a_bad_spec_is_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        CombatSpec(FEATURES, **kw)


def first(cohort, site="131") -> tuple[pd.DataFrame, str]:
    part = cohort[cohort[SITE] == site].copy()
    return part, str(part.index[1])


def test_an_undeclared_category_names_the_column_row_and_value(cohort):
    part, pid = first(cohort)
    part.loc[pid, "SEX"] = 2.0
    with pytest.raises(DataError, match=rf"site 131: categorical covariate 'SEX' of participant "
                                        rf"'{pid}' is 2\.0, not one of the declared levels"):
        site_mean_sums(SPEC, part, "131")


def test_a_missing_covariate_names_the_site_column_and_participant(cohort):
    part, pid = first(cohort)
    part.loc[pid, "AGE"] = np.nan
    with pytest.raises(DataError, match=rf"site 131: covariate 'AGE' is missing for 1 "
                                        rf"participant\(s\) \('{pid}'\)"):
        site_mean_sums(SPEC, part, "131")


def test_a_missing_feature_is_refused_in_the_fit_and_kept_missing_when_applied(cohort):
    part, pid = first(cohort)
    holed = part.copy()
    holed.loc[pid, FEATURES[3]] = np.nan
    with pytest.raises(DataError, match=rf"site 131: feature '{FEATURES[3]}' is missing for 1 "
                                        rf"participant\(s\) \('{pid}'\).*complete rows"):
        site_mean_sums(SPEC, holed, "131")
    fit, adj = combat_pooled(cohort, SPEC)
    out = harmonise(fit, adj["131"], holed)
    full = harmonise(fit, adj["131"], part)
    assert np.isnan(out.loc[pid, FEATURES[3]])
    assert out.loc[pid, FEATURES[4]] == full.loc[pid, FEATURES[4]]


def test_a_site_below_min_cell_is_refused_with_its_size(cohort):
    small = pd.concat([cohort[cohort[SITE] != "131"], cohort[cohort[SITE] == "131"].iloc[:4]])
    with pytest.raises(DataError, match=r"site 131: 4 participant\(s\).*fewer than 5 "
                                        r"\(min_cell = 5\)"):
        combat_pooled(small, SPEC, min_cell=5)
    fit, _ = combat_pooled(cohort[cohort[SITE] != "131"], SPEC)
    with pytest.raises(DataError, match=r"site 131: 4 participant"):  # an unseen site, too
        site_adjustment(fit, cohort[cohort[SITE] == "131"].iloc[:4], "131")


def test_a_feature_constant_within_a_site_names_site_and_feature(cohort):
    frame = cohort.copy()
    frame.loc[frame[SITE] == "255", FEATURES[5]] = 2.5
    with pytest.raises(DataError, match=rf"site 255: feature '{FEATURES[5]}' has the same value "
                                        r"for all 92 participants"):
        combat_pooled(frame, SPEC)


def test_a_feature_without_pooled_variance_is_named(cohort):
    frame = cohort.copy()  # exactly site offset + covariate effect: nothing left to standardise
    offset = frame[SITE].map({"131": 1.0, "201": 2.0, "255": 3.0, "47": 4.0}).astype(float)
    frame[FEATURES[7]] = offset + 0.01 * frame["AGE"]
    with pytest.raises(DataError, match=rf"feature '{FEATURES[7]}' has no residual variance"):
        combat_pooled(frame, SPEC)


def test_a_singular_design_names_the_covariate(cohort):
    absent = CombatSpec(FEATURES, ("AGE",), {"SEX": (0.0, 1.0, 2.0)})
    with pytest.raises(DataError, match=r"singular: categorical covariate 'SEX': no participant "
                                        r"in the fit has the level 2\.0"):
        combat_pooled(cohort, absent)
    frame = cohort.assign(SCANNER=cohort[SITE].map({"131": "GE", "201": "GE", "255": "Philips",
                                                    "47": "Siemens"}))
    confounded = CombatSpec(FEATURES, ("AGE",), {"SCANNER": ("GE", "Philips", "Siemens")})
    with pytest.raises(DataError, match=r"covariate column 'SCANNER=Philips' does not vary "
                                        r"within any site"):
        combat_pooled(frame, confounded)
    twice = CombatSpec(FEATURES, ("AGE", "AGE_MONTHS"))
    with pytest.raises(DataError, match=r"\['AGE', 'AGE_MONTHS'\] are collinear"):
        combat_pooled(cohort.assign(AGE_MONTHS=12 * cohort["AGE"] + 3), twice)


def test_applying_needs_the_matching_fit_and_an_adjustment_per_site(cohort):
    fit, adj = combat_pooled(cohort[cohort[SITE] != "47"], SPEC)
    with pytest.raises(DataError, match=r"site 47: no harmonisation adjustment"):
        harmonise_sites(fit, adj, cohort)
    other, _ = combat_pooled(cohort, SPEC)
    with pytest.raises(DataError, match=r"site 131: its adjustment was estimated with another"):
        harmonise(other, adj["131"], cohort[cohort[SITE] == "131"])


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------


def test_fit_and_adjustment_round_trip_through_json(cohort):
    fit, adj = combat_pooled(cohort, SPEC, parametric=False)
    fit2 = CombatFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    adj2 = SiteAdjustment.from_dict(json.loads(json.dumps(adj["47"].to_dict())))
    assert fit2.spec == fit.spec and fit2.fit_id == fit.fit_id and adj2.method == "non-parametric"
    for name in ("alpha", "beta", "sigma2"):
        np.testing.assert_array_equal(getattr(fit2, name), getattr(fit, name))
    part = cohort[cohort[SITE] == "47"]
    pd.testing.assert_frame_equal(harmonise(fit2, adj2, part), harmonise(fit, adj["47"], part))


def test_sums_round_trip_and_a_malformed_message_is_refused(cohort):
    part = cohort[cohort[SITE] == "47"]
    sums = site_mean_sums(SPEC, part, "47")
    back = MeanSums.from_arrays(sums.to_arrays(), SPEC)
    for k, v in sums.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[k], v)
    bad = {**sums.to_arrays(), "xx": np.zeros((3, 3))}
    with pytest.raises(DataError, match=r"MeanSums: array 'xx' has shape \(3, 3\), expected "
                                        r"\(2, 2\)"):
        MeanSums.from_arrays(bad, SPEC)
    with pytest.raises(DataError, match=r"expected the arrays"):
        ResidualSums.from_arrays({"n": np.ones(1)}, SPEC)
    with pytest.raises(DataError, match=r"harmonisation fit: 'sigma2' is missing"):
        d = combat_pooled(cohort, SPEC)[0].to_dict()
        del d["sigma2"]
        CombatFit.from_dict(d)
