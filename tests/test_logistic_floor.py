"""The logistic regression floor in a real Flower simulation: the federated fit equals the pooled
one on the same training splits (plain and under secure aggregation), SAFN starts from it
(round 0 evaluates the floor, and predicts its probabilities), and a DP-SGD run goes without it
and says so."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safn_core.config import dump_config, load_config
from tests.helpers import SMALL_MODEL, write_toy

pytestmark = pytest.mark.timeout(600)


def _run(tmp_path, cfg):
    """A Flower simulation of ``cfg`` in ``tmp_path/run``: (run folder, cfg, cohort, sites)."""
    from safn_core.data.sources import load_cohort
    from safn_core.federation.run_folder import write_config
    from safn.simulations.compare import build_sites
    from safn.simulations.engine import run_flower_simulation
    from safn.simulations.virtual_sites import write_virtual_sites

    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    write_config(run_dir, dump_config(cfg))
    write_virtual_sites(run_dir, cohort, parts)
    run_flower_simulation(run_dir, cfg, len(parts))
    return run_dir, cfg, cohort, parts


def _simulate_synthetic(tmp_path, *overrides):
    """A small synthetic federation (5 natural sites) with the floor."""
    cfg = load_config(None, ["synth.n_pd=260", "synth.n_hc=140", "synth.n_without_mri=0",
                             "synth.n_swedd=0", "synth.n_prodromal=0", "synth.min_site_size=60",
                             "federation.rounds=1", "model.wide=trained",
                             f"simulation.site_state_dir={tmp_path / 'state'}", *SMALL_MODEL,
                             *overrides])
    return _run(tmp_path, cfg)[0]


def test_under_harmonisation_the_floor_is_fitted_on_the_harmonised_data(tmp_path):
    """Plain queries carry the harmonisation fit like every later message (the secure sums'
    base config does too): both fits are on the harmonised training splits, so they agree; a
    plain fit on unharmonised data would not."""
    from safn.server.logistic_floor import load_floor

    fits = {secure: load_floor(_simulate_synthetic(
        tmp_path / str(secure), "harmonisation.method=combat",
        f"federation.secure_aggregation={str(secure).lower()}")) for secure in (False, True)}
    unharmonised = load_floor(_simulate_synthetic(tmp_path / "raw",
                                                  "federation.secure_aggregation=false"))
    assert np.abs(fits[False].coef - fits[True].coef).max() < 1e-6
    assert np.abs(fits[False].coef - unharmonised.coef).max() > 1e-3


def _simulate(tmp_path, *overrides):
    csv, mapping = write_toy(tmp_path, n=320)
    cfg = load_config(None, ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
                             "simulation.partition=iid", "simulation.n_sites=4",
                             "federation.rounds=2", "federation.select=val_loss",
                             f"simulation.site_state_dir={tmp_path / 'state'}",
                             "model.wide=trained", *SMALL_MODEL, *overrides])
    return _run(tmp_path, cfg)


def _pooled(run_dir, cfg, cohort, parts):
    """The pooled fit on the union of the sites' training splits, preprocessed as the
    federation preprocessed them (the checkpoint's preprocessing)."""
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.site import Site
    from safn_core.logistic import fit_pooled
    from safn_core.preprocess import Preprocessor

    pre = Preprocessor.from_state(load_checkpoint(run_dir).preprocessing)
    sites = [Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()]
    train = [s.arrays(pre, "train") for s in sites]
    val = [s.arrays(pre, "val") for s in sites]
    x = np.concatenate([a.x for a in train]).astype(np.float64)
    y = np.concatenate([a.y for a in train])
    fit = fit_pooled(x, y, np.concatenate([a.x for a in val]).astype(np.float64),
                     np.concatenate([a.y for a in val]))
    return fit, pre, sites


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_the_federated_floor_equals_the_pooled_fit_and_safn_starts_from_it(tmp_path, secure):
    from safn_core.bundle import load_bundle
    from safn_core.logistic import LogisticFit
    from safn_core.training.local import Arrays, make_model, predict

    run_dir, cfg, cohort, parts = _simulate(
        tmp_path, f"federation.secure_aggregation={str(secure).lower()}")
    record = json.loads((run_dir / "logistic.json").read_text())
    assert record["secure_aggregation"] is secure
    assert record["sites"] == sorted(parts)
    fed = LogisticFit.from_dict(record["fit"])
    pooled, pre, sites = _pooled(run_dir, cfg, cohort, parts)
    assert fed.converged and fed.penalty == pooled.penalty
    assert np.abs(fed.coef - pooled.coef).max() < 1e-6
    assert abs(fed.intercept - pooled.intercept) < 1e-6
    assert list(fed.n_train) == [int(v) for v in np.bincount(
        np.concatenate([s.arrays(pre, "train").y for s in sites]), minlength=2)]

    # round 0 evaluated the initial model before any training; SAFN's initial model is the floor
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2]
    assert "train_loss" not in history[0] and history[0]["pooled"] is not None
    model = make_model(pre.modalities, cfg.model, cfg.train.seed)
    model.set_wide(fed.coef, fed.intercept)
    test = Arrays(np.concatenate([s.arrays(pre, "test").x for s in sites]),
                  np.concatenate([s.arrays(pre, "test").mask for s in sites]),
                  np.concatenate([s.arrays(pre, "test").y for s in sites]))
    p_model, _ = predict(model, test)
    np.testing.assert_allclose(p_model, fed.predict_proba(test.x.astype(np.float64)),
                               atol=1e-5)
    # the bundle keeps the selected round (0 when no training round improved on the floor)
    bundle = load_bundle(run_dir / "model")
    assert bundle.meta["training"]["selected_round"] in (0, 1, 2)
    floor = bundle.meta["training"]["logistic_floor"]
    assert floor["penalty"] == fed.penalty and floor["secure_aggregation"] is secure
    assert floor["pooled_test"] == history[0]["pooled"]
    assert "starts from the exact federated logistic regression" in \
        (run_dir / "model" / "model_card.md").read_text()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    fitted = [e for e in events if e["event"] == "logistic"]
    assert [e["code"] for e in fitted] == ["fitted"]
    assert fitted[0]["secure"] is secure and fitted[0]["participants"] == sum(fed.n_train)
    assert "logistic regression floor: fitted" in (run_dir / "progress.log").read_text()


def test_the_comparison_has_the_floor_pooled_and_local_logistic_regressions(tmp_path):
    """safn-sim's table: the federated floor scores as the pooled logistic regression on the
    pooled test set (the same fit), and each site has its local-only logistic regression."""
    from safn_core.bundle import load_bundle
    from safn.server.logistic_floor import load_floor
    from safn.simulations.compare import compare, flat_intervals

    run_dir, cfg, cohort, parts = _simulate(tmp_path, "federation.secure_aggregation=false",
                                            "federation.rounds=1")
    bundle = load_bundle(run_dir / "model")
    df, _ = compare(cohort, parts, cfg, (bundle.model, bundle.preprocessor), load_floor(run_dir))
    rows = df.set_index("kind")
    floor, pooled = rows.loc["federated-lr"], rows.loc["pooled-lr"]
    for k in ("roc_auc", "balanced_accuracy", "brier", "threshold"):
        assert float(floor[k]) == pytest.approx(float(pooled[k]), abs=1e-6), k
    assert list(floor["roc_auc_ci"]) == pytest.approx(list(pooled["roc_auc_ci"]), abs=1e-6)
    local = df[df.kind == "local-lr"]
    assert sorted(local.model) == sorted(f"local-only logistic regression {n}" for n in parts)
    assert (df.kind == "best-local-lr").sum() == 1
    assert "roc_auc_ci_low" in flat_intervals(df).columns


def test_a_dp_run_goes_without_the_floor_and_says_why(tmp_path):
    run_dir, *_ = _simulate(tmp_path, "privacy.mode=dp-sgd", "privacy.epsilon=8",
                            "federation.rounds=1", "federation.secure_aggregation=false")
    record = json.loads((run_dir / "logistic.json").read_text())
    assert record["fit"] is None and "DP-SGD" in record["skipped"]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["round"] for e in history] == [1]  # no round 0: nothing to keep from a floor
    assert json.loads((run_dir / "federation_status.json").read_text())["status"] == "completed"
    assert "logistic regression floor: not fitted" in (run_dir / "progress.log").read_text()


def test_central_dp_goes_without_the_floor(tmp_path):
    """An exact regression inside a model released under central DP would bypass its noise."""
    run_dir, *_ = _simulate(tmp_path, "federation.central_dp.enabled=true",
                            "federation.strategy=fedavg", "federation.rounds=1",
                            "federation.secure_aggregation=false")
    record = json.loads((run_dir / "logistic.json").read_text())
    assert record["fit"] is None and "central DP" in record["skipped"]
    assert [e["round"] for e in json.loads((run_dir / "history.json").read_text())] == [1]
