"""Round selection (`RoundSelection`), round-wise training (`fit_by_rounds`) and the comparators
of `safn-sim`, which must train by the federation's rounds, budget and selection rule."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from safn_core.config import TrainConfig, load_config
from safn_core.training import local
from safn_core.training.local import fit_by_rounds, fit_with_early_stopping, validation_loss
from safn_core.training.selection import RoundSelection
from tests.helpers import SMALL_MODEL, TINY_MODEL, TWO_MODALITIES, shifted_arrays, toy_cohort


def feed(sel: RoundSelection, losses=None, aucs=None, start: int = 1) -> list[bool]:
    """Update ``sel`` with a sequence of rounds until it says stop; the update answers."""
    n = len(losses if losses is not None else aucs)
    out = []
    for i in range(n):
        out.append(sel.update(start + i, val_loss=None if losses is None else losses[i],
                              val_roc_auc=None if aucs is None else aucs[i]))
        if sel.should_stop:
            break
    return out


# ---- RoundSelection ----------------------------------------------------------------------------

def test_val_loss_picks_lowest_with_tolerance():
    sel = RoundSelection("val_loss")
    answers = feed(sel, losses=[0.9, 0.7, 0.8, 0.5, 0.5 - 1e-6, 0.6])
    assert sel.best_round_ == 4 and sel.best_score_ == pytest.approx(0.5)
    assert answers == [True, True, False, True, False, False]  # 1e-6 lower is no improvement
    assert sel.rounds_since_best_ == 2 and not sel.should_stop  # patience None: never stops


def test_val_roc_auc_picks_highest():
    sel = RoundSelection("val_roc_auc", patience=10)
    feed(sel, aucs=[0.6, 0.8, 0.75, 0.82, 0.7])
    assert sel.selected_round == 4 and sel.best_score_ == pytest.approx(0.82)
    # the loss is not read under val_roc_auc
    sel2 = RoundSelection("val_roc_auc")
    sel2.update(1, val_loss=0.1, val_roc_auc=0.9)
    assert not sel2.update(2, val_loss=0.01, val_roc_auc=0.5)


def test_last_picks_last_and_never_stops():
    sel = RoundSelection("last", patience=1)
    answers = feed(sel, losses=[0.5, 0.9, 1.0, 1.1, 1.2])
    assert answers == [True] * 5
    assert sel.best_round_ == 5 and not sel.should_stop and sel.best_score_ is None


def test_early_stopping_exactly_at_patience():
    sel = RoundSelection("val_loss", patience=3)
    answers = feed(sel, losses=[1.0, 0.8, 0.9, 0.85, 0.81, 0.1, 0.1])
    assert len(answers) == 5  # rounds 3, 4, 5 without improvement on round 2: stop after 5
    assert sel.best_round_ == 2 and sel.rounds_since_best_ == 3 and sel.should_stop
    sel = RoundSelection("val_loss", patience=3)
    assert len(feed(sel, losses=[1.0, 0.8, 0.9, 0.85, 0.7, 0.75])) == 6  # improvement resets


def test_state_round_trip_resumes_with_same_decisions():
    losses = [1.0, 0.8, 0.9, 0.79, 0.85, 0.86, 0.9, 0.95]
    whole = RoundSelection("val_loss", patience=3)
    answers_whole = feed(whole, losses=losses)
    first = RoundSelection("val_loss", patience=3)
    answers = feed(first, losses=losses[:5])
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    resumed = RoundSelection.from_state(state)
    assert resumed == first
    answers += feed(resumed, losses=losses[5:], start=6)
    assert answers == answers_whole and resumed == whole and resumed.should_stop


def test_missing_metrics():
    # a missing round never displaces a scored selection but counts toward patience
    sel = RoundSelection("val_loss", patience=2)
    assert feed(sel, losses=[0.5, None, float("nan")]) == [True, False, False]
    assert sel.best_round_ == 1 and sel.should_stop
    # before any score the selection follows the latest round, without patience running
    sel = RoundSelection("val_roc_auc", patience=1)
    assert feed(sel, aucs=[None, None, None]) == [True, True, True]
    assert sel.best_round_ == 3 and sel.best_score_ is None and not sel.should_stop
    assert sel.update(4, val_roc_auc=0.6)  # the first scored round is selected
    assert not sel.update(5, val_roc_auc=None) and sel.best_round_ == 4 and sel.should_stop


def test_invalid_configuration():
    with pytest.raises(ValueError):
        RoundSelection("val_accuracy")
    with pytest.raises(ValueError):
        RoundSelection("val_loss", patience=0)


# ---- fit_by_rounds -----------------------------------------------------------------------------

MODS = TWO_MODALITIES
# the paper's structure: rounds from 1 (a wide path adds round 0, tests/test_wide_path.py)
MODEL = TINY_MODEL.model_copy(update={"wide": "off", "ensemble_size": 1})
TRAIN = TrainConfig(batch_size=32, lr=0.01)
TR, VA = shifted_arrays(96, 0), shifted_arrays(40, 1)


def test_fit_by_rounds_restores_selected_round():
    torch.set_num_threads(1)
    fit = fit_by_rounds(TR, VA, MODS, MODEL, TRAIN, 0, rounds=6, epochs_per_round=2,
                        select="val_loss", patience=None)
    losses = [h["val_loss"] for h in fit.history]
    assert len(fit.history) == 6 and fit.epochs_run == 12
    assert [h["epoch"] for h in fit.history] == [2, 4, 6, 8, 10, 12]
    sel = RoundSelection("val_loss")
    feed(sel, losses=losses)
    assert fit.selected_round == sel.best_round_ and fit.best_epoch == 2 * sel.best_round_
    assert fit.best_val_loss == losses[fit.selected_round - 1]
    assert validation_loss(fit.model, VA, MODEL, TR.class_counts()) == pytest.approx(
        fit.best_val_loss, abs=1e-6)
    assert all(0 <= h["val_roc_auc"] <= 1 for h in fit.history)


def test_fit_by_rounds_stops_at_patience_and_keeps_that_rounds_weights(monkeypatch):
    """Scripted validation metrics: stop exactly ``patience`` rounds after the best, and the
    returned weights are those the model had when the selected round was validated."""
    scripted = iter([(0.9, 0.6), (0.7, 0.7), (0.8, 0.9), (0.75, 0.65), (0.72, 0.8),
                     (0.5, 0.5), (0.4, 0.4)])
    states = []

    def fake(model, data, model_cfg, counts, loss="objective"):
        states.append(copy.deepcopy(model.state_dict()))
        return next(scripted)

    monkeypatch.setattr(local, "validation_metrics", fake)
    fit = fit_by_rounds(TR, VA, MODS, MODEL, TRAIN, 0, rounds=7, epochs_per_round=1,
                        select="val_roc_auc", patience=2)
    assert fit.selected_round == 3 and len(fit.history) == 5  # rounds 4, 5 without improvement
    kept = fit.model.state_dict()
    assert all(torch.equal(kept[k], states[2][k]) for k in kept)
    assert not all(torch.equal(kept[k], states[-1][k]) for k in kept)


def test_fit_with_early_stopping_is_epochwise_fit_by_rounds():
    cfg = TrainConfig(batch_size=32, lr=0.01, max_epochs=5, patience=2)
    a = fit_with_early_stopping(TR, VA, MODS, MODEL, cfg, 0)
    b = fit_by_rounds(TR, VA, MODS, MODEL, cfg, 0, rounds=5, epochs_per_round=1,
                      select="val_loss", patience=2)
    assert a.best_epoch == b.best_epoch == a.selected_round and a.epochs_run == b.epochs_run
    assert a.best_val_loss == b.best_val_loss and not math.isinf(a.best_val_loss)


@pytest.mark.parametrize("select", ["val_roc_auc", "last"])
def test_fit_with_early_stopping_follows_train_select(select):
    """``train.select`` is the centralised fit's rule: the same fit as `fit_by_rounds` with that
    rule; ``last`` trains every epoch and keeps the last."""
    cfg = TrainConfig(batch_size=32, lr=0.01, max_epochs=6, patience=2, select=select)
    a = fit_with_early_stopping(TR, VA, MODS, MODEL, cfg, 0)
    b = fit_by_rounds(TR, VA, MODS, MODEL, cfg, 0, rounds=6, epochs_per_round=1,
                      select=select, patience=2)
    assert a.selected_round == b.selected_round and a.epochs_run == b.epochs_run
    if select == "last":
        assert a.epochs_run == 6 and a.selected_round == 6
    else:
        aucs = [h["val_roc_auc"] for h in a.history]
        assert aucs[a.selected_round - 1] == max(aucs)


# ---- compare() ---------------------------------------------------------------------------------

def test_compare_trains_comparators_by_the_federations_rule(tmp_path, monkeypatch):
    from safn.simulations.compare import build_sites, compare

    cohort = toy_cohort(tmp_path)
    cfg = load_config(None, SMALL_MODEL + ["federation.rounds=3", "federation.local_epochs=2",
                                           "federation.select=val_roc_auc",
                                           "federation.patience=2", "train.max_epochs=99"])
    calls = []
    real = local.fit_by_rounds

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("comparators must not use epoch-wise early stopping")

    monkeypatch.setattr(local, "fit_by_rounds", spy)
    monkeypatch.setattr(local, "fit_with_early_stopping", forbidden)
    parts = build_sites(cohort, cfg)
    df, _ = compare(cohort, parts, cfg)
    trained = df[df.kind.isin(["pooled", "local"])]
    assert len(calls) == len(trained) >= 2 and (df.kind == "pooled").sum() == 1
    assert all(c == {"rounds": 3, "epochs_per_round": 2, "select": "val_roc_auc", "patience": 2,
                     "val_loss": "cross_entropy"} for c in calls)
    assert "selected_round" in df.columns
    # round 0: the logistic regression the default wide path starts from may be kept
    assert all(0 <= int(r) <= 3 for r in trained.selected_round)


def test_ema_weights_are_the_moving_average_of_the_trajectory_and_are_what_is_kept(monkeypatch):
    """train.weight_averaging=ema: the model validated and returned is w̄ ← d·w̄ + (1−d)·w
    after every optimizer step, recomputed here from the raw trajectory of the same run."""
    torch.set_num_threads(1)
    cfg = TRAIN.model_copy(update={"weight_averaging": "ema", "ema_decay": 0.7})
    trajectory = []
    real_run_epochs = local.run_epochs

    def recording(model, *args, after_step=None, **kw):
        def step():
            trajectory.append([p.detach().clone() for p in model.parameters()])
            after_step()
        return real_run_epochs(model, *args, after_step=step, **kw)

    monkeypatch.setattr(local, "run_epochs", recording)
    fit = fit_by_rounds(TR, VA, MODS, MODEL, cfg, 0, rounds=2, epochs_per_round=1,
                        select="last", patience=None)
    start = local.make_model(MODS, MODEL, 0)
    ema = [p.detach().clone() for p in start.parameters()]
    for weights in trajectory:
        ema = [0.7 * a + 0.3 * w for a, w in zip(ema, weights)]
    assert len(trajectory) == 2 * math.ceil(len(TR) / TRAIN.batch_size)
    for kept, expected, raw in zip(fit.model.parameters(), ema, trajectory[-1]):
        assert torch.allclose(kept, expected, atol=1e-6)
    assert not all(torch.allclose(k, r) for k, r in zip(fit.model.parameters(), trajectory[-1]))
