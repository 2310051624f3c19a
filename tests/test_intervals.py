"""95 % intervals beside every figure of the comparison tables (issue #27): the vectorised
bootstraps, the pooled intervals of a federated round, and how the tables render and store them."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from safn_core.metrics import (METRICS, _count_metrics, binary_metrics, bootstrap_ci,
                               bootstrap_histogram_ci, interval_lists, metrics_from_histogram,
                               score_histogram, threshold_from_histogram)
from safn_core.report import Report, interval_text


def scores(n: int, seed: int = 0, prevalence: float = 0.6, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1)
    return y, (np.round(p, 1) if ties else p)


# ------------------------------------------------------------------ the bootstraps


@pytest.mark.parametrize("ties", [False, True])
def test_counts_per_score_value_give_exactly_the_metric_set(ties):
    """One draw of the vectorised core is `binary_metrics` (scikit-learn) on distinct scores and
    `metrics_from_histogram` on histogram bins, ties included."""
    y, p = scores(240, seed=4, ties=ties)
    values, inv = np.unique(p, return_inverse=True)
    neg = np.bincount(inv[y == 0], minlength=len(values))[None]
    pos = np.bincount(inv[y == 1], minlength=len(values))[None]
    for t in (0.35, 0.5, 0.62):
        got = _count_metrics(neg, pos, values >= t, values)
        want = binary_metrics(y, p, t)
        for k in METRICS:
            assert got[k][0] == pytest.approx(want[k], abs=1e-12), k
    hist = score_histogram(y, p)
    t = threshold_from_histogram(hist)
    bins = hist.shape[1]
    got = _count_metrics(hist[0][None], hist[1][None], np.arange(bins) >= round(t * bins),
                         (np.arange(bins) + 0.5) / bins)
    want = metrics_from_histogram(hist, t)
    for k in METRICS:
        assert got[k][0] == pytest.approx(want[k], abs=1e-12), k


def test_the_vectorised_bootstrap_is_the_loop_over_binary_metrics():
    """Same resamples (drawn as `bootstrap_ci` draws them), scored one by one with
    `binary_metrics`: the same percentile intervals."""
    y, p = scores(90, seed=7)
    n_boot, t = 150, 0.5
    rng = np.random.default_rng(11)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pos_idx = pos[rng.integers(0, len(pos), (n_boot, len(pos)))]
    neg_idx = neg[rng.integers(0, len(neg), (n_boot, len(neg)))]
    draws = {k: [] for k in METRICS}
    for a, b in zip(pos_idx, neg_idx):
        idx = np.concatenate([a, b])
        m = binary_metrics(y[idx], p[idx], t)
        for k in METRICS:
            draws[k].append(m[k])
    got = bootstrap_ci(y, p, t, n_boot=n_boot, seed=11)
    for k in METRICS:
        want = np.percentile(np.array(draws[k])[~np.isnan(draws[k])], [2.5, 97.5])
        assert got[k] == pytest.approx(tuple(want), abs=1e-12), k


def test_intervals_contain_the_estimate_narrow_with_more_participants_and_repeat():
    small_y, small_p = scores(100, seed=1)
    large_y, large_p = scores(1600, seed=1)
    small = bootstrap_ci(small_y, small_p, 0.5, seed=3)
    large = bootstrap_ci(large_y, large_p, 0.5, seed=3)
    for y, p, ci in ((small_y, small_p, small), (large_y, large_p, large)):
        point = binary_metrics(y, p, 0.5)
        for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "pr_auc_pd",
                  "pr_auc_hc", "f1", "mcc", "brier", "accuracy"):
            assert ci[k][0] <= point[k] <= ci[k][1], k
    for k in ("roc_auc", "balanced_accuracy", "mcc"):
        # 16 × the participants: about a quarter of the width
        assert (large[k][1] - large[k][0]) < 0.45 * (small[k][1] - small[k][0]), k
    assert bootstrap_ci(small_y, small_p, 0.5, seed=3) == small  # a fixed seed repeats
    assert bootstrap_ci(small_y, small_p, 0.5, seed=4) != small
    hist = score_histogram(small_y, small_p)
    assert bootstrap_histogram_ci(hist, 0.5, seed=3) == bootstrap_histogram_ci(hist, 0.5, seed=3)


def test_models_on_the_same_test_set_are_resampled_on_the_same_participants():
    """Two models that classify everyone alike but score differently (2 distinct scores
    against thousands; a test set large enough to be resampled in chunks) get the same
    intervals for every metric of the classification."""
    y, p = scores(2500, seed=6)
    hard = np.where(p >= 0.5, 0.9, 0.1)
    a = bootstrap_ci(y, p, 0.5, n_boot=1000, seed=2)
    b = bootstrap_ci(y, hard, 0.5, n_boot=1000, seed=2)
    for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "mcc"):
        assert a[k] == b[k], k
    assert a["roc_auc"] != b["roc_auc"]


def test_histogram_bootstrap_agrees_with_the_participant_bootstrap_on_the_same_scores():
    y, p = scores(300, seed=5)
    t = 0.5
    participants = bootstrap_ci(y, p, t, n_boot=2000, seed=1)
    counts = bootstrap_histogram_ci(score_histogram(y, p), t, n_boot=2000, seed=2)
    for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "pr_auc_pd", "mcc"):
        assert counts[k][0] == pytest.approx(participants[k][0], abs=0.03), k
        assert counts[k][1] == pytest.approx(participants[k][1], abs=0.03), k


def test_one_class_and_empty_inputs_give_undefined_intervals_not_errors():
    y = np.ones(30, int)
    p = np.linspace(0.2, 0.9, 30)
    ci = bootstrap_ci(y, p, 0.5, n_boot=50)
    assert np.isnan(ci["roc_auc"][0]) and ci["sensitivity"][0] <= ci["sensitivity"][1]
    assert interval_lists(ci)["roc_auc"] is None
    assert isinstance(interval_lists(ci)["sensitivity"], list)
    empty = bootstrap_histogram_ci(np.zeros((2, 10), int), 0.5)
    assert all(np.isnan(v[0]) for v in empty.values())


def test_the_bootstraps_are_fast():
    """A table of seven models must not add more than a second or two to a run."""
    y, p = scores(400, seed=2)
    start = time.perf_counter()
    for _ in range(7):
        bootstrap_ci(y, p, 0.5, n_boot=1000)
    hist = score_histogram(y, p)
    for _ in range(3):
        bootstrap_histogram_ci(hist, 0.5)
    assert time.perf_counter() - start < 3.0  # about 1 s on a busy 2-core machine


# ------------------------------------------------------------------ a federated round


def site_eval(n, seed):
    y, p = scores(n, seed=seed)
    return {"val": score_histogram(y, p), "test": score_histogram(y, p), "withheld": False}


def test_a_rounds_pooled_metrics_carry_intervals_from_the_summed_histograms():
    from safn_core.federation.aggregate import round_metrics, secure_round_metrics

    hists = {"a": site_eval(120, 1), "b": site_eval(150, 2)}
    entry = round_metrics(hists)
    for k in METRICS:
        lo, hi = entry["pooled_ci"][k]
        assert lo <= entry["pooled"][k] <= hi, k
    assert entry["pooled_ci"] == round_metrics(hists)["pooled_ci"]  # same record, same entry
    json.dumps(entry["pooled_ci"], allow_nan=False)  # plain JSON in history.json
    # the secure round: the same sums, the same intervals
    sums = {"val": hists["a"]["val"] + hists["b"]["val"],
            "test": hists["a"]["test"] + hists["b"]["test"], "sites": 2, "val_loss_sum": 1.0,
            "val_examples": 270}
    secure = secure_round_metrics(sums, {"a": None, "b": None}, 5, ["a", "b"])
    assert secure["pooled_ci"] == entry["pooled_ci"]
    # below min_cell there are no pooled metrics and no intervals
    few = secure_round_metrics(sums, {"a": None, "b": None}, 10_000, ["a", "b"])
    assert few["pooled"] is None and "pooled_ci" not in few


def test_the_run_report_shows_the_pooled_intervals(tmp_path):
    from safn_core.config import load_config
    from safn_core.federation.aggregate import round_metrics
    from safn_core.federation.run_report import write_server_report

    entry = {"round": 1, "selected_round": 1, **round_metrics(
        {"site_a": site_eval(120, 1), "site_b": site_eval(150, 2)})}
    html = write_server_report(tmp_path, load_config(None, []), [entry],
                               ["site_a", "site_b"]).read_text()
    roc, (lo, hi) = entry["pooled"]["roc_auc"], entry["pooled_ci"]["roc_auc"]
    assert f'{roc:.3f} <span class="ci">[{lo:.3f}, {hi:.3f}]</span>' in html
    assert "bootstrap over the pooled test histograms" in html


# ------------------------------------------------------------------ rendering and storing


def test_interval_text():
    assert interval_text(0.91234, (0.8712, 0.9481)) == "0.912 [0.871, 0.948]"
    assert interval_text(0.91234, [0.8712, 0.9481], sep="\n") == "0.912\n[0.871, 0.948]"
    assert interval_text(0.9, None) == interval_text(0.9, [float("nan"), 0.95]) == "0.900"
    assert interval_text(0.9, float("nan")) == interval_text(0.9, [None, None]) == "0.900"
    assert interval_text(float("nan"), (0.1, 0.2)) == interval_text(None) == "—"


def test_the_report_keeps_an_interval_together_and_prints_percentages_with_one_decimal():
    rep = Report("t")
    rep.table(pd.DataFrame({"site": ["site_01"], "participants": [500], "% PD": [85.4],
                            "roc_auc": ["0.912 [0.871, 0.948]"], "f1": [0.81234]}))
    html = rep.render()
    assert "<td>85.4</td>" in html and "85.400" not in html
    assert '<td>0.912 <span class="ci">[0.871, 0.948]</span></td>' in html
    assert "<td>0.812</td>" in html and "<td>500</td>" in html


def comparison_frame():
    rows = []
    for name, kind, auc in (("pooled (all training splits together)", "pooled", 0.91),
                            ("federated", "federated", 0.90), ("local-only site_01", "local",
                                                               0.82)):
        y, p = scores(200, seed=int(auc * 100))
        ci = bootstrap_ci(y, p, 0.5, n_boot=200, seed=0)
        rows.append({"model": name, "kind": kind, "n_train": 300, "sites": 3, "threshold": 0.5,
                     "selected_round": 2, **binary_metrics(y, p, 0.5),
                     **{f"{k}_ci": v for k, v in interval_lists(ci).items()}})
    return pd.DataFrame(rows)


def test_the_simulation_prints_and_reports_each_figure_with_its_interval(tmp_path):
    from rich.console import Console

    from safn.simulations import cli
    from safn.simulations.compare import flat_intervals
    from safn.simulations.report import write_sim_report
    from safn_core.config import load_config

    df = comparison_frame()
    console = Console(width=240, record=True, file=open("/dev/null", "w"))
    old, cli.console = cli.console, console
    try:
        cli.print_comparison(df, 200, 3)
    finally:
        cli.console = old
    text = " ".join(console.export_text().split())
    for _, r in df.iterrows():  # each figure, and its interval on the cell's second line
        for k in cli.SHOWN:
            lo, hi = r[f"{k}_ci"]
            assert f"{r[k]:.3f}" in text and f"[{lo:.3f}, {hi:.3f}]" in text, k
    assert "95% interval" in text

    sites = pd.DataFrame([{"site": "site_01", "participants": 120, "PD": 102, "HC": 18,
                           "% PD": 85.0}, {"site": "site_02", "participants": 130, "PD": 111,
                                           "HC": 19, "% PD": 85.4}])
    html = write_sim_report(tmp_path, load_config(None, []), "synthetic", sites, [], df,
                            None).read_text()
    for _, r in df.iterrows():
        for k in METRICS:
            lo, hi = r[f"{k}_ci"]
            assert f'{r[k]:.3f} <span class="ci">[{lo:.3f}, {hi:.3f}]</span>' in html, k
    assert "<td>85.4</td>" in html and "85.400" not in html

    flat = flat_intervals(df)
    assert "roc_auc_ci" not in flat
    cols = list(flat.columns)
    assert cols.index("roc_auc_ci_low") + 1 == cols.index("roc_auc_ci_high")
    assert flat.roc_auc_ci_low.tolist() == [c[0] for c in df.roc_auc_ci]
    assert (flat.roc_auc_ci_low <= flat.roc_auc).all()
    assert (flat.roc_auc <= flat.roc_auc_ci_high).all()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.helpers import toy_cohort

    return toy_cohort(tmp_path_factory.mktemp("toy"), n=300)


@pytest.mark.timeout(300)
def test_compare_scores_every_model_with_participant_bootstrap_intervals(toy):
    """Each row of the comparison: every metric with its interval, bracketing it, the same on a
    second run (fixed seed), and as JSON rows of results.json hold them."""
    from safn.simulations.compare import compare
    from safn.simulations.partition import partition
    from safn_core.config import load_config
    from tests.helpers import SMALL_MODEL

    cfg = load_config(None, SMALL_MODEL + ["federation.rounds=2", "federation.patience=1"])
    parts = partition(toy, "natural", seed=0)
    df, n_test = compare(toy, parts, cfg)
    assert {"pooled", "local"} <= set(df.kind) and n_test > 0
    for _, r in df.iterrows():
        for k in METRICS:
            lo, hi = r[f"{k}_ci"]
            assert lo <= r[k] <= hi, (r.model, k)
    rows = json.loads(json.dumps(df.replace({np.nan: None}).to_dict("records"),
                                 allow_nan=False))
    assert all(isinstance(row["roc_auc_ci"], list) and len(row["roc_auc_ci"]) == 2
               for row in rows)
    again, _ = compare(toy, parts, cfg)
    assert again.roc_auc_ci.tolist() == df.roc_auc_ci.tolist()
