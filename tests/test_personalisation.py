"""Personalisation at a site (`safn_core.federation.personal_training`, `personal_comparison`,
`personal_wire`): what is kept, where, what may
leave, and what a DP site spends. The federation end to end: tests/test_secure_federation.py
(Ditto under secure aggregation, with a recorder of every message) and
tests/test_federation_flower.py (fine-tuning in a plain run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safn_core.config import load_config
from safn_core.errors import ConfigError
from safn_core.federation import personal_training
from safn_core.federation.aggregate import global_preprocessing
from safn_core.federation.personal_comparison import personalise, pooled_from_confusion
from safn_core.federation.personal_plan import planned_personal_epochs
from safn_core.federation.personal_training import ditto_round, fine_tune
from safn_core.federation.personal_wire import comparison_from_metrics, comparison_to_metrics
from safn_core.federation.personal_store import PersonalStore, folder
from safn_core.federation.protocol import WITHHELD, Layout, Metric
from safn_core.federation.site import Site, state_to_numpy
from safn_core.preprocess import Preprocessor
from safn_core.training.local import make_model
from tests.helpers import SMALL_MODEL, toy_cohort


def _site(tmp_path, *overrides, n=240):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cohort = toy_cohort(tmp_path, n=n)
    cfg = load_config(None, [*SMALL_MODEL, "federation.rounds=3", *overrides])
    site = Site("A", cohort, cfg)
    stats, counts = site.describe(check_cells=False)
    pre, class_counts = global_preprocessing(cohort.modalities, [stats], [counts])
    pre = Preprocessor.from_state(pre.state_dict())
    weights = state_to_numpy(make_model(cohort.modalities, cfg.model, 0))
    return site, pre, class_counts, weights


def _flat(weights):
    return Layout.of(weights).flatten(weights)


def _scripted(monkeypatch, losses):
    """Validation losses in the order the site asks for them (a spy on its selection)."""
    seen = []

    def scores(site, pre, weights, class_counts):
        seen.append(_flat(weights))
        return losses[len(seen) - 1], 0.5

    monkeypatch.setattr(personal_training, "validation_scores", scores)
    return seen


def test_fine_tune_keeps_the_epoch_its_validation_split_prefers(tmp_path, monkeypatch):
    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "personalisation.epochs=3")
    seen = _scripted(monkeypatch, [0.50, 0.60, 0.40, 0.45])
    kept, record = fine_tune(site, weights, pre, counts, privacy=site.cfg.privacy,
                             state_dir=tmp_path / "state", run_id="r1", seed=0)
    assert record["epoch"] == 2 and record["epochs_trained"] == 3 and len(seen) == 4
    np.testing.assert_array_equal(_flat(kept), seen[2])  # the weights after epoch 2
    assert not np.allclose(seen[2], _flat(weights))


def test_fine_tune_keeps_the_global_model_when_no_epoch_helps(tmp_path, monkeypatch):
    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "personalisation.epochs=2")
    _scripted(monkeypatch, [0.30, 0.50, 0.60])
    kept, record = fine_tune(site, weights, pre, counts, privacy=site.cfg.privacy,
                             state_dir=tmp_path / "state", run_id="r1", seed=0)
    assert record["epoch"] == 0
    np.testing.assert_array_equal(_flat(kept), _flat(weights))


def test_ditto_trains_each_round_once_and_keeps_the_round_its_validation_prefers(
        tmp_path, monkeypatch):
    site, pre, counts, weights = _site(tmp_path, "personalisation.method=ditto")
    state = tmp_path / "state"
    _scripted(monkeypatch, [0.50, 0.40, 0.60, 0.70])
    after = []
    for r in (1, 2, 3):
        out = ditto_round(site, weights, pre, counts, server_round=r, privacy=site.cfg.privacy,
                          state_dir=state, run_id="r1", seed=r)
        assert out.trained
        after.append(_flat(PersonalStore(state, "r1").current()))
    assert out.selected_round == 2
    kept, record = PersonalStore(state, "r1").selected()
    assert record["round"] == 2
    np.testing.assert_array_equal(_flat(kept), after[1])
    assert not np.allclose(after[0], after[1])  # each round continues the personal model
    # a round the coordinator redoes after a crash is not trained again
    again = ditto_round(site, weights, pre, counts, server_round=3, privacy=site.cfg.privacy,
                        state_dir=state, run_id="r1", seed=3)
    assert not again.trained and again.selected_round == 2
    np.testing.assert_array_equal(_flat(PersonalStore(state, "r1").current()), after[2])
    # another run's personal model is another folder; this one's is untouched
    ditto_round(site, weights, pre, counts, server_round=1, privacy=site.cfg.privacy,
                state_dir=state, run_id="r2", seed=1)
    assert folder(state, "r2") != folder(state, "r1")
    np.testing.assert_array_equal(_flat(PersonalStore(state, "r1").current()), after[2])


def test_dittos_lambda_pulls_the_personal_model_towards_the_global_one(tmp_path):
    distance = {}
    for lam in (0.0, 50.0):
        site, pre, counts, weights = _site(tmp_path / str(lam), "personalisation.method=ditto",
                                           f"personalisation.ditto_lambda={lam}",
                                           "federation.local_epochs=3")
        ditto_round(site, weights, pre, counts, server_round=1, privacy=site.cfg.privacy,
                    state_dir=tmp_path / str(lam) / "state", run_id="r", seed=1)
        v = _flat(PersonalStore(tmp_path / str(lam) / "state", "r").current())
        distance[lam] = float(np.linalg.norm(v - _flat(weights)))
    assert 0 < distance[50.0] < 0.5 * distance[0.0], distance


def test_the_comparison_leaves_the_site_only_where_its_test_split_passes_min_cell(tmp_path):
    for min_cell, sent in ((3, True), (200, False)):
        site, pre, counts, weights = _site(tmp_path / str(min_cell),
                                           "personalisation.method=fine_tune",
                                           "personalisation.epochs=2",
                                           f"data.min_cell={min_cell}")
        state = tmp_path / str(min_cell) / "state"
        c = personalise(site, weights, pre, counts, federation_threshold=0.5,
                        privacy=site.cfg.privacy, state_dir=state, run_id="r", seed=0)
        assert c.reported is sent and c.refusal is None
        own = PersonalStore(state, "r").evaluation()  # the site keeps every figure
        assert own["metrics"]["personal"]["balanced_accuracy"] == pytest.approx(
            c.metrics["personal"]["balanced_accuracy"])
        assert sum(own["confusion"]["global"]) == len(site.split.test)
        for secure in (False, True):
            m = comparison_to_metrics(c, secure=secure)
            read = comparison_from_metrics(m)
            assert read["reported"] is sent
            if sent:
                assert read["personal"]["balanced_accuracy"] == pytest.approx(
                    c.metrics["personal"]["balanced_accuracy"])
                assert read["n"] == len(site.split.test)
            else:
                assert read["personal"] is None and read["n"] is None
                assert m[Metric.PERSONAL_PREFIX + "balanced-accuracy"] == WITHHELD
            # counts travel beside the metrics only in plain runs, and only when sent
            assert (Metric.GLOBAL_CONFUSION in m) is (not secure)
            if not secure:
                assert (sum(m[Metric.GLOBAL_CONFUSION]) > 0) is sent
        _, chosen = PersonalStore(state, "r").selected()
        assert (chosen["threshold_from"] == "site_validation" if sent
                else chosen["threshold_from"].startswith("federation"))


def test_the_personal_threshold_can_be_the_federations(tmp_path):
    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "personalisation.epochs=1",
                                       "personalisation.threshold=global")
    c = personalise(site, weights, pre, counts, federation_threshold=0.37,
                    privacy=site.cfg.privacy, state_dir=tmp_path / "s", run_id="r", seed=0)
    assert c.thresholds == {"global": 0.37, "personal": 0.37}


def test_ditto_without_a_trained_round_has_no_personal_model(tmp_path):
    site, pre, counts, weights = _site(tmp_path, "personalisation.method=ditto")
    c = personalise(site, weights, pre, counts, federation_threshold=0.5,
                    privacy=site.cfg.privacy, state_dir=tmp_path / "s", run_id="r", seed=0)
    assert c.refusal and "no personal model" in c.refusal and not c.reported
    m = comparison_to_metrics(c, secure=False)
    assert m[Metric.PERSONAL_REFUSED] == 1 and m[Metric.GLOBAL_CONFUSION] == [0, 0, 0, 0]


def test_pooled_comparison_from_summed_confusion_counts():
    total = {"global": [30, 10, 20, 20], "personal": [36, 4, 30, 10]}
    pooled = pooled_from_confusion(total, min_cell=5)
    assert pooled["n"] == 80
    assert pooled["global"]["balanced_accuracy"] == pytest.approx((30 / 40 + 20 / 40) / 2)
    assert pooled["personal"]["sensitivity"] == pytest.approx(0.9)
    assert pooled["personal"]["specificity"] == pytest.approx(0.75)
    assert pooled_from_confusion({"global": [2, 1, 20, 20], "personal": [3, 0, 30, 10]},
                                 min_cell=5) is None


def test_config_names_the_key_of_a_wrong_method():
    with pytest.raises(ConfigError, match="personalisation.method"):
        load_config(None, ["personalisation.method=maml"])
    assert planned_personal_epochs(load_config(None, [])) == 0
    cfg = load_config(None, ["personalisation.method=ditto", "federation.rounds=4",
                             "federation.local_epochs=2"])
    assert planned_personal_epochs(cfg) == 8
    cfg = load_config(None, ["personalisation.method=fine_tune", "personalisation.epochs=6"])
    assert planned_personal_epochs(cfg) == 6


def test_a_dp_site_plans_and_spends_its_personal_training_in_the_same_ledger(tmp_path):
    from safn_core.federation.site_privacy import train_round
    from safn_core.privacy import PrivacyLedger, default_ledger_path

    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "personalisation.epochs=2", "privacy.mode=dp-sgd",
                                       "privacy.epsilon=8", "federation.rounds=1")
    state = tmp_path / "state"
    out = train_round(site, weights, pre, counts, request=None, state_dir=state, run_id="r",
                      rounds=1, epochs=1, server_round=1, seed=1)
    assert out.refusal is None
    ledger = PrivacyLedger.read(default_ledger_path(state))
    plan = ledger.plan("r")
    assert plan["personal_epochs"] == 2
    assert plan["planned_steps"] == (1 + 2) * plan["steps_per_epoch"]
    c = personalise(site, out.weights, pre, counts, federation_threshold=0.5,
                    privacy=site.cfg.privacy.for_site(None), state_dir=state, run_id="r",
                    seed=0)
    assert c.refusal is None
    ledger = PrivacyLedger.read(default_ledger_path(state))
    kinds = [e["kind"] for e in ledger.snapshot()["entries"]]
    assert kinds == ["train", "personal", "personal"]
    assert ledger.charged_steps("r", "personal") == 2 * plan["steps_per_epoch"]
    from safn_core.privacy import epsilon

    spent = epsilon(ledger.history(), plan["delta"], plan["accountant"])
    assert spent <= 8 + 1e-9 and spent == pytest.approx(plan["epsilon_planned"], rel=1e-6)


def test_a_dp_site_whose_budget_is_spent_refuses_its_personal_model(tmp_path):
    from safn_core.federation.site_privacy import train_round
    from safn_core.privacy import PrivacyLedger, default_ledger_path

    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "personalisation.epochs=2", "privacy.mode=dp-sgd",
                                       "privacy.epsilon=8", "federation.rounds=1")
    state = tmp_path / "state"
    # run r spends its whole plan (its σ is calibrated to the budget): 1 round + 2 epochs
    out = train_round(site, weights, pre, counts, request=None, state_dir=state, run_id="r",
                      rounds=1, epochs=1, server_round=1, seed=1)
    assert personalise(site, out.weights, pre, counts, federation_threshold=0.5,
                       privacy=site.cfg.privacy, state_dir=state, run_id="r",
                       seed=0).refusal is None
    before = PrivacyLedger.read(default_ledger_path(state)).snapshot()["entries"]
    # a new run at the same site finds nothing left: no personal model, nothing spent
    again = personalise(site, out.weights, pre, counts, federation_threshold=0.5,
                        privacy=site.cfg.privacy, state_dir=state, run_id="r2", seed=0)
    assert again.refusal and "budget" in again.refusal and not again.reported
    assert PrivacyLedger.read(default_ledger_path(state)).snapshot()["entries"] == before
    assert json.loads((folder(state, "r2") / "evaluation.json").read_text())["refusal"]
    assert comparison_to_metrics(again, secure=True)[Metric.PERSONAL_REFUSED] == 1


def test_a_site_whose_validation_split_is_too_small_keeps_the_global_model(tmp_path):
    from safn_core.federation.personal_training import unfit_validation

    site, pre, counts, weights = _site(tmp_path, "personalisation.method=fine_tune",
                                       "data.min_cell=3")
    val = np.bincount(site.cohort.table.loc[site.split.val, "label"].to_numpy(int),
                      minlength=2)
    assert unfit_validation(site) is None
    site.cfg.data.min_cell = int(val.min()) + 1  # one more than its smaller class
    why = unfit_validation(site)
    assert why == {"code": "validation_too_small", "class_counts": [int(val[0]), int(val[1])],
                   "min_cell": int(val.min()) + 1}
    state = tmp_path / "s"
    c = personalise(site, weights, pre, counts, federation_threshold=0.41,
                    privacy=site.cfg.privacy, state_dir=state, run_id="r", seed=0)
    assert c.refusal is None and c.selected["kept"] == "global"
    assert c.thresholds == {"global": 0.41, "personal": 0.41}
    assert c.metrics["personal"] == c.metrics["global"]
    kept, _ = PersonalStore(state, "r").selected()
    np.testing.assert_array_equal(_flat(kept), _flat(weights))
    assert comparison_from_metrics(comparison_to_metrics(c, secure=True))["kept_global"]
    # Ditto trains no personal model there (a DP site would spend nothing on it)
    out = ditto_round(site, weights, pre, counts, server_round=1, privacy=site.cfg.privacy,
                      state_dir=state, run_id="d", seed=1)
    assert not out.trained and out.refusal == why
    assert PersonalStore(state, "d").current() is None
