"""Distributed DP-SGD: noise shares under secure aggregation (issue #28).

Unit tests of the mechanism (the unmasked sum of shares through the real secure-sum protocol,
the noise's distribution and its scaling for t colluding sites, the grid's cost), of a site's
budget (one ledger entry per round, refusals, never a second draw) and of the configuration;
then real Ray simulations: one in-process run with a recorder around the coordinator's Grid
(nothing per site in plain text, a dropout in round 2 whose retry re-masks the same shares,
every ledger with the same mechanism and Opacus' own ε), and `safn-sim` runs for the refusals
(a spent budget, too few sites that can take part) and resume. The deployed run through real
`flower-superlink` / `flower-supernode` processes is in tests/test_deploy.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from safn_core.config import PrivacyConfig, load_config
from safn_core.errors import ConfigError
from safn_core.federation.secure_records import share_packing
from safn_core.privacy import BudgetExhausted, PrivacyError, data_fingerprint, resolve_privacy
from safn_core.privacy.distributed_budget import DistributedBudget
from safn_core.privacy.noise_shares import NoiseShares, min_sites
from safn_core.secagg import AggregationContext, SiteSecret, SiteSession, secure_sum
from tests.helpers import SMALL_MODEL, DroppingRecorder, virtual_run, write_toy

pytestmark = pytest.mark.timeout(400)
BIN = Path(sys.executable).parent


# -------------------------------------------------------------------------------- mechanism


def _sessions(tmp_path: Path, n: int) -> dict[int, SiteSession]:
    return {i: SiteSession(SiteSecret.load_or_create(tmp_path / f"s{i}"), i)
            for i in range(1, n + 1)}


def _dict_transport(sessions, values):
    def request(phase, payloads):
        return {s: sessions[s].respond(phase, p, values.get(s)) for s, p in payloads.items()}
    return request


def test_the_unmasked_sum_is_the_clipped_sums_plus_every_share_of_noise(tmp_path):
    """Five sites' shares through the real masking protocol: the coordinator's decoded sum is
    exactly Σ round(s·g_i) + Σ round(s·z_i) (over s), and its noise has SD σ·C_eff·√(n/(n−t))."""
    n, t, d, sigma, c = 5, 1, 40_000, 1.3, 0.7
    shares = NoiseShares.plan(noise_multiplier=sigma, clipping_norm=c, sites=n, colluding=t,
                              dimension=d, max_site_examples=1000)
    rng = np.random.default_rng(0)
    sums = {i: rng.normal(0, 0.01, d) for i in range(1, n + 1)}
    for i in sums:  # a clipped sum over ≤ 40 participants
        sums[i] *= min(1.0, 40 * c / np.linalg.norm(sums[i]))
    values = {i: {"share": shares.encode(sums[i], np.random.default_rng([7, i])),
                  "examples": 100 + i, "sites": 1, "noise_shares": 1} for i in sums}
    sessions = _sessions(tmp_path, n)
    packing = share_packing(d, n)
    base = AggregationContext("run", 3, "train", 0)
    result = secure_sum(list(sessions), _dict_transport(sessions, values), packing,
                        base.with_attempt, min_parties=3)
    got = shares.decode(result.values["share"])
    assert int(result.values["examples"]) == sum(100 + i for i in sums)
    assert int(result.values["sites"]) == n
    # exactly the encoded signal plus the independently re-drawn noise, nothing else
    signal = sum(np.rint(sums[i] * shares.scale).astype(np.int64) for i in sums)
    noise = sum(np.rint(np.random.default_rng([7, i]).normal(0, shares.share_std * shares.scale,
                                                             d)).astype(np.int64) for i in sums)
    np.testing.assert_array_equal(result.values["share"], signal + noise)
    residual = got - sum(sums.values())
    expected_sd = sigma * shares.sensitivity * math.sqrt(n / (n - t))
    assert abs(residual.mean()) < 5 * expected_sd / math.sqrt(d)
    # sample SD within 5 of its own standard errors (√(1/(2d)) relative)
    assert abs(residual.std() / expected_sd - 1) < 5 / math.sqrt(2 * d)
    # the honest n − t shares alone carry the full noise σ·C_eff (t shares known to colluders)
    honest = sum(np.rint(np.random.default_rng([7, i]).normal(0, shares.share_std * shares.scale,
                                                              d)) for i in range(1, n - t + 1))
    assert abs((honest / shares.scale).std() / (sigma * shares.sensitivity) - 1) \
        < 5 / math.sqrt(2 * d)


def test_shares_scale_with_colluding_sites_and_the_grid_costs_almost_nothing():
    kw = dict(noise_multiplier=2.0, clipping_norm=1.0, dimension=120_000, max_site_examples=100_000)
    one = NoiseShares.plan(sites=5, colluding=1, **kw)
    two = NoiseShares.plan(sites=5, colluding=2, **kw)
    assert one.share_std == pytest.approx(2.0 * one.sensitivity / 2.0)  # √(5 − 1)
    assert two.share_std == pytest.approx(2.0 * two.sensitivity / math.sqrt(3))
    assert 0 < one.rounding_slack < 1e-6  # C_eff = C (1 + √d/s + …)
    assert min_sites(0) == 3 and min_sites(1) == 3 and min_sites(3) == 5
    with pytest.raises(ValueError, match="at least 5 sites"):
        NoiseShares.plan(sites=4, colluding=3, **kw)
    # the scale leaves room for every site's largest clipped sum and 64 noise SDs
    reach = 5 * 100_000 * 1.0 + 64 * one.total_std(5)
    assert reach * one.scale <= 2.0**62
    # a sum that wrapped around is detected, not read as a gradient
    with pytest.raises(ValueError, match="headroom"):
        one.decode(np.full(120_000, -(2**63) + 1000, dtype=np.int64))
    with pytest.raises(ValueError, match="not clipped"):
        one.encode(np.full(120_000, 1000.0), np.random.default_rng(0))
    assert NoiseShares.from_dict(one.to_dict()) == one


def test_a_site_that_does_not_train_still_sends_its_share_of_the_noise():
    """A refusal mid-run must not thin the noise below the guarantee: the site sends a share of
    pure noise (no data, nothing charged), counted in ``noise_shares`` but not in ``sites``."""
    from safn_core.federation.site_distributed import noise_only

    shares = NoiseShares.plan(noise_multiplier=1.0, clipping_norm=1.0, sites=4, colluding=1,
                              dimension=50_000, max_site_examples=100)
    values = noise_only(shares, seed=3)
    assert (values["sites"], values["examples"], values["noise_shares"]) == (0, 0, 1)
    noise = values["share"] / shares.scale
    assert abs(noise.std() / shares.share_std - 1) < 5 / math.sqrt(2 * 50_000)
    assert not np.array_equal(values["share"], noise_only(shares, seed=4)["share"])


# ---------------------------------------------------------------------------------- budgets


def _budget(tmp_path, **kw) -> DistributedBudget:
    cfg = PrivacyConfig(mode="distributed", epsilon=kw.pop("epsilon", 3.0), delta=1e-5, **kw)
    return DistributedBudget(cfg, 200, fingerprint=data_fingerprint(range(200), ["a"]),
                             state_dir=tmp_path, site="A")


def test_a_site_charges_each_round_once_with_opacus_accounting_and_refuses_beyond_its_budget(
        tmp_path):
    b = _budget(tmp_path)
    q, rounds = 0.2, 12
    sigma = b.needed_sigma(q, rounds)
    b.keep_plan("run", {"noise_multiplier": sigma, "sample_rate": q, "clipping_norm": 1.0,
                        "colluding": 1})
    for r in range(1, rounds + 1):
        seq = b.reserve_round("run", r, sigma, q)
        b.ledger.confirm(seq, 1)
        assert b.charged_round("run", r)
    acc = RDPAccountant()
    acc.history = [(sigma, q, rounds)]
    assert b.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert b.epsilon() <= 3.0
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        b.reserve_round("run", rounds + 1, sigma, q)  # one more step does not fit
    with pytest.raises(PrivacyError, match="cannot change mid-run"):
        b.keep_plan("run", {"noise_multiplier": sigma * 2, "sample_rate": q,
                            "clipping_norm": 1.0, "colluding": 1})
    with pytest.raises(BudgetExhausted, match="what is left of this site's privacy budget"):
        _budget(tmp_path).needed_sigma(q, rounds)  # the same ledger: nothing left


def test_a_site_whose_needed_noise_exceeds_its_cap_declines(tmp_path):
    with pytest.raises(BudgetExhausted, match="max_noise_multiplier"):
        _budget(tmp_path, epsilon=0.5).needed_sigma(0.5, 500)


def test_who_decides_a_dp_sgd_site_declines_distributed_and_an_off_site_joins():
    req = PrivacyConfig(mode="distributed", epsilon=3.0, max_grad_norm=0.5,
                        distributed={"colluding_sites": 2, "sample_rate": 0.1})
    joined = resolve_privacy(PrivacyConfig(), req)
    assert joined.mode == "distributed" and joined.epsilon == 3.0
    assert joined.distributed.colluding_sites == 2 and joined.max_grad_norm == 0.5
    tighter = resolve_privacy(PrivacyConfig(mode="distributed", epsilon=1.0), req)
    assert tighter.epsilon == 1.0 and tighter.distributed.sample_rate == 0.1
    with pytest.raises(PrivacyError, match="only with local DP-SGD"):
        resolve_privacy(PrivacyConfig(mode="dp-sgd", epsilon=1.0), req)
    # a distributed site in a local DP-SGD run trains with local DP-SGD (stronger)
    local = resolve_privacy(PrivacyConfig(mode="distributed", epsilon=1.0),
                            PrivacyConfig(mode="dp-sgd", epsilon=3.0))
    assert local.mode == "dp-sgd" and local.epsilon == 1.0


def test_configuration_errors_name_the_key_and_the_preset_yields_to_the_user():
    base = ["privacy.mode=distributed", "privacy.epsilon=3"]
    cases = {"federation.secure_aggregation=false": "federation.secure_aggregation must be true",
             "federation.central_dp.enabled=true": "federation.central_dp must be off",
             "personalisation.method=fine_tune": "personalisation must be off",
             "federation.min_sites=2": "federation.min_sites must be at least 3"}
    for extra, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [extra])
    with pytest.raises(ConfigError, match="privacy.epsilon is required"):
        load_config(None, ["privacy.mode=distributed"])
    from safn_core.config.dp_preset import DISTRIBUTED_PRESET

    preset = load_config(None, base)
    assert preset.federation.rounds == DISTRIBUTED_PRESET["federation"]["rounds"]
    assert preset.federation.min_sites == 3
    assert load_config(None, base + ["federation.rounds=7"]).federation.rounds == 7
    assert load_config(None, base + ["privacy.distributed.colluding_sites=3"]
                       ).federation.min_sites == 5
    assert load_config(None, []).federation.rounds == 20  # no DP: no preset


# ------------------------------------------------------------------------------ simulations


PLAIN_PER_SITE = {"num-examples", "train-loss", "val-neg", "val-pos", "test-neg", "test-pos",
                  "class-0", "class-1", "n-train"}


def test_a_distributed_run_sees_only_noised_sums_and_a_retry_reuses_the_same_shares(
        tmp_path, monkeypatch):
    import safn.server.app as server_app
    import safn.server.distributed_dp as ddp
    from safn.simulations.engine import run_flower_simulation
    from safn.simulations.virtual_sites import virtual_site_state_dir

    csv, mapping = write_toy(tmp_path, n=400)
    cfg = load_config(None, ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
                             "simulation.partition=iid", "simulation.n_sites=6",
                             "server.held_out_sites=[site_06]", "federation.rounds=2",
                             f"simulation.site_state_dir={tmp_path / 'state'}",
                             "privacy.mode=distributed", "privacy.epsilon=4",
                             "privacy.delta=1e-5", "privacy.accountant=rdp",
                             "privacy.distributed.sample_rate=0.3", *SMALL_MODEL])
    run_dir, cohort, parts = virtual_run(tmp_path, cfg)

    recorders, sums = [], {}

    class Recorded(server_app.Coordinator):
        def __init__(self, grid, *args, **kwargs):
            recorders.append(DroppingRecorder(grid))
            super().__init__(recorders[-1], *args, **kwargs)

    gradient = ddp.DistributedDP.gradient

    def recorded_gradient(self, shares, values):
        sums[len(sums) + 1] = (shares, np.array(values["share"]))
        return gradient(self, shares, values)

    monkeypatch.setattr(server_app, "Coordinator", Recorded)
    monkeypatch.setattr(ddp.DistributedDP, "gradient", recorded_gradient)
    run_flower_simulation(run_dir, cfg, len(parts))

    status = json.loads((run_dir / "federation_status.json").read_text())
    assert status == {"status": "completed", "round": 2}, status
    rec = recorders[0]
    assert rec.dropped == 1  # its round-2 share; the retry never asks it again
    history = {e["round"]: e for e in json.loads((run_dir / "history.json").read_text())}
    assert sorted(history) == [1, 2]  # no floor under distributed DP: no round 0
    training = sorted(n for n in parts if n != "site_06")
    plan = json.loads((run_dir / "distributed_dp.json").read_text())
    assert plan["sites"] == training and plan["colluding"] == 1
    assert "colluding" in plan["guarantee"]
    d1, d2 = history[1]["distributed_dp"], history[2]["distributed_dp"]
    assert (d1["shares"], d1["sites_asked"]) == (5, 5)
    assert (d2["shares"], d2["sites_asked"]) == (4, 5)  # n − t = 4 shares: enough
    assert history[2]["secure_sum"]["retries"][0]["lost"] == 1
    assert d1["noise_multiplier"] == plan["noise_multiplier"]
    # the coordinator saw masked vectors only: no per-site count, histogram, loss or update
    held_out = {r.metadata.src_node_id for r in rec.replies
                if "site" in r.content.config_records
                and r.content["site"].get("name") == "site_06"}
    assert len(held_out) == 1 and len(rec.replies) > 15
    for reply in rec.replies:
        if reply.metadata.src_node_id in held_out:
            continue  # the held-out site evaluates alone, in plain text
        content = reply.content
        for name, arrays in content.array_records.items():
            assert list(arrays.keys()) == ["masked"], (name, list(arrays.keys()))
            masked = arrays["masked"].numpy()
            assert masked.dtype == np.uint64
            if masked.size > 1000:  # a share: its masked words look uniform on 2^64
                top = (masked >> np.uint64(63)).mean()
                assert abs(top - 0.5) < 5 * 0.5 / math.sqrt(masked.size), top
        for metrics in content.metric_records.values():
            assert not PLAIN_PER_SITE & set(metrics.keys()), set(metrics.keys())
    # the retry re-masked the kept shares: round 2's unmasked sum is exactly the four
    # survivors' kept vectors (nothing drawn again), and every site paid round 2 once
    shares2, total2 = sums[2]
    survivors = [n for n in training if n != _name_of(rec, run_dir, rec.lost)]
    kept = {}
    for name in training:
        state = virtual_site_state_dir(run_dir, name)
        with np.load(state / "secagg" / "train.npz") as data:
            kept[name] = data["share"].astype(np.int64)
    np.testing.assert_array_equal(total2, sum(kept[n] for n in survivors))
    sigma, q = plan["noise_multiplier"], plan["sample_rate"]
    for name in training:
        ledger = json.loads((virtual_site_state_dir(run_dir, name)
                             / "privacy_ledger.json").read_text())
        entries = [e for e in ledger["entries"] if e["kind"] == "distributed"]
        assert [(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])
                for e in entries] == [(1, sigma, q, 1), (2, sigma, q, 1)], name
        acc = RDPAccountant()
        acc.history = [(sigma, q, 2)]
        reported = history[2]["privacy"][name]["epsilon"] if name in survivors \
            else history[1]["privacy"][name]["epsilon"]
        expected = acc.get_epsilon(ledger["delta"])
        if name in survivors:
            assert reported == pytest.approx(expected, rel=1e-9)
        assert expected <= 4.0
    assert not (virtual_site_state_dir(run_dir, "site_06") / "privacy_ledger.json").exists()
    # the held-out site evaluated every round, the model is finite
    assert all("site_06" in e["held_out"] for e in history.values())
    from safn_core.bundle import load_bundle

    weights = load_bundle(run_dir / "model").model.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())


def _name_of(rec: DroppingRecorder, run_dir: Path, node_id: int) -> str:
    """The site name a node id had (from the statistics round's replies)."""
    for reply in rec.replies:
        if reply.metadata.src_node_id == node_id and "site" in reply.content.config_records:
            return str(reply.content["site"]["name"])
    raise AssertionError(f"node {node_id} never described itself")


def _sim(tmp_path, out, *sets, ok=True):
    csv, mapping = write_toy(tmp_path, n=300)
    args = ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
            "simulation.partition=iid", "simulation.n_sites=4", "simulation.compare=false",
            f"simulation.site_state_dir={tmp_path / 'state'}", "privacy.mode=distributed",
            "privacy.delta=1e-5", *SMALL_MODEL, *sets]
    proc = subprocess.run([str(BIN / "safn-sim"), *[x for s in args for x in ("--set", s)],
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (proc.returncode == 0) == ok, text[-3000:]
    return text


def test_a_spent_budget_declines_and_too_few_sites_stop_the_run_cleanly(tmp_path):
    # two sites will not take part: one insists on local DP-SGD, one's budget is too small
    # for the run; 2 of 4 remain, fewer than max(3, t + 2) = 3: the run stops before training
    _sim(tmp_path, tmp_path / "few", "privacy.epsilon=3", "federation.rounds=3",
         "privacy.sites.site_01.mode=dp-sgd", "privacy.sites.site_02.max_noise_multiplier=0.5",
         ok=False)
    out = (tmp_path / "few" / "progress.log").read_text()
    assert "site site_01 takes no part: this site trains only with local DP-SGD" in out
    assert "site site_02 takes no part" in out and "privacy.max_noise_multiplier = 0.5" in out
    assert "distributed DP needs at least 3 sites that can take part" in out
    status = json.loads((tmp_path / "few" / "federation_status.json").read_text())
    assert status["status"] == "failed" and status["kind"] == "DistributedDPStopped"
    assert not (tmp_path / "few" / "checkpoints").exists() or not any(
        (tmp_path / "few" / "checkpoints").iterdir())
    # a site with a smaller budget takes part; σ is the largest the sites need
    _sim(tmp_path, tmp_path / "ok", "privacy.epsilon=3", "federation.rounds=3",
         "privacy.sites.site_03.epsilon=1.5")
    plan = json.loads((tmp_path / "ok" / "distributed_dp.json").read_text())
    assert plan["sites"] == ["site_01", "site_02", "site_03", "site_04"]
    history = json.loads((tmp_path / "ok" / "history.json").read_text())
    last = history[-1]["privacy"]
    # σ is shared and δ equal, so every site spends what the tightest budget allows
    assert 1.5 - 0.02 <= last["site_03"]["epsilon"] <= 1.5
    assert {round(r["epsilon"], 9) for r in last.values()} == {round(last["site_03"]["epsilon"],
                                                                     9)}
    # the same ledgers again: site_03's budget is spent, so it declines; the others go on
    _sim(tmp_path, tmp_path / "again", "privacy.epsilon=3", "federation.rounds=3",
         "privacy.sites.site_03.epsilon=1.5")
    out = (tmp_path / "again" / "progress.log").read_text()
    assert "site site_03 takes no part" in out
    assert re.search(r"\(ε spent 1\.4[89]\d* of 1\.5\)|\(ε spent 1\.5 of 1\.5\)", out), out
    plan = json.loads((tmp_path / "again" / "distributed_dp.json").read_text())
    assert plan["sites"] == ["site_01", "site_02", "site_04"]
    assert "site_03" in plan["declined"]


def test_a_resumed_run_keeps_its_plan_and_resends_the_kept_shares(tmp_path):
    """A run stopped after round 2 whose sites had already sent round 3's shares: resumed, it
    keeps σ, every site sends its kept round-3 share again (no second draw, no second ledger
    entry), and round 3's model is the uninterrupted run's, bit for bit."""
    from safn_core.federation.checkpoint import load_checkpoint
    from tests.helpers import truncate_checkpoints

    run_dir = tmp_path / "run"
    _sim(tmp_path, run_dir, "privacy.epsilon=3", "federation.rounds=3", "federation.patience=null")
    uninterrupted = load_checkpoint(run_dir)
    assert uninterrupted.round == 3
    truncate_checkpoints(run_dir, 2)
    proc = subprocess.run([str(BIN / "safn-sim"), "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    progress = (run_dir / "progress.log").read_text()
    assert "distributed DP: the run's plan kept" in progress
    resumed = load_checkpoint(run_dir)
    assert resumed.round == 3
    for name, value in uninterrupted.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], value, err_msg=name)
    for site in ("site_01", "site_02", "site_03", "site_04"):
        ledger = json.loads((tmp_path / "state" / site / "privacy_ledger.json").read_text())
        rounds = [e["round"] for e in ledger["entries"] if e["kind"] == "distributed"]
        assert rounds == [1, 2, 3], (site, rounds)


def test_a_kept_share_is_sent_again_only_for_the_plan_it_was_drawn_for(tmp_path):
    """A resumed round with other sites has another plan (grid, shares): the kept share is not
    sent for it (its noise would be too little and its scale wrong), nor is a new one drawn."""
    from safn.client import secure_aggregation as secure
    from safn.client.distributed_replies import reusable

    kw = dict(noise_multiplier=1.0, clipping_norm=1.0, colluding=1, dimension=10,
              max_site_examples=100_000)
    six, five = NoiseShares.plan(sites=6, **kw), NoiseShares.plan(sites=5, **kw)
    assert six.scale != five.scale
    ctx = AggregationContext("run", 4, "train", 0)
    share = {"share": np.arange(10, dtype=np.int64), "examples": 7, "sites": 1,
             "noise_shares": 1}
    plan6 = json.dumps(six.to_dict(), sort_keys=True)
    secure.keep(tmp_path, ctx, share, min_peers=six.honest, plan=plan6)
    kept = secure.kept(tmp_path, ctx.with_attempt(1))
    values, reason = reusable(kept, plan6, 4)
    assert reason is None and set(values) == set(share)
    np.testing.assert_array_equal(values["share"], share["share"])
    values, reason = reusable(kept, json.dumps(five.to_dict(), sort_keys=True), 4)
    assert values is None and "another noise plan" in reason


def test_the_preset_is_the_coordinators_not_a_sites_own():
    """A deployed site's site.yaml on distributed DP keeps its own accountant (its ledger is
    bound to it); the coordinator's configuration takes the preset."""
    from safn_core.config.dp_preset import DISTRIBUTED_PRESET

    coordinator = load_config(None, ["privacy.mode=distributed", "privacy.epsilon=3"])
    preset = DISTRIBUTED_PRESET.get("privacy", {})
    if "accountant" in preset:
        assert coordinator.privacy.accountant == preset["accountant"]
    site = load_config(None, ["privacy.mode=distributed", "privacy.epsilon=3",
                              "site.name=a", "site.superlink=127.0.0.1:9092"])
    assert site.privacy.accountant == "rdp"  # the schema's default, the site's own
    assert site.federation.rounds == 20
