"""K-class metrics (issue #32): hand-checked values, agreement with scikit-learn, federated
metrics from per-class histograms and confusion counts equal to the pooled computation, min_cell
per class, the majority baseline, and a 3-class site's evaluation through the coordinator's
plain and secure paths."""

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from safn_core.config import FederationConfig, load_config
from safn_core.federation.aggregate import (global_preprocessing, held_out_metrics,
                                            round_metrics, secure_round_metrics)
from safn_core.federation.secure_records import evaluate_packing, evaluate_values
from safn_core.federation.site import Site, state_to_numpy
from safn_core.multiclass import (bootstrap_ci_multiclass, class_score_histogram,
                                  confusion_counts, fit_cutpoints, metrics_from_class_histograms,
                                  multiclass_metrics, predict_classes, qwk_from_confusion,
                                  summarise_multiclass, withhold_small_classes)
from safn_core.targets import HC_PRODROMAL_PD
from tests.helpers import SMALL_MODEL, toy_cohort

NAMES = ["HC", "Prodromal", "PD"]
SCALARS = ("roc_auc", "pr_auc", "balanced_accuracy", "accuracy", "macro_f1", "qwk", "mae")


def probs_predicting(pred, K=3):
    """Rows of 0.2 with 0.6 at the predicted class (argmax = ``pred``)."""
    P = np.full((len(pred), K), 0.4 / (K - 1))
    P[np.arange(len(pred)), pred] = 0.6
    return P


def noisy(n=300, seed=0, K=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    P = rng.dirichlet(np.ones(K), n)
    P[np.arange(n), y] += 0.6
    return y, P / P.sum(1, keepdims=True)


# ------------------------------------------------------------------ hand-checked


def test_hand_checked_confusion_qwk_mae_balanced_accuracy():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = multiclass_metrics(y, probs_predicting(pred), True, NAMES)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["mae"] == pytest.approx(3 / 6)  # |1-0| + |0-2|
    # Σ W·O = 1/4 + 1 = 1.25, Σ W·E = 1.75 (margins 2,2,2 and 2,3,1): κ = 1 - 5/7
    assert m["qwk"] == pytest.approx(2 / 7)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["per_class"]["Prodromal"]["recall"] == 1.0
    assert m["per_class"]["Prodromal"]["precision"] == pytest.approx(2 / 3)
    unordered = multiclass_metrics(y, probs_predicting(pred), False, NAMES)
    assert unordered["qwk"] is None and unordered["mae"] is None


def test_majority_baseline():
    y = np.array([0, 0, 1, 1, 2, 2])
    P = probs_predicting(y)
    m = multiclass_metrics(y, P, True, NAMES)["majority"]
    assert m["class"] == 0  # a tie goes to the lower class
    assert m["balanced_accuracy"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(1 / 3)
    assert m["mae"] == pytest.approx(1.0) and m["qwk"] == 0.0 and m["roc_auc"] == 0.5
    by_training = multiclass_metrics(y, P, True, NAMES, majority_class=1)["majority"]
    assert by_training["mae"] == pytest.approx(4 / 6)


def test_agrees_with_sklearn_and_absent_classes_are_left_out():
    y, P = noisy()
    m = multiclass_metrics(y, P, True, NAMES)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    pred = P.argmax(1)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert qwk_from_confusion(m["confusion"]) == pytest.approx(m["qwk"])
    assert m["pr_auc"] == pytest.approx(np.mean([average_precision_score(y == j, P[:, j])
                                                 for j in range(3)]))
    keep = y != 1  # no prodromal participant
    m2 = multiclass_metrics(y[keep], P[keep], True, NAMES)
    assert m2["per_class"]["Prodromal"]["roc_auc"] is None
    assert m2["per_class"]["Prodromal"]["n"] == 0
    assert m2["roc_auc"] == pytest.approx(np.mean([m2["per_class"][c]["roc_auc"]
                                                   for c in ("HC", "PD")]))


def test_cutpoints_on_the_expected_class():
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.4, 0.2, 0.4]])
    assert predict_classes(P).tolist() == [0, 1, 2, 0]
    assert predict_classes(P, cutpoints=[0.5, 1.5]).tolist() == [0, 1, 2, 1]  # E = 1.0
    with pytest.raises(ValueError):
        predict_classes(P, cutpoints=[1.5, 0.5])
    # scores biased towards class 0: cutpoints fitted on validation recover the kappa
    y, P = noisy(400, 1)
    shifted = P * np.array([3.0, 1.0, 1.0])
    shifted /= shifted.sum(1, keepdims=True)
    cut = fit_cutpoints(y, shifted)
    assert len(cut) == 2 and cut[0] < cut[1]
    mid = multiclass_metrics(y, shifted, True, NAMES, cutpoints=[0.5, 1.5])["qwk"]
    assert multiclass_metrics(y, shifted, True, NAMES, cutpoints=cut)["qwk"] >= mid


def test_summary_and_bootstrap():
    rows = [multiclass_metrics(*noisy(200, s), True, NAMES) for s in range(3)]
    s = summarise_multiclass(rows)
    assert s["qwk"]["n"] == 3 and s["roc_auc"]["mean"] == pytest.approx(
        np.mean([r["roc_auc"] for r in rows]))
    assert s["majority_balanced_accuracy"]["mean"] == pytest.approx(1 / 3)
    y, P = noisy(200, 4)
    ci = bootstrap_ci_multiclass(y, P, n_boot=300, seed=1)
    m = multiclass_metrics(y, P, True, NAMES)
    for k in ("roc_auc", "balanced_accuracy", "qwk"):
        assert ci[k][0] <= m[k] <= ci[k][1]
    assert ci == bootstrap_ci_multiclass(y, P, n_boot=300, seed=1)


# ------------------------------------------------------------------ federated


def constructed(seed=0):
    """Three sites whose scores come from a few probability vectors, no two different values of
    a class's score in one bin of 1000: the histogram AUCs are exact."""
    templates = np.array([[0.62, 0.25, 0.13], [0.30, 0.51, 0.19], [0.11, 0.27, 0.62],
                          [0.41, 0.38, 0.21], [0.18, 0.44, 0.38], [0.233, 0.297, 0.47]])
    for j in range(3):
        col = np.unique(templates[:, j])
        assert len(np.unique((col * 1000).astype(int))) == len(col)
    rng = np.random.default_rng(seed)
    out = []
    for n in (80, 120, 60):
        y = rng.integers(0, 3, n)
        pick = np.where(rng.random(n) < 0.6, np.array([0, 1, 2])[y], rng.integers(0, 6, n))
        out.append((y, templates[pick]))
    return out


def test_federated_metrics_equal_the_pooled_computation():
    parts = constructed()
    hist = sum(class_score_histogram(y, P, 3, 1000) for y, P in parts)
    conf = sum(confusion_counts(y, P, 3) for y, P in parts)
    assert hist.shape == (3, 3, 1000) and conf.shape == (3, 3)
    fed = metrics_from_class_histograms(hist, conf, True, NAMES)
    y = np.concatenate([p[0] for p in parts])
    P = np.concatenate([p[1] for p in parts])
    pooled = multiclass_metrics(y, P, True, NAMES)
    for k in SCALARS:
        assert fed[k] == pytest.approx(pooled[k], abs=1e-12), k
    assert fed["confusion"] == pooled["confusion"]
    assert fed["majority"] == pooled["majority"]
    for c in NAMES:
        for k in ("roc_auc", "pr_auc", "recall", "precision", "n"):
            assert fed["per_class"][c][k] == pytest.approx(pooled["per_class"][c][k], abs=1e-12)
    assert fed["brier"] == pytest.approx(pooled["brier"], abs=2e-3)  # bin centres
    assert fed["log_loss"] == pytest.approx(pooled["log_loss"], abs=5e-3)


def site_entry(y, P, bins=1000):
    return {"val": class_score_histogram(y, P, 3, bins), "test": class_score_histogram(y, P, 3, bins),
            "val_confusion": confusion_counts(y, P, 3), "test_confusion": confusion_counts(y, P, 3),
            "withheld": False, "val_loss_sum": 1.0, "val_examples": len(y)}


def test_round_metrics_for_three_classes_from_summed_sites():
    parts = constructed(1)
    hists = {f"s{i}": site_entry(y, P) for i, (y, P) in enumerate(parts)}
    out = round_metrics(hists, HC_PRODROMAL_PD)
    y = np.concatenate([p[0] for p in parts])
    P = np.concatenate([p[1] for p in parts])
    pooled = multiclass_metrics(y, P, True, NAMES)
    assert out["decision_rule"] == "argmax" and "threshold" not in out
    assert out["pooled"]["roc_auc"] == pytest.approx(pooled["roc_auc"], abs=1e-12)
    assert out["pooled"]["qwk"] == pytest.approx(pooled["qwk"], abs=1e-12)
    assert out["val_roc_auc"] == pytest.approx(pooled["roc_auc"], abs=1e-12)
    assert out["val_loss"] == pytest.approx(3 / len(y))
    assert out["n_test"] == len(y) and out["sites_reported"] == 3
    assert out["sites"]["s0"]["roc_auc"] == pytest.approx(
        multiclass_metrics(*parts[0], True, NAMES)["roc_auc"], abs=1e-12)
    lo, hi = out["pooled_ci"]["qwk"]
    assert lo <= pooled["qwk"] <= hi and out["pooled_ci"]["roc_auc"] is None
    ext = held_out_metrics({"x": hists["s0"]}, 0.5, HC_PRODROMAL_PD)
    assert ext["x"]["qwk"] == pytest.approx(out["sites"]["s0"]["qwk"])


def test_min_cell_per_class_on_federation_wide_counts():
    y, P = noisy(120, 2)
    keep = (y != 1) | (np.arange(len(y)) < 40)
    keep &= ~((y == 1) & (np.cumsum(y == 1) > 3))  # 3 prodromal participants in all
    y, P = y[keep], P[keep]
    counts = np.bincount(y, minlength=3)
    assert counts[1] == 3
    m = metrics_from_class_histograms(class_score_histogram(y, P, 3, 100),
                                      confusion_counts(y, P, 3), True, NAMES)
    w = withhold_small_classes(m, counts, 5)
    assert all(w[k] is None for k in ("roc_auc", "balanced_accuracy", "qwk", "mae",
                                      "confusion", "majority"))
    assert w["per_class"]["Prodromal"] is None and w["withheld"] == ["Prodromal"]
    assert w["per_class"]["HC"]["roc_auc"] == m["per_class"]["HC"]["roc_auc"]
    assert "min_cell = 5" in w["withheld_note"]
    assert withhold_small_classes(m, counts, 3) is m  # nothing small: unchanged
    assert withhold_small_classes(m, [50, 0, 60], 5) is m  # an absent class describes no one
    # the secure path applies it to the summed counts
    sums = {"val": class_score_histogram(y, P, 3, 100), "test": class_score_histogram(y, P, 3, 100),
            "val_confusion": confusion_counts(y, P, 3), "test_confusion": confusion_counts(y, P, 3),
            "val_loss_sum": 10.0, "val_examples": len(y), "sites": 2}
    out = secure_round_metrics(sums, {"a": None, "b": None}, 5, ["a", "b"], HC_PRODROMAL_PD)
    assert out["pooled"]["roc_auc"] is None and out["pooled"]["per_class"]["PD"] is not None
    assert "val_roc_auc" not in out and "pooled_ci" not in out and out["n_test"] == 0
    ok = secure_round_metrics(sums, {"a": None, "b": None}, 3, ["a", "b"], HC_PRODROMAL_PD)
    assert ok["pooled"]["roc_auc"] == pytest.approx(m["roc_auc"]) and "val_roc_auc" in ok


def test_evaluate_packing_binary_unchanged_and_k_class_round_trip():
    fed = FederationConfig()
    binary = evaluate_packing(50, fed, 3)
    assert binary.names == ("val", "test", "val_loss_sum", "val_examples", "sites")
    assert binary.field("val").shape == (2, 50)
    packing = evaluate_packing(50, fed, 3, n_classes=3)
    y, P = noisy(90, 3)
    res = site_entry(y, P, 50)
    decoded = packing.decode(packing.encode(evaluate_values(res)).vector)
    for k in ("val", "test", "val_confusion", "test_confusion"):
        assert np.array_equal(decoded[k], res[k])


# ------------------------------------------------------------------ a 3-class site


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """The toy cohort with a third of its PD participants relabelled prodromal (0 HC,
    1 prodromal, 2 PD)."""
    cohort = toy_cohort(tmp_path_factory.mktemp("toy3"), n=400)
    table = cohort.table.copy()
    pd_rows = np.flatnonzero(table["label"].to_numpy() == 1)
    label = table["label"].to_numpy() * 2
    label[pd_rows[::3]] = 1
    table["label"] = label
    return replace(cohort, table=table, label_names=tuple(HC_PRODROMAL_PD.classes),
                   target=HC_PRODROMAL_PD)


def test_a_three_class_site_evaluates_and_the_coordinator_pools(three_class):
    from safn_core.training.local import make_model, predict

    cfg = load_config(None, SMALL_MODEL + ["data.min_cell=1"])
    sites = {s: Site(s, three_class.subset(three_class.table.index[three_class.table.site == s]),
                     cfg) for s in ("A", "B")}
    described = [s.describe() for s in sites.values()]
    pre, _ = global_preprocessing(three_class.modalities, [d[0] for d in described],
                                  [d[1] for d in described])
    model = make_model(three_class.modalities, cfg.model, 0, target=HC_PRODROMAL_PD)
    weights = state_to_numpy(model)
    res = {k: s.evaluate(weights, pre, cfg.model, 200) for k, s in sites.items()}
    for r in res.values():
        assert r["test"].shape == (3, 3, 200) and r["test_confusion"].shape == (3, 3)
        assert r["val_loss_sum"] > 0 and not r["withheld"]
    # the site's counts are its test split's scores, binned
    site = sites["A"]
    data = site.arrays(pre, "test")
    P, _ = predict(model, data)
    assert np.array_equal(res["A"]["test_confusion"], confusion_counts(data.y, P, 3))
    assert np.array_equal(res["A"]["test"], class_score_histogram(data.y, P, 3, 200))
    out = round_metrics(res, HC_PRODROMAL_PD)
    assert set(SCALARS) <= set(out["pooled"]) and "val_roc_auc" in out and "val_loss" in out
    assert out["n_test"] == sum(len(s.split.test) for s in sites.values())
    # secure: the same values summed inside the masked vector's packing
    packing = evaluate_packing(200, cfg.federation, 2, n_classes=3)
    vectors = [packing.encode(evaluate_values(s.evaluate(weights, pre, cfg.model, 200,
                                                         withhold=False))).vector
               for s in sites.values()]
    summed = packing.decode(sum(vectors))
    secure = secure_round_metrics(summed, {k: None for k in sites}, 1, list(sites),
                                  HC_PRODROMAL_PD)
    assert secure["pooled"]["qwk"] == pytest.approx(out["pooled"]["qwk"])
    assert secure["val_roc_auc"] == pytest.approx(out["val_roc_auc"])
    # a site short of a class withholds both splits
    site.cfg = load_config(None, SMALL_MODEL + ["data.min_cell=1000"])
    small = site.evaluate(weights, pre, cfg.model, 200)
    assert small["withheld"] and small["test"].sum() == 0 and small["test_confusion"].sum() == 0
