"""A bundle as an MLflow pyfunc model (issue #30): `mlflow.pyfunc.load_model(...).predict` gives
safn-validate's probabilities on the same participants (a binary bundle with a training
temperature, a 3-class bundle with ordinal cut points), a frame without a feature gets the
bundle's one-line error, the signature lists the features, the input example is synthetic."""

import json

import numpy as np
import pandas as pd
import pytest

from safn_core.bundle import load_bundle, save_bundle
from safn_core.cli.common import run_main
from safn_core.cli.validate import run as validate_cli
from safn_core.config import load_config
from safn_core.data.cohort import LABEL
from safn_core.data.table_loader import load_table
from safn_core.errors import DataError
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import CalibrationMap, TrainingTemperature
from safn_core.targets import HC_PRODROMAL_PD
from safn_core.training.local import make_model
from tests.helpers import MAPPING, toy_table, write_toy

mlflow = pytest.importorskip("mlflow")

SMALL = ["model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16", "model.ffn_hidden=16",
         "model.head_hidden=16"]


def _bundle(tmp, cohort, target=None, **kw):
    cfg = load_config(None, ["data.source=table", f"data.path={tmp / 'cohort.csv'}",
                             f"data.mapping={tmp / 'mapping.yaml'}", *SMALL])
    pre = Preprocessor(cohort.modalities).fit(cohort.table)
    k = 2 if target is None else target.n_classes
    return save_bundle(tmp / "model", make_model(pre.modalities, cfg.model, 0, target), pre, cfg,
                       class_counts=[1] * k, kind="centralised", target=target, **kw)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """An untrained binary bundle with a training temperature, its MLflow model and the
    safn-validate run of another site's table."""
    from safn_core.mlflow_model import save_mlflow_model

    tmp = tmp_path_factory.mktemp("binary")
    csv, mapping = write_toy(tmp, seed=1)
    temp = TrainingTemperature(CalibrationMap("temperature", {"temperature": 1.7}), {})
    bundle = _bundle(tmp, load_table(csv, mapping), threshold=0.55, calibration=temp)
    site = tmp / "site"
    site.mkdir()
    site_csv, site_mapping = write_toy(site, seed=7)
    out = tmp / "val"
    assert run_main(validate_cli, ["--model", str(bundle), "--data", str(site_csv), "--mapping",
                                   str(site_mapping), "--out", str(out), "--bootstrap", "5"]) == 0
    model = save_mlflow_model(bundle, tmp / "mlflow-model")
    return bundle, model, load_table(site_csv, site_mapping).export(), out


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """An untrained 3-class bundle with ordinal cut points, and its MLflow model."""
    from safn_core.mlflow_model import save_mlflow_model

    tmp = tmp_path_factory.mktemp("kclass")
    df = toy_table(seed=2)
    score = df["cl_1"].fillna(10) + np.random.default_rng(0).normal(0, 2, len(df))
    df["dx"] = np.array(["HC", "Prodromal", "PD"])[np.digitize(score, np.quantile(score, [.3, .6]))]
    df.to_csv(tmp / "cohort.csv", index=False)
    (tmp / "mapping.yaml").write_text(MAPPING.replace(
        "{column: dx, positive: PD, negative: HC}",
        "{column: dx, values: [HC, Prodromal, PD]}"))
    cohort = load_table(tmp / "cohort.csv", tmp / "mapping.yaml")
    bundle = _bundle(tmp, cohort, HC_PRODROMAL_PD, threshold=None, cutpoints=[0.7, 1.3])
    return bundle, save_mlflow_model(bundle, tmp / "mlflow-model"), cohort


def test_binary_pyfunc_predicts_as_safn_validate(binary):
    bundle, model, frame, out = binary
    loaded = mlflow.pyfunc.load_model(str(model))
    pred = loaded.predict(frame.drop(columns=[LABEL]))
    ref = pd.read_csv(out / "predictions.csv", dtype={"participant_id": str})
    assert list(pred.columns) == ["participant_id", "p_PD", "predicted"]
    merged = ref.merge(pred, on="participant_id")
    assert len(merged) == len(ref) == len(frame)
    np.testing.assert_allclose(merged["p_PD"], merged["p"], rtol=0, atol=1e-6)
    threshold = json.loads((out / "validation.json").read_text())["threshold"]
    assert threshold == 0.55
    assert (merged["predicted"] == np.where(merged["p"] >= threshold, "PD", "HC")).all()


def test_kclass_pyfunc_predicts_as_the_bundle_and_safn_validate(three_class, tmp_path):
    bundle_dir, model, cohort = three_class
    pred = mlflow.pyfunc.load_model(str(model)).predict(cohort.export())
    assert list(pred.columns) == ["participant_id", "p_HC", "p_Prodromal", "p_PD", "predicted"]
    bundle = load_bundle(bundle_dir)
    p, _ = bundle.predict(bundle.arrays(cohort.table))
    np.testing.assert_allclose(pred[["p_HC", "p_Prodromal", "p_PD"]].to_numpy(), p, atol=1e-9)
    expected = np.array(bundle.label_names)[bundle.decide(p)]
    assert (pred["predicted"].to_numpy() == expected).all()
    # safn-validate's predictions.csv on the same table
    out = tmp_path / "val"
    folder = bundle_dir.parent
    assert run_main(validate_cli, ["--model", str(bundle_dir), "--data",
                                   str(folder / "cohort.csv"), "--mapping",
                                   str(folder / "mapping.yaml"), "--out", str(out),
                                   "--bootstrap", "5"]) == 0
    ref = pd.read_csv(out / "predictions.csv", dtype={"participant_id": str})
    merged = ref.merge(pred, on="participant_id", suffixes=("", "_mlflow"))
    assert len(merged) == len(pred)
    for c in ("p_HC", "p_Prodromal", "p_PD"):
        np.testing.assert_allclose(merged[c], merged[f"{c}_mlflow"], atol=1e-6)
    assert (merged["predicted"] == merged["predicted_mlflow"]).all()


def test_a_missing_feature_is_the_bundles_one_line_error(binary):
    _, model, frame, _ = binary
    loaded = mlflow.pyfunc.load_model(str(model))
    with pytest.raises(DataError) as err:
        loaded.predict(frame.drop(columns=["cl_2", "ct_0"]))
    msg = str(err.value)
    assert "\n" not in msg and "lacks 2 feature column(s)" in msg
    assert "ct_0" in msg and "cl_2" in msg


def test_signature_lists_the_features_and_the_example_is_synthetic(binary):
    from safn_core.config import load_config
    from safn_core.data.sources import load_cohort

    bundle_dir, model, frame, _ = binary
    info = mlflow.models.get_model_info(str(model))
    features = load_bundle(bundle_dir).preprocessor.features
    inputs = info.signature.inputs
    assert [c for c in inputs.input_names() if c in features] == features
    assert all(inputs.input_dict()[f].type.name == "double" for f in features)
    assert {"participant_id", "site"} <= set(inputs.input_names())
    example = pd.read_json(model / "input_example.json", orient="split",
                           dtype={"participant_id": str})
    ids = set(example["participant_id"].astype(str))
    synthetic = set(load_cohort(load_config(None, []).data).table.index.astype(str))
    assert ids and ids <= synthetic
    assert not ids & set(frame["participant_id"].astype(str))
    # read back as a CSV would be (integer site and ids), the example predicts
    pred = mlflow.pyfunc.load_model(str(model)).predict(pd.read_json(
        model / "input_example.json", orient="split"))
    assert len(pred) == len(example) and pred["p_PD"].between(0, 1).all()


def test_safn_export_mlflow_writes_a_loadable_model_and_refuses_an_existing_folder(
        three_class, tmp_path, capsys):
    from safn_core.cli.export_mlflow import run as export_cli

    bundle_dir, _, cohort = three_class
    dest = tmp_path / "served"
    assert run_main(export_cli, [str(bundle_dir), str(dest)]) == 0
    frame = cohort.export().iloc[:7]
    pred = mlflow.pyfunc.load_model(str(dest)).predict(frame)
    assert len(pred) == 7 and list(pred["participant_id"]) == list(frame["participant_id"])
    assert run_main(export_cli, [str(bundle_dir), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err


def test_without_mlflow_the_error_names_the_extra(three_class, tmp_path, monkeypatch, capsys):
    import sys

    from safn_core.cli.export_mlflow import run as export_cli

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as if absent
    assert run_main(export_cli, [str(three_class[0]), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[tracking]'" in err and not (tmp_path / "m").exists()


def test_a_harmonising_bundle_adjusts_each_site_of_the_frame_as_safn_validate(tmp_path):
    """ComBat bundle: each site of the frame adjusted from its own rows, as safn-validate."""
    from safn_core.mlflow_model import save_mlflow_model
    from safn_core.training import crossval
    from tests.test_harmonisation_pipeline import cfg_of, cohort_of, scanner_table, write

    final = crossval.final_model(cohort_of(tmp_path / "train", scanner_table()),
                                 cfg_of("train.max_epochs=1"))
    bundle = save_bundle(tmp_path / "model", final.fit.model, final.preprocessor, cfg_of(),
                         threshold=final.threshold, class_counts=final.class_counts,
                         kind="centralised", harmonisation=final.harmonisation,
                         calibration=final.calibration)
    csv, mapping = write(tmp_path / "site", scanner_table(seed=5, centres=("D", "E")))
    out = tmp_path / "val"
    assert run_main(validate_cli, ["--model", str(bundle), "--data", str(csv), "--mapping",
                                   str(mapping), "--out", str(out), "--bootstrap", "5"]) == 0
    model = save_mlflow_model(bundle, tmp_path / "mlflow-model")
    assert mlflow.models.get_model_info(str(model)).metadata["safn_bundle"]["harmonised"]
    frame = load_table(csv, mapping).export()
    pred = mlflow.pyfunc.load_model(str(model)).predict(frame)
    ref = pd.read_csv(out / "predictions.csv", dtype={"participant_id": str})
    merged = ref.merge(pred, on="participant_id")
    assert len(merged) == len(ref) == len(frame)
    np.testing.assert_allclose(merged["p_PD"], merged["p"], atol=1e-6)


LOAD_WITHOUT_SAFN = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p and not (p.startswith(sys.argv[2]) and "/.venv/" not in p)]
try:
    import safn_core
    sys.exit("safn_core is still importable")
except ImportError:
    pass
import mlflow, pandas as pd
pred = mlflow.pyfunc.load_model(sys.argv[1]).predict(
    pd.read_json(sys.argv[1] + "/input_example.json", orient="split"))
import safn_core
print(len(pred), safn_core.__file__)
"""


def test_the_model_loads_where_safn_is_not_installed(three_class, tmp_path):
    """The model's code/ copy of safn_core is what MLflow imports where safn is absent."""
    import subprocess
    import sys
    from pathlib import Path

    model, root = three_class[1], Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SAFN, str(model), str(root)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    n, where = res.stdout.split()[-2:]
    assert n == "5" and Path(where).is_relative_to(model / "code")
