"""Issue #32, data side: the labels of each target from PPMI downloads of both name generations,
the H&Y classes, the leakage guard (PPMI and tables), K-class tables, the contract's per-class
min_cell and the cohort store's target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.config import DataConfig, SynthConfig
from safn_core.data.cohort_store import META, read_cohort, write_cohort
from safn_core.data.contract import check_cohort
from safn_core.data.ppmi_loader import load_ppmi
from safn_core.data.sources import load_path
from safn_core.data.table_loader import load_table
from safn_core.errors import DataError
from safn_core.synth import write_download
from safn_core.targets import HC_PRODROMAL_PD, HY_STAGE, PD_VS_HC
from tests.ppmi_fixtures import Person, build_download, default_rows

# PD 1..6 (H&Y written per test), HC 11-12, SWEDD 21, Prodromal 31-32
PEOPLE = (*(Person(p, "PD") for p in range(1, 7)), Person(11, "HC"), Person(12, "HC"),
          Person(21, "SWEDD"), Person(31, "Prodromal"), Person(32, "Prodromal", "20"))
NHY = {1: 1, 2: 2, 3: 3, 4: 101, 5: "", 6: 0}  # → class 1, 2, 2, excluded ×3


def _download(tmp_path: Path, legacy: bool, nhy: dict | None = None):
    d = build_download(tmp_path / ("legacy" if legacy else "new"), people=PEOPLE, legacy=legacy)
    if nhy:
        rows = default_rows("updrs3", PEOPLE, legacy)
        for r in rows:
            if r["PATNO"] in nhy:
                r["NHY"] = nhy[r["PATNO"]]
        d.write("updrs3", rows)
    return d


def _labels(cohort) -> dict[int, int]:
    return {int(k): int(v) for k, v in cohort.table["label"].items()}


@pytest.mark.parametrize("legacy", [False, True])
def test_hc_prodromal_pd_keeps_prodromal_and_excludes_swedd(tmp_path, legacy):
    c = load_ppmi(_download(tmp_path, legacy).root, target="hc_prodromal_pd")
    assert c.target is HC_PRODROMAL_PD and c.label_names == ("HC", "Prodromal", "PD")
    assert c.n_classes == 3
    assert _labels(c) == {**{p: 2 for p in range(1, 7)}, 11: 0, 12: 0, 31: 1, 32: 1}
    assert c.report.excluded == {"cohort SWEDD": 1}
    assert c.report.cohorts == {"PD": 6, "HC": 2, "Prodromal": 2, "SWEDD": 1}
    assert "NHY" in c.features  # only hy_stage is defined by H&Y


@pytest.mark.parametrize("legacy", [False, True])
def test_pd_vs_hc_still_excludes_prodromal(tmp_path, legacy):
    c = load_ppmi(_download(tmp_path, legacy).root)
    assert c.target is PD_VS_HC and c.label_names == ("HC", "PD")
    assert set(c.table.index.astype(int)) == {1, 2, 3, 4, 5, 6, 11, 12}
    assert c.report.excluded == {"cohort SWEDD": 1, "cohort Prodromal": 2}


def test_legacy_prodromal_spelling_and_no_class_note(tmp_path):
    d = _download(tmp_path, legacy=True)
    rows = default_rows("status", PEOPLE, legacy=True)
    for r in rows:
        r["ENROLL_CAT"] = {"PRODROMA": "PRODROMAL"}.get(r["ENROLL_CAT"], r["ENROLL_CAT"])
    d.write("status", rows)
    c = load_ppmi(d.root, target="hc_prodromal_pd")
    assert (c.y == 1).sum() == 2
    rows = [r for r in rows if r["ENROLL_CAT"] != "PRODROMAL"]
    d.write("status", rows)
    c = load_ppmi(d.root, target="hc_prodromal_pd")
    assert "no Prodromal participant in the cohort" in c.report.notes
    assert "no PD participant in the cohort" not in c.report.notes


@pytest.mark.parametrize("legacy", [False, True])
def test_hy_stage_classes_exclusions_and_no_nhy_input(tmp_path, legacy):
    c = load_ppmi(_download(tmp_path, legacy, NHY).root, target="hy_stage")
    assert c.target is HY_STAGE and c.label_names == ("HC", "H&Y 1", "H&Y >=2")
    assert _labels(c) == {1: 1, 2: 2, 3: 2, 11: 0, 12: 0}  # stage 3 joins class 2
    assert c.report.excluded == {"cohort Prodromal": 2, "cohort SWEDD": 1,
                                 "H&Y not recorded": 2, "H&Y 0 (PD)": 1}
    assert c.report.cohorts["H&Y 1"] == 1 and c.report.cohorts["H&Y >=2"] == 2
    assert "NHY" not in c.features and "NHY" not in c.report.missing_rate
    assert "NP3TOT" in c.features  # only the defining feature goes
    assert "NHY defines the target hy_stage: removed from the inputs" in c.report.notes
    assert len(c.report.notes) == len(set(c.report.notes))  # Part III read twice, noted once
    assert any("1 PD participant at H&Y stage 3" in n for n in c.report.notes)


def test_hy_stage_reads_nhy_even_without_motor_features(tmp_path):
    c = load_ppmi(_download(tmp_path, False, NHY).root, target="hy_stage", exclude_motor=True)
    assert _labels(c) == {1: 1, 2: 2, 3: 2, 11: 0, 12: 0}
    assert not {"NHY", "NP3TOT"} & set(c.features)


def test_hy_stage_without_part_iii_excludes_every_pd(tmp_path):
    d = _download(tmp_path, False)
    d.remove("updrs3")
    c = load_ppmi(d.root, target="hy_stage")
    assert set(c.y) == {0} and c.report.excluded["H&Y not recorded"] == 6
    assert "no H&Y >=2 participant in the cohort" in c.report.notes


def test_data_target_is_threaded_through_load_path(tmp_path):
    root = _download(tmp_path, False, NHY).root
    c = load_path(root, DataConfig(source="ppmi", path=root, target="hy_stage"))
    assert c.target is HY_STAGE and sorted(set(c.y)) == [0, 1, 2]
    assert c.plausible_ranges and "NHY" not in c.plausible_ranges


@pytest.fixture(scope="module")
def severity_download(tmp_path_factory):
    """The synthetic download with the shares documented for severity work."""
    out = tmp_path_factory.mktemp("synth") / "dl"
    summary = write_download(SynthConfig(n_prodromal=300), out)
    return out, summary


@pytest.mark.parametrize("target", ["hc_prodromal_pd", "hy_stage"])
def test_synthetic_severity_download_has_min_cell_of_each_class_per_site(severity_download,
                                                                         target):
    out, summary = severity_download
    c = load_path(out, DataConfig(target=target))
    report = check_cohort(c, 5)
    assert report.ok and len(report.site_class_counts) == 5
    for per in report.site_class_counts.values():
        assert list(per) == list(c.label_names) and min(per.values()) >= 5
    if target == "hc_prodromal_pd":  # every prodromal participant with MRI is kept
        assert report.class_counts["Prodromal"] == summary["Prodromal_with_mri"]
        assert {s["CNO"]: s["Prodromal_with_mri"] for s in summary["sites"].values()} == {
            int(k): v["Prodromal"] for k, v in report.site_class_counts.items()}
    else:
        n1, n2 = report.class_counts["H&Y 1"], report.class_counts["H&Y >=2"]
        assert 0.3 < n1 / (n1 + n2) < 0.55  # PPMI ≈ 44 % stage 1


def _write_table(tmp_path: Path, mapping: str) -> tuple[Path, Path]:
    table = tmp_path / "t.csv"
    rows = ["id,site,stage,hy,moca,ct"]
    stages = ["HC", "early", "late", "HC", "early", "late", "unknown", "", "late"]
    for i, s in enumerate(stages):
        rows.append(f"p{i},{'A' if i < 5 else 'B'},{s},{i % 3},{25 + i},{2.0 + i / 10}")
    table.write_text("\n".join(rows) + "\n")
    mp = tmp_path / "m.yaml"
    mp.write_text(mapping)
    return table, mp


ORDINAL = """id: id
site: site
label: {column: stage, values: [HC, early, late], ordered: true, defined_by: [hy]}
modalities:
  clinical: {columns: [moca]}
  imaging: {side: imaging, columns: [ct]}
"""


def test_table_with_k_ordered_values(tmp_path):
    c = load_table(*_write_table(tmp_path, ORDINAL))
    assert c.target.name == "label" and c.target.classes == ("HC", "early", "late")
    assert c.target.ordered and c.target.defined_by == ("hy",)
    assert c.label_names == ("HC", "early", "late")
    assert list(c.y) == [0, 1, 2, 0, 1, 2, 2]
    assert c.report.excluded == {"label unknown": 1, "label (empty)": 1}
    assert c.report.cohorts == {"HC": 2, "early": 2, "late": 3, "unknown": 1, "(empty)": 1}
    named = ORDINAL.replace("ordered: true", "ordered: true, names: [healthy, mild, severe]")
    c = load_table(*_write_table(tmp_path, named))
    assert c.label_names == ("healthy", "mild", "severe") and c.target.classes == c.label_names


def test_table_feature_that_defines_the_label_is_refused(tmp_path):
    leaky = ORDINAL.replace("columns: [moca]", "columns: [moca, hy]")
    with pytest.raises(DataError) as e:
        load_table(*_write_table(tmp_path, leaky))
    msg = str(e.value)
    assert "t.csv" in msg and "hy" in msg and "label.defined_by" in msg and "remove" in msg


@pytest.mark.parametrize("label, match", [
    ("{column: stage, positive: late, values: [HC, late]}", "either 'positive'"),
    ("{column: stage}", "either 'positive'"),
    ("{column: stage, values: [HC, early], names: [a, b, c]}", "needs 2 display names"),
    ("{column: stage, values: [HC, HC]}", "two distinct values"),
    ("{column: stage, values: [HC, late], negative: HC}", "'negative' belongs"),
    ("{column: stage, values: [HC, late], defined_by: [nope]}", "'nope'.*label.defined_by"),
])
def test_table_label_declaration_errors(tmp_path, label, match):
    mapping = ORDINAL.replace(ORDINAL.splitlines()[2], f"label: {label}")
    with pytest.raises(DataError, match=match):
        load_table(*_write_table(tmp_path, mapping))


def test_binary_table_mapping_is_unchanged(tmp_path):
    binary = ORDINAL.replace(ORDINAL.splitlines()[2],
                             "label: {column: stage, positive: late, negative: HC}")
    c = load_table(*_write_table(tmp_path, binary))
    assert c.label_names == ("HC", "late") and c.target.classes == ("HC", "late")
    assert list(c.y) == [0, 1, 0, 1, 1]
    assert list(c.report.cohorts)[:2] == ["late", "HC"]  # positive first, as before
    assert c.report.excluded == {"label early": 2, "label unknown": 1, "label (empty)": 1}


def test_contract_counts_every_class_and_names_the_small_one(tmp_path):
    c = load_table(*_write_table(tmp_path, ORDINAL))
    report = check_cohort(c, min_cell=3)
    assert report.class_counts == {"HC": 2, "early": 2, "late": 3}
    fatal = [p.message for p in report.fatal]
    assert len(fatal) == 2 and any("class HC has 2" in m for m in fatal)
    assert any("class early has 2" in m for m in fatal)
    assert report.site_class_counts == {"A": {"HC": 2, "early": 2, "late": 1},
                                        "B": {"HC": 0, "early": 0, "late": 2}}
    warn = [p.message for p in report.warnings if p.message.startswith("site")]
    assert warn[0].startswith("site A") and "late 1" in warn[0] and "HC 2" in warn[0]
    assert "HC 0, early 0, late 2" in warn[1]
    assert check_cohort(c, min_cell=2).ok


def test_cohort_store_round_trips_the_target(tmp_path):
    c = load_ppmi(_download(tmp_path, False, NHY).root, target="hy_stage")
    meta = write_cohort(tmp_path / "store", c)
    back = read_cohort(meta)
    assert back.target is HY_STAGE and back.label_names == c.label_names
    assert np.array_equal(back.y, c.y)
    t = load_table(*_write_table(tmp_path, ORDINAL))
    back = read_cohort(write_cohort(tmp_path / "table", t))
    assert back.target == t.target and back.target.ordered
    # a file written before targets: pd_vs_hc
    import json

    old = tmp_path / "old"
    write_cohort(old, load_ppmi(_download(tmp_path / "x", False).root))
    d = json.loads((old / META).read_text())
    d.pop("target")
    (old / META).write_text(json.dumps(d))
    assert read_cohort(old / META).target is PD_VS_HC
    assert pd.read_parquet(old / "cohort.parquet").shape[0] == 8
