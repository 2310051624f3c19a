"""safn-validate: a bundle evaluated offline on a site's data, checked against scikit-learn."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, brier_score_loss,
                             matthews_corrcoef, roc_auc_score)

from safn_core.bundle import save_bundle
from safn_core.cli.common import run_main
from safn_core.cli.validate import run as validate
from safn_core.config import load_config
from safn_core.training import crossval
from tests.helpers import toy_table, write_toy


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One small model fitted on toy sites A, B and C, for bundles of either kind."""
    tmp = tmp_path_factory.mktemp("train")
    csv, mapping = write_toy(tmp, seed=1)
    cfg = load_config(None, ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}",
                             "train.max_epochs=10", "model.d_model=16", "model.n_heads=2"])
    from safn_core.data.sources import load_cohort
    cohort = load_cohort(cfg.data)
    fit, pre, threshold, counts = crossval.final_fit(cohort, cfg)
    sites = pd.Series(cohort.sites).value_counts().sort_index().to_dict()
    return tmp, cfg, fit, pre, threshold, counts, sites, csv


@pytest.fixture(scope="module")
def bundle_path(fitted):
    tmp, cfg, fit, pre, threshold, counts, _, _ = fitted
    return save_bundle(tmp / "model", fit.model, pre, cfg, threshold=threshold,
                       class_counts=counts, kind="centralised")


@pytest.fixture(scope="module")
def centralised_bundle(fitted):
    """As safn-train writes it: the training table's site column values and their counts."""
    tmp, cfg, fit, pre, threshold, counts, sites, _ = fitted
    return save_bundle(tmp / "model-centralised", fit.model, pre, cfg, threshold=threshold,
                       class_counts=counts, kind="centralised",
                       extra={"training": {"participants": sum(sites.values()), "sites": sites}})


@pytest.fixture(scope="module")
def federated_bundle(fitted):
    """As safn-server writes it: site names (a simulation's natural partition: site_<value>)
    and a held-out site."""
    tmp, cfg, fit, pre, threshold, counts, _, _ = fitted
    return save_bundle(tmp / "model-federated", fit.model, pre, cfg, threshold=threshold,
                       class_counts=counts, kind="federated",
                       extra={"training": {"participants": 200, "sites": ["site_A", "site_B"],
                                           "held_out_sites": ["site_H"]}})


def _toy_at(tmp_path, centres, seed=7):
    """A toy table whose participants come from ``centres`` only."""
    from tests.helpers import MAPPING

    df = toy_table(seed=seed)
    df["centre"] = [centres[i % len(centres)] for i in range(len(df))]
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv, mapping = tmp_path / "cohort.csv", tmp_path / "mapping.yaml"
    df.to_csv(csv, index=False)
    mapping.write_text(MAPPING)
    return csv, mapping


def _validate(bundle, out, *source):
    code = run_main(validate, ["--model", str(bundle), *map(str, source), "--out", str(out),
                               "--bootstrap", "50"])
    assert code == 0
    return json.loads((out / "validation.json").read_text())


def test_metrics_match_sklearn_on_same_predictions(bundle_path, tmp_path, capsys):
    csv, mapping = write_toy(tmp_path, seed=7)  # another site's data
    out = tmp_path / "val"
    code = run_main(validate, ["--model", str(bundle_path), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(out), "--bootstrap", "100"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "validation.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    y, p, t = preds.y.to_numpy(), preds.p.to_numpy(), res["threshold"]
    m = res["metrics"]
    assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc_pd"]["value"] == pytest.approx(average_precision_score(y, p))
    assert m["pr_auc_hc"]["value"] == pytest.approx(average_precision_score(1 - y, 1 - p))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p >= t))
    assert m["mcc"]["value"] == pytest.approx(matthews_corrcoef(y, p >= t))
    assert m["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
    for k, v in m.items():
        if not np.isnan(v["value"]):
            assert v["ci"][0] <= v["value"] + 1e-9 and v["value"] <= v["ci"][1] + 1e-9, k
    assert len(preds) == len(toy_table(seed=7))
    assert set(res["modality_weights"]) == {"imaging", "clinical", "demographics"}
    assert sum(res["modality_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "slope" in res["calibration"] and (out / "report.html").is_file()


def test_missing_features_is_a_clear_error(bundle_path, tmp_path, capsys):
    csv, mapping = write_toy(tmp_path)
    mapping.write_text(mapping.read_text().replace('["cl_*"]', '["cl_0", "cl_1"]'))
    code = run_main(validate, ["--model", str(bundle_path), "--data", str(csv), "--mapping",
                               str(mapping), "--out", str(tmp_path / "v")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks 1 feature" in err and "cl_2" in err and "Traceback" not in err


def test_not_a_bundle(tmp_path, capsys):
    csv, mapping = write_toy(tmp_path)
    code = run_main(validate, ["--model", str(tmp_path), "--data", str(csv), "--mapping",
                               str(mapping)])
    err = capsys.readouterr().err
    assert code == 2 and "not a safn model bundle" in err


def test_validate_sim_and_train_bundles_on_a_fresh_synthetic_site(tmp_path):
    """The issue's path: bundles from safn-sim and safn-train, a new site written by safn-synth."""
    import subprocess
    import sys
    from pathlib import Path

    bin_ = Path(sys.executable).parent
    small = ["--set", "synth.n_pd=90", "--set", "synth.n_hc=60", "--set", "synth.n_without_mri=0",
             "--set", "synth.n_swedd=0", "--set", "synth.n_prodromal=0", "--set", "synth.n_sites=3",
             "--set", "synth.min_site_size=30", "--set", "model.d_model=16",
             "--set", "model.n_heads=2"]

    def ok(*cmd):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    ok(bin_ / "safn-sim", "--out", tmp_path / "sim", *small, "--set", "federation.rounds=2",
       "--set", "federation.local_epochs=1", "--set", "simulation.compare=false")
    # only the bundle matters here: one feature set, no ablation rows, one baseline
    ok(bin_ / "safn-train", "--quick", "--out", tmp_path / "train", *small,
       "--set", "train.max_epochs=5", "--set", "train.workers=1",
       "--set", "train.feature_sets=[all]", "--set", "train.ablations=[]",
       "--set", "train.baselines=[majority]")
    # a fresh site: another seed, its own download
    ok(bin_ / "safn-synth", "--out", tmp_path / "site", "--seed", "42",
       "--set", "synth.n_pd=60", "--set", "synth.n_hc=40", "--set", "synth.n_sites=1")
    for kind in ("sim", "train"):
        out = tmp_path / f"val-{kind}"
        ok(bin_ / "safn-validate", "--model", tmp_path / kind / "model", "--data",
           tmp_path / "site", "--out", out, "--bootstrap", "100")
        res = json.loads((out / "validation.json").read_text())
        preds = pd.read_csv(out / "predictions.csv")
        assert res["n"] == 100 and len(preds) == 100
        assert res["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(preds.y, preds.p))
        assert res["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
            balanced_accuracy_score(preds.y, preds.p >= res["threshold"]))
        assert (out / "report.html").is_file()


def test_a_training_sites_data_is_internal_in_every_output(centralised_bundle, tmp_path):
    bundle_files = {p.name: p.read_bytes() for p in centralised_bundle.iterdir()}
    csv, mapping = _toy_at(tmp_path / "data", ["A", "B"])
    out = tmp_path / "val"
    res = _validate(centralised_bundle, out, "--data", csv, "--mapping", mapping)
    assert res["validation"] == "internal"
    assert res["training_sites"] == ["A", "B", "C"] and res["validated_sites"] == ["A", "B"]
    assert "final fit used every participant" in res["validation_note"]
    html = (out / "report.html").read_text()
    assert "<h1>safn-validate: internal validation</h1>" in html
    assert "has participants from A, B" in html
    card = (out / "model_card.md").read_text()
    bundle_card = bundle_files["model_card.md"].decode()
    assert card.startswith(bundle_card.rstrip("\n"))
    section = card[len(bundle_card.rstrip("\n")):]
    assert "## Validation at" in section and "**internal validation**" in section
    assert f"participants: {res['n']} ({res['positive']} PD" in section
    assert "- training sites: A, B, C" in section and "- validated sites: A, B" in section
    roc = res["metrics"]["roc_auc"]
    lo, hi = roc["ci"]
    assert f"roc_auc: {roc['value']:.3f} (95% CI {lo:.3f}–{hi:.3f})" in section
    # the bundle folder is left exactly as it was
    assert {p.name: p.read_bytes() for p in centralised_bundle.iterdir()} == bundle_files


def test_a_site_not_in_the_bundle_is_external(centralised_bundle, tmp_path, capsys):
    csv, mapping = _toy_at(tmp_path / "data", ["D"])
    out = tmp_path / "val"
    res = _validate(centralised_bundle, out, "--data", csv, "--mapping", mapping)
    assert res["validation"] == "external" and res["validated_sites"] == ["D"]
    assert "training table has no participants from D" in res["validation_note"]
    printed = capsys.readouterr().out
    assert printed.lstrip().startswith("external validation") and "internal" not in printed
    assert "<h1>safn-validate: external validation</h1>" in (out / "report.html").read_text()
    assert "**external validation**" in (out / "model_card.md").read_text()


def test_data_from_training_and_new_sites_is_mixed(centralised_bundle, tmp_path):
    csv, mapping = _toy_at(tmp_path / "data", ["A", "D"])
    res = _validate(centralised_bundle, tmp_path / "val", "--data", csv, "--mapping", mapping)
    assert res["validation"] == "mixed"
    assert res["validation_note"].startswith(
        "Mixed: the model's training table has participants from A, none from D")


def test_federated_bundle_by_site_file_name(federated_bundle, tmp_path):
    """--site: the site is known by its site.yaml name; a held-out site is external."""
    import yaml

    csv, mapping = _toy_at(tmp_path / "data", ["X"])
    labels = {}
    for name in ("site_A", "site_H", "site_Z"):
        site = tmp_path / f"{name}.yaml"
        site.write_text(yaml.safe_dump({"site": {"name": name}, "data": {
            "source": "table", "path": str(csv), "mapping": str(mapping)}}))
        res = _validate(federated_bundle, tmp_path / f"val-{name}", "--site", site)
        labels[name] = res["validation"]
        assert res["validated_sites"] == [name] and res["held_out_sites"] == ["site_H"]
        if name == "site_A":
            assert "may include site_A's own training participants" in res["validation_note"]
        if name == "site_H":
            assert "held-out site" in res["validation_note"]
        if name == "site_Z":
            assert "site_Z did not train this model" in res["validation_note"]
    assert labels == {"site_A": "internal", "site_H": "external", "site_Z": "external"}
    # the site column of a natural-partition simulation: value A is the site site_A
    csv2, mapping2 = _toy_at(tmp_path / "data2", ["A", "B"])
    res = _validate(federated_bundle, tmp_path / "val-data", "--data", csv2, "--mapping", mapping2)
    assert res["validation"] == "internal"


def test_unmatchable_sites_are_unknown():
    """No site column, or virtual sites cut at random: neither internal nor external."""
    from types import SimpleNamespace

    from safn_core.validation_scope import validation_scope

    cfg = load_config(None, ["simulation.partition=iid", "simulation.n_sites=3"])
    sim = SimpleNamespace(meta={"kind": "federated", "training": {
        "sites": ["site_01", "site_02", "site_03"]}}, config=cfg)
    assert validation_scope(sim, ["A"])["validation"] == "unknown"
    assert "cut at random" in validation_scope(sim, ["A"])["note"]
    table = SimpleNamespace(meta={"kind": "centralised", "training": {"sites": {"all": 240}}},
                            config=load_config(None, []))
    assert validation_scope(table, None)["validation"] == "unknown"
    assert "no site column" in validation_scope(table, None)["note"]
    # the very table it was trained on (its config's data.path): internal
    same = validation_scope(table, None, same_data=True)
    assert same["validation"] == "internal" and "resubstitution" in same["note"]


# ------------------------------------------------------------------ --recalibrate (issue #16)

def _tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _recalibrate(bundle, out, csv, mapping, *extra):
    return _validate(bundle, out, "--data", csv, "--mapping", mapping, "--recalibrate", *extra)


def _same_figures(a: dict, b: dict):
    for k in a:
        assert b[k]["value"] == pytest.approx(a[k]["value"], rel=1e-6, nan_ok=True), k
        assert b[k]["ci"] == pytest.approx(a[k]["ci"], rel=1e-6, nan_ok=True), k


def test_a_recalibrated_site_bundle_round_trips_through_safn_validate(centralised_bundle,
                                                                      tmp_path):
    original = _tree(centralised_bundle)
    csv, mapping = _toy_at(tmp_path / "data", ["D"])
    out = tmp_path / "recal"
    res = _recalibrate(centralised_bundle, out, csv, mapping, "--calibration", "platt",
                       "--recalibration-fraction", "0.4", "--split-seed", "3")
    assert _tree(centralised_bundle) == original  # the input bundle, byte for byte
    site = out / "site_bundle"
    for name in ("weights.pt", "preprocessing.json", "config.yaml"):
        assert (site / name).read_bytes() == original[name]
    rec, meta = res["recalibration"], json.loads((site / "bundle.json").read_text())
    old_threshold = json.loads(original["bundle.json"])["threshold"]
    assert meta["recalibration"] == rec and meta["threshold"] == rec["threshold"]
    assert rec["method"] == "platt" and set(rec["map"]["params"]) == {"a", "b"}
    assert rec["threshold_before"] == rec["training_threshold"] == old_threshold
    assert res["before"]["threshold"] == old_threshold
    assert res["after"]["threshold"] == rec["threshold"]
    assert (rec["site"], rec["fraction"], rec["split_seed"]) == ("D", 0.4, 3)
    split = pd.read_csv(out / "recalibration_split.csv")
    in_recal = split.part == "recalibration"
    assert rec["recalibration_part"] == {"n": int(in_recal.sum()),
                                         "PD": int((in_recal & (split.y == 1)).sum()),
                                         "HC": int((in_recal & (split.y == 0)).sum())}
    assert res["parts"]["evaluation"]["n"] == int((~in_recal).sum()) == len(
        pd.read_csv(out / "predictions.csv"))
    card = (site / "model_card.md").read_text()
    assert card.startswith(original["model_card.md"].decode().rstrip("\n"))
    assert "## Recalibration at D" in card and f"threshold {rec['threshold']:.3f}" in card
    html = (out / "report.html").read_text()
    assert "Before and after, on the evaluation part" in html
    assert 'alt="reliability curve before recalibration"' in html
    assert 'alt="reliability curve after recalibration"' in html

    # the site bundle, validated plainly on the evaluation participants, gives the AFTER
    # figures; the input bundle there gives the BEFORE figures
    df = pd.read_csv(csv)
    evaluation = set(split.participant_id[~in_recal].astype(str))
    df[df.subject.astype(str).isin(evaluation)].to_csv(tmp_path / "evaluation.csv", index=False)
    plain = _validate(site, tmp_path / "val-site", "--data", tmp_path / "evaluation.csv",
                      "--mapping", mapping)
    assert plain["n"] == len(evaluation) and plain["threshold"] == rec["threshold"]
    assert plain["recalibration"]["map"] == rec["map"]
    assert "fitted at D on" in plain["validation_note"]
    _same_figures(res["after"]["metrics"], plain["metrics"])
    assert plain["calibration"]["ece"] == pytest.approx(res["after"]["calibration"]["ece"])
    p_site = pd.read_csv(tmp_path / "val-site" / "predictions.csv").set_index("participant_id")
    p_after = pd.read_csv(out / "predictions.csv").set_index("participant_id")
    assert np.allclose(p_site.loc[p_after.index, "p"], p_after.p_after)
    as_is = _validate(centralised_bundle, tmp_path / "val-input", "--data",
                      tmp_path / "evaluation.csv", "--mapping", mapping)
    _same_figures(res["before"]["metrics"], as_is["metrics"])


def test_recalibration_reads_only_its_part_and_a_second_replaces_the_first(
        centralised_bundle, tmp_path):
    """A leakage spy through the CLI: other features for the evaluation participants change
    the AFTER figures but not the map or threshold; other features for the recalibration
    participants change the map. Recalibrating a site bundle refits from the model's logits."""
    csv, mapping = _toy_at(tmp_path / "data", ["D"])
    first = _recalibrate(centralised_bundle, tmp_path / "r1", csv, mapping)
    rec = first["recalibration"]
    assert rec["method"] == "temperature" and rec["replaces"] is None
    split = pd.read_csv(tmp_path / "r1" / "recalibration_split.csv")
    df = pd.read_csv(csv)

    def with_new_features(part: str) -> dict:
        d = df.copy()
        rows = d.subject.isin(split.participant_id[split.part == part])
        # the clinical scores stretched: the same signal, other logits
        d.loc[rows, ["cl_0", "cl_1", "cl_2"]] = 1.5 * d.loc[rows, ["cl_0", "cl_1", "cl_2"]] - 4
        folder = tmp_path / f"data-{part}"
        folder.mkdir()
        d.to_csv(folder / "cohort.csv", index=False)
        res = _recalibrate(centralised_bundle, tmp_path / f"r-{part}", folder / "cohort.csv",
                           mapping)
        assert pd.read_csv(tmp_path / f"r-{part}" / "recalibration_split.csv").equals(split)
        return res

    ev = with_new_features("evaluation")
    assert ev["recalibration"]["map"] == rec["map"]
    assert ev["recalibration"]["threshold"] == rec["threshold"]
    assert ev["after"]["metrics"]["brier"] != first["after"]["metrics"]["brier"]
    rc = with_new_features("recalibration")
    assert rc["recalibration"]["map"] != rec["map"]

    # recalibrating the site bundle again: refitted from the model's own logits on the same
    # split, so the same map (not one stacked on the first); it records what it replaces
    again = _recalibrate(tmp_path / "r1" / "site_bundle", tmp_path / "r2", csv, mapping)
    rec2 = again["recalibration"]
    assert rec2["map"]["params"] == pytest.approx(rec["map"]["params"])
    assert rec2["threshold"] == pytest.approx(rec["threshold"])
    assert rec2["replaces"]["site"] == "D" and rec2["replaces"]["map"] == rec["map"]
    assert rec2["threshold_before"] == rec["threshold"]
    assert rec2["training_threshold"] == rec["training_threshold"]
    _same_figures(first["after"]["metrics"], again["before"]["metrics"])
    assert "replace that one" in (tmp_path / "r2" / "site_bundle" / "model_card.md").read_text()


def test_recalibration_option_errors(centralised_bundle, tmp_path, capsys):
    csv, mapping = _toy_at(tmp_path / "data", ["D"])
    base = ["--model", str(centralised_bundle), "--data", str(csv), "--mapping", str(mapping)]
    cases = [
        (["--recalibrate", "--recalibration-fraction", "1.5"],
         "--recalibration-fraction 1.5: must lie strictly between 0 and 1"),
        (["--calibration", "platt"], "--calibration is an option of --recalibrate"),
        # about 60 HC at the site: 2 % is one HC in the recalibration part
        (["--recalibrate", "--recalibration-fraction", "0.02"],
         "in the recalibration part and"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code = run_main(validate, [*base, *extra, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (out / "site_bundle").exists()
    assert "each part needs at least data.min_cell = 5 of each class" in err
    assert "would work" in err
