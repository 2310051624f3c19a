"""Federated SAFN without Flower: partitions, splits, statistics round, pooled metrics, small
cells, server updates, checkpoints and resume (the in-process reference loop over the same
functions, `tests/reference_loop.py`)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from safn_core.config import load_config
from safn_core.errors import ConfigError, DataError
from safn_core.federation.aggregate import global_preprocessing, round_metrics, weighted_mean
from safn_core.federation.protocol import modalities_from_record, modalities_to_record
from safn_core.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from safn_core.federation.sampling import sample_sites
from safn.simulations.partition import partition, summary
from safn_core.federation.site import Site, SmallCell, split_participants
from safn_core.metrics import binary_metrics, metrics_from_histogram, score_histogram
from safn_core.preprocess import Preprocessor
from tests.helpers import SMALL_MODEL, toy_cohort, truncate_checkpoints
from tests.reference_loop import ServerOptimizer, run_in_process

SMALL = SMALL_MODEL


def cfg_of(*extra):
    return load_config(None, SMALL + list(extra))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return toy_cohort(tmp_path_factory.mktemp("toy"), n=400)


def sites_of(cohort, scheme="natural", n=3, **kw):
    return {k: cohort.subset(v) for k, v in partition(cohort, scheme, n, **kw).items()}


# ------------------------------------------------------------------ partitions and splits


@pytest.mark.parametrize("scheme", ["natural", "iid", "dirichlet", "size_skew"])
def test_partitions_keep_every_participant_exactly_once(cohort, scheme):
    parts = partition(cohort, scheme, 4, alpha=0.3, size_alpha=0.5, seed=3)
    allocated = np.concatenate(list(parts.values()))
    assert len(allocated) == len(cohort)
    assert sorted(allocated) == sorted(cohort.ids)
    table = summary(cohort, parts)
    assert table.participants.sum() == len(cohort)
    assert table.PD.sum() == int(cohort.y.sum())
    assert partition(cohort, scheme, 4, alpha=0.3, size_alpha=0.5, seed=3).keys() == parts.keys()


def test_natural_partition_follows_site_column(cohort):
    parts = partition(cohort, "natural")
    assert sorted(parts) == ["site_A", "site_B", "site_C"]
    for name, ids in parts.items():
        assert set(cohort.table.loc[ids, "site"]) == {name.removeprefix("site_")}


def test_dirichlet_skews_labels_and_iid_does_not(cohort):
    share = lambda parts: [cohort.table.loc[ids, "label"].mean() for ids in parts.values()]
    iid = share(partition(cohort, "iid", 4, seed=0))
    skew = share(partition(cohort, "dirichlet", 4, alpha=0.2, seed=0))
    assert np.ptp(iid) < 0.05 < np.ptp(skew)


def test_bad_partition_settings_are_config_errors(cohort):
    one_site = cohort.subset(cohort.table.index[cohort.table.site == "A"])
    with pytest.raises(ConfigError, match="at least two"):
        partition(one_site, "natural")
    with pytest.raises(ConfigError, match="unknown"):
        partition(cohort, "weird", 3)


def test_site_split_is_by_participant_stratified_and_seeded(cohort):
    s = split_participants(cohort.ids, cohort.y, 0.15, 0.2, seed=4)
    parts = [set(s.train), set(s.val), set(s.test)]
    assert sum(map(len, parts)) == len(cohort) and set.union(*parts) == set(cohort.ids)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    rate = cohort.table.label.mean()
    for ids in (s.train, s.val, s.test):
        assert abs(cohort.table.loc[ids, "label"].mean() - rate) < 0.05
    again = split_participants(cohort.ids, cohort.y, 0.15, 0.2, seed=4)
    assert np.array_equal(again.test, s.test)


# ------------------------------------------------------------------ statistics round


def test_statistics_round_reproduces_pooled_mean_and_sd(cohort):
    cfg = cfg_of("data.min_cell=1")
    sites = [Site(k, c, cfg) for k, c in sites_of(cohort).items()]
    described = [s.describe() for s in sites]
    pre, counts = global_preprocessing(cohort.modalities, [d[0] for d in described],
                                       [d[1] for d in described])
    train = cohort.table.loc[np.concatenate([s.split.train for s in sites])]
    central = Preprocessor(cohort.modalities).fit(train)
    np.testing.assert_allclose(pre.mean_, central.mean_, rtol=1e-12)
    np.testing.assert_allclose(pre.scale_, central.scale_, rtol=1e-10)
    np.testing.assert_allclose(pre.mean_, train[cohort.features].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(pre.scale_, train[cohort.features].std(ddof=1).to_numpy(),
                               rtol=1e-10)
    assert counts == np.bincount(train.label, minlength=2).tolist()


def test_modality_structure_travels_as_flat_lists(cohort):
    rec = modalities_to_record(cohort.modalities)
    assert all(isinstance(v, list) for v in rec.values())
    assert modalities_from_record(rec) == cohort.modalities


# ------------------------------------------------------------------ small cells


def test_site_refuses_statistics_of_a_small_class(cohort):
    ids = cohort.table.index[(cohort.table.site == "A")]
    hc = [i for i in ids if cohort.table.at[i, "label"] == 0][:4]
    tiny = cohort.subset(list(hc) + [i for i in ids if cohort.table.at[i, "label"] == 1])
    site = Site("tiny", tiny, cfg_of("data.min_cell=5"))
    with pytest.raises(SmallCell, match="fewer than min_cell = 5"):
        site.describe()


def test_rarely_observed_feature_is_withheld(cohort):
    site = Site("A", cohort.subset(cohort.table.index[cohort.table.site == "A"]),
                cfg_of("data.min_cell=5"))
    train = site.split.train
    site.cohort.table.loc[train, "cl_1"] = np.nan
    site.cohort.table.loc[train[:3], "cl_1"] = 1.0  # observed in 3 people < min_cell
    stats, _ = site.describe()
    j = stats.features.index("cl_1")
    assert stats.count[j] == 0 and stats.total[j] == 0 and stats.total_sq[j] == 0
    assert stats.count[stats.features.index("cl_0")] > 0


def test_evaluation_withholds_small_splits_and_pooled_metrics_skip_them(cohort):
    cfg = cfg_of("data.min_cell=1")
    sites = {k: Site(k, c, cfg) for k, c in sites_of(cohort).items()}
    stats = [s.describe() for s in sites.values()]
    pre, _ = global_preprocessing(cohort.modalities, [s[0] for s in stats], [s[1] for s in stats])
    from safn_core.training.local import make_model
    from safn_core.federation.site import state_to_numpy

    weights = state_to_numpy(make_model(cohort.modalities, cfg.model, 0))
    hists = {k: s.evaluate(weights, pre, cfg.model, 100) for k, s in sites.items()}
    assert not any(h["withheld"] for h in hists.values())
    sites["site_A"].cfg = cfg_of("data.min_cell=1000")
    hists["site_A"] = sites["site_A"].evaluate(weights, pre, cfg.model, 100)
    assert hists["site_A"]["withheld"] and hists["site_A"]["test"].sum() == 0
    out = round_metrics(hists)
    assert out["sites"]["site_A"] is None and out["sites_withheld"] == ["site_A"]
    assert out["sites_reported"] == 2
    assert out["n_test"] == sum(h["test"].sum() for k, h in hists.items() if k != "site_A")


# ------------------------------------------------------------------ pooled metrics


def test_pooled_auc_from_summed_histograms_matches_sklearn():
    rng = np.random.default_rng(0)
    ys, ps, hists = [], [], []
    for shift in (0.0, 0.5, -0.3):  # three sites with different score distributions
        y = (rng.random(300) < 0.7).astype(int)
        p = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.2 * y + shift)))
        ys.append(y), ps.append(p), hists.append(score_histogram(y, p, 1000))
    y, p = np.concatenate(ys), np.concatenate(ps)
    pooled = metrics_from_histogram(sum(hists), threshold=0.5)
    assert abs(pooled["roc_auc"] - roc_auc_score(y, p)) < 2e-3
    assert abs(pooled["pr_auc_pd"] - average_precision_score(y, p)) < 5e-3
    assert abs(pooled["pr_auc_hc"] - average_precision_score(1 - y, 1 - p)) < 5e-3
    exact = binary_metrics(y, p, 0.5)  # threshold on a bin edge: confusion counts are exact
    for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1", "mcc"):
        assert pooled[k] == pytest.approx(exact[k], abs=1e-12)
    assert pooled["brier"] == pytest.approx(exact["brier"], abs=1e-3)
    site_mean_auc = np.mean([roc_auc_score(a, b) for a, b in zip(ys, ps)])
    assert abs(site_mean_auc - roc_auc_score(y, p)) > 0.01  # why histograms, not mean AUCs


# ------------------------------------------------------------------ server updates


def test_fedavg_is_the_examples_weighted_mean():
    a, b = {"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([3.0, 6.0], np.float32)}
    out = weighted_mean([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_matches_flowers_strategy(name, monkeypatch):
    """The loop's FedAdam/FedYogi step is Flower's (its weighted mean stubbed: no Messages)."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

    rng = np.random.default_rng(1)
    current = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    flower = {"fedadam": FedAdam, "fedyogi": FedYogi}[name](eta=0.05, tau=1e-3, beta_1=0.9,
                                                           beta_2=0.99)
    ours = ServerOptimizer(name, 0.05, 1e-3, 0.9, 0.99)
    for r in (1, 2, 3):
        updates = [({"w": current["w"] + rng.normal(size=(3, 2)).astype(np.float32)}, n)
                   for n in (10, 30)]
        avg = weighted_mean(updates)["w"]
        monkeypatch.setattr(FedAvg, "aggregate_train",
                            lambda self, rnd, replies: (ArrayRecord({"w": Array(avg)}), None))
        flower.current_arrays = {k: v.copy() for k, v in current.items()}
        got, _ = flower.aggregate_train(r, [])
        mine = ours.step(r, current, updates)
        np.testing.assert_allclose(mine["w"], got["w"].numpy(), rtol=1e-6)
        current = mine
    assert set(ours.get_state()) == {"m_t", "v_t"}


def test_round_sampling_is_seeded_per_round():
    names = [f"s{i}" for i in range(10)]
    assert sample_sites(names, 0.3, 2, 0, 5) == sample_sites(list(reversed(names)), 0.3, 2, 0, 5)
    assert len(sample_sites(names, 0.3, 2, 0, 5)) == 3
    assert len(sample_sites(names, 0.05, 2, 0, 5)) == 2
    assert sample_sites(names, 1.0, 2, 0, 1) == sorted(names)


# ------------------------------------------------------------------ checkpoints and resume


def test_checkpoints_are_never_overwritten(tmp_path):
    state = RunState(1, {"w": np.zeros(2, np.float32)}, {"mean": [0.0]}, [1, 2],
                     {"m_t": {"w": np.ones(2)}}, [{"round": 1}], {"0": "site_A"})
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back.round == 1 and back.class_counts == [1, 2] and back.sites == {"0": "site_A"}
    np.testing.assert_array_equal(back.strategy_state["m_t"]["w"], np.ones(2))
    with pytest.raises(DataError, match="never overwritten"):
        save_checkpoint(tmp_path, state)
    (tmp_path / "checkpoints" / "round_0001.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="damaged"):
        load_checkpoint(tmp_path)


def truncate_run(src, dst, keep_round: int) -> None:
    """A copy of a run folder as if it had stopped after ``keep_round``."""
    shutil.copytree(src, dst)
    truncate_checkpoints(dst, keep_round)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_gives_the_same_model_as_an_uninterrupted_run(cohort, tmp_path, strategy):
    cfg = cfg_of("federation.rounds=4", f"federation.strategy={strategy}")
    sites = sites_of(cohort)
    full = run_in_process(sites, cfg, tmp_path / "full", report=lambda s: None)
    truncate_run(tmp_path / "full", tmp_path / "resumed", 2)
    lines = []
    resumed = run_in_process(sites, cfg, tmp_path / "resumed", report=lines.append)
    assert [line.split()[1] for line in lines] == ["3/4", "4/4"]
    assert resumed.round == full.round == 4
    for k in full.weights:
        np.testing.assert_array_equal(resumed.weights[k], full.weights[k])
    # round 0: the logistic regression floor SAFN's wide path starts from, evaluated untrained
    assert [e["round"] for e in resumed.history] == [0, 1, 2, 3, 4]
    assert resumed.history[-1]["pooled"] == full.history[-1]["pooled"]


def test_federated_training_learns(cohort):
    """From random weights (the paper's SAFN: no wide path, one member) the federation learns;
    the default model starts at the logistic regression floor instead (round 0)."""
    state = run_in_process(sites_of(cohort), cfg_of("federation.rounds=5", "train.lr=0.005",
                                                    "model.wide=off", "model.ensemble_size=1"),
                           report=lambda s: None)
    assert [e["round"] for e in state.history] == [1, 2, 3, 4, 5]
    assert state.history[-1]["pooled"]["roc_auc"] > 0.8
    assert state.history[-1]["pooled"]["roc_auc"] > state.history[0]["pooled"]["roc_auc"]
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    df = pd.DataFrame([e["pooled"] for e in state.history])
    assert df.roc_auc.notna().all()


def test_a_site_that_withholds_its_statistics_takes_no_part(cohort):
    sites = sites_of(cohort)
    a = sites["site_A"].table
    keep = list(a.index[a.label == 1]) + list(a.index[a.label == 0][:3])
    sites["site_A"] = cohort.subset(keep)  # 3 HC: below min_cell = 5
    lines = []
    state = run_in_process(sites, cfg_of("federation.rounds=1", "data.min_cell=5"),
                           report=lines.append)
    assert "site site_A withheld its statistics" in lines[0]
    assert set(state.history[0]["sites"]) == {"site_B", "site_C"}
    assert sum(state.class_counts) < sum(len(s.table) for s in sites.values()) * 0.8


def test_plain_evaluation_replies_have_the_same_keys_whether_withheld_or_not():
    """Flower refuses to aggregate metric records whose keys differ: a site below min_cell and
    a site above it send the same keys, and the coordinator reads the loss sum only from the
    second."""
    from safn_core.federation.protocol import evaluation_from_metrics, evaluation_to_metrics

    hist = np.ones((2, 10), dtype=np.int64)
    full = {"val": hist, "test": hist, "withheld": False, "val_loss_sum": 3.5, "val_examples": 20}
    small = {"val": np.zeros_like(hist), "test": hist, "withheld": True}
    a, b = evaluation_to_metrics(full), evaluation_to_metrics(small)
    assert set(a) == set(b)
    back = evaluation_from_metrics(a)
    assert back["val_loss_sum"] == 3.5 and back["val_examples"] == 20 and not back["withheld"]
    np.testing.assert_array_equal(back["test"], hist)
    assert evaluation_from_metrics(b)["val_examples"] == 0
