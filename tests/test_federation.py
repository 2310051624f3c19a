"""Federated SAFN: partitioners, the statistics round, min_cell, and real Flower simulations."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safn_core.config import load_config
from safn_core.federation.aggregate import global_preprocessing, round_metrics
from safn_core.federation.checkpoint import load_checkpoint
from safn_core.federation.partition import partition
from safn_core.federation.site import Site, SmallCell
from safn_core.metrics import binary_metrics, score_histogram
from safn_core.preprocess import Preprocessor
from tests.helpers import toy_cohort

BIN = Path(sys.executable).parent


@pytest.fixture
def cohort(tmp_path):
    return toy_cohort(tmp_path, n=400)


@pytest.mark.parametrize("scheme", ["natural", "iid", "dirichlet", "size_skew"])
def test_partitioners_keep_every_participant_exactly_once(cohort, scheme):
    parts = partition(cohort, scheme, 4, alpha=0.3, size_alpha=0.5, seed=3)
    everyone = np.concatenate(list(parts.values()))
    assert len(everyone) == len(cohort) and set(everyone) == set(cohort.ids)
    again = partition(cohort, scheme, 4, alpha=0.3, size_alpha=0.5, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_dirichlet_skews_labels_and_natural_follows_site_column(cohort):
    skewed = partition(cohort, "dirichlet", 4, alpha=0.1, seed=0)
    y = dict(zip(cohort.ids, cohort.y))
    shares = [np.mean([y[i] for i in ids]) for ids in skewed.values() if len(ids) > 10]
    assert max(shares) - min(shares) > 0.3
    natural = partition(cohort, "natural")
    assert set(natural) == {"site_A", "site_B", "site_C"}


def test_statistics_round_reproduces_pooled_mean_and_sd(cohort):
    cfg = load_config(None)
    sites = [Site(n, cohort.subset(ids), cfg) for n, ids in partition(cohort, "iid", 3).items()]
    described = [s.describe() for s in sites]
    pre, counts = global_preprocessing(cohort.modalities, [d[0] for d in described],
                                       [d[1] for d in described])
    train_ids = np.concatenate([s.split.train for s in sites])
    pooled = Preprocessor(cohort.modalities).fit(cohort.table.loc[train_ids])
    np.testing.assert_allclose(pre.mean_, pooled.mean_, rtol=1e-12)
    np.testing.assert_allclose(pre.scale_, pooled.scale_, rtol=1e-10)
    assert counts == np.bincount(cohort.table.loc[train_ids, "label"], minlength=2).tolist()


def test_site_with_too_few_of_a_class_withholds(cohort):
    cfg = load_config(None, ["data.min_cell=5"])
    hc = cohort.ids[cohort.y == 0][:4]
    pd_ids = cohort.ids[cohort.y == 1][:40]
    site = Site("tiny", cohort.subset(np.concatenate([hc, pd_ids])), cfg)
    with pytest.raises(SmallCell, match="min_cell = 5"):
        site.describe()
    big = Site("big", cohort, cfg)
    stats, _ = big.describe()
    pre, _ = global_preprocessing(cohort.modalities, [stats], [[1, 1]])
    from safn_core.training.local import make_model
    from safn_core.federation.site import state_to_numpy
    weights = state_to_numpy(make_model(cohort.modalities, cfg.model, 0))
    res = site.evaluate(weights, pre, cfg.model, 100)
    assert res["test_withheld"] and res["test"].sum() == 0


def test_pooled_metrics_from_site_histograms_match_sklearn():
    rng = np.random.default_rng(0)
    sites, ys, ps = {}, [], []
    for i in range(4):
        y = (rng.random(150) < 0.7).astype(int)
        p = np.clip(rng.normal(0.4 + 0.3 * y, 0.2), 0, 1)
        ys.append(y), ps.append(p)
        sites[f"s{i}"] = {"val": score_histogram(y, p), "test": score_histogram(y, p),
                          "val_withheld": False, "test_withheld": False}
    res = round_metrics(sites)
    y, p = np.concatenate(ys), np.concatenate(ps)
    exact = binary_metrics(y, p, res["threshold"])
    for k in ("roc_auc", "pr_auc_pd", "balanced_accuracy", "mcc"):
        assert res["pooled"][k] == pytest.approx(exact[k], abs=3e-3), k
    site_auc_mean = np.mean([m["roc_auc"] for m in res["sites"].values()])
    assert res["pooled"]["roc_auc"] != pytest.approx(site_auc_mean, abs=1e-9)


SMALL = ["--set", "synth.n_pd=90", "--set", "synth.n_hc=60", "--set", "synth.n_without_mri=0",
         "--set", "synth.n_swedd=0", "--set", "synth.n_prodromal=0", "--set", "synth.n_sites=3",
         "--set", "synth.min_site_size=30", "--set", "model.d_model=16", "--set",
         "model.n_heads=2", "--set", "model.encoder_hidden=16", "--set", "model.ffn_hidden=16",
         "--set", "model.head_hidden=16", "--set", "federation.local_epochs=1"]


def sim(args, timeout=300):
    proc = subprocess.run([str(BIN / "safn-sim"), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def fedadam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = sim(["--out", str(out), *SMALL, "--set", "federation.rounds=4",
                "--set", "federation.strategy=fedadam", "--set", "simulation.compare=true"])
    return out, proc


def test_simulation_end_to_end_through_flower(fedadam_run):
    out, proc = fedadam_run
    assert "round   4/4" in proc.stdout and "federated" in proc.stdout
    assert "best local-only" in proc.stdout
    state = load_checkpoint(out)
    assert state.round == 4 and len(state.history) == 4
    assert set(state.strategy_state) == {"m_t", "v_t"}  # FedAdam's moments are checkpointed
    assert all(np.isfinite(v).all() for v in state.weights.values())
    from safn_core.bundle import load_bundle
    bundle = load_bundle(out / "model")
    assert bundle.meta["kind"] == "federated" and bundle.meta["training"]["rounds"] == 4
    comparison = json.loads((out / "comparison.json").read_text())
    kinds = {r["kind"] for r in comparison}
    assert {"pooled", "federated", "local", "best-local"} <= kinds
    assert "INFO" not in proc.stdout  # Flower's log flood is kept out of the user's view


def test_resume_gives_the_same_final_model(fedadam_run, tmp_path):
    out, _ = fedadam_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    for r in (3, 4):  # the coordinator died after round 2
        for ext in (".json", ".npz"):
            (resumed / "checkpoints" / f"round_{r:04d}{ext}").unlink()
    (resumed / "checkpoints" / "latest.json").write_text(
        json.dumps({"round": 2, "stem": "round_0002"}))
    proc = sim(["--resume", str(resumed)])
    assert "resuming after round 2" in (resumed / "progress.log").read_text()
    a, b = load_checkpoint(out), load_checkpoint(resumed)
    assert b.round == 4 and [h["round"] for h in b.history] == [1, 2, 3, 4]
    for k in a.weights:
        np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-5, atol=1e-6)
    assert "round   3/4" in proc.stdout


def test_existing_run_folder_is_not_overwritten(fedadam_run):
    out, _ = fedadam_run
    proc = subprocess.run([str(BIN / "safn-sim"), "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
