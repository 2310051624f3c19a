"""Secure aggregation in the federation: the coordinator sees only federation-wide sums.

One real Ray simulation (4 training sites and a held-out one, personalised by Ditto) with a
recorder around the coordinator's Grid: every reply the coordinator receives is checked for
plain-text per-site statistics, histograms or updates, and no message either way carries a
site's personal model; one site's reply is lost in round 2's training (after the key exchange),
and the round completes with the other three. Plus the aggregation's exactness, and the refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safn_core.config import load_config
from safn_core.federation.secure_records import train_packing, train_values
from tests.helpers import SMALL_MODEL, DroppingRecorder, virtual_run, write_toy

pytestmark = pytest.mark.timeout(400)
BIN = Path(sys.executable).parent

PLAIN_PER_SITE = {"num-examples", "train-loss", "val-neg", "val-pos", "test-neg", "test-pos",
                  "class-0", "class-1", "n-train"}


def test_secure_mean_equals_fedavg_within_the_stated_bound():
    cfg = load_config(None, [])
    rng = np.random.default_rng(0)
    for case in range(20):
        sites, size = int(rng.integers(3, 9)), int(rng.integers(1, 3000))
        packing = train_packing(size, cfg.federation, sites)
        weights = [rng.normal(0, rng.choice([1e-3, 1, 30]), size) for _ in range(sites)]
        n = [int(rng.integers(1, 5000)) for _ in range(sites)]
        total = sum(packing.encode(train_values(w, k, 0.5, 1e3)).vector for w, k in
                    zip(weights, n))
        got = packing.decode(total)
        mean = got["weighted"] / int(got["examples"])
        plain = np.average(np.stack(weights), axis=0, weights=n)
        assert int(got["examples"]) == sum(n) and int(got["sites"]) == sites
        bound = packing.error_bound("weighted") / sum(n)
        assert np.max(np.abs(mean - plain)) <= bound
        assert np.max(np.abs(mean - plain)) <= 1e-6 * max(1.0, np.max(np.abs(plain)))


def test_central_dp_under_secure_aggregation_clips_at_the_sites_and_noises_the_mean(tmp_path):
    """3 virtual sites, central DP on, secure aggregation on (the default): each round records
    a release with σ, C and the site-level ε; a zero-noise run moves the model by the mean of
    the sites' clipped updates, so no update's norm exceeds C."""
    csv, mapping = write_toy(tmp_path, n=240)
    base = ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
            "federation.rounds=2", "simulation.compare=false",
            f"simulation.site_state_dir={tmp_path / 'state'}", *SMALL_MODEL,
            "federation.central_dp.enabled=true", "federation.central_dp.clipping_norm=0.05"]
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "safn-sim"), "--out", str(out),
                           *[x for s in base + ["federation.central_dp.noise_multiplier=1e-9"]
                             for x in ("--set", s)]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "securely summed" in proc.stdout
    history = json.loads((out / "history.json").read_text())
    from safn_core.federation.checkpoint import load_checkpoint

    for entry in history:
        c = entry["central_dp"]
        assert c["clipped_at"] == "sites (secure aggregation)"
        assert c["sites_aggregated"] == c["sites_per_round"] == 3
        assert c["effective_noise_multiplier"] == pytest.approx(1e-9)
        assert c["epsilon"] > 0
    weights = [np.load(out / "checkpoints" / f"round_000{r}.npz") for r in (1, 2)]
    step = np.sqrt(sum(float(np.sum((weights[1][k].astype(np.float64)
                                     - weights[0][k].astype(np.float64)) ** 2))
                       for k in weights[0].files if k.startswith("w::")))
    assert 0 < step <= 0.05 * (1 + 1e-4)  # the mean of updates clipped to C moves at most C
    assert load_checkpoint(out).round == 2


def test_two_sites_are_refused_clearly(tmp_path):
    csv, mapping = write_toy(tmp_path, n=200)
    proc = subprocess.run([str(BIN / "safn-sim"), "--out", str(tmp_path / "run"),
                           "--set", "data.source=table", "--set", f"data.path={csv}",
                           "--set", f"data.mapping={mapping}", "--set", "simulation.partition=iid",
                           "--set", "simulation.n_sites=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = " ".join((proc.stdout + proc.stderr).split())
    assert "secure_aggregation needs at least 3 sites" in message
    assert "federation.secure_aggregation=false" in message


def test_the_coordinator_sees_no_per_site_values_and_a_dropout_does_not_stop_a_round(
        tmp_path, monkeypatch):
    import safn.server.app as server_app
    from safn.simulations.engine import run_flower_simulation

    csv, mapping = write_toy(tmp_path, n=320)
    cfg = load_config(None, ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
                             "simulation.partition=iid", "simulation.n_sites=5",
                             "server.held_out_sites=[site_05]",
                             "federation.rounds=3", "federation.local_epochs=1",
                             f"simulation.site_state_dir={tmp_path / 'state'}",
                             "personalisation.method=ditto", *SMALL_MODEL])
    run_dir, cohort, parts = virtual_run(tmp_path, cfg)

    recorders = []

    class Recorded(server_app.Coordinator):
        def __init__(self, grid, *args, **kwargs):
            recorders.append(DroppingRecorder(grid))
            super().__init__(recorders[-1], *args, **kwargs)

    monkeypatch.setattr(server_app, "Coordinator", Recorded)
    run_flower_simulation(run_dir, cfg, len(parts))

    status = json.loads((run_dir / "federation_status.json").read_text())
    assert status == {"status": "completed", "round": 3}, status
    rec = recorders[0]
    assert rec.dropped == 1  # its train reply; the redone aggregation never asks it again
    history = json.loads((run_dir / "history.json").read_text())
    by_round = {e["round"]: e for e in history}  # round 0: the floor, evaluated untrained
    assert sorted(by_round) == [0, 1, 2, 3]
    second = by_round[2]
    assert second["secure_sum"]["sites_trained"] == 3
    assert second["secure_sum"]["retries"] and second["secure_sum"]["retries"][0]["lost"] == 1
    assert by_round[1]["secure_sum"]["sites_trained"] == 4
    assert by_round[0]["secure_sum"]["sites_trained"] is None
    training_sites = [s for s in _sites(cohort, parts, cfg) if s.name != "site_05"]
    n_test = sum(len(s.split.test) for s in training_sites)
    for entry in history:  # pooled metrics every round, on every training site's test split
        assert entry["pooled"] is not None and entry["n_test"] == n_test
        # the held-out site evaluates alone, on all its participants, in plain text
        assert entry["held_out"]["site_05"]["n"] == len(parts["site_05"])
        assert "site_05" not in entry.get("sites_trained", [])
    # nothing per site in plain text: only masked uint64 vectors, no counts or histograms
    assert len(rec.replies) > 10
    held_out = {r.metadata.src_node_id for r in rec.replies
                if "site" in r.content.config_records
                and r.content["site"].get("name") == "site_05"}
    assert len(held_out) == 1
    for reply in rec.replies:
        if reply.metadata.src_node_id in held_out:
            continue
        content = reply.content
        assert "stats" not in content.array_records
        for name, arrays in content.array_records.items():
            assert list(arrays.keys()) == ["masked"], (name, list(arrays.keys()))
            assert arrays["masked"].numpy().dtype == np.uint64
        for metrics in content.metric_records.values():
            assert not PLAIN_PER_SITE & set(metrics.keys()), set(metrics.keys())
    from safn_core.bundle import load_bundle

    bundle = load_bundle(run_dir / "model")
    weights = bundle.model.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
    # every site said its kind of data in the statistics round (secure and held-out replies);
    # the pooled metrics rest on a federation-wide sum, whose sites are named
    training = bundle.meta["training"]
    assert training["data_sources"] == {name: "table" for name in parts}
    basis = training["test_evaluation"]
    assert basis["secure_aggregation"] and basis["participants"] == n_test
    assert basis["sites"] == sorted(s.name for s in training_sites)
    assert basis["held_out"] == {"site_05": len(parts["site_05"])}
    _personal_models_stayed_at_the_sites(rec, run_dir, cfg, training_sites, bundle)


def _personal_models_stayed_at_the_sites(rec, run_dir, cfg, training_sites, bundle):
    """Ditto: each training site kept its personal models in its own state folder; none of
    their weights is in any message sent or received; the pooled comparison is a secure sum."""
    from safn_core.federation.personal_store import PersonalStore
    from safn_core.federation.protocol import Layout
    from safn_core.federation.run_folder import run_identity
    from safn.simulations.virtual_sites import virtual_site_state_dir

    record = json.loads((run_dir / "personalisation.json").read_text())
    assert record["method"] == "ditto" and sorted(record["sites"]) == sorted(
        s.name for s in training_sites)
    assert record["pooled_basis"].startswith("secure sum over 4 sites")
    assert record["pooled"]["n"] == sum(len(s.split.test) for s in training_sites)
    personal = []
    for s in training_sites:
        store = PersonalStore(virtual_site_state_dir(run_dir, s.name), run_identity(run_dir))
        for weights in (store.current(), store.selected()[0]):
            assert weights is not None, s.name
            personal.append(Layout.of(weights).flatten(weights))
    assert all(not np.allclose(v, personal[0]) for v in personal[2:])  # each site its own
    carried = []
    for m in [*rec.sent, *rec.replies]:
        for arrays in m.content.array_records.values():
            carried += [a.numpy() for a in arrays.values()]
    assert any(a.dtype != np.uint64 for a in carried)  # the global models sent to the sites
    for v in personal:
        for a in carried:
            if a.shape == v.shape and a.dtype != np.uint64:
                assert not np.allclose(a.astype(np.float64), v, atol=1e-6)


def _sites(cohort, parts, cfg):
    from safn_core.federation.site import Site

    return [Site(name, cohort.subset(ids), cfg) for name, ids in parts.items()]
