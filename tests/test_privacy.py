"""Differential privacy of a site: Opacus' own accountants, the persistent ledger, the budget.

Real Opacus throughout (accountants, PrivacyEngine, DPOptimizer); nothing of Opacus is mocked.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from safn_core.config import ModelConfig, PrivacyConfig, SafnConfig, TrainConfig, load_config
from safn_core.data.cohort import Modality
from safn_core.errors import ConfigError
from safn_core.preprocess import FeatureStats
from safn_core.privacy import (BudgetExhausted, LedgerError, LedgerLocked, LedgerMismatch,
                               LedgerRewind, PrivacyError, PrivacyLedger, SiteBudget,
                               SitePrivacy, calibrate_noise, data_fingerprint, epsilon,
                               exact_clipped_statistics, federation_state,
                               load_federation_state, privatise_statistics, release_statistics,
                               resolve_privacy)
from safn_core.privacy import engine as engine_mod
from safn_core.training.local import Arrays, make_loader, make_model, make_optimizer, run_epochs

ROOT = Path(__file__).resolve().parents[1]
MODS = (Modality("imaging", ("ct_0", "ct_1", "ct_2", "ct_3"), "imaging"),
        Modality("clinical", ("cl_0", "cl_1"), "clinical"))
FEATURES = [f for m in MODS for f in m.features]
MODEL = ModelConfig(d_model=8, n_heads=2, encoder_hidden=8, ffn_hidden=8, head_hidden=8,
                    dropout=0.0)
TRAIN = TrainConfig(batch_size=16, lr=5e-3)


def toy_arrays(n: int = 60, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.7).astype(np.int64)
    y[:2] = [0, 1]
    x = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    x[:, 4] += 1.5 * y
    return Arrays(x, np.ones((n, len(MODS)), bool), y)


DATA = toy_arrays()
FP = data_fingerprint([f"P{i:03d}" for i in range(len(DATA))], FEATURES)


def dp_cfg(**kw) -> PrivacyConfig:
    return PrivacyConfig(**{"mode": "dp-sgd", "epsilon": 3.0, **kw})


def site(tmp_path, cfg=None, *, run_id="run-1", rounds=2, local_epochs=1, data=DATA, **kw):
    return SitePrivacy(cfg or dp_cfg(), data, TRAIN, rounds=rounds, local_epochs=local_epochs,
                       run_id=run_id, fingerprint=kw.pop("fingerprint", FP), state_dir=tmp_path,
                       site="A", **kw)


def init_state() -> dict[str, np.ndarray]:
    return federation_state(make_model(MODS, MODEL, 0))


def train(sp: SitePrivacy, rnd: int, state=None, **kw):
    return sp.train_round(state if state is not None else init_state(), MODS, MODEL,
                          DATA.class_counts(), server_round=rnd, seed=rnd, **kw)


def opacus_epsilon(mechanism: str, releases, delta: float) -> float:
    """What an Opacus accountant reports after these steps, computed independently of safn."""
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    for sigma, q, steps in releases:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


# ------------------------------------------------------------------------------- configuration


def test_privacy_config_validation_names_the_key(tmp_path):
    assert SafnConfig().privacy.mode == "off"
    with pytest.raises(ConfigError, match=r"privacy\.epsilon is required when privacy\.mode"):
        load_config(None, ["privacy.mode=dp-sgd"])
    with pytest.raises(ConfigError, match=r"'privacy\.delta'"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=1", "privacy.delta=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'privacy\.epsilom'"):
        load_config(None, ["privacy.epsilom=1"])
    with pytest.raises(ConfigError, match=r"'privacy\.epsilon'"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=0"])
    with pytest.raises(ConfigError, match="statistics_epsilon is required"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=1",
                           "privacy.statistics=gaussian"])
    with pytest.raises(ConfigError, match="must be below privacy.epsilon"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=1",
                           "privacy.statistics=gaussian", "privacy.statistics_epsilon=1"])
    with pytest.raises(ConfigError, match=r"privacy\.sites\.B\.epsilonn: unknown key"):
        load_config(None, ["privacy.sites.B.epsilonn=1"])
    # a YAML site file: bare `off` (YAML false) still means off; per-virtual-site overrides merge
    path = tmp_path / "site.yaml"
    path.write_text("privacy:\n  mode: dp-sgd\n  epsilon: 4\n  accountant: prv\n"
                    "  sites:\n    B: {mode: off}\n    C: {epsilon: 1.5}\n")
    cfg = load_config(path).privacy
    assert cfg.for_site("B").mode == "off"
    assert (cfg.for_site("C").epsilon, cfg.for_site("C").accountant) == (1.5, "prv")
    assert cfg.for_site("D").epsilon == 4
    # the default δ is 1/(10 n); an explicit δ must be below 1/n_train
    with pytest.raises(PrivacyError, match="not below 1/n_train"):
        site(tmp_path, dp_cfg(delta=1 / len(DATA)))


def test_coordinator_can_ask_for_dp_but_never_weaken_a_site():
    strict = dp_cfg(epsilon=2.0, delta=1e-5, max_grad_norm=0.5, ledger="mine.json")
    assert resolve_privacy(strict, PrivacyConfig(mode="off")) == strict
    assert resolve_privacy(strict, None) == strict
    assert resolve_privacy(strict, dp_cfg(epsilon=8.0)) == strict
    tighter = resolve_privacy(strict, dp_cfg(epsilon=1.0, delta=1e-6))
    assert (tighter.epsilon, tighter.delta, tighter.max_grad_norm) == (1.0, 1e-6, 0.5)
    opened = resolve_privacy(PrivacyConfig(), dp_cfg(epsilon=4.0))
    assert (opened.mode, opened.epsilon) == ("dp-sgd", 4.0)
    # the ledger, the accountant and the noise cap are the site's, whatever the request says
    asked = resolve_privacy(strict, dp_cfg(epsilon=1.0, ledger="/tmp/x.json", accountant="prv",
                                           max_noise_multiplier=1e6))
    assert (str(asked.ledger), asked.accountant, asked.max_noise_multiplier) == \
        ("mine.json", "rdp", 10.0)
    stats = resolve_privacy(strict, dp_cfg(statistics="gaussian", statistics_epsilon=0.2))
    assert (stats.statistics, stats.statistics_epsilon) == ("gaussian", 0.2)
    with pytest.raises(PrivacyError, match="cannot be combined"):
        resolve_privacy(dp_cfg(epsilon=0.1), dp_cfg(statistics="gaussian",
                                                    statistics_epsilon=0.5))


# --------------------------------------------------------------------------------- accounting


def test_reported_epsilon_equals_opacus_accountant(tmp_path):
    sp = site(tmp_path, rounds=2, local_epochs=2)
    state, r1 = train(sp, 1)
    _, r2 = train(sp, 2, state)
    n, b = len(DATA), TRAIN.batch_size
    q = 1 / math.ceil(n / b)
    assert (r1.sample_rate, r2.sample_rate) == (q, q)
    assert r1.steps == r2.steps == 2 * int(1 / q)  # local epochs × Opacus' steps per epoch
    sigma = r1.noise_multiplier
    assert sigma == sp.plan()["noise_multiplier"] and sigma > 0
    delta = 1 / (10 * n)  # the default δ
    assert r1.delta == pytest.approx(delta)
    assert r1.epsilon == pytest.approx(opacus_epsilon("rdp", [(sigma, q, r1.steps)], delta),
                                       rel=1e-12)
    assert r2.epsilon == pytest.approx(
        opacus_epsilon("rdp", [(sigma, q, r1.steps + r2.steps)], delta), rel=1e-12)
    assert r1.epsilon < r2.epsilon <= 3.0
    # the ledger on disk, read as plain JSON, gives the same history to an Opacus accountant
    raw = json.loads((tmp_path / "privacy_ledger.json").read_text())
    releases = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in raw["entries"]]
    assert [e["status"] for e in raw["entries"]] == ["confirmed", "confirmed"]
    assert all(e["steps_taken"] == e["steps"] for e in raw["entries"])
    assert opacus_epsilon("rdp", releases, raw["delta"]) == pytest.approx(r2.epsilon, rel=1e-12)
    assert r1.metrics().keys() == {"dp", "epsilon", "delta", "epsilon-budget",
                                   "noise-multiplier", "dp-steps"}


def test_prv_accountant_and_calibration_match_opacus():
    releases = [(1.3, 0.2, 15), (2.0, 1.0, 1), (1.3, 0.2, 10)]
    assert epsilon(releases, 1e-4, "prv") == pytest.approx(
        opacus_epsilon("prv", releases, 1e-4), rel=1e-9)
    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-4, sample_rate=0.2, steps=25,
                            accountant="prv")
    assert sigma == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-4,
                                         sample_rate=0.2, steps=25, accountant="prv")
    assert 4.0 - 0.011 <= epsilon([(sigma, 0.2, 25)], 1e-4, "prv") <= 4.0


def test_calibration_meets_the_total_budget_over_all_planned_steps():
    q, steps, delta = 0.25, 3 * 2 * 4, 1e-3  # 3 rounds × 2 local epochs × 4 steps per epoch
    sigma = calibrate_noise(target_epsilon=2.0, delta=delta, sample_rate=q, steps=steps)
    assert sigma == get_noise_multiplier(target_epsilon=2.0, target_delta=delta,
                                         sample_rate=q, steps=steps, accountant="rdp")
    assert 2.0 - 0.01 <= opacus_epsilon("rdp", [(sigma, q, steps)], delta) <= 2.0
    # earlier spend is composed with the plan, not subtracted: the total still meets the target
    prior = [(2.0, 0.25, 4)]  # ε ≈ 1 already spent
    sigma2 = calibrate_noise(target_epsilon=2.0, delta=delta, sample_rate=q, steps=steps,
                             prior=prior)
    assert sigma2 > sigma
    assert 2.0 - 0.01 <= opacus_epsilon("rdp", prior + [(sigma2, q, steps)], delta) <= 2.0
    with pytest.raises(BudgetExhausted, match="budget is spent"):
        calibrate_noise(target_epsilon=0.5, delta=delta, sample_rate=q, steps=steps,
                        prior=[(0.5, 0.25, 100)])


# ------------------------------------------------------------------------------------ the ledger


def test_restart_does_not_reset_and_second_run_starts_from_spent_budget(tmp_path):
    first = site(tmp_path, run_id="run-1", rounds=2)
    _, r1 = train(first, 1)
    # the process dies; a new one (new objects, same disk) continues the same run
    again = site(tmp_path, run_id="run-1", rounds=2)
    assert again.epsilon() == pytest.approx(r1.epsilon, rel=1e-12)
    assert again.noise_multiplier == first.noise_multiplier  # the run's plan is kept
    _, r2 = train(again, 2)
    assert r1.epsilon < r2.epsilon <= 3.0
    # a second run on the same ledger starts from the spent budget and plans on what is left
    # (the site raised its total budget to 4: with 3 nothing useful would be left)
    second = site(tmp_path, dp_cfg(epsilon=4.0), run_id="run-2", rounds=2)
    assert second.epsilon() == pytest.approx(r2.epsilon, rel=1e-12)
    plan = second.plan()
    assert plan["epsilon_before"] == pytest.approx(r2.epsilon, rel=1e-12)
    assert plan["noise_multiplier"] > first.noise_multiplier
    assert r2.epsilon < plan["epsilon_planned"] <= 4.0
    _, r3 = train(second, 1)
    assert r2.epsilon < r3.epsilon <= plan["epsilon_planned"]


def test_crash_between_reservation_and_confirmation_keeps_the_spend(tmp_path, monkeypatch):
    sp = site(tmp_path)

    def killed(*args, **kwargs):
        raise RuntimeError("site killed mid-round")

    monkeypatch.setattr(engine_mod.local, "run_epochs", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(sp, 1)
    monkeypatch.undo()
    restarted = site(tmp_path)
    [entry] = restarted.ledger.entries
    assert entry["status"] == "reserved" and entry["steps"] == restarted.steps_per_round()
    expected = opacus_epsilon("rdp", [(restarted.noise_multiplier, restarted.sample_rate,
                                       entry["steps"])], restarted.delta)
    assert restarted.epsilon() == pytest.approx(expected, rel=1e-12) and expected > 0
    _, report = train(restarted, 1)  # the retried round is charged again, never netted out
    assert len(restarted.ledger.entries) == 2 and report.epsilon > expected


def test_killed_process_keeps_its_reservation_and_releases_the_lock(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests import test_privacy as t
        from safn_core.privacy import engine
        def hang(*a, **k):
            print("training", flush=True)
            time.sleep(120)
        engine.local.run_epochs = hang
        t.train(t.site(__import__("pathlib").Path({str(tmp_path)!r})), 1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "training"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    sp = site(tmp_path, lock_timeout=2.0)  # the dead process's lock is gone
    assert [e["status"] for e in sp.ledger.entries] == ["reserved"]
    assert sp.epsilon() > 0


def test_exhausted_budget_refuses_before_training_with_a_clear_message(tmp_path):
    sp = site(tmp_path, dp_cfg(epsilon=2.0), rounds=1)
    state, report = train(sp, 1)
    assert report.epsilon <= 2.0
    entries = sp.ledger.entries
    assert not sp.would_fit()
    with pytest.raises(BudgetExhausted) as exc:
        sp.check_round(2)
    msg = str(exc.value)
    assert "site A: privacy budget exhausted" in msg and "of 2" in msg and "ledger" in msg.lower()
    assert exc.value.spent == pytest.approx(report.epsilon) and exc.value.needed > 2.0
    with pytest.raises(BudgetExhausted):
        train(sp, 2, state)
    assert sp.ledger.entries == entries  # nothing reserved, nothing spent
    refusal = sp.metrics_now()  # what the refusing site reports: same keys, no steps
    assert refusal.keys() == report.metrics().keys() and refusal["dp-steps"] == 0
    assert refusal["epsilon"] == pytest.approx(report.epsilon)
    # a later run whose budget is already spent is refused at once, with no training
    with pytest.raises(BudgetExhausted, match="does not train in run run-9"):
        site(tmp_path, dp_cfg(epsilon=report.epsilon), run_id="run-9").check_round(1)


def test_ledger_is_atomic_append_only_and_never_rewound(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4)
    stale = PrivacyLedger.read(path)
    old_bytes = path.read_bytes()
    seq = ledger.reserve(kind="train", run_id="r", round=1, noise_multiplier=1.0,
                         sample_rate=0.25, steps=8)
    ledger.confirm(seq, steps_taken=0)  # confirming never lowers the charge
    assert ledger.history() == [(1.0, 0.25, 8)]
    with pytest.raises(LedgerRewind, match="never rewound"):
        stale.save()  # an older copy cannot overwrite the newer ledger
    path.write_bytes(old_bytes)  # someone restores an old backup behind a live process
    with pytest.raises(LedgerRewind, match="replaced by an older copy"):
        ledger.reserve(kind="train", run_id="r", round=2, noise_multiplier=1.0,
                       sample_rate=0.25, steps=8)
    # atomic writes leave no temporary files; the file is always complete JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert json.loads(path.read_text())["format"] == "safn-privacy-ledger/1"
    # a corrupt ledger is an error, never silently replaced by an empty one
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="do not delete it"):
        PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4)
    assert path.read_text() == "{not json"


def test_ledger_is_bound_to_its_data_accountant_and_delta(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4)
    ledger.reserve(kind="train", run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.5,
                   steps=2)
    other = data_fingerprint([f"P{i:03d}" for i in range(len(DATA) + 1)], FEATURES)
    assert data_fingerprint(reversed([f"P{i:03d}" for i in range(len(DATA))]), FEATURES) == FP
    for kw in ({"fingerprint": other}, {"accountant": "prv"}, {"delta": 1e-5}):
        args = {"fingerprint": FP, "accountant": "rdp", "delta": 1e-4, **kw}
        with pytest.raises(LedgerMismatch, match="accept_ledger_change"):
            PrivacyLedger.open(path, **args)
    moved = PrivacyLedger.open(path, fingerprint=other, accountant="rdp", delta=1e-4,
                               accept_changes=True)
    assert moved.history() == [(1.0, 0.5, 2)]  # the old spend still counts
    assert moved.events[-1]["kind"] == "fingerprint_changed"


def test_lock_stops_a_second_process_spending_concurrently(tmp_path):
    path = tmp_path / "ledger.json"
    holder = PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4)
    with holder.transaction():
        with pytest.raises(LedgerLocked, match="locked by another process"):
            PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4,
                               lock_timeout=0.2)
    PrivacyLedger.open(path, fingerprint=FP, accountant="rdp", delta=1e-4, lock_timeout=0.2)


# ----------------------------------------------------------------------------------- training


def plain_train(state, seed=1):
    """What a non-DP site does (`Site.train`): the same model, loader, optimizer and loop."""
    torch.manual_seed(seed)
    model = make_model(MODS, MODEL, seed)
    load_federation_state(model, state)
    run_epochs(model, make_loader(DATA, TRAIN.batch_size, seed), make_optimizer(model, TRAIN),
               1, MODEL, DATA.class_counts())
    return federation_state(model)


def test_dp_and_non_dp_sites_share_one_layout_and_dp_training_moves_weights(tmp_path):
    start = init_state()
    plain = plain_train(start)
    private, rd = train(site(tmp_path / "dp"), 1, start, proximal_mu=0.1)
    with pytest.raises(PrivacyError, match="privacy.mode is 'off'"):
        site(tmp_path / "plain", PrivacyConfig())  # a non-DP site has no SitePrivacy
    reference = make_model(MODS, MODEL, 0).state_dict()
    for state in (plain, private):
        assert list(state) == list(reference)  # no `_module.` prefix, same order
        assert all(state[k].shape == tuple(reference[k].shape) for k in reference)
        assert all(np.isfinite(v).all() for v in state.values())
    assert rd.dp is True and rd.steps > 0
    moved = max(float(np.abs(private[k] - start[k]).max()) for k in start)
    assert moved > 1e-4
    # the federation averages them like any two sites, and either loads into a fresh model
    averaged = {k: (plain[k] + private[k]) / 2 for k in start}
    model = make_model(MODS, MODEL, 1)
    load_federation_state(model, {"_module." + k: v for k, v in averaged.items()})
    assert all(np.allclose(v.numpy(), averaged[k]) for k, v in model.state_dict().items())


def test_an_empty_poisson_batch_still_takes_its_noise_step():
    from opacus import PrivacyEngine

    model = make_model(MODS, MODEL, 0)
    optimizer = make_optimizer(model, TRAIN)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=make_loader(DATA, 16, 0),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    empty = (torch.zeros(0, len(FEATURES)), torch.zeros(0, len(MODS), dtype=torch.bool),
             torch.zeros(0, dtype=torch.int64))
    full = (torch.from_numpy(DATA.x[:8]), torch.from_numpy(DATA.mask[:8]),
            torch.from_numpy(DATA.y[:8]))
    before = [p.detach().clone() for p in dp_opt.params]
    wrapped = engine_mod._NoiseStepOnEmptyBatch([empty, full, empty], dp_opt)
    run_epochs(dp_model, wrapped, dp_opt, 1, MODEL, DATA.class_counts())
    assert engine.accountant.history == [(1.0, 0.25, 3)]  # every sampled batch is a step
    assert any(not torch.equal(a, b) for a, b in zip(before, dp_opt.params))


# -------------------------------------------------------------------------------- statistics


def test_gaussian_statistics_round_is_accounted_in_the_same_ledger(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(2.0, 0.3, size=(60, len(FEATURES))), columns=FEATURES)
    frame.iloc[:5, 0] = np.nan
    labels = DATA.y
    ranges = {f: (0.0, 4.0) for f in FEATURES}
    # with (almost) no noise the mechanism returns the exact statistics, in raw units
    stats, counts = privatise_statistics(frame, FEATURES, labels, ranges, 1e-9, rng)
    exact = FeatureStats.from_frame(frame, FEATURES)
    assert np.allclose(stats.count, exact.count) and np.allclose(stats.mean(), exact.mean())
    assert np.allclose(stats.std(), exact.std(), rtol=1e-6)
    assert counts == pytest.approx(DATA.class_counts())
    c, s, q, k, _, _ = exact_clipped_statistics(frame, FEATURES, labels, ranges)
    assert (np.abs(s) <= c).all() and (q <= c).all()  # each person moves each term by ≤ 1
    with pytest.raises(PrivacyError, match="plausible range"):
        privatise_statistics(frame, FEATURES, labels, {"ct_0": (0, 1)}, 1.0, rng)

    cfg = dp_cfg(statistics="gaussian", statistics_epsilon=0.5)
    budget = SiteBudget(cfg, len(DATA), fingerprint=FP, state_dir=tmp_path, site="A")
    noisy, noisy_counts, info = release_statistics(budget, "run-1", frame, FEATURES, labels,
                                                   ranges, seed_material=(7,))
    [entry] = budget.ledger.entries
    assert (entry["kind"], entry["sample_rate"], entry["steps"]) == ("statistics", 1.0, 1)
    assert info["epsilon"] == pytest.approx(
        opacus_epsilon("rdp", [(info["noise_multiplier"], 1.0, 1)], budget.delta), rel=1e-12)
    assert 0.49 <= info["epsilon"] <= 0.5 and not info["repeated"]
    assert not np.allclose(noisy.total, exact.total)  # the coordinator never sees the sums
    assert noisy_counts != pytest.approx(DATA.class_counts())
    # asked again for the same run (a resumed run), the site re-sends what it released: the
    # same numbers, no new charge
    again, again_counts, info2 = release_statistics(budget, "run-1", frame, FEATURES, labels,
                                                    ranges, seed_material=(7,))
    assert info2["repeated"] and len(budget.ledger.entries) == 1
    assert np.array_equal(again.total_sq, noisy.total_sq) and again_counts == noisy_counts
    # a simulation's seeded release reproduces on a fresh ledger; the OS-entropy one does not
    fresh = SiteBudget(cfg, len(DATA), fingerprint=FP, state_dir=tmp_path / "f", site="A")
    same, _, _ = release_statistics(fresh, "run-1", frame, FEATURES, labels, ranges,
                                    seed_material=(7,))
    assert np.array_equal(same.total, noisy.total)
    other = SiteBudget(cfg, len(DATA), fingerprint=FP, state_dir=tmp_path / "o", site="A")
    unseeded, _, _ = release_statistics(other, "run-1", frame, FEATURES, labels, ranges)
    assert not np.array_equal(unseeded.total, noisy.total)
    sp = site(tmp_path, cfg)
    plan = sp.plan()  # training is planned on what the statistics left
    assert plan["epsilon_before"] == pytest.approx(info["epsilon"])
    assert plan["epsilon_planned"] <= 3.0
    planned = site(tmp_path / "p", cfg, run_id="run-p")
    planned.plan()
    with pytest.raises(PrivacyError, match="before training"):
        release_statistics(planned, "run-p", frame, FEATURES, labels, ranges)
    with pytest.raises(PrivacyError, match="exact"):
        release_statistics(SiteBudget(dp_cfg(), len(DATA), fingerprint=FP,
                                      state_dir=tmp_path / "x"), "r", frame, FEATURES, labels,
                           ranges)


def test_a_run_the_remaining_budget_could_only_buy_noise_is_refused(tmp_path):
    first = site(tmp_path, dp_cfg(epsilon=2.0), rounds=1)
    _, report = train(first, 1)
    # a new run on the same ledger with a sliver of budget left: σ would be huge
    later = site(tmp_path, dp_cfg(epsilon=report.epsilon + 0.02), run_id="run-2", rounds=5)
    with pytest.raises(BudgetExhausted, match="max_noise_multiplier = 10"):
        later.check_round(1)
    entries = later.ledger.entries
    # the site may accept noisier updates: then the same run is planned and trains
    lenient = site(tmp_path, dp_cfg(epsilon=report.epsilon + 0.02, max_noise_multiplier=1e6),
                   run_id="run-3", rounds=5)
    assert lenient.noise_multiplier > 10
    assert later.ledger.entries[:len(entries)] == entries


# -------------------------------------------------------------------------------- randomness


def test_seeded_dp_rounds_reproduce_and_unseeded_ones_do_not(tmp_path):
    """A simulation's virtual site (seeded) reproduces bit for bit on a fresh ledger; a
    deployed site (OS entropy) does not; a second release on one ledger never reuses noise."""
    start = init_state()
    a, ra = train(site(tmp_path / "a", seeded=True), 1, start)
    b, rb = train(site(tmp_path / "b", seeded=True), 1, start)
    assert all(np.array_equal(a[k], b[k]) for k in start) and ra.epsilon == rb.epsilon
    c, _ = train(site(tmp_path / "c"), 1, start)
    d, _ = train(site(tmp_path / "d"), 1, start)
    assert not all(np.array_equal(c[k], d[k]) for k in start)
    # same seed, same ledger, a later run: the ledger entry differs, so the noise does too
    again = site(tmp_path / "a", dp_cfg(epsilon=6.0), run_id="run-2", seeded=True)
    e, _ = train(again, 1, start)
    assert not all(np.array_equal(a[k], e[k]) for k in start)


def test_secure_rng_is_refused_without_torchcsprng_and_used_with_it(tmp_path, monkeypatch):
    import types

    import safn_core.privacy.randomness as randomness

    monkeypatch.setitem(sys.modules, "torchcsprng", None)  # not importable, as with torch 2.13
    assert "torchcsprng" in randomness.secure_rng_unavailable()
    with pytest.raises(ConfigError, match=r"privacy\.secure_rng: true cannot be turned on here: "
                                          r"Opacus' secure mode needs the torchcsprng package"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=3", "privacy.secure_rng=true"])
    with pytest.raises(ConfigError, match=r"privacy\.sites\.B.*secure_rng"):
        load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=3",
                           "privacy.sites={B: {secure_rng: true}}"])

    # where torchcsprng exists, secure_rng runs Opacus' secure mode (its generator for noise
    # and Poisson sampling; no seed passed), even at a seeded (virtual) site
    made = []

    def create_random_device_generator(path):
        made.append(path)
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    monkeypatch.setitem(sys.modules, "torchcsprng", types.SimpleNamespace(
        create_random_device_generator=create_random_device_generator))
    cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=3",
                             "privacy.secure_rng=true"]).privacy
    start = init_state()
    a, ra = train(site(tmp_path / "a", cfg, seeded=True), 1, start)
    b, _ = train(site(tmp_path / "b", cfg, seeded=True), 1, start)
    assert made == ["/dev/urandom", "/dev/urandom"] and ra.steps > 0
    assert not all(np.array_equal(a[k], b[k]) for k in start)
    assert resolve_privacy(dp_cfg(), cfg).secure_rng  # a coordinator may ask for it
