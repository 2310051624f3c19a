"""A round's history entry is a pure function of its record: what the strategy saw, never
averaged where it must not be (ε, losses a DP site withholds), held-out sites apart, codes
for rejections."""

from __future__ import annotations

import numpy as np
import pytest

from safn_core.federation.aggregate import round_metrics
from safn_core.federation.round_record import (RoundRecord, SecureEvaluation, SecureTrainSum,
                                               round_entry)
from tests.test_modelcard import WITHHELD, site_eval


def _train(n: int, loss: float) -> dict:
    return {"num-examples": n, "train-loss": loss}


def test_a_plain_round_pools_histograms_and_keeps_held_out_sites_apart():
    record = RoundRecord(
        round=4,
        trained={"a": _train(100, 0.2), "b": _train(300, -1.0)},  # b: a DP site withholds
        privacy={"a": {"dp": False, "refused": False, "epsilon": None},
                 "b": {"dp": True, "refused": False, "epsilon": 1.5},
                 "c": {"dp": True, "refused": True, "epsilon": 3.0}},
        refused=({"site": "c", "reason": "budget exhausted"},),
        rejected=({"site": "d", "code": "non_finite", "array": "model"},),
        evaluated={"a": site_eval(60, 1), "b": site_eval(80, 2), "h": site_eval(50, 3)},
        held_out=frozenset({"h"}))
    entry = round_entry(record, [], min_cell=5, central_delta=1e-5)
    assert entry["round"] == 4 and entry["sites_trained"] == ["a", "b"]
    assert entry["train_loss"] == pytest.approx(0.2)  # only the site that reports one
    assert entry["privacy"]["b"]["epsilon"] == 1.5 and entry["privacy"]["c"]["refused"]
    assert entry["refused"] == [{"site": "c", "reason": "budget exhausted"}]
    assert entry["rejected"] == [{"round": 4, "site": "d", "code": "non_finite",
                                  "array": "model"}]
    pooled = round_metrics({"a": site_eval(60, 1), "b": site_eval(80, 2)})
    assert entry["pooled"] == pooled["pooled"] and entry["n_test"] == pooled["n_test"]
    assert set(entry["sites"]) == {"a", "b"} and set(entry["held_out"]) == {"h"}
    assert entry["held_out"]["h"]["n"] == 50
    assert "secure_sum" not in entry and "central_dp" not in entry
    # the same record makes the same entry: nothing else goes into it
    assert round_entry(record, [], 5, 1e-5) == entry


def test_a_secure_round_reports_only_sums_and_counts_sites():
    pooled = {k: v for k, v in round_metrics({"a": site_eval(60, 1)}).items()}
    sums = {"val": site_eval(60, 1)["val"], "test": site_eval(60, 1)["test"], "sites": 3,
            "val_loss_sum": 12.0, "val_examples": 60}
    record = RoundRecord(
        round=2, trained={"a": {}, "b": {}, "c": {}}, secure=True,
        secure_train=SecureTrainSum(sites=3, examples=400, train_loss=0.3),
        secure_evaluation=SecureEvaluation(sums, ("a", "b", "c"),
                                           {"a": {"roc_auc": 0.9, "n": 30}, "b": None,
                                            "c": None}),
        retries=({"aggregation": "train", "round": 2, "lost": 1, "attempts": 2},))
    entry = round_entry(record, [], min_cell=5, central_delta=1e-5)
    assert entry["train_loss"] == 0.3 and entry["sites_trained"] == ["a", "b", "c"]
    assert entry["secure_sum"] == {"sites_trained": 3, "sites_evaluated": 3,
                                   "retries": [{"aggregation": "train", "round": 2, "lost": 1,
                                                "attempts": 2}]}
    assert entry["secure_aggregation"] and entry["n_test"] == pooled["n_test"]
    assert entry["rejected"] == []


def test_central_dp_epsilon_counts_the_runs_earlier_releases():
    release = {"noise_multiplier": 1.0, "clipping_norm": 0.1, "sites_per_round": 3,
               "sites_aggregated": 3, "max_weight": 1 / 3, "effective_noise_multiplier": 1.0}
    first = round_entry(RoundRecord(round=1, central_dp=release,
                                    evaluated={"a": WITHHELD}), [], 5, 1e-5)
    second = round_entry(RoundRecord(round=2, central_dp=release,
                                     evaluated={"a": WITHHELD}), [first], 5, 1e-5)
    assert second["central_dp"]["epsilon"] > first["central_dp"]["epsilon"] > 0
    assert np.isfinite(second["central_dp"]["epsilon"])
