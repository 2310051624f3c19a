"""Generic tabular cohorts: mapping, label coding, column patterns, and clear errors."""


import numpy as np
import pandas as pd
import pytest

from safn_core.config import DataConfig
from safn_core.data.contract import check_cohort
from safn_core.data.sources import load_path
from safn_core.data.table_loader import load_table
from safn_core.errors import DataError

MAPPING = """\
id: subject
site: centre
label: {column: dx, positive: PD, negative: HC}
modalities:
  img: {side: imaging, columns: ["ct_*"]}
  cli: {side: clinical, columns: [moca, upsit]}
ranges: {moca: [0, 30]}
"""


def make_table(n=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dx = np.where(np.arange(n) % 4 == 0, "HC", "PD")
    return pd.DataFrame({
        "subject": [f"S{i:03d}" for i in range(n)],
        "centre": np.where(np.arange(n) % 2 == 0, "A", "B"),
        "dx": dx,
        "ct_a": rng.normal(2.4, 0.1, n).round(3),
        "ct_b": rng.normal(2.5, 0.1, n).round(3),
        "moca": rng.integers(20, 31, n),
        "upsit": rng.integers(10, 40, n),
        "notes": ["free text"] * n,
    })


@pytest.fixture
def files(tmp_path):
    table = make_table()
    csv = tmp_path / "cohort.csv"
    table.to_csv(csv, index=False)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(MAPPING)
    return table, csv, mapping


def test_loads_with_patterns_and_labels(files):
    table, csv, mapping = files
    cohort = load_table(csv, mapping)
    assert len(cohort) == 40
    assert [m.name for m in cohort.modalities] == ["img", "cli"]
    assert cohort.modalities[0].features == ("ct_a", "ct_b")
    assert cohort.modalities[0].side == "imaging"
    assert cohort.y.sum() == (table.dx == "PD").sum()
    assert cohort.label_names == ("HC", "PD")
    assert set(cohort.sites) == {"A", "B"}
    assert cohort.table["ct_a"].dtype == np.float64
    np.testing.assert_allclose(cohort.table.loc["S001", "ct_a"], table.loc[1, "ct_a"])
    assert "notes" not in cohort.table.columns
    assert check_cohort(cohort, 5).ok


def test_parquet_same_as_csv(files, tmp_path):
    table, csv, mapping = files
    pq = tmp_path / "cohort.parquet"
    table.to_parquet(pq)
    a, b = load_table(csv, mapping), load_table(pq, mapping)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_other_labels_excluded_and_counted(files, tmp_path):
    table, csv, mapping = files
    table.loc[[2, 3], "dx"] = "SWEDD"
    table.loc[5, "dx"] = ""
    table.to_csv(csv, index=False)
    cohort = load_table(csv, mapping)
    assert len(cohort) == 37
    assert cohort.report.excluded == {"label SWEDD": 2, "label (empty)": 1}


def test_missing_values_become_nan(files):
    table, csv, mapping = files
    table["moca"] = table["moca"].astype(object)
    table.loc[0, "moca"] = "NA"
    table.loc[1, "moca"] = ""
    table.to_csv(csv, index=False)
    cohort = load_table(csv, mapping)
    assert np.isnan(cohort.table.loc["S000", "moca"]) and np.isnan(cohort.table.loc["S001", "moca"])
    assert cohort.report.missing_rate["moca"] == pytest.approx(2 / 40)


def test_bom_is_accepted(files):
    table, csv, mapping = files
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    assert len(load_table(csv, mapping)) == 40


def test_require_all_modalities_drops_and_counts(files):
    table, csv, mapping = files
    table.loc[0, ["ct_a", "ct_b"]] = np.nan
    table.to_csv(csv, index=False)
    cfg = DataConfig(mapping=mapping, require_all_modalities=True)
    cohort = load_path(csv, cfg)
    assert len(cohort) == 39
    assert cohort.report.excluded["missing modality img"] == 1


# ---------------------------------------------------------------- malformed inputs


def expect_error(csv, mapping, *fragments):
    with pytest.raises(DataError) as exc:
        load_table(csv, mapping)
    for f in fragments:
        assert f in str(exc.value), str(exc.value)


def test_text_in_numeric_column_names_rows(files):
    table, csv, mapping = files
    table["upsit"] = table["upsit"].astype(object)
    table.loc[3, "upsit"] = "twelve"
    table.to_csv(csv, index=False)
    expect_error(csv, mapping, "cohort.csv", "'upsit'", "line", "5", "twelve")


def test_duplicate_ids_name_lines(files):
    table, csv, mapping = files
    table.loc[7, "subject"] = "S001"
    table.to_csv(csv, index=False)
    expect_error(csv, mapping, "duplicate participant ids", "S001", "3, 9")


def test_empty_id(files):
    table, csv, mapping = files
    table.loc[4, "subject"] = ""
    table.to_csv(csv, index=False)
    expect_error(csv, mapping, "'subject'", "empty", "6")


def test_missing_column(files, tmp_path):
    table, csv, mapping = files
    mapping.write_text(MAPPING.replace("[moca, upsit]", "[moca, gds]"))
    expect_error(csv, mapping, "column 'gds'", "modality 'cli'")


def test_pattern_matches_nothing(files):
    table, csv, mapping = files
    mapping.write_text(MAPPING.replace("ct_*", "thick_*"))
    expect_error(csv, mapping, "pattern 'thick_*'")


def test_label_as_feature_refused(files):
    table, csv, mapping = files
    mapping.write_text(MAPPING.replace("[moca, upsit]", "[moca, dx]"))
    expect_error(csv, mapping, "'dx'", "cannot be a feature")


def test_column_in_two_modalities(files):
    table, csv, mapping = files
    mapping.write_text(MAPPING.replace("[moca, upsit]", "[moca, ct_a]"))
    expect_error(csv, mapping, "'ct_a'", "both modality")


def test_mapping_unknown_key(files):
    table, csv, mapping = files
    mapping.write_text(MAPPING + "colour: blue\n")
    expect_error(csv, mapping, "mapping.yaml", "unknown key 'colour'")


def test_mapping_missing_label(files):
    table, csv, mapping = files
    mapping.write_text("id: subject\nmodalities:\n  a: {columns: [ct_a]}\n")
    expect_error(csv, mapping, "missing required key 'label'")


def test_mapping_unreadable_yaml(files):
    table, csv, mapping = files
    mapping.write_text("id: [subject\nlabel: x\n")
    expect_error(csv, mapping, "mapping.yaml", "not valid YAML")


def test_mapping_missing_file(files, tmp_path):
    table, csv, mapping = files
    expect_error(csv, tmp_path / "none.yaml", "none.yaml", "not found")


def test_table_missing(tmp_path, files):
    _, _, mapping = files
    expect_error(tmp_path / "absent.csv", mapping, "absent.csv", "not found")


def test_table_unsupported_format(tmp_path, files):
    _, _, mapping = files
    xls = tmp_path / "cohort.xlsx"
    xls.write_bytes(b"PK\x03\x04")
    expect_error(xls, mapping, "unsupported table format")


def test_table_not_utf8(tmp_path, files):
    _, _, mapping = files
    bad = tmp_path / "latin.csv"
    bad.write_bytes("subject,dx\nS\xe9,PD\n".encode("latin-1"))
    expect_error(bad, mapping, "latin.csv", "UTF-8")


def test_empty_table(tmp_path, files):
    _, _, mapping = files
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    expect_error(empty, mapping, "empty.csv")


def test_id_column_absent(files):
    table, csv, mapping = files
    mapping.write_text(MAPPING.replace("id: subject", "id: patient"))
    expect_error(csv, mapping, "column 'patient'", "'id'")


def test_corrupt_parquet(tmp_path, files):
    _, _, mapping = files
    pq = tmp_path / "broken.parquet"
    pq.write_bytes(b"not parquet at all")
    expect_error(pq, mapping, "broken.parquet", "cannot be read")


# ---------------------------------------------------------------- the data contract


def test_contract_empty_class_is_fatal(files):
    table, csv, mapping = files
    table = table[table.dx == "PD"]
    table.to_csv(csv, index=False)
    report = check_cohort(load_table(csv, mapping), min_cell=5)
    assert not report.ok
    assert any("class HC has 0" in p.message for p in report.fatal)


def test_contract_small_class_below_min_cell(files):
    table, csv, mapping = files
    table = pd.concat([table[table.dx == "PD"], table[table.dx == "HC"].head(3)])
    table.to_csv(csv, index=False)
    report = check_cohort(load_table(csv, mapping), min_cell=5)
    assert any("class HC has 3" in p.message and "min_cell = 5" in p.message for p in report.fatal)
    assert check_cohort(load_table(csv, mapping), min_cell=3).ok


def test_contract_out_of_range_names_rows(files):
    table, csv, mapping = files
    table.loc[[2, 9], "moca"] = 45
    table.to_csv(csv, index=False)
    report = check_cohort(load_table(csv, mapping), min_cell=5)
    (problem,) = report.fatal
    assert problem.column == "moca" and problem.rows == ["S002", "S009"]
    assert "plausible range [0, 30]" in problem.message


def test_contract_absent_modality_and_missingness(files):
    table, csv, mapping = files
    table["ct_a"] = np.nan
    table["ct_b"] = np.nan
    table.loc[: 29, "upsit"] = np.nan
    table.to_csv(csv, index=False)
    report = check_cohort(load_table(csv, mapping), min_cell=5)
    assert any("modality 'img' is entirely absent" in p.message for p in report.fatal)
    assert any(p.column == "upsit" and "75%" in p.message for p in report.warnings)


# --- categorical columns ---------------------------------------------------------------------

CATEGORICAL = MAPPING.replace("cli: {side: clinical, columns: [moca, upsit]}",
                              "cli: {side: clinical, columns: [moca, apoe, sex]}") + """\
categorical:
  apoe: [E2E3, E3E3, E3E4, E4E4]
  sex: [female, male]
"""


def categorical_files(tmp_path, table, name="cohort.csv", mapping_text=CATEGORICAL):
    csv = tmp_path / name
    table.to_csv(csv, index=False)
    mapping = tmp_path / "categorical.yaml"
    mapping.write_text(mapping_text)
    return csv, mapping


def with_categories(n=40, seed=0):
    t = make_table(n, seed)
    t["apoe"] = np.array(["E3E3", "E3E4", "E2E3", "E4E4"])[np.arange(n) % 4]
    t["sex"] = np.where(np.arange(n) % 3 == 0, "female", "male")
    return t


def test_categorical_column_becomes_declared_indicators(tmp_path):
    t = with_categories()
    t.loc[5, "apoe"] = ""  # missing stays missing
    csv, mapping = categorical_files(tmp_path, t)
    cohort = load_table(csv, mapping)
    cli = cohort.modalities[1]
    assert cli.features == ("moca", "apoe=E2E3", "apoe=E3E3", "apoe=E3E4", "apoe=E4E4",
                            "sex=female", "sex=male")
    assert cohort.categories == {"apoe": ("E2E3", "E3E3", "E3E4", "E4E4"),
                                 "sex": ("female", "male")}
    row = cohort.table.loc["S001"]
    assert row["apoe=E3E4"] == 1.0 and row["apoe=E3E3"] == 0.0 and row["sex=male"] == 1.0
    assert cohort.table.loc["S005", ["apoe=E2E3", "apoe=E3E3", "apoe=E3E4", "apoe=E4E4"]] \
        .isna().all()
    ind = cohort.table[[f for f in cli.features if f.startswith("apoe=")]]
    assert (ind.drop(index="S005").sum(axis=1) == 1).all()  # exactly one category per row
    assert cohort.plausible_ranges["apoe=E4E4"] == (0.0, 1.0)


def test_two_sites_encode_a_categorical_column_identically(tmp_path):
    """A site that never sees a category still gets its (all-zero) indicator, in the same
    order, so both sites' feature lists and statistics line up."""
    a = with_categories(20, 0)
    b = with_categories(20, 1)
    b["apoe"] = "E3E3"  # site b has one genotype only
    csv_a, mapping = categorical_files(tmp_path, a, "a.csv")
    csv_b, _ = categorical_files(tmp_path, b, "b.csv")
    ca, cb = load_table(csv_a, mapping), load_table(csv_b, mapping)
    assert ca.modalities == cb.modalities
    assert cb.table["apoe=E4E4"].eq(0).all() and cb.table["apoe=E3E3"].eq(1).all()


def test_an_undeclared_category_names_column_line_and_value(tmp_path):
    t = with_categories()
    t.loc[7, "apoe"] = "E2E2"
    csv, mapping = categorical_files(tmp_path, t)
    with pytest.raises(DataError) as e:
        load_table(csv, mapping)
    msg = str(e.value)
    assert "column 'apoe'" in msg and "'E2E2'" in msg and "file line 9" in msg
    assert "categorical.apoe" in msg


def test_numeric_codes_as_categories_and_parquet(tmp_path):
    t = with_categories()
    t["apoe"] = np.array([33, 34, 23, 44])[np.arange(len(t)) % 4]
    text = CATEGORICAL.replace("[E2E3, E3E3, E3E4, E4E4]", "[23, 33, 34, 44]")
    csv, mapping = categorical_files(tmp_path, t, mapping_text=text)
    pq = tmp_path / "cohort.parquet"
    t.assign(apoe=t["apoe"].astype(float)).to_parquet(pq)  # 34.0 reads as category 34
    from_csv, from_pq = load_table(csv, mapping), load_table(pq, mapping)
    assert "apoe=34" in from_csv.features
    pd.testing.assert_frame_equal(from_csv.table, from_pq.table)


@pytest.mark.parametrize("text, expected", [
    ("categorical:\n  apoe: [E3E3]\n", "at least two declared categories"),
    ("categorical:\n  apoe: [E3E3, E3E3]\n", "more than once"),
    ("categorical:\n  apoe: [E3E3, NA]\n", "missing-value token"),
    ("categorical:\n  genotype: [a, b]\n", "'categorical.genotype'"),
    ("categorical:\n  upsit: [a, b]\n", "in no modality"),
    ("ranges: {moca: [0, 30], apoe: [0, 1]}\ncategorical:\n  apoe: [E2E3, E3E3, E3E4, E4E4]\n",
     "ranges apply to numeric columns"),
])
def test_bad_categorical_declarations_are_named(tmp_path, text, expected):
    base = CATEGORICAL.split("ranges:")[0].split("categorical:")[0]
    base = base.replace("apoe, sex", "apoe")
    if "ranges:" not in text:
        base += "ranges: {moca: [0, 30]}\n"
    t = with_categories()
    csv, mapping = categorical_files(tmp_path, t, mapping_text=base + text)
    with pytest.raises(DataError) as e:
        load_table(csv, mapping)
    assert expected in str(e.value)


def test_text_column_without_declaration_says_how_to_declare(files, tmp_path):
    t = with_categories()
    csv, mapping = categorical_files(tmp_path, t, mapping_text=CATEGORICAL.split("categorical:")[0])
    with pytest.raises(DataError) as e:
        load_table(csv, mapping)
    assert "column 'apoe'" in str(e.value) and "categorical" in str(e.value)


def test_a_categorical_cohort_trains_safn_and_the_baselines_on_its_indicators(tmp_path):
    """The indicators are ordinary features downstream: preprocessing, SAFN (whose first
    encoder layer holds one vector per category) and the one-hot baselines all run on them."""
    from safn_core.config import load_config
    from safn_core.training.crossval import make_splits, run_fold

    t = with_categories(80)
    csv, mapping = categorical_files(tmp_path, t)
    cohort = load_table(csv, mapping)
    cfg = load_config(None, ["train.max_epochs=2", "train.feature_sets=[all]",
                             "train.ablations=[]", "train.modality_drop=false",
                             "train.baselines=[logistic_regression,hist_gradient_boosting_es]",
                             "model.d_model=8", "model.n_heads=2"])
    split = make_splits(cohort, 2, 1, 0.25, 0)[0]
    out = run_fold(cohort, split, cfg)
    assert {r["model"] for r in out["rows"]} == {"SAFN", "logistic_regression",
                                                 "hist_gradient_boosting_es"}
    assert all(0.0 <= r["roc_auc"] <= 1.0 for r in out["rows"])
