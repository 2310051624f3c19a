"""The model card and the run report say what the SITES said their data is and how many
participants and sites the metrics rest on, never the coordinator's own `data` defaults; and
they print no count of a group below min_cell."""

import json
import re

import numpy as np

from safn_core.config import load_config
from safn_core.federation.aggregate import (held_out_metrics, round_metrics,
                                            secure_round_metrics)
from safn_core.federation.provenance import evaluation_basis
from safn_core.metrics import score_histogram
from safn_core.modelcard import model_card

BINS = 50
COORDINATOR = load_config(None, [])  # a coordinator's config: data.source is the default


def hist(n: int, seed: int) -> np.ndarray:
    """A (2, BINS) score histogram of n participants, both classes present."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y)))
    return score_histogram(y, p, BINS)


def site_eval(n: int, seed: int) -> dict:
    return {"val": hist(n, seed), "test": hist(n, seed + 100), "withheld": False}


WITHHELD = {"val": np.zeros((2, BINS), np.int64), "test": np.zeros((2, BINS), np.int64),
            "withheld": True}


def federated_meta(sources: dict, entry: dict, training_sites: list[str], held_out=(),
                   min_cell: int = 5) -> dict:
    """A federated bundle's meta as `safn_core.federation.federated_bundle.save_federated_bundle` writes it."""
    return {"kind": "federated", "threshold": entry.get("threshold", 0.5),
            "class_counts": [60, 90], "label_names": ["HC", "PD"],
            "metrics": {"federated_pooled_test": {k: {"mean": v, "sd": None}
                                                  for k, v in (entry.get("pooled") or {}).items()}},
            "training": {"participants": 150, "sites": training_sites,
                         "held_out_sites": list(held_out), "rounds": 3, "selected_round": 2,
                         "selection": {"rule": "val_loss", "patience": 3},
                         "data_sources": sources,
                         "test_evaluation": evaluation_basis(entry, training_sites, min_cell)}}


def section(card: str, name: str) -> str:
    return card.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_the_card_names_each_sites_data_and_claims_no_synthetic_data_when_none_said_so():
    entry = round_metrics({"site_a": site_eval(40, 1), "site_b": site_eval(60, 2)})
    card = model_card(federated_meta({"site_a": "ppmi", "site_b": "table"}, entry,
                                     ["site_a", "site_b"]), COORDINATOR)
    assert COORDINATOR.data.source == "synthetic"  # what the card used to print
    data = section(card, "Training data")
    assert "site_a: PPMI download" in data and "site_b: table" in data
    assert "synthetic" not in card.lower() and "not real patients" not in card


def test_synthetic_data_is_claimed_where_the_sites_said_so():
    entry = round_metrics({"site_a": site_eval(40, 1), "site_b": site_eval(60, 2)})
    every = model_card(federated_meta({"site_a": "synthetic", "site_b": "synthetic"}, entry,
                                      ["site_a", "site_b"]), COORDINATOR)
    assert "synthetic PPMI-style cohort (not real patients) at every site" in section(
        every, "Training data")
    assert "Trained on synthetic data" in section(every, "Known limits")
    mixed = model_card(federated_meta({"site_a": "ppmi", "site_b": "synthetic",
                                       "site_c": "ppmi"}, entry, ["site_a", "site_b"],
                                      held_out=["site_c"]), COORDINATOR)
    data = section(mixed, "Training data")
    assert "site_a: PPMI download" in data and "site_c (held out): PPMI download" in data
    assert "site_b: synthetic PPMI-style cohort (not real patients)" in data
    limits = section(mixed, "Known limits")
    assert "Synthetic data (not real patients) at site_b:" in limits
    assert "Trained on synthetic data" not in limits


def test_performance_says_how_many_participants_and_sites_and_which_site_withheld():
    hists = {"site_a": site_eval(40, 1), "site_b": WITHHELD, "site_c": site_eval(70, 3)}
    entry = round_metrics(hists)
    entry["held_out"] = held_out_metrics({"site_d": site_eval(30, 4), "site_e": WITHHELD},
                                         entry["threshold"])
    sites = ["site_a", "site_b", "site_c"]
    card = model_card(federated_meta({s: "ppmi" for s in [*sites, "site_d", "site_e"]}, entry,
                                     sites, held_out=["site_d", "site_e"], min_cell=5),
                      COORDINATOR)
    perf = section(card, "Performance")
    n = int(hists["site_a"]["test"].sum() + hists["site_c"]["test"].sum())
    line = next(x for x in perf.splitlines() if "pooled test metrics rest on" in x)
    assert f"rest on {n} test participants from 2 of 3 training sites (site_a, site_c)" in line
    assert "not in the pool: site_b" in line and "min_cell, at least 5" in line
    d = int(site_eval(30, 4)["test"].sum())
    assert f"held-out site_d: {d} participants" in perf
    assert "held-out site_e: metrics withheld" in perf


def test_under_secure_aggregation_the_card_gives_the_federation_wide_sum_and_its_sites():
    val, test = hist(150, 5), hist(160, 6)
    pooled = {"val": val, "test": test, "val_loss_sum": 90.0, "val_examples": 150, "sites": 3}
    own = {"site_a": {"roc_auc": 0.8, "n": 70}, "site_b": None, "site_c": {"roc_auc": 0.7,
                                                                           "n": 60}}
    entry = secure_round_metrics(pooled, own, 5, ["site_c", "site_a", "site_b"])
    sites = ["site_a", "site_b", "site_c", "site_x"]  # site_x dropped out of that round
    perf = section(model_card(federated_meta({s: "table" for s in sites}, entry, sites),
                              COORDINATOR), "Performance")
    line = next(x for x in perf.splitlines() if "pooled test metrics rest on" in x)
    assert (f"rest on {int(test.sum())} test participants from 3 of 4 training sites "
            "(site_a, site_b, site_c), a secure sum") in line
    assert "federation-wide" in line and "own metrics withheld" in line and "site_b" in line
    assert "not evaluated in that round: site_x" in line


def test_no_count_below_min_cell_is_printed():
    small = hist(160, 7)
    small[0] = 0
    small[0, 10] = 3  # three controls in the whole federation's test splits
    pooled = {"val": hist(150, 8), "test": small, "val_loss_sum": 90.0, "val_examples": 150,
              "sites": 3}
    entry = secure_round_metrics(pooled, {s: None for s in "abc"}, 5, list("abc"))
    card = model_card(federated_meta({s: "ppmi" for s in "abc"}, entry, list("abc")),
                      COORDINATOR)
    perf = section(card, "Performance")
    assert "no pooled test metrics" in perf
    assert re.findall(r"\d+", perf) == ["5"]  # min_cell; no count of the 3 or their split


def test_a_centralised_card_keeps_its_own_data_source_and_says_what_cross_validation_rests_on():
    cfg = load_config(None, ["data.source=ppmi", "data.path=/data/ppmi"])
    meta = {"kind": "centralised", "class_counts": [40, 80],
            "metrics": {"cross_validation": {"roc_auc": {"mean": 0.8, "sd": 0.05}}},
            "training": {"participants": 120, "sites": {"s1": 70, "s2": 50}}}
    card = model_card(meta, cfg)
    assert "- source: ppmi" in card and "synthetic" not in card.lower()
    assert (f"{cfg.train.folds} folds × {cfg.train.repeats} repeats of the 120 participants"
            in section(card, "Performance"))
    synth = model_card(meta, load_config(None, []))
    assert "not real patients" in synth and "Trained on synthetic data" in synth


def test_the_run_report_names_each_sites_data(tmp_path):
    from safn_core.federation.run_folder import write_data_sources
    from safn_core.federation.run_report import write_server_report

    write_data_sources(tmp_path, {"site_a": "ppmi", "site_b": "table"})
    assert json.loads((tmp_path / "data_sources.json").read_text())["sites"]["site_b"] == "table"
    html = write_server_report(tmp_path, COORDINATOR, [], ["site_a", "site_b", "site_c"]
                               ).read_text()
    assert "PPMI download" in html and "table (with a column mapping)" in html
    assert "did not describe it" in html  # site_c never answered the statistics round
    assert "not real patients" not in html


def test_the_card_shows_the_run_id_beside_flowers_run_ids():
    entry = {"round": 2, "pooled": {"roc_auc": 0.8}}
    meta = federated_meta({"site_a": "ppmi"}, entry, ["site_a"])
    meta.update(run_id="run-3f2a", flower_run_ids=["123", "456"])
    model = section(model_card(meta, COORDINATOR), "Model")
    assert "- run id run-3f2a (Flower runs 123, 456: one per submission, a resume starts a " \
           "new one)" in model
    meta.update(flower_run_ids=[])  # a simulation: no Flower run submitted by safn-server
    assert "- run id run-3f2a\n" in section(model_card(meta, COORDINATOR), "Model")
