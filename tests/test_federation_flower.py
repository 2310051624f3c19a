"""End to end through Flower's Simulation Engine (Ray backend): safn-sim on a small table cohort,
the Flower run against the in-process loop, leave-one-site-out, and model selection with early
stopping and a resume from a checkpoint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from safn_core.bundle import load_bundle
from safn_core.federation.checkpoint import load_checkpoint
from safn_core.federation.run_folder import load_run_config
from safn.simulations.virtual_sites import load_virtual_site, virtual_site_names
from tests.helpers import SMALL_MODEL, truncate_checkpoints, write_toy
from tests.reference_loop import run_in_process

pytestmark = pytest.mark.timeout(300)

SMALL = SMALL_MODEL + ["train.lr=0.005", "train.max_epochs=10", "train.patience=3",
                       "simulation.num_cpus_per_site=1"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    csv, mapping = write_toy(folder, n=400)
    return ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}"]


BIN = Path(sys.executable).parent


class Done:
    def __init__(self, proc):
        self.code, self.err = proc.returncode, proc.stderr
        self.out = " ".join(proc.stdout.split())  # rich wraps table titles


def run(args) -> Done:
    """The safn-sim console script, as a user runs it."""
    return Done(subprocess.run([str(BIN / "safn-sim"), *args], capture_output=True, text=True,
                               timeout=240))


def argv(table, out, *extra):
    sets = [x for s in (table + SMALL + list(extra)) for x in ("--set", s)]
    return [*sets, "--out", str(out)]


def test_safn_sim_end_to_end(table, tmp_path):
    out = tmp_path / "run"
    # plain aggregation, so that the in-process loop below must match bit for bit; secure
    # aggregation end to end: tests/test_secure_federation.py (and the resume test below)
    # personalised by fine-tuning, after the federation: its global model is unchanged
    done = run(argv(table, out, "federation.rounds=3", "federation.secure_aggregation=false",
                    "personalisation.method=fine_tune", "personalisation.epochs=3",
                    f"simulation.site_state_dir={tmp_path / 'state'}"))
    assert done.code == 0, done.out[-3000:] + done.err[-3000:]
    text = done.out
    assert "INFO" not in text and "Traceback" not in done.err  # no Flower/Ray log flood
    assert "virtual sites (natural partition of 400 participants)" in text
    # round 0 (the logistic regression floor, untrained) and rounds 1-3
    assert text.count("pooled ROC-AUC") == 4 and "round 3/3" in text
    assert "round 0/3 (the initial model, the logistic regression floor" in text
    assert "union of the 3 sites' test splits" in text
    bundle = load_bundle(out / "model")
    assert bundle.meta["kind"] == "federated" and bundle.meta["training"]["rounds"] == 3
    comparison = pd.read_csv(out / "comparison.csv")
    # each SAFN row beside its logistic regression (the floor where the model has a wide path)
    floor = ["federated-lr"] if bundle.meta["training"].get("logistic_floor") else []
    assert list(comparison.kind) == ["pooled", "federated", *floor, "pooled-lr",
                                     *["local", "local-lr"] * 3, "best-local", "best-local-lr"]
    assert comparison.roc_auc.between(0, 1).all()
    results = json.loads((out / "results.json").read_text())
    assert "pooled test set" in results["comparison"]["evaluated_on"]
    # every figure with its 95 % interval: printed, in results.json, in comparison.csv
    assert (comparison.roc_auc_ci_low <= comparison.roc_auc).all()
    assert (comparison.roc_auc <= comparison.roc_auc_ci_high).all()
    for row in results["comparison"]["rows"]:
        lo, hi = row["balanced_accuracy_ci"]
        assert lo <= row["balanced_accuracy"] <= hi
        assert f"[{row['roc_auc_ci'][0]:.3f}, {row['roc_auc_ci'][1]:.3f}]" in text
    history = json.loads((out / "history.json").read_text())
    # the federation's pooled test metrics: intervals from the summed histograms' counts
    assert all(e["pooled_ci"]["roc_auc"][0] <= e["pooled"]["roc_auc"]
               <= e["pooled_ci"]["roc_auc"][1] for e in history)
    assert [e["round"] for e in history] == [0, 1, 2, 3]  # 0: the floor, untrained
    # plain evaluation replies carry the validation loss sums: the run selects by them
    assert all(e["val_loss"] > 0 and 0 <= e["val_roc_auc"] <= 1 for e in history)
    chosen = history[-1]["selected_round"]
    by_round = {e["round"]: e for e in history}
    assert by_round[chosen]["val_loss"] == min(e["val_loss"] for e in history)
    assert bundle.meta["training"]["selected_round"] == chosen
    assert set(history[-1]["sites"]) == {"site_A", "site_B", "site_C"}
    # the card says what each virtual site said its data is, and what the metrics rest on
    training = bundle.meta["training"]
    assert training["data_sources"] == {s: "table" for s in ("site_A", "site_B", "site_C")}
    card = (out / "model" / "model_card.md").read_text()
    assert "site_B: table" in card and "synthetic" not in card.lower()
    basis = training["test_evaluation"]
    assert basis["participants"] == by_round[chosen]["n_test"] > 0
    assert basis["sites"] == ["site_A", "site_B", "site_C"] and not basis["withheld"]
    assert (f"rest on {basis['participants']} test participants from 3 of 3 training sites"
            in card)
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(rounds.site) == {"pooled", "site_A", "site_B", "site_C"}
    # every site compared its fine-tuned model with the global one on its test split; the
    # pooled comparison sums the counts of the sites that passed min_cell (plain run)
    personal = results["personalisation"]
    assert personal["method"] == "fine_tune" and not personal["refused"]
    assert sorted(personal["sites"]) == ["site_A", "site_B", "site_C"]
    assert personal["pooled_basis"] == "sum over the 3 sites whose test split passes min_cell"
    assert personal["pooled"]["n"] == sum(s["n"] for s in personal["sites"].values()) \
        == by_round[chosen]["n_test"]
    for name, s in personal["sites"].items():
        assert 0 <= s["selected"] <= 3 and "confusion" not in s
        # the global model at the federation's threshold: the figure of the selected round
        assert s["global"]["balanced_accuracy"] == pytest.approx(
            by_round[chosen]["sites"][name]["balanced_accuracy"], abs=1e-9)
        kept = tmp_path / "state" / name / "personal"
        assert len(list(kept.glob("*/selected.npz"))) == 1
    assert "personalisation (fine_tune): pooled balanced accuracy" in text
    assert "Personalisation (fine_tune)" in (out / "report.html").read_text()

    # the Flower apps add nothing to the maths: the in-process loop gives the same weights
    # (bit for bit, with one torch thread as in every ClientApp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_run_config(out.resolve())
        sites = dict(load_virtual_site(out.resolve(), i) for i in range(3))
        loop = run_in_process(sites, cfg, report=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    flower = load_checkpoint(out)
    for k, v in loop.weights.items():
        np.testing.assert_array_equal(flower.weights[k], v)
    assert history[-1]["pooled"] == pytest.approx(loop.history[-1]["pooled"])

    # a run folder is never overwritten
    again = run(argv(table, out, "federation.rounds=3", "federation.secure_aggregation=false"))
    assert again.code == 2 and "not empty" in again.err and "Traceback" not in again.err


def stop_after(src, dst, keep_round: int) -> None:
    """A copy of a finished run folder as it was when its coordinator stopped after a round."""
    shutil.copytree(src, dst)
    for name in ("model", "results.json", "history.json", "rounds.csv",
                 "federation_status.json", "comparison.csv"):
        path = dst / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    truncate_checkpoints(dst, keep_round)


@pytest.mark.timeout(600)  # three federations; 190 s beside another xdist worker here
def test_leave_one_site_out_through_flower(tmp_path):
    """Every site is held out once; its model never saw it; metrics carry CIs; report renders."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    out = tmp_path / "loso"
    small = ["--set", "synth.n_pd=90", "--set", "synth.n_hc=60", "--set", "synth.n_without_mri=0",
             "--set", "synth.n_swedd=0", "--set", "synth.n_prodromal=0", "--set", "synth.n_sites=3",
             "--set", "synth.min_site_size=30", "--set", "federation.rounds=2",
             "--set", "federation.local_epochs=1", "--set", "simulation.compare=false",
             "--set", "model.d_model=16", "--set", "model.n_heads=2",
             # each leave-one-site-out federation has 2 sites: too few to sum securely
             "--set", "federation.secure_aggregation=false"]
    proc = subprocess.run([str(Path(sys.executable).parent / "safn-sim"), "--out", str(out),
                           "--loso", *small], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    loso = pd.read_csv(out / "loso.csv")
    sites = pd.read_csv(out / "sites.csv")
    assert sorted(loso.held_out) == sorted(sites.site)
    assert (loso.n.to_numpy() == sites.set_index("site").loc[loso.held_out].participants.to_numpy()).all()
    for held in loso.held_out:
        trained_on = virtual_site_names(out / "loso" / held)
        assert held not in trained_on and len(trained_on) == len(sites) - 1
    summary = json.loads((out / "loso.json").read_text())["summary"]
    assert abs(summary["roc_auc"]["mean"] - loso.roc_auc.mean()) < 1e-9
    first = json.loads((out / "loso.json").read_text())["sites"][0]
    assert first["roc_auc_ci"][0] <= first["roc_auc"] <= first["roc_auc_ci"][1]
    assert (loso.roc_auc_ci_low <= loso.roc_auc).all()
    assert (loso.roc_auc <= loso.roc_auc_ci_high).all()
    html = (out / "report.html").read_text()
    assert "Leave-one-site-out" in html and html.count("data:image/png;base64,") >= 1


def _round_weights(run_dir: Path, r: int) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoints" / f"round_{r:04d}.npz") as npz:
        return {k[3:]: npz[k] for k in npz.files if k.startswith("w::")}


def test_the_bundle_is_the_round_with_the_best_pooled_validation_loss_and_resume_keeps_it(
        table, tmp_path):
    """Model selection and resume through Flower (FedAdam, secure aggregation on): the bundle
    holds the weights of
    the round with the lowest pooled validation loss, with that round's threshold; the run stops
    after `patience` rounds without improvement; a run resumed after its best round ends with
    the same model; the comparators report the round they selected by the same rule."""
    full = tmp_path / "full"
    # a high learning rate overfits the toy cohort within a few rounds: validation loss turns
    done = run(argv(table, full, "federation.rounds=8", "federation.patience=2",
                    "federation.select=val_loss", "train.lr=0.05",
                    "federation.strategy=fedadam", "federation.server_lr=0.3"))
    assert done.code == 0, done.out[-3000:] + done.err[-3000:]
    history = json.loads((full / "history.json").read_text())
    losses = {e["round"]: e["val_loss"] for e in history}
    by_round = {e["round"]: e for e in history}  # round 0: the floor, untrained
    chosen = history[-1]["selected_round"]
    assert losses[chosen] == min(losses.values())
    last = history[-1]["round"]
    assert last < 8, "expected early stopping (patience 2, FedAdam η 0.3)"
    assert last == chosen + 2  # stopped exactly `patience` rounds after the best
    assert f"early stopping after round {last}" in done.out
    bundle = load_bundle(full / "model")
    assert bundle.meta["training"]["selected_round"] == chosen
    assert bundle.meta["training"]["selection"]["stopped_early"] is True
    assert bundle.threshold == pytest.approx(by_round[chosen]["threshold"])
    best = _round_weights(full, chosen)
    state = bundle.model.state_dict()
    for k, v in best.items():  # the bundle's model is float32 (FedAdam's weights are float64)
        np.testing.assert_array_equal(state[k].numpy(), np.asarray(v, dtype=np.float32))
    assert f"round {chosen}, selected by pooled validation" in (
        full / "model" / "model_card.md").read_text()
    results = json.loads((full / "results.json").read_text())
    assert results["selected_round"] == chosen
    rows = results["comparison"]["rows"]
    safn_rows = [r for r in rows if not r["kind"].endswith("-lr")]
    assert all(r["selected_round"] >= 0 for r in safn_rows)
    assert all(r["selected_round"] is None for r in rows if r["kind"].endswith("-lr"))
    assert next(r for r in rows if r["kind"] == "federated")["selected_round"] == chosen

    # stopped one round after its best, resumed: the checkpoint kept the best round's weights,
    # the resumed run trains one more round, stops, and ends with the same model
    resumed = tmp_path / "resumed"
    stop_after(full, resumed, chosen + 1)
    done = run(["--resume", str(resumed)])
    assert done.code == 0, done.out[-3000:] + done.err[-3000:]
    again = json.loads((resumed / "history.json").read_text())
    assert f"resuming after round {chosen + 1} of 8" in done.out
    assert [e["selected_round"] for e in again] == [e["selected_round"] for e in history]
    other = load_bundle(resumed / "model").model.state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(other[k].numpy(), v.numpy())
    # ... and the same last round: weights and FedAdam's moments, bit for bit
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert a.round == b.round == history[-1]["round"] and "round 1/8" not in done.out
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    for group in ("m_t", "v_t"):
        for k in a.strategy_state[group]:
            np.testing.assert_array_equal(a.strategy_state[group][k],
                                          b.strategy_state[group][k])
