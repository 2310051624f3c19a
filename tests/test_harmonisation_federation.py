"""Federated ComBat in the federation (`safn.server.harmonisation`, `safn.client.harmonisation_replies`,
`safn_core.federation.site_harmonisation`): the fit the sites reach from sums equals pooled
neuroCombat on their training splits, validation and test rows shape nothing, a held-out site
adjusts itself without changing anyone else's data, and the preprocessing is fitted on the
harmonised data. Two real Flower simulations (secure and plain) on a small synthetic cohort;
the maths alone: tests/test_harmonisation.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.config import load_config
from safn_core.data.cohort import ID, SITE
from safn_core.federation.site import Site
from safn_core.harmonisation.record import complete_cases
from safn_core.federation.site_harmonisation import (harmonise_site, mean_sums,
                                                     residual_sums, unscale_fit)
from safn_core.harmonisation import (CombatSpec, MeanSums, ResidualSums, solve_means,
                                     solve_variance)
from safn_core.harmonisation.setup import combat_spec
from tests.helpers import SMALL_MODEL

pytestmark = pytest.mark.timeout(400)
BIN = Path(sys.executable).parent
SMALL_COHORT = ["synth.n_pd=260", "synth.n_hc=140", "synth.n_without_mri=0",
                "synth.n_swedd=0", "synth.n_prodromal=0", "synth.min_site_size=60"]


def _cohort_and_sites(*overrides):
    from safn_core.data.sources import load_cohort
    from safn.simulations.compare import build_sites

    cfg = load_config(None, [*SMALL_COHORT, *SMALL_MODEL, "harmonisation.method=combat",
                             *overrides])
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    return cfg, cohort, {n: Site(n, cohort.subset(ids), cfg) for n, ids in parts.items()}


def _fit(sites, spec, scales=None):
    means = solve_means(spec, MeanSums.total(mean_sums(s, spec, scales) for s in sites))
    return unscale_fit(solve_variance(means, ResidualSums.total(
        residual_sums(s, means, scales) for s in sites)), scales)


def test_sums_come_from_the_training_split_only_and_scaling_changes_nothing():
    cfg, cohort, sites = _cohort_and_sites()
    spec = combat_spec(cfg.harmonisation, cohort.modalities)
    fit = _fit(sites.values(), spec)
    # the fit on data divided by per-column scales, turned back, is the same fit
    rng = np.random.default_rng(0)
    scales = {f: float(rng.uniform(0.01, 1e4)) for f in cohort.features}
    again = _fit(sites.values(), spec, scales)
    for a, b in ((fit.alpha, again.alpha), (fit.beta, again.beta), (fit.sigma2, again.sigma2)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    # a leakage spy: other values in every site's validation and test rows change nothing
    for s in sites.values():
        rows = np.concatenate([s.split.val, s.split.test])
        s.cohort.table.loc[rows, list(spec.features)] *= 3.0
    spied = _fit(sites.values(), spec)
    np.testing.assert_array_equal(spied.alpha, fit.alpha)
    np.testing.assert_array_equal(spied.sigma2, fit.sigma2)
    # ... and the site's own adjustment comes from its training split too
    site = next(iter(sites.values()))
    before = harmonise_site(site, fit, cfg.harmonisation, held_out=False)
    site.cohort.table.loc[site.split.test, list(spec.features)] += 1.0
    after = harmonise_site(site, fit, cfg.harmonisation, held_out=False)
    np.testing.assert_array_equal(before.adjustment.gamma, after.adjustment.gamma)
    assert before.fit_rows == len(complete_cases(site.cohort.table.loc[site.split.train], spec))
    # a held-out site estimates from all its participants, with the same fit
    held = harmonise_site(site, fit, cfg.harmonisation, held_out=True)
    assert held.fit_rows == len(site.cohort.table) and held.adjustment.fit_id == fit.fit_id


def test_a_site_that_cannot_take_part_says_why():
    from safn.client.harmonisation_replies import sums
    from safn_core.federation.protocol import Config
    from safn_core.federation.shared_config import shared_config_text

    cfg, cohort, sites = _cohort_and_sites()
    site = next(iter(sites.values()))
    config = {Config.SAFN_CONFIG: shared_config_text(cfg)}
    arrays, reason = sums(site, config, "means")
    assert reason is None and set(arrays) == {"n", "x_sum", "y_sum", "xx", "xy"}
    site.cfg.data.min_cell = len(site.split.train) + 1
    arrays, reason = sums(site, config, "means")
    assert arrays is None and "participant(s) to estimate its scanner effects from" in reason
    small = load_config(None, [*SMALL_COHORT, "harmonisation.method=combat",
                               "harmonisation.covariates={AGE: continuous, EDUCATION: continuous}"])
    arrays, reason = sums(site, {Config.SAFN_CONFIG: shared_config_text(small)}, "means")
    assert arrays is None and "harmonisation.covariates: ['EDUCATION']" in reason
    dp = site.cfg.model_copy(deep=True)
    dp.privacy = dp.privacy.model_copy(update={"mode": "dp-sgd", "epsilon": 3.0,
                                               "statistics": "gaussian",
                                               "statistics_epsilon": 0.3})
    arrays, reason = sums(Site(site.name, site.cohort, dp), config, "means")
    assert arrays is None and "privacy.statistics: gaussian" in reason


def _neurocombat(frames: list[pd.DataFrame], spec: CombatSpec) -> np.ndarray:
    from neuroCombat import neuroCombat

    raw = pd.concat(frames)
    covars = pd.DataFrame({"batch": raw[SITE].astype(str).to_numpy(),
                           # neuroCombat reads continuous covariates as float32
                           "AGE": raw["AGE"].to_numpy().astype(np.float32).astype(float),
                           "SEX": raw["SEX"].to_numpy()})
    out = neuroCombat(dat=raw[list(spec.features)].to_numpy(float).T, covars=covars,
                      batch_col="batch", categorical_cols=["SEX"], continuous_cols=["AGE"])
    return out["data"].T


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "plain"])
def test_federated_combat_equals_pooled_neurocombat_on_the_training_splits(tmp_path, secure):
    from safn_core.bundle import load_bundle
    from safn.simulations.virtual_sites import load_virtual_site, virtual_site_names

    out = tmp_path / "run"
    sets = [*SMALL_COHORT, *SMALL_MODEL, "harmonisation.method=combat", "federation.rounds=1",
            "simulation.compare=false", f"simulation.site_state_dir={tmp_path / 'state'}",
            f"federation.secure_aggregation={str(secure).lower()}"]
    if secure:  # a held-out site: not in the fit, it adjusts itself
        sets.append("server.held_out_sites=[site_293]")
    proc = subprocess.run([str(BIN / "safn-sim"), "--out", str(out),
                           *[x for s in sets for x in ("--set", s)]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = " ".join(proc.stdout.split())
    assert "harmonisation: ComBat fitted on the training splits of" in said
    assert ("securely summed" in said) is secure
    record = json.loads((out / "harmonisation.json").read_text())
    cfg = load_config(out / "config.yaml")
    names = virtual_site_names(out.resolve())
    training = [n for n in names if n not in cfg.server.held_out_sites]
    assert record["sites"] == sorted(training) and record["secure_aggregation"] is secure
    # every training site wrote its harmonised training split to its disk (the run folder)
    written = sorted(p.stem for p in (out / "harmonised").glob("*.csv"))
    assert written == sorted(training)
    sites = {}
    for i in range(len(names)):
        name, cohort = load_virtual_site(out.resolve(), i)
        sites[name] = Site(name, cohort, cfg)
    spec = combat_spec(cfg.harmonisation, next(iter(sites.values())).cohort.modalities)
    train = [sites[n].cohort.table.loc[sites[n].split.train] for n in training]
    expected = _neurocombat(train, spec)
    got = pd.concat([pd.read_csv(out / "harmonised" / f"{n}.csv", index_col=ID)
                     for n in training])
    raw = pd.concat(train)
    assert list(got.index.astype(str)) == list(raw.index.astype(str))
    sd = raw[list(spec.features)].to_numpy(float).std(axis=0)
    error = np.abs(got[list(spec.features)].to_numpy(float) - expected) / sd
    assert error.max() < 1e-6, error.max()
    assert set(got.columns) == {SITE, *spec.covariates, *spec.features}  # no label
    # the preprocessing was fitted on the harmonised training splits, not the raw ones
    bundle = load_bundle(out / "model")
    mean = dict(zip([f for m in bundle.preprocessor.modalities for f in m.features],
                    bundle.preprocessor.mean_))
    feature = spec.features[0]
    assert mean[feature] == pytest.approx(float(got[feature].mean()), rel=1e-6)
    assert mean[feature] != pytest.approx(float(raw[feature].mean()), rel=1e-6)
    if secure:
        return
    # a coordinator that stopped before its first round: the resumed run keeps the run's fit
    # (harmonisation.json), and the sites harmonise exactly as before
    import shutil

    again = tmp_path / "resumed"
    shutil.copytree(out, again)
    for name in ("model", "results.json", "history.json", "rounds.csv", "checkpoints",
                 "federation_status.json", "harmonised"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    proc = subprocess.run([str(BIN / "safn-sim"), "--resume", str(again)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "harmonisation: the run's ComBat fit" in " ".join(proc.stdout.split())
    assert load_bundle(again / "model").harmonisation.fit.fit_id == \
        bundle.harmonisation.fit.fit_id
    for n in training:
        assert (again / "harmonised" / f"{n}.csv").read_text() == \
            (out / "harmonised" / f"{n}.csv").read_text()
