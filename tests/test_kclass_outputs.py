"""K-class model outputs (issue #32): a 3-class bundle round trip (target recorded, model
rebuilt, same predictions), safn-validate's K-class figures and its refusal of data whose
classes are not the bundle's, K-class recalibration (temperature and vector scaling), and the
K-class report and model card."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import log_softmax, softmax
from sklearn.metrics import balanced_accuracy_score

from safn_core.bundle import load_bundle, save_bundle, save_site_bundle
from safn_core.cli.common import run_main
from safn_core.cli.validate import run as validate_cli
from safn_core.config import load_config
from safn_core.data.cohort import LABEL
from safn_core.errors import DataError
from safn_core.model import SAFN
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import RecalibrationOptions
from safn_core.recalibration_multiclass import MultiClassMap, fit_multiclass_map, log_loss
from safn_core.targets import HC_PRODROMAL_PD, PD_VS_HC, Target
from safn_core.training.local import Arrays
from tests.helpers import toy_cohort

SMALL = ["model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16", "model.ffn_hidden=16",
         "model.head_hidden=16"]


def _build_model(pre, cfg, target):
    from inspect import signature

    from safn_core.training.local import make_model

    if "target" in signature(make_model).parameters:
        return make_model(pre.modalities, cfg.model, 0, target=target)
    return SAFN([(m.name, len(m.features), m.side) for m in pre.modalities], cfg.model,
                n_classes=target.n_classes)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """A toy table relabelled into HC / Prodromal / PD by its clinical scores, an (untrained)
    3-class SAFN on it, and its bundle."""
    tmp = tmp_path_factory.mktemp("kclass")
    cohort = toy_cohort(tmp, seed=2)
    table = cohort.table.copy()
    score = table["cl_1"].fillna(10) + np.random.default_rng(0).normal(0, 2, len(table))
    table[LABEL] = np.digitize(score, np.quantile(score, [0.3, 0.6])).astype(int)
    cfg = load_config(None, ["data.source=table", f"data.path={tmp / 'cohort.csv'}",
                             f"data.mapping={tmp / 'mapping.yaml'}", *SMALL])
    pre = Preprocessor(cohort.modalities).fit(table)
    model = _build_model(pre, cfg, HC_PRODROMAL_PD)
    path = save_bundle(tmp / "model", model, pre, cfg, threshold=0.5,
                       class_counts=np.bincount(table[LABEL], minlength=3).tolist(),
                       kind="centralised", target=HC_PRODROMAL_PD)
    return tmp, table, pre, model, path


def _site(bundle_path, table, scope="unknown"):
    from safn_core.validation import SiteData

    return SiteData(bundle_path, load_bundle(bundle_path), "toy.csv", table, "toy",
                    {"validation": scope, "note": "test data.", "training_sites": [],
                     "held_out_sites": [], "validated_sites": None, "by": "the data's site column"},
                    5, None, {"applied": False})


def test_a_kclass_bundle_round_trips(three_class):
    _, table, pre, model, path = three_class
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["target"] == HC_PRODROMAL_PD.to_dict()
    assert meta["label_names"] == ["HC", "Prodromal", "PD"]
    assert meta["decision"] == {"rule": "argmax", "cutpoints": None}
    bundle = load_bundle(path)
    assert bundle.target == Target.from_dict(HC_PRODROMAL_PD.to_dict())
    assert bundle.n_classes == 3 and bundle.decision_rule == "argmax"
    z, p, alpha = bundle.scores(table)
    assert z.shape == (len(table), 3) and p.shape == (len(table), 3)
    arrays = Arrays.from_table(pre, table)
    import torch
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(arrays.x), torch.from_numpy(arrays.mask)).double()
    np.testing.assert_allclose(z, logits.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p, softmax(logits.numpy(), axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    p2, _ = bundle.predict(table)
    np.testing.assert_array_equal(p2, p)  # no map: the model's own probabilities
    np.testing.assert_array_equal(bundle.decide(p), p.argmax(1))
    card = (path / "model_card.md").read_text()
    assert "hc_prodromal_pd" in card and "Prodromal" in card and "argmax" in card


def test_old_bundles_are_pd_vs_hc(three_class):
    from safn_core.bundle_target import bundle_target

    assert bundle_target({"label_names": ["HC", "PD"]}) == PD_VS_HC
    assert bundle_target({}) == PD_VS_HC


def test_ordinal_cutpoints_are_the_decision_rule(three_class, tmp_path):
    tmp, table, pre, model, _ = three_class
    cfg = load_bundle(three_class[4]).config
    path = save_bundle(tmp_path / "m", model, pre, cfg, threshold=0.5, class_counts=[1, 1, 1],
                       kind="centralised", target=HC_PRODROMAL_PD, cutpoints=[0.4, 1.6])
    bundle = load_bundle(path)
    assert bundle.decision_rule == "cutpoints" and bundle.cutpoints == [0.4, 1.6]
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.05, 0.05, 0.9]])
    e = p @ np.arange(3)  # expected class index 0.4, 1.3, 1.85
    np.testing.assert_array_equal(bundle.decide(p), np.searchsorted([0.4, 1.6], e, "right"))
    with pytest.raises(ValueError, match="cut points"):
        save_bundle(tmp_path / "m2", model, pre, cfg, threshold=0.5, class_counts=[1, 1, 1],
                    kind="centralised", target=HC_PRODROMAL_PD, cutpoints=[0.5])


def test_kclass_validation_writes_class_columns_metrics_report_and_card(three_class, tmp_path):
    from safn_core.cli import validate_outputs_multiclass as kclass
    from safn_core.validation import validate

    _, table, _, _, path = three_class
    res = validate(_site(path, table), n_boot=20)
    pred = res.predictions()
    assert list(pred.columns) == ["participant_id", "y", "class", "p_HC", "p_Prodromal",
                                  "p_PD", "predicted"]
    np.testing.assert_allclose(pred[["p_HC", "p_Prodromal", "p_PD"]].sum(axis=1), 1, atol=1e-9)
    assert set(pred.predicted) <= {"HC", "Prodromal", "PD"}
    rec = res.record()
    assert rec["target"]["name"] == "hc_prodromal_pd" and rec["decision_rule"] == "argmax"
    assert np.array(rec["confusion"]).sum() == len(table)
    assert {"roc_auc", "balanced_accuracy", "qwk", "mae", "log_loss"} <= set(rec["metrics"])
    assert rec["majority"]["class_name"] in ("HC", "Prodromal", "PD")
    json.dumps(rec, allow_nan=True)
    kclass.write_validation_card(tmp_path, res)
    html = kclass.write_validation_report(tmp_path, res).read_text()
    card = (tmp_path / "model_card.md").read_text()
    for text in (html, card):
        assert "Prodromal" in text and "confusion matrix" in text and "majority" in text
    assert (tmp_path / "confusion.png").is_file() and (tmp_path / "roc_ovr.png").is_file()


def test_validate_refuses_data_of_another_target(three_class, capsys):
    tmp, *_, path = three_class
    # the toy table as it is: HC / PD (two classes) against a 3-class bundle
    code = run_main(validate_cli, ["--model", str(path), "--data", str(tmp / "cohort.csv"),
                                   "--mapping", str(tmp / "mapping.yaml"),
                                   "--out", str(tmp / "v-mismatch")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'hc_prodromal_pd'" in err and "['HC', 'PD']" in err and "2 classes instead of 3" in err
    from types import SimpleNamespace

    from safn_core.validation_multiclass import check_target
    report = SimpleNamespace(source="site.csv")
    for names, why in ((("HC", "SWEDD", "PD"), "'SWEDD' the bundle does not know"),
                       (("PD", "Prodromal", "HC"), "another order")):
        cohort = SimpleNamespace(label_names=names, target=Target("label", names), report=report)
        with pytest.raises(DataError, match=why):
            check_target(HC_PRODROMAL_PD, cohort, tmp / "model")
    check_target(HC_PRODROMAL_PD, SimpleNamespace(label_names=HC_PRODROMAL_PD.classes,
                                                  report=report), tmp / "model")


def _overconfident(n=6000, seed=0, k=3, scale=3.0, shift=None):
    """Logits of a model whose true class probabilities are softmax(t), reported as
    scale·t + shift: a known miscalibration."""
    rng = np.random.default_rng(seed)
    t = rng.normal(0, 1.2, (n, k))
    y = np.array([rng.choice(k, p=row) for row in softmax(t, axis=1)])
    return scale * t + (0 if shift is None else np.asarray(shift)), y


def test_temperature_scaling_lowers_log_loss_and_keeps_argmax():
    z, y = _overconfident()
    fit, ev = slice(0, 3000), slice(3000, None)
    cmap = fit_multiclass_map("temperature", z[fit], y[fit], 3)
    assert cmap.params["temperature"] == pytest.approx(3.0, rel=0.1)
    assert log_loss(y[ev], np.log(cmap(z[ev]))) < log_loss(y[ev], z[ev]) - 0.05
    np.testing.assert_array_equal(cmap(z).argmax(1), z.argmax(1))
    again = MultiClassMap.from_dict(json.loads(json.dumps(cmap.to_dict())))
    np.testing.assert_allclose(again(z), cmap(z))


def test_vector_scaling_recovers_per_class_shift():
    z, y = _overconfident(scale=1.0, shift=[0.0, 1.5, -1.0])
    fit, ev = slice(0, 3000), slice(3000, None)
    cmap = fit_multiclass_map("vector", z[fit], y[fit], 3)
    b = np.array(cmap.params["bias"])
    assert b[1] - b[0] == pytest.approx(-1.5, abs=0.25) and b[2] - b[0] == pytest.approx(1.0,
                                                                                        abs=0.25)
    assert log_loss(y[ev], log_softmax(cmap.logit(z[ev]), axis=1)) < log_loss(y[ev], z[ev])
    with pytest.raises(DataError, match="vector"):
        MultiClassMap.from_dict({"method": "vector", "params": {"scale": [1, 1], "bias": [0, 0]}},
                                "bundle.json recalibration.map", 3)
    with pytest.raises(DataError, match="platt is the binary map"):
        fit_multiclass_map("platt", z, y, 3)
    with pytest.raises(DataError, match="one class only"):
        fit_multiclass_map("temperature", z[y < 2], y[y < 2], 3)


def test_kclass_recalibration_at_a_site_and_its_site_bundle(three_class, tmp_path):
    from safn_core.cli import validate_outputs_multiclass as kclass
    from safn_core.validation import recalibrate_at_site

    _, table, _, _, path = three_class
    site = _site(path, table)
    res = recalibrate_at_site(site, RecalibrationOptions("temperature", 0.5), n_boot=20)
    assert res.cmap.method == "temperature" and res.record["n_classes"] == 3
    # temperature scaling never changes a participant's most probable class
    np.testing.assert_array_equal(res.p_before.argmax(1), res.p_after.argmax(1))
    ev = res.evaluated
    z = load_bundle(path).scores(table)[0]
    assert log_loss(res.y[res.in_recal], res.cmap.logit(z[res.in_recal])) <= log_loss(
        res.y[res.in_recal], z[res.in_recal]) + 1e-9
    site_path = save_site_bundle(tmp_path / "site_bundle", path, res.site_meta(),
                                 kclass.recalibration_card(res))
    sb = load_bundle(site_path)
    assert isinstance(sb.calibration_map, MultiClassMap)
    p, _ = sb.predict(table)
    np.testing.assert_allclose(p[ev], res.p_after, rtol=1e-9)
    html = kclass.write_recalibration_report(tmp_path, res).read_text()
    assert "Recalibration at toy" in html and "Prodromal" in html
    vec = recalibrate_at_site(site, RecalibrationOptions("vector", 0.5), n_boot=0)
    assert len(vec.cmap.params["scale"]) == 3
    pd.testing.assert_frame_equal(vec.split(), res.split())  # the same seeded split


def _kclass_entry():
    """A K-class history entry as `federation.aggregate_multiclass` writes it."""
    from safn_core.multiclass import multiclass_metrics

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    p = softmax(rng.normal(0, 1, (90, 3)) + 2 * np.eye(3)[y], axis=1)
    pooled = multiclass_metrics(y, p, True, ["HC", "H&Y 1", "H&Y >=2"])
    return {"round": 1, "decision_rule": "argmax", "pooled": pooled,
            "pooled_ci": {"roc_auc": [0.7, 0.9], "balanced_accuracy": [0.5, 0.8],
                          "qwk": [0.4, 0.8]},
            "sites": {"A": {"roc_auc": pooled["roc_auc"], "n": 90}}, "n_test": 90,
            "sites_reported": 1, "val_loss": 0.9, "val_roc_auc": 0.8}


def test_run_report_and_federated_card_have_the_kclass_block(tmp_path):
    from safn_core.federation.federated_bundle import kclass_metrics
    from safn_core.federation.run_report import learning_section
    from safn_core.modelcard import model_card
    from safn_core.report import Report
    from safn_core.targets import HY_STAGE

    entry = _kclass_entry()
    rep = Report("run")
    learning_section(rep, [entry], tmp_path, "curves", "selected round 1, pooled test")
    html = rep.render()
    assert "H&amp;Y &gt;=2" in html and "confusion matrix" in html and "majority class" in html
    assert "qwk" in html and (tmp_path / "confusion.png").is_file()
    metrics = kclass_metrics(entry)
    section = metrics["federated_pooled_test"]
    assert section["roc_auc"]["ci"] == [0.7, 0.9] and len(section["confusion"]) == 3
    cfg = load_config(None, SMALL)
    card = model_card({"kind": "federated", "label_names": list(HY_STAGE.classes),
                       "target": HY_STAGE.to_dict(), "threshold": None,
                       "decision": {"rule": "argmax", "cutpoints": None},
                       "class_counts": [30, 30, 30], "metrics": metrics}, cfg)
    assert "## Target" in card and "hy_stage" in card and "(ordered)" in card
    assert "NHY" in card and "argmax" in card and "confusion matrix" in card
    assert "H&Y 1: roc-auc" in card and "majority-class baseline" in card
    binary = model_card({"kind": "centralised", "label_names": ["HC", "PD"], "threshold": 0.4,
                         "class_counts": [1, 2], "metrics": {}}, cfg)
    assert "## Target" not in binary and "PD vs HC" in binary


def test_safn_validate_end_to_end_on_a_synthetic_three_class_site(tmp_path):
    """safn-validate itself on a 3-class synthetic download (data.target: hc_prodromal_pd):
    plain validation, then --recalibrate with vector scaling and its site bundle."""
    from safn_core.data.sources import load_path
    from safn_core.synth.writer import write_download
    from safn_core.training.local import make_model

    cfg = load_config(None, ["data.target=hc_prodromal_pd", "synth.n_pd=60", "synth.n_hc=50",
                             "synth.n_prodromal=120", "synth.n_without_mri=0", "synth.n_swedd=0",
                             "synth.n_sites=1", "synth.min_site_size=30", *SMALL])
    write_download(cfg.synth, tmp_path / "site")
    cohort = load_path(tmp_path / "site", cfg.data)
    assert cohort.target.name == "hc_prodromal_pd"
    pre = Preprocessor(cohort.modalities).fit(cohort.table)
    model = make_model(pre.modalities, cfg.model, 0, target=cohort.target)
    bundle = save_bundle(tmp_path / "model", model, pre, cfg, threshold=None,
                         class_counts=np.bincount(cohort.table[LABEL], minlength=3).tolist(),
                         kind="centralised", target=cohort.target)
    out = tmp_path / "val"
    assert run_main(validate_cli, ["--model", str(bundle), "--data", str(tmp_path / "site"),
                                   "--out", str(out), "--bootstrap", "30"]) == 0
    res = json.loads((out / "validation.json").read_text())
    preds = pd.read_csv(out / "predictions.csv")
    assert res["n"] == len(preds) == len(cohort.table)
    assert {"p_HC", "p_Prodromal", "p_PD", "predicted"} <= set(preds.columns)
    assert res["metrics"]["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(
        preds.y, preds[["p_HC", "p_Prodromal", "p_PD"]].to_numpy().argmax(1)))
    assert "confusion" in (out / "report.html").read_text()
    rec_out = tmp_path / "recal"
    assert run_main(validate_cli, ["--model", str(bundle), "--data", str(tmp_path / "site"),
                                   "--out", str(rec_out), "--bootstrap", "0", "--recalibrate",
                                   "--calibration", "vector"]) == 0
    site = load_bundle(rec_out / "site_bundle")
    assert site.calibration_map.method == "vector" and site.n_classes == 3
    again = tmp_path / "val-site"
    assert run_main(validate_cli, ["--model", str(rec_out / "site_bundle"), "--data",
                                   str(tmp_path / "site"), "--out", str(again),
                                   "--bootstrap", "0"]) == 0
    assert "vector scaling" in (again / "model_card.md").read_text()
