"""Differential privacy through the federation: the DP core wired into the Flower apps.

Real Ray simulations through the `safn-sim` console script (small model, 3 toy sites) and the
real Opacus accountant; the strategy's screening and Flower's central-DP wrapper are also
checked directly on hand-made replies. The site ledgers live in ``<tmp>/ledgers`` (outside every
run folder), so runs in one test share them as real sites' disks would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from safn_core.bundle import load_bundle
from safn_core.config import load_config
from safn_core.errors import ConfigError
from safn_core.federation.checkpoint import load_checkpoint
from safn_core.federation.event_text import rejection_text
from safn_core.federation.run_folder import load_run_config
from safn.simulations.virtual_sites import load_virtual_site
from safn_core.federation.site import Site
from safn_core.federation.site_privacy import METRIC_KEYS, effective_privacy
from safn_core.privacy import PrivacyLedger
from safn_core.processes import descendants
from safn_core.training.local import make_model
from safn.server.central_dp import CentralDP
from safn.server.strategies import flower_strategy
from safn.server.strategy import RunSites, SafnStrategy, StrategyOptions
from tests.helpers import SMALL_MODEL, write_toy

pytestmark = pytest.mark.timeout(300)

BIN = Path(sys.executable).parent
SMALL = SMALL_MODEL + ["train.lr=0.005", "simulation.compare=false",
                       "simulation.num_cpus_per_site=1", "federation.min_sites=1"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    csv, mapping = write_toy(folder, n=400)
    return ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}"]


def argv(table, out, ledgers, *extra):
    sets = table + SMALL + [f"simulation.site_state_dir={ledgers}", *extra]
    return [x for s in sets for x in ("--set", s)] + ["--out", str(out)]


def sim(args, timeout=240):
    proc = subprocess.run([str(BIN / "safn-sim"), *args], capture_output=True, text=True,
                          timeout=timeout)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def sample_rate(run_dir: Path, site: str) -> float:
    """Opacus' Poisson rate for the site's training split, computed here from the split."""
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    for i in range(3):
        name, cohort = load_virtual_site(run_dir, i)
        if name == site:
            n = len(Site(name, cohort, cfg).split.train)
            return 1.0 / math.ceil(n / cfg.train.batch_size)
    raise KeyError(site)


def opacus_epsilon(releases, delta: float) -> float:
    """An Opacus RDP accountant stepped through these releases, independently of safn."""
    acc = RDPAccountant()
    for sigma, q, steps in releases:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def site_reports(hist: list[dict], site: str) -> list[dict]:
    return [e["privacy"][site] for e in hist if site in (e.get("privacy") or {})]


# ------------------------------------------------------------------ unit: settings and replies


def test_site_settings_and_config_errors(tmp_path):
    cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=3",
                             "privacy.sites={B: {mode: 'off'}, C: {epsilon: 1}}"])

    class FakeSite:  # effective_privacy reads only the name and the site's config
        def __init__(self, name, cfg):
            self.name, self.cfg = name, cfg

    # simulation: the privacy section is the virtual sites' own file (no separate request)
    assert effective_privacy(FakeSite("A", cfg), cfg.privacy).epsilon == 3
    assert effective_privacy(FakeSite("B", cfg), cfg.privacy).mode == "off"
    assert effective_privacy(FakeSite("C", cfg), cfg.privacy).epsilon == 1
    # deployment: the site's own settings, tightened (never weakened) by the coordinator
    own = load_config(None, ["site.name=A", "privacy.mode=dp-sgd", "privacy.epsilon=2"])
    off = load_config(None, ["privacy.mode=off"]).privacy
    ask = load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=8"]).privacy
    assert effective_privacy(FakeSite("A", own), off).mode == "dp-sgd"
    assert effective_privacy(FakeSite("A", own), ask).epsilon == 2
    plain = load_config(None, ["site.name=A"])
    assert effective_privacy(FakeSite("A", plain), ask).epsilon == 8  # the coordinator asks

    with pytest.raises(ConfigError, match="central_dp needs strategy fedavg or fedprox"):
        load_config(None, ["federation.central_dp.enabled=true", "federation.strategy=fedadam"])
    with pytest.raises(ConfigError, match="'federation.central_dp.noise_multiplier'"):
        load_config(None, ["federation.central_dp.noise_multiplier=0"])


def _reply(node: int, arrays: dict | None, metrics: dict, refusal: str | None = None) -> Message:
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if refusal:
        content["refusal"] = ConfigRecord({"reason": refusal})
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                    message_type="train")
    return Message(RecordDict(content), metadata=meta)


def _metrics(n, *, dp=0, eps=-1.0, refused=0, loss=0.5):
    return {"num-examples": n, "train-loss": loss, "dp": dp, "epsilon": eps,
            "delta": 1e-5 if dp else 0.0, "epsilon-budget": 3.0 if dp else -1.0,
            "noise-multiplier": 1.1 if dp else 0.0, "dp-steps": 4 if dp else 0,
            "refused": refused}


def test_refusals_are_recorded_not_averaged_and_central_dp_clips_and_records():
    cfg = load_config(None, ["federation.central_dp.enabled=true",
                             "federation.secure_aggregation=false",
                             "federation.central_dp.noise_multiplier=1e-6",
                             "federation.central_dp.clipping_norm=0.1"])
    glob = {"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    sites = RunSites({1: "A", 2: "B", 3: "C"}, frozenset({1, 2, 3}))

    def strategy_with(min_sites: int) -> SafnStrategy:
        central = CentralDP(cfg.federation.central_dp, 3)
        options = StrategyOptions.from_config(cfg.federation, 0)
        strategy = SafnStrategy(central.wrap(flower_strategy(cfg.federation)),
                                dataclasses.replace(options, min_sites=min_sites),
                                sites, central_dp=central,
                                expected={k: v.shape for k, v in glob.items()})
        assert strategy.inner.num_sampled_clients == 3  # Flower's own DP wrapper
        # what Flower's wrapper keeps from configure_train: the global model of the round
        strategy.inner.current_arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
        return strategy

    strategy = strategy_with(cfg.federation.min_sites)
    replies = [
        # B sends its arrays in another order: re-ordered before Flower's clipping pairs them
        _reply(2, {"b": np.ones(2, np.float32), "w": np.full(3, 10.0, np.float32)},
               _metrics(100, loss=0.25)),
        _reply(1, {"w": np.full(3, 10.0, np.float32), "b": np.ones(2, np.float32)},
               _metrics(300, dp=1, eps=2.5, loss=-1.0)),
        _reply(3, None, _metrics(0, dp=1, eps=2.99, refused=1, loss=-1.0),
               "privacy budget exhausted: ε spent so far 2.99 of 3"),
    ]
    arrays, metrics = strategy.aggregate_train(5, replies)
    record = strategy.record()
    # the refused site is recorded with its reason and its ε, and left out of the average
    assert record.round == 5
    assert record.refused == ({"site": "C",
                               "reason": "privacy budget exhausted: ε spent so far 2.99 of 3"},)
    assert sorted(record.trained) == ["A", "B"] and record.rejected == ()
    assert record.privacy["C"]["refused"] and record.privacy["C"]["epsilon"] == 2.99
    assert record.privacy["B"]["epsilon"] is None and not record.privacy["B"]["dp"]
    # ε is never averaged; the loss only over sites that report one (a DP site withholds it)
    assert set(metrics.keys()) == {"num-examples", "train-loss"}
    assert metrics["train-loss"] == pytest.approx(0.25) and metrics["num-examples"] == 400
    # Flower's server-side clipping: each update clipped to norm 0.1, then averaged
    new = np.concatenate([arrays["w"].numpy(), arrays["b"].numpy()])
    assert np.linalg.norm(new) == pytest.approx(0.1, rel=1e-3)
    release = record.central_dp
    assert release["sites_aggregated"] == 2 and release["max_weight"] == pytest.approx(0.75)
    assert release["effective_noise_multiplier"] == pytest.approx(1e-6 / (3 * 0.75))

    # too few usable replies: nothing is released, the model is unchanged, said by round
    strategy = strategy_with(2)
    arrays, _ = strategy.aggregate_train(6, [replies[2]])
    record = strategy.record()
    assert arrays is None and record.central_dp is None
    assert record.rejected[-1]["code"] == "too_few"
    assert "fewer than min_sites" in rejection_text(record.rejected[-1])


# ------------------------------------------------------------------ through Flower (Ray)


def test_dp_federation_epsilon_ledger_and_mixed_sites(table, tmp_path):
    """Mixed DP/non-DP federation; ε equals Opacus' own recomputation; a second run starts
    from the spent budget; an exhausted site refuses clearly while the others train."""
    ledgers = tmp_path / "ledgers"
    first = tmp_path / "first"
    out = sim(argv(table, first, ledgers, "federation.rounds=3", "privacy.mode=dp-sgd",
                   "privacy.epsilon=3", "privacy.sites={site_B: {mode: 'off'}, "
                                        "site_C: {epsilon: 8, delta: 1.0e-5}}"))
    hist = history(first)
    assert [e["round"] for e in hist] == [1, 2, 3]
    assert "DP-SGD ε spent so far" in out and "site_B off" in out
    for e in hist:  # mixed federation: one parameter layout, every update used
        assert e["sites_trained"] == ["site_A", "site_B", "site_C"] and not e["rejected"]
    b = site_reports(hist, "site_B")
    assert all(not r["dp"] and r["epsilon"] is None for r in b)
    model = make_model(load_bundle(first / "model").preprocessor.modalities,
                       load_run_config(first.resolve()).model, 0)
    assert set(load_checkpoint(first).weights) == set(model.state_dict())

    # the ε a site reports is what Opacus' accountant computes for its (σ, q, steps)
    for site, budget in (("site_A", 3.0), ("site_C", 8.0)):
        reps = site_reports(hist, site)
        q = sample_rate(first, site)
        steps = 0
        for r in reps:
            steps += r["dp_steps"]
            assert r["dp"] and r["epsilon_budget"] == budget and not r["refused"]
            assert r["epsilon"] == pytest.approx(
                opacus_epsilon([(r["noise_multiplier"], q, steps)], r["delta"]), rel=1e-9)
        assert [r["epsilon"] for r in reps] == sorted(r["epsilon"] for r in reps)
        assert budget - 0.02 <= reps[-1]["epsilon"] <= budget  # the plan spends the budget
    assert site_reports(hist, "site_C")[0]["delta"] == 1e-5
    ledger_a = ledgers / "site_A" / "privacy_ledger.json"
    assert ledger_a.is_file() and not (ledgers / "site_B" / "privacy_ledger.json").exists()
    # DP-SGD sites under secure aggregation (the default): only sums reached the coordinator
    assert "securely summed" in out and all(e["secure_sum"]["sites_trained"] == 3 for e in hist)
    assert not list(first.rglob("privacy_ledger.json"))  # never inside a run folder
    rounds = pd.read_csv(first / "rounds.csv")
    assert "epsilon" in rounds.columns
    html = (first / "report.html").read_text()
    assert "Differential privacy" in html and (first / "epsilon.png").is_file()
    meta = load_bundle(first / "model").meta
    assert meta["privacy"]["site_dp"]["sites"]["site_A"]["epsilon"] == pytest.approx(
        site_reports(hist, "site_A")[-1]["epsilon"])
    card = (first / "model" / "model_card.md").read_text()
    assert "## Privacy" in card and "site_B: no DP" in card

    # a second run on the same ledgers: site_A starts from what it spent (and plans its σ on
    # the remainder, so its ε never exceeds the budget); site_C's operator lowered its budget
    # below its spend: it refuses every round with a clear message, the others train
    spent_a = site_reports(hist, "site_A")[-1]["epsilon"]
    spent_c = site_reports(hist, "site_C")[-1]["epsilon"]
    second = tmp_path / "second"
    # (site_A's operator raised its total budget to 4: the ~0.02 left of 3 would buy only
    # noise, which privacy.max_noise_multiplier refuses)
    out = sim(argv(table, second, ledgers, "federation.rounds=2", "privacy.mode=dp-sgd",
                   "privacy.epsilon=4", "privacy.sites={site_B: {mode: 'off'}, "
                                        "site_C: {epsilon: 5, delta: 1.0e-5}}"))
    hist2 = history(second)
    a2 = site_reports(hist2, "site_A")
    assert a2[0]["epsilon"] >= spent_a and a2[-1]["epsilon"] <= 4.0
    q = sample_rate(second, "site_A")
    releases = [(r["noise_multiplier"], q, r["dp_steps"]) for r in site_reports(hist, "site_A")
                + a2]
    assert a2[-1]["epsilon"] == pytest.approx(opacus_epsilon(releases, a2[-1]["delta"]),
                                              rel=1e-9)
    for e in hist2:
        assert e["sites_trained"] == ["site_A", "site_B"]
        assert e["privacy"]["site_C"]["refused"] and e["privacy"]["site_C"]["dp_steps"] == 0
        assert e["privacy"]["site_C"]["epsilon"] == pytest.approx(spent_c)
        (refusal,) = e["refused"]
        assert refusal["site"] == "site_C"
        assert refusal["reason"].startswith("privacy budget exhausted, the site does not train")
        assert "only the site may raise privacy.epsilon" in refusal["reason"]
    assert "site site_C did not train: privacy budget exhausted" in out
    assert "(refused)" in out
    ledger = PrivacyLedger.read(ledger_a)
    assert len(ledger.snapshot()["plans"]) == 2  # one plan per run


def test_killed_run_resumes_without_resetting_epsilon(table, tmp_path):
    """Kill the whole simulation (coordinator and every site process) during round 2, resume
    it: the ledger keeps every reservation, ε goes on from where it was, never below."""
    ledgers, run_dir = tmp_path / "ledgers", tmp_path / "run"
    args = argv(table, run_dir, ledgers, "federation.rounds=3", "privacy.mode=dp-sgd",
                "privacy.epsilon=2", "privacy.sites={site_B: {mode: 'off'}}")
    proc = subprocess.Popen([str(BIN / "safn-sim"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = run_dir / "progress.log"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.is_file() and "round   1/3" in progress.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        tree = descendants(proc.pid)  # Ray's processes and the sites' ClientApp actors
        for pid in [proc.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.wait(timeout=60)
    before = load_checkpoint(run_dir)
    assert before is not None and before.round in (1, 2)
    eps_before = before.history[-1]["privacy"]["site_A"]["epsilon"]
    ledger = PrivacyLedger.read(ledgers / "site_A" / "privacy_ledger.json")
    assert ledger.charged_steps() >= sum(e["privacy"]["site_A"]["dp_steps"]
                                         for e in before.history)

    out = sim(["--resume", str(run_dir)])
    assert f"resuming after round {before.round} of 3" in out
    hist = history(run_dir)
    assert [e["round"] for e in hist] == [1, 2, 3]
    after = [e["privacy"]["site_A"] for e in hist[before.round:]]
    assert after[0]["epsilon"] >= eps_before  # never reset
    assert all(r["epsilon"] <= 2.0 for r in after)
    assert len(PrivacyLedger.read(ledgers / "site_A" / "privacy_ledger.json")
               .snapshot()["plans"]) == 1  # the resumed run kept its plan (same run id)
    # the replayed rounds were paid again: once the plan's steps are used up the site refuses
    # (a checkpoint never rewinds a ledger) while site_B goes on training
    final = PrivacyLedger.read(ledgers / "site_A" / "privacy_ledger.json")
    assert final.charged_steps() >= ledger.charged_steps()
    assert all("site_B" in e["sites_trained"] for e in hist)


def test_central_dp_runs_and_is_reported(table, tmp_path):
    run_dir = tmp_path / "central"
    out = sim(argv(table, run_dir, tmp_path / "ledgers", "federation.rounds=2",
                   "federation.central_dp.enabled=true", "federation.secure_aggregation=false",
                   "federation.central_dp.noise_multiplier=0.8",
                   "federation.central_dp.clipping_norm=0.5"))
    hist = history(run_dir)
    assert "central DP (server-side clipping + noise), no per-site ε" in out
    z = []
    for e in hist:
        c = e["central_dp"]
        assert c["mechanism"] == "central DP (server-side clipping + noise), no per-site ε"
        assert c["noise_multiplier"] == 0.8 and c["clipping_norm"] == 0.5
        assert c["sites_per_round"] == 3 and c["sites_aggregated"] == 3
        assert c["effective_noise_multiplier"] == pytest.approx(0.8 / (3 * c["max_weight"]))
        z.append(c["effective_noise_multiplier"])
        assert c["epsilon"] == pytest.approx(opacus_epsilon([(s, 1.0, 1) for s in z], 1e-5),
                                             rel=1e-9)
        assert "privacy" not in e  # no per-site ε: no site trains with DP-SGD
    meta = load_bundle(run_dir / "model").meta
    assert meta["privacy"]["central_dp"]["epsilon"] == pytest.approx(hist[-1]["central_dp"]
                                                                     ["epsilon"])
    assert "site_dp" not in meta["privacy"]
    assert "central DP (server-side clipping + noise)" in (run_dir / "report.html").read_text()


def test_every_reply_has_the_same_metric_keys(table, tmp_path):
    """A non-DP site, a DP site and a refused DP site send identical metric keys."""
    from safn_core.data.table_loader import load_table
    from safn_core.federation.aggregate import global_preprocessing
    from safn_core.federation.site_privacy import train_round

    cfg = load_config(None, table + SMALL + ["privacy.mode=dp-sgd", "privacy.epsilon=2",
                                             "privacy.sites={B: {mode: 'off'}}"])
    cohort = load_table(cfg.data.path, cfg.data.mapping)
    sites = {n: Site(n, cohort.subset(cohort.ids[i::2]), cfg) for i, n in enumerate("AB")}
    stats = [s.describe() for s in sites.values()]
    pre, counts = global_preprocessing(cohort.modalities, [s for s, _ in stats],
                                       [c for _, c in stats])
    state = {k: v.numpy() for k, v in make_model(cohort.modalities, cfg.model, 0)
             .state_dict().items()}
    kw = dict(request=cfg.privacy, state_dir=None, run_id="r1", rounds=1, epochs=1, seed=0)
    a = train_round(sites["A"], state, pre, counts, server_round=1,
                    **{**kw, "state_dir": tmp_path / "A"})
    b = train_round(sites["B"], state, pre, counts, server_round=1, **kw)
    refused = train_round(sites["A"], state, pre, counts, server_round=2,
                          **{**kw, "state_dir": tmp_path / "A"})  # the 1-round plan is spent
    for out in (a, b, refused):
        assert tuple(out.metrics) == METRIC_KEYS
    assert a.refusal is None and a.metrics["dp"] == 1 and a.metrics["train-loss"] == -1.0
    assert set(a.weights) == set(b.weights) == set(state)
    assert b.metrics["dp"] == 0 and b.metrics["epsilon"] == -1.0 and b.metrics["train-loss"] > 0
    assert refused.weights is None and refused.metrics["refused"] == 1
    assert refused.refusal.startswith("privacy budget exhausted: ε spent so far")
    assert refused.metrics["epsilon"] == pytest.approx(a.metrics["epsilon"])


# ------------------------------------------------------------------ promises that must hold


RANGES = "ranges:\n" + "".join(f"  ct_{j}: [0.0, 5.0]\n" for j in range(6)) + "".join(
    f"  cl_{j}: [-10.0, 40.0]\n" for j in range(3)) + "  age: [18.0, 100.0]\n"


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_gaussian_statistics_round_is_noised_charged_and_the_run_completes(table, tmp_path,
                                                                           secure):
    """privacy.statistics: gaussian through Flower: the coordinator builds its preprocessing
    and class counts from noised statistics (not the exact ones), each site's ledger records
    the release before its training, ε composes both, and the run completes; with secure
    aggregation the same release is what the sites sum (charged once, not once per sum)."""
    from safn_core.federation.aggregate import global_preprocessing

    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(Path(table[2].split("=", 1)[1]).read_text() + RANGES)
    data = [table[0], table[1], f"data.mapping={mapping}"]
    ledgers, run_dir = tmp_path / "ledgers", tmp_path / "run"
    out = sim(argv(data, run_dir, ledgers, "federation.rounds=2",
                   f"federation.secure_aggregation={str(secure).lower()}", "privacy.mode=dp-sgd",
                   "privacy.epsilon=4", "privacy.statistics=gaussian",
                   "privacy.statistics_epsilon=0.5"))
    hist = history(run_dir)
    assert [e["round"] for e in hist] == [1, 2]
    assert all(e["sites_trained"] == ["site_A", "site_B", "site_C"] for e in hist)
    assert "site site_A sent noised statistics (Gaussian mechanism" in out

    # what the coordinator used differs from what the exact statistics would have given
    cfg = load_run_config(run_dir.resolve())
    sites = [Site(*load_virtual_site(run_dir.resolve(), i), cfg) for i in range(3)]
    exact = [s.describe() for s in sites]
    pre, counts = global_preprocessing(sites[0].cohort.modalities, [s for s, _ in exact],
                                       [c for _, c in exact])
    used = load_checkpoint(run_dir)
    assert used.class_counts != counts
    assert not np.allclose(used.preprocessing["mean"], pre.mean_)

    for site in ("site_A", "site_B", "site_C"):
        ledger = PrivacyLedger.read(ledgers / site / "privacy_ledger.json")
        first, *rounds = ledger.entries
        assert (first["kind"], first["sample_rate"], first["steps"], first["round"]) == \
            ("statistics", 1.0, 1, 0)
        assert [e["kind"] for e in rounds] == ["train", "train"]
        assert [e["kind"] for e in ledger.events].count("statistics_released") == 1
        plan = next(iter(ledger.snapshot()["plans"].values()))
        delta = ledger.delta
        assert plan["epsilon_before"] == pytest.approx(
            opacus_epsilon([(first["noise_multiplier"], 1.0, 1)], delta), rel=1e-9)
        assert 0.49 <= plan["epsilon_before"] <= 0.5
        # the ε a site reports composes the statistics release with its DP-SGD steps
        last = site_reports(hist, site)[-1]
        releases = [(first["noise_multiplier"], 1.0, 1)] + [
            (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rounds]
        assert last["epsilon"] == pytest.approx(opacus_epsilon(releases, delta), rel=1e-9)
        assert last["epsilon"] <= 4.0
    meta = load_bundle(run_dir / "model").meta
    assert set(meta["privacy"]["statistics_dp"]["sites"]) == {"site_A", "site_B", "site_C"}
    card = (run_dir / "model" / "model_card.md").read_text()
    assert "statistics round through the Gaussian mechanism" in card
    assert "the statistics round of every other site" in card


def test_a_run_in_which_no_site_trained_fails_with_each_sites_reason(table, tmp_path):
    """Every site's budget is too small for the run (σ above max_noise_multiplier): every site
    refuses every round; the run ends as failed with each site's reason, writes no bundle, and
    safn-sim exits non-zero with that one-line message and no traceback."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "safn-sim"), *argv(table, run_dir, tmp_path / "ledgers",
                                      "federation.rounds=2", "privacy.mode=dp-sgd",
                                      "privacy.epsilon=0.05", "privacy.max_noise_multiplier=2",
                                      "federation.secure_aggregation=false")],
        capture_output=True, text=True, timeout=240)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "the federation failed: no site trained in any of the 2 rounds, so there is no " \
           "model (no bundle written)" in err
    for site in ("site_A", "site_B", "site_C"):
        assert f"site {site} refused: privacy budget nearly exhausted" in err
    assert "privacy.max_noise_multiplier = 2" in err
    status = json.loads((run_dir / "federation_status.json").read_text())
    assert status["status"] == "failed" and "no site trained" in status["reason"]
    assert not (run_dir / "model").exists()


def test_dp_simulations_reproduce_bit_for_bit_for_a_seed(table, tmp_path):
    """Two identical DP simulations (DP-SGD at every site, central DP at the coordinator),
    each on fresh ledgers: the same final weights and the same ε, bit for bit."""
    runs = []
    for name in ("one", "two"):
        sim(argv(table, tmp_path / name, tmp_path / f"ledgers-{name}", "federation.rounds=2",
                 "federation.secure_aggregation=false", "privacy.mode=dp-sgd",
                 "privacy.epsilon=3", "federation.central_dp.enabled=true",
                 "federation.central_dp.noise_multiplier=0.5",
                 "federation.central_dp.clipping_norm=1.0"))
        runs.append((load_checkpoint(tmp_path / name), history(tmp_path / name)))
    (a, ha), (b, hb) = runs
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    assert [e["privacy"] for e in ha] == [e["privacy"] for e in hb]
    assert [e["central_dp"]["epsilon"] for e in ha] == [e["central_dp"]["epsilon"] for e in hb]
    assert all(r["dp_steps"] > 0 for e in ha for r in e["privacy"].values())
