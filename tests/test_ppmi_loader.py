"""The PPMI download reader: one test per quirk of real downloads (docs/ppmi-data.md)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from safn_core.data import load_ppmi
from safn_core.data.cohort import ID, LABEL, SITE
from safn_core.data.ppmi_catalog import (
    DK_REGIONS, ETIV, GDS_ITEMS, GDS_POSITIVE, MOTOR_FEATURES, NP3_ITEMS, RBDSQ_CORE, RBDSQ_NEURO,
    SCOPA_ITEMS, STAI_ITEMS, STAI_REVERSED, TABLES, THICKNESS_FEATURES, VOLUME_FEATURES,
    VOLUME_REGIONS, is_forbidden_feature, ppmi_modalities,
)
from safn_core.data.ppmi_files import find_tables, match_table, read_table, split_date_suffix
from safn_core.errors import DataError

from tests.ppmi_fixtures import (
    EXPECTED, PEOPLE, THICKNESS, VOLUME, ETIV_VALUE, Person, _visit, build_download, csv_text,
    default_rows,
)

P1, P2, P3, P4 = (p.patno for p in PEOPLE)  # PD, HC, PD, HC


def expected(feature, patno):
    v = EXPECTED[feature]
    if isinstance(v, tuple):
        return v[0] if patno in (P1, P3) else v[1]
    return v


def updrs3_row(p, event="BL", *, item=1, total=None, nhy=2, state="", pag="NUPDRS3", **extra):
    items = {i: item for i in NP3_ITEMS}
    items.update({k: v for k, v in extra.items() if k in NP3_ITEMS or k == "PN3RIGRL"})
    row = _visit(p, event, PDSTATE=state, **items, NHY=nhy)
    if total is not None:
        row["NP3TOT"] = total
    row["PAG_NAME"] = pag
    row.update({k: v for k, v in extra.items() if k not in row})
    return row


# --------------------------------------------------------------------------------------------
# the whole cohort
# --------------------------------------------------------------------------------------------


def test_2023_download_gives_one_row_per_participant(tmp_path):
    d = build_download(tmp_path / "dl")
    c = load_ppmi(d.root)
    t = c.table
    features = [f for m in ppmi_modalities() for f in m.features]
    assert t.index.name == ID
    assert list(t.index) == ["1001", "1002", "1003", "1004"]
    assert list(t.columns) == [SITE, LABEL] + features == [SITE, LABEL] + c.features
    assert (t[features].dtypes == "float64").all()
    assert list(t[LABEL]) == [1, 0, 1, 0]
    assert list(t[SITE]) == ["10", "10", "20", "20"]
    for f, v in EXPECTED.items():
        for pid in t.index:
            assert t.loc[pid, f] == expected(f, int(pid)), (f, pid)
    assert (t[list(THICKNESS_FEATURES)] == THICKNESS).all().all()
    assert t.loc["1001", ETIV] == ETIV_VALUE and t.loc["1001", "Left_Thalamus"] == VOLUME
    r = c.report
    assert r.cohorts == {"PD": 2, "HC": 2} and r.excluded == {}
    assert r.modality_present == {"thickness": 4, "volume": 4, "clinical": 4, "demographics": 4}
    assert r.tables["status"] == "_Subject_Characteristics/Participant_Status_05Jan2024.csv"
    assert set(r.tables) >= {"status", "center", "updrs3", "moca", "cth", "aseg", "age"}
    assert all(v == 0.0 for v in r.missing_rate.values())
    assert set(r.missing_rate) == set(features)
    assert not any(is_forbidden_feature(f) for f in t.columns)


def test_legacy_names_and_columns(tmp_path):
    """Patient_Status/ENROLL_CAT, Screening___Demographics/GENDER, age from dates, old Part III
    name with the PN3RIGRL typo, older UPSIT (booklets summed), double-underscore MDS names."""
    d = build_download(tmp_path / "dl", legacy=True)
    # without a shipped total, NP3TOT needs every item, PN3RIGRL included
    rows = [updrs3_row(p, item=1 if p.cohort == "PD" else 0, nhy=1) for p in PEOPLE]
    for r in rows:
        r["PN3RIGRL"] = r.pop("NP3RIGRL") + 2
    d.write("updrs3", rows)
    names = {k: p.name for k, p in d.paths.items()}
    assert names["status"] == "Patient_Status_05Jan2024.csv"
    assert names["demographics"] == "Screening___Demographics_05Jan2024.csv"
    assert names["updrs1pq"] == "MDS_UPDRS_Part_I__Patient_Questionnaire_05Jan2024.csv"
    assert "age" not in names
    c = load_ppmi(d.root)
    t = c.table
    assert list(t[LABEL]) == [1, 0, 1, 0]
    assert list(t["NP3TOT"]) == [35.0, 2.0, 35.0, 2.0]
    assert (t["AGE"] == 63.5).all()  # 02/2012 - 08/1948 = 63 years 6 months
    assert (t["SEX"] == 1.0).all()  # GENDER 2 = male
    assert list(t["UPSIT"]) == [22.0, 34.0, 22.0, 34.0]
    used = {k: v.rsplit("/", 1)[-1] for k, v in c.report.tables.items()}
    assert used["updrs1"] == "MDS_UPDRS_Part_I_05Jan2024.csv"
    assert used["updrs1pq"] == "MDS_UPDRS_Part_I__Patient_Questionnaire_05Jan2024.csv"
    assert used["updrs2"] == "MDS_UPDRS_Part_II__Patient_Questionnaire_05Jan2024.csv"
    assert used["updrs3"] == "MDS_UPDRS_Part_III_05Jan2024.csv"
    assert any("ENROLL_DATE - BIRTHDT" in n for n in c.report.notes)


def test_legacy_gender_codes_and_handedness(tmp_path):
    d = build_download(tmp_path / "dl", legacy=True)
    demo = default_rows("demographics", PEOPLE, legacy=True)
    for r, g, h in zip(demo, (0, 1, 2, ""), (1, 2, 3, 9)):
        r["GENDER"], r["HANDED"] = g, h
    demo[3]["BIRTHDT"] = "1950"  # a bare year counts as mid-year
    d.write("demographics", demo)
    t = load_ppmi(d.root, require_all_modalities=False).table
    assert list(t["SEX"].fillna(-1)) == [0.0, 0.0, 1.0, -1.0]
    assert list(t["HANDED_LEFT"].fillna(-1)) == [0.0, 1.0, 0.0, -1.0]
    assert list(t["HANDED_MIXED"].fillna(-1)) == [0.0, 0.0, 1.0, -1.0]
    assert t.loc["1004", "AGE"] == pytest.approx((2012 * 12 + 1 - (1950 * 12 + 5.5)) / 12)


def test_2023_sex_and_age_fallbacks(tmp_path):
    d = build_download(tmp_path / "dl")
    demo = default_rows("demographics", PEOPLE)
    for r, sx in zip(demo, (0, 1, 2, "")):
        r["SEX"] = sx
    d.write("demographics", demo)
    age = [r for r in default_rows("age", PEOPLE) if r["PATNO"] != P2]  # P2: no visit age
    age.append({"PATNO": P3, "EVENT_ID": "SC", "AGE_AT_VISIT": 60.0})  # BL (63.5) wins
    d.write("age", age)
    status = default_rows("status", PEOPLE)
    status[1]["ENROLL_AGE"] = 58.2
    d.write("status", status)
    t = load_ppmi(d.root).table
    assert list(t["SEX"].fillna(-1)) == [0.0, 1.0, -1.0, -1.0]  # 2 is no SEX code
    assert list(t["AGE"]) == [63.5, 58.2, 63.5, 63.5]


# --------------------------------------------------------------------------------------------
# files: names, dates, folders, encodings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem, key, exact", [
    ("MDS_UPDRS_Part_I_05Jan2024", "updrs1", True),
    ("MDS-UPDRS_Part_I_05Jan2024", "updrs1", True),
    ("mds-updrs_part_i", "updrs1", True),
    ("MDS_UPDRS_Part_III_05Jan2024", "updrs3", True),
    ("MDS-UPDRS_Part_III_12Dec2023", "updrs3", True),
    ("MDS_UPDRS_Part_I__Patient_Questionnaire_05Jan2024", "updrs1pq", True),
    ("MDS-UPDRS_Part_I_Patient_Questionnaire_05Jan2024", "updrs1pq", True),
    ("MDS_UPDRS_Part_II__Patient_Questionnaire_05Jan2024", "updrs2", True),
    ("MDS-UPDRS_Part_IV__Motor_Complications_05Jan2024", None, False),
    ("MDS_UPDRS_Part_III_ON_OFF_Determination___Dosing_05Jan2024", None, False),
    ("Geriatric_Depression_Scale__Short_Version__05Jan2024", "gds", True),
    ("Geriatric_Depression_Scale__Short_Form_12Dec2023", "gds", False),
    ("Hopkins_Verbal_Learning_Test_-_Revised_05Jan2024", "hvlt", True),
    ("Participant_Status_05Jan2024 (1)", "status", True),
    ("FS7_APARC_CTH_05Jan2024", "cth", True),
    ("DaTScan_Analysis_05Jan2024", None, False),
])
def test_table_names_match_by_longest_prefix(stem, key, exact):
    assert match_table(stem) == (key, exact)


def test_date_suffix_parsing():
    assert split_date_suffix("Participant_Status_05Jan2024") == (
        "Participant_Status", pd.Timestamp("2024-01-05").date())
    assert split_date_suffix("Participant_Status")[1] is None
    assert split_date_suffix("Participant_Status_31Feb2024")[1] is None  # not a date


def test_newest_dated_copy_wins(tmp_path):
    """05Jan2024 is newer than 12Dec2023 though it sorts first; an undated copy ranks oldest."""
    d = build_download(tmp_path / "dl", date="12Dec2023")
    newest = default_rows("status", PEOPLE)
    newest[1]["COHORT"] = 3  # P2 became SWEDD in the newest download
    d.write("status", newest, date="05Jan2024")
    undated = default_rows("status", PEOPLE)
    undated[0]["COHORT"] = 4
    d.write("status", undated, date="")
    d.write("moca", [_visit(p, "SC", MCATOT=20) for p in PEOPLE], date="01Mar2023",
            folder="Old")
    c = load_ppmi(d.root)
    assert list(c.table.index) == ["1001", "1003", "1004"]
    assert c.report.excluded == {"cohort SWEDD": 1}
    assert c.report.tables["status"].endswith("Participant_Status_05Jan2024.csv")
    assert (c.table["MCATOT"] != 20).all()
    note = next(n for n in c.report.notes if "Participant_Status_12Dec2023.csv" in n)
    assert "ignored older" in note and "Participant_Status.csv" in note
    assert any("Old/Montreal_Cognitive_Assessment__MoCA__01Mar2023.csv" in n
               for n in c.report.notes)


def test_find_tables_ignores_other_tables_and_macos_debris(tmp_path):
    d = build_download(tmp_path / "dl")
    part4 = d.root / "Motor___MDS-UPDRS" / "MDS-UPDRS_Part_IV__Motor_Complications_09Sep2024.csv"
    part4.write_text("PATNO,EVENT_ID,NP4WDYSK,NP4TOT\n1001,BL,1,3\n")
    junk = d.root / "__MACOSX" / "._Participant_Status_09Sep2024.csv"
    junk.parent.mkdir()
    junk.write_bytes(b"\x00\x05\x16\x07binary")
    found = find_tables(d.root)
    assert found["updrs1"].path == d.paths["updrs1"]
    assert found["status"].path == d.paths["status"]
    load_ppmi(d.root)


def test_nested_and_flat_layouts_give_the_same_cohort(tmp_path):
    nested = load_ppmi(build_download(tmp_path / "nested").root)
    flat_dl = build_download(tmp_path / "flat", flat=True)
    assert all(p.parent == flat_dl.root for p in flat_dl.paths.values())
    flat = load_ppmi(flat_dl.root)
    pd.testing.assert_frame_equal(nested.table, flat.table)
    # and deeper, mixed nesting
    deep = build_download(tmp_path / "deep")
    target = deep.root / "a" / "b" / deep.paths["cth"].name
    target.parent.mkdir(parents=True)
    deep.paths["cth"].rename(target)
    pd.testing.assert_frame_equal(nested.table, load_ppmi(deep.root).table)


def test_utf8_bom_files(tmp_path):
    d = build_download(tmp_path / "dl", bom=True)
    assert d.paths["status"].read_bytes()[:3] == b"\xef\xbb\xbf"
    c = load_ppmi(d.root)
    assert len(c) == 4 and (c.table["MCATOT"].notna()).all()
    assert "PATNO" in read_table(d.paths["status"]).columns


# --------------------------------------------------------------------------------------------
# visits, duplicates, MDS-UPDRS III
# --------------------------------------------------------------------------------------------


def test_updrs3_off_on_rows_never_choose_on(tmp_path):
    d = build_download(tmp_path / "dl")
    p1, p2, p3, p4 = PEOPLE
    d.write("updrs3", [
        # P1: ON (newer) and OFF → OFF
        updrs3_row(p1, total=10, state="ON", pag="NUPDR3ON", LAST_UPDATE="2023-01-01"),
        updrs3_row(p1, total=30, state="OFF", pag="NUPDR3OF"),
        # P2: OFF and untreated (blank PDSTATE) → untreated
        updrs3_row(p2, total=5, state="OFF", pag="NUPDR3OF"),
        updrs3_row(p2, total=4, state="", pag="NUPDRS3"),
        # P3: no PDSTATE value, PAG_NAME only: NUPDR3ON listed first → NUPDRS3
        updrs3_row(p3, total=12, state="", pag="NUPDR3ON"),
        updrs3_row(p3, total=22, state="", pag="NUPDRS3"),
        # P4: only an ON row → used, and noted
        updrs3_row(p4, total=7, state="ON", pag="NUPDR3ON"),
    ])
    c = load_ppmi(d.root)
    assert list(c.table["NP3TOT"]) == [30.0, 4.0, 22.0, 7.0]
    assert any("only an ON-state" in n for n in c.report.notes)
    assert any("several Part III rows" in n for n in c.report.notes)


def test_unable_to_rate_101_is_missing(tmp_path):
    """Rule: shipped NP3TOT kept when no item is 101; an item 101 makes NP3TOT missing; NHY 101 is
    missing; without a shipped total the items are summed."""
    d = build_download(tmp_path / "dl")
    p1, p2, p3, p4 = PEOPLE
    rows = [
        updrs3_row(p1, total=134, nhy=101, NP3GAIT=101),  # 32 + 101 shipped as 134
        updrs3_row(p2, item=0, total=40, nhy=0),  # shipped total kept although items sum to 0
        updrs3_row(p3, nhy=3),
        updrs3_row(p4, item=0, nhy=101),
    ]
    rows[2].pop("NP3TOT", None)
    d.write("updrs3", rows, columns=list(dict.fromkeys(c for r in rows for c in r)))
    t = load_ppmi(d.root).table
    assert math.isnan(t.loc["1001", "NP3TOT"]) and math.isnan(t.loc["1001", "NHY"])
    assert t.loc["1002", "NP3TOT"] == 40.0 and t.loc["1002", "NHY"] == 0.0
    assert t.loc["1003", "NP3TOT"] == 33.0 and t.loc["1003", "NHY"] == 3.0
    assert t.loc["1004", "NP3TOT"] == 0.0 and math.isnan(t.loc["1004", "NHY"])


def test_moca_at_screening_only(tmp_path):
    d = build_download(tmp_path / "dl")
    rows = [_visit(p, "SC", MCATOT=26) for p in PEOPLE]
    rows.append(_visit(PEOPLE[0], "BL", MCATOT=20))  # SC is MoCA's baseline: SC row wins
    rows.append(_visit(PEOPLE[1], "V04", MCATOT=20))  # later visits never count
    d.write("moca", rows)
    t = load_ppmi(d.root).table
    assert list(t["MCATOT"]) == [26.0] * 4


def test_screening_fallback_when_baseline_missing(tmp_path):
    d = build_download(tmp_path / "dl")
    p1, p2, p3, p4 = PEOPLE
    d.write("updrs3", [
        updrs3_row(p1, "SC", total=18),  # no BL row → SC
        updrs3_row(p2, "SC", item=0, total=3, nhy=0), updrs3_row(p2, "BL", item=0, total=1, nhy=0),
        updrs3_row(p3, "V04", total=50),  # neither BL nor SC → missing
        updrs3_row(p4, "BL", item=0, total=0, nhy=0),
    ])
    c = load_ppmi(d.root)
    t = c.table
    assert t.loc["1001", "NP3TOT"] == 18.0 and t.loc["1002", "NP3TOT"] == 1.0
    assert math.isnan(t.loc["1003", "NP3TOT"]) and t.loc["1004", "NP3TOT"] == 0.0
    assert any("without a BL row: SC row used" in n for n in c.report.notes)


def test_duplicate_rows_keep_latest_update(tmp_path):
    d = build_download(tmp_path / "dl")
    rows = [_visit(p, TOTAL_CORRECT=30) for p in PEOPLE]
    rows.append({**_visit(PEOPLE[0], TOTAL_CORRECT=11), "LAST_UPDATE": "2022-03-04 09:00:00.0"})
    rows.insert(0, {**_visit(PEOPLE[1], TOTAL_CORRECT=12), "LAST_UPDATE": "2021-01-01"})
    # same LAST_UPDATE: the higher REC_ID wins, whatever the order in the file
    rows.insert(0, {**_visit(PEOPLE[2], TOTAL_CORRECT=13), "REC_ID": "9999"})
    rows.append({**_visit(PEOPLE[2], TOTAL_CORRECT=14), "REC_ID": "1000"})
    d.write("upsit", rows)
    c = load_ppmi(d.root)
    assert list(c.table["UPSIT"]) == [11.0, 12.0, 13.0, 30.0]
    assert any("several rows at the chosen visit" in n and "latest" in n for n in c.report.notes)


# --------------------------------------------------------------------------------------------
# imaging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["{h}_{r}_thickness", "{H}_{r}_thickavg"])
def test_thickness_spellings(tmp_path, spelling):
    d = build_download(tmp_path / "dl")
    rows = []
    for k, p in enumerate(PEOPLE):
        row = {"PATNO": p.patno, "EVENT_ID": "BL"}
        for j, r in enumerate(DK_REGIONS):
            for h, hh in (("lh", "L"), ("rh", "R")):
                row[spelling.format(h=h, H=hh, r=r)] = 2.0 + 0.01 * j + 0.1 * k
        row["L_thickavg" if "thickavg" in spelling else "lh_MeanThickness"] = 2.4
        rows.append(row)
    d.write("cth", rows)
    t = load_ppmi(d.root).table
    assert t.loc["1003", "lh_bankssts"] == pytest.approx(2.2)
    assert t.loc["1001", "rh_insula"] == pytest.approx(2.0 + 0.01 * (len(DK_REGIONS) - 1))
    assert t[list(THICKNESS_FEATURES)].notna().all().all()


def test_aseg_dash_names_thalamus_proper_and_etiv_normalisation(tmp_path):
    d = build_download(tmp_path / "dl")
    rows = []
    for p in PEOPLE:
        row = {"PATNO": p.patno, "EVENT_ID": "BL"}
        for f in VOLUME_FEATURES[:-1]:
            name = f.replace("Thalamus", "Thalamus_Proper").replace("_", "-")
            row[name] = 3000.0
        row["eTIV"] = 1.5e6
        rows.append(row)
    d.write("aseg", rows)
    t = load_ppmi(d.root).table
    assert (t["Left_Thalamus"] == 3000.0).all() and (t["3rd_Ventricle"] == 3000.0).all()
    assert (t[ETIV] == 1.5e6).all()
    t = load_ppmi(d.root, normalise_volumes_by_etiv=True).table
    assert np.allclose(t[list(VOLUME_REGIONS)], 3000.0 / 1.5e6)
    assert (t[ETIV] == 1.5e6).all()


def test_missing_mri_excluded_or_kept(tmp_path):
    people = PEOPLE[:3] + (Person(1004, "HC", "20", mri=False),)
    d = build_download(tmp_path / "dl", people=people)
    c = load_ppmi(d.root)
    assert list(c.table.index) == ["1001", "1002", "1003"]
    assert c.report.excluded == {"missing modality thickness": 1}
    assert c.report.cohorts == {"PD": 2, "HC": 2}
    c = load_ppmi(d.root, require_all_modalities=False)
    assert len(c) == 4
    assert c.table.loc["1004", list(THICKNESS_FEATURES) + list(VOLUME_FEATURES)].isna().all()
    assert c.report.missing_rate["lh_bankssts"] == 0.25
    assert c.report.missing_rate[ETIV] == 0.25
    assert c.report.missing_rate["MCATOT"] == 0.0
    assert c.report.modality_present == {"thickness": 3, "volume": 3, "clinical": 4,
                                         "demographics": 4}
    assert c.report.excluded == {}


def test_no_imaging_tables_at_all(tmp_path):
    d = build_download(tmp_path / "dl", skip=("cth", "aseg"))
    c = load_ppmi(d.root, require_all_modalities=False)
    assert len(c) == 4 and c.report.modality_present["thickness"] == 0
    assert any("FS7_APARC_CTH not found" in n for n in c.report.notes)
    with pytest.raises(DataError, match="no PD or HC participant left"):
        load_ppmi(d.root)


# --------------------------------------------------------------------------------------------
# scores computed from items
# --------------------------------------------------------------------------------------------


def test_totals_computed_from_items(tmp_path):
    d = build_download(tmp_path / "dl")
    p1, p2, p3, p4 = PEOPLE
    # SCOPA-AUT: items 1-21 with 9 → 3, items 22-25 with 9 → 0
    sc1 = {i: 1 for i in SCOPA_ITEMS}
    sc1.update(SCAU5=9, SCAU21=9, SCAU22=9, SCAU23=2, SCAU24="", SCAU25="")
    sc2 = {i: 0 for i in SCOPA_ITEMS[:21]}  # items 22-25 all blank
    sc3 = {i: 2 for i in SCOPA_ITEMS}
    sc3["SCAU7"] = ""  # a core item missing → no total
    d.write("scopa", [_visit(p1, **sc1), _visit(p2, **sc2), _visit(p3, **sc3),
                      _visit(p4, **{i: 0 for i in SCOPA_ITEMS})])
    # GDS: answers 1 everywhere → the 10 negative items score 1, the 5 positive ones 0
    g1 = {i: 1 for i in GDS_ITEMS}
    g2 = {i: int(i in GDS_POSITIVE) for i in GDS_ITEMS}  # the least depressed answers
    g3 = {i: 1 - int(i in GDS_POSITIVE) for i in GDS_ITEMS}  # the most depressed answers
    d.write("gds", [_visit(p1, **g1), _visit(p2, **g2), _visit(p3, **g3),
                    _visit(p4, **{**g1, "GDSBORED": ""})])
    # STAI: 1..4 items, 19 reversed as 5 - x
    s1 = {i: 1 for i in STAI_ITEMS}
    s2 = {i: 4 for i in STAI_ITEMS}
    s3 = {i: (4 if i in STAI_REVERSED else 1) for i in STAI_ITEMS}
    d.write("stai", [_visit(p, **s) for p, s in zip(PEOPLE, (s1, s2, s3, s1))])
    # RBDSQ: 12 core yes/no + 1 for any neurological disease
    core0 = {i: 0 for i in RBDSQ_CORE}
    neuro0 = {i: 0 for i in RBDSQ_NEURO}
    d.write("rbdsq", [
        _visit(p1, **{**core0, "DRMVIVID": 1, "SLPINJUR": 1}, **{**neuro0, "PARKISM": 1}),
        _visit(p2, **core0, **{**neuro0, "STROKE": 1, "RLS": 1}),  # several diseases: still 1
        _visit(p3, **{i: 1 for i in RBDSQ_CORE}, **neuro0),
        _visit(p4, **core0),  # neuro items blank: no point
    ])
    t = load_ppmi(d.root).table
    # SCOPA P1: 19 core items of 1 + two 9→3 = 25; sex items 9→0, 2, blank, blank = 2 → 27
    assert list(t["SCOPA_AUT"].fillna(-1)) == [27.0, 0.0, -1.0, 0.0]
    assert list(t["GDS"].fillna(-1)) == [10.0, 0.0, 15.0, -1.0]
    # STAI P1: 21 × 1 + 19 × (5-1) = 97; P2: 21 × 4 + 19 × 1 = 103; P3: 21 × 1 + 19 × 1 = 40
    assert list(t["STAI"]) == [97.0, 103.0, 40.0, 97.0]
    assert list(t["RBDSQ"]) == [3.0, 1.0, 12.0, 0.0]


def test_exclude_motor_drops_updrs_and_hy(tmp_path):
    d = build_download(tmp_path / "dl", skip=("updrs1", "updrs1pq", "updrs2", "updrs3"))
    c = load_ppmi(d.root, exclude_motor=True)
    assert set(MOTOR_FEATURES) == {"NP1RTOT", "NP1PTOT", "NP2PTOT", "NP3TOT", "NHY"}
    assert not set(MOTOR_FEATURES) & set(c.table.columns)
    assert not set(MOTOR_FEATURES) & set(c.features)
    assert not any(k.startswith("updrs") for k in c.report.tables)
    assert len(c) == 4
    with_motor = load_ppmi(build_download(tmp_path / "dl2").root)
    assert set(MOTOR_FEATURES) <= set(with_motor.features)


# --------------------------------------------------------------------------------------------
# cohorts, sites, missingness, leakage
# --------------------------------------------------------------------------------------------


def test_swedd_and_prodromal_excluded_and_counted(tmp_path):
    people = PEOPLE + (Person(1005, "SWEDD"), Person(1006, "SWEDD"), Person(1007, "Prodromal"))
    d = build_download(tmp_path / "dl", people=people)
    c = load_ppmi(d.root)
    assert list(c.table.index) == ["1001", "1002", "1003", "1004"]
    assert c.report.cohorts == {"PD": 2, "HC": 2, "SWEDD": 2, "Prodromal": 1}
    assert c.report.excluded == {"cohort SWEDD": 2, "cohort Prodromal": 1}
    assert sum(c.report.cohorts.values()) == len(c) + sum(c.report.excluded.values())
    legacy = load_ppmi(build_download(tmp_path / "legacy", people=people, legacy=True).root)
    assert legacy.report.excluded == {"cohort SWEDD": 2, "cohort Prodromal": 1}


def test_screen_failures_and_unknown_cohorts_excluded(tmp_path):
    d = build_download(tmp_path / "dl")
    status = default_rows("status", PEOPLE)
    status[1]["ENROLL_STATUS"] = "Screen failed"
    status[2]["COHORT"] = ""
    d.write("status", status)
    c = load_ppmi(d.root)
    assert list(c.table.index) == ["1001", "1004"]
    assert c.report.excluded == {"cohort missing": 1, "enrolment status Screen failed": 1}


def test_participant_without_any_data_is_dropped_even_when_modalities_are_optional(tmp_path):
    d = build_download(tmp_path / "dl")
    status = default_rows("status", PEOPLE + (Person(1005, "PD"),))
    status[-1]["ENROLL_AGE"] = ""  # else ENROLL_AGE alone would give 1005 demographics
    d.write("status", status)
    c = load_ppmi(d.root, require_all_modalities=False)
    assert list(c.table.index) == ["1001", "1002", "1003", "1004"]
    assert c.report.excluded == {"no feature data": 1}
    assert c.report.cohorts == {"PD": 3, "HC": 2}


def test_site_from_status_table_when_no_centre_list(tmp_path):
    d = build_download(tmp_path / "dl", skip=("center",))
    status = default_rows("status", PEOPLE)
    for r, s in zip(status, ("7", "7.0", "", "9")):
        r["SITE"] = s
    d.write("status", status)
    c = load_ppmi(d.root)
    assert list(c.table[SITE].fillna("?")) == ["7", "7", "?", "9"]
    assert any("site unknown for 1 participant" in n for n in c.report.notes)


def test_missing_rates(tmp_path):
    d = build_download(tmp_path / "dl")
    d.write("upsit", [_visit(PEOPLE[0], TOTAL_CORRECT=20)])  # 3 of 4 without UPSIT
    socio = default_rows("socio", PEOPLE)
    socio[0]["EDUCYRS"] = ""
    d.write("socio", socio)
    c = load_ppmi(d.root)
    assert c.report.missing_rate["UPSIT"] == 0.75
    assert c.report.missing_rate["EDUCYRS"] == 0.25
    assert c.report.missing_rate["MCATOT"] == 0.0
    assert c.report.to_dict()["missing_rate"]["UPSIT"] == 0.75


def test_forbidden_columns_never_become_features(tmp_path):
    d = build_download(tmp_path / "dl")
    status = default_rows("status", PEOPLE)
    for r in status:
        r.update(PDDXDT="01/2011", DURATION_YRS=1.2, LEDD=300)
    d.write("status", status)
    rows = default_rows("updrs3", PEOPLE)
    for r in rows:
        r.update(NP4WDYSK=1, DATSCAN_PUTAMEN_R=1.2, PDTRTMNT=1)
    d.write("updrs3", rows)
    (d.root / "Imaging" / "DaTScan_Analysis_05Jan2024.csv").write_text(
        "PATNO,EVENT_ID,DATSCAN_CAUDATE_R,SBR_PUTAMEN\n1001,SC,2.1,1.0\n")
    (d.root / "MDS-UPDRS_Part_IV__Motor_Complications_09Sep2024.csv").write_text(
        "PATNO,EVENT_ID,NP4WDYSK,NP4TOT\n1001,BL,1,3\n")
    c = load_ppmi(d.root)
    cols = set(c.table.columns)
    assert not any(is_forbidden_feature(col) for col in cols)
    assert not {"COHORT", "NP4WDYSK", "NP4TOT", "DATSCAN_PUTAMEN_R", "LEDD", "PDTRTMNT"} & cols
    assert not any(is_forbidden_feature(f) for m in ppmi_modalities() for f in m.features)


def test_leakage_guard_is_a_bug_not_a_user_error(tmp_path, monkeypatch):
    import safn_core.data.ppmi_loader as loader
    d = build_download(tmp_path / "dl")
    monkeypatch.setattr(loader, "is_forbidden_feature", lambda c: c == "NP3TOT")
    with pytest.raises(RuntimeError, match="leakage guard") as e:
        load_ppmi(d.root)
    assert not isinstance(e.value, DataError)


# --------------------------------------------------------------------------------------------
# malformed input: always a one-line DataError naming the file
# --------------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_ppmi(tmp_path / "nope")
    assert "nope" in _one_line(e)
    f = tmp_path / "file.csv"
    f.write_text("PATNO\n")
    with pytest.raises(DataError, match="not a folder"):
        load_ppmi(f)


def test_no_status_table(tmp_path):
    d = build_download(tmp_path / "dl", skip=("status",))
    with pytest.raises(DataError) as e:
        load_ppmi(d.root)
    msg = _one_line(e)
    assert "Participant_Status" in msg and "Patient_Status" in msg and str(d.root) in msg


def test_no_feature_table(tmp_path):
    d = build_download(tmp_path / "dl", skip=tuple(k for k in TABLES if k not in ("status",
                                                                                  "center")))
    with pytest.raises(DataError, match="no feature table") as e:
        load_ppmi(d.root)
    assert "FS7_APARC_CTH" in _one_line(e)


@pytest.mark.parametrize("content, what", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "NUL bytes"),
    ("PATNO,EVENT_ID,MCATOT\n1001,SC,Dur\xe9e\n".encode("latin-1"), "not UTF-8"),
    (b"PATNO,EVENT_ID,MCATOT\n1001,SC,27\n1002,SC,28,extra,fields\n", "malformed CSV"),
    (b"", "empty"),
    ("PATNO,EVENT_ID,MCATOT\n1001,SC,27\n".encode("utf-16"), "NUL bytes"),
])
def test_unreadable_feature_file(tmp_path, content, what):
    d = build_download(tmp_path / "dl")
    d.paths["moca"].write_bytes(content)
    with pytest.raises(DataError, match=what) as e:
        load_ppmi(d.root)
    assert "Montreal_Cognitive_Assessment__MoCA__05Jan2024.csv" in _one_line(e)


def test_status_without_patno_or_cohort(tmp_path):
    d = build_download(tmp_path / "dl")
    d.paths["status"].write_text("SUBJECT,COHORT\n1001,1\n")
    with pytest.raises(DataError, match="no PATNO column") as e:
        load_ppmi(d.root)
    assert "Participant_Status_05Jan2024.csv" in _one_line(e)
    d.paths["status"].write_text("PATNO,ENROLL_DATE\n1001,02/2012\n")
    with pytest.raises(DataError, match="neither a COHORT nor an ENROLL_CAT"):
        load_ppmi(d.root)


def test_non_numeric_junk_is_missing_and_noted(tmp_path):
    d = build_download(tmp_path / "dl")
    d.write("sdmt", [_visit(p, SDMTOTAL=v) for p, v in zip(PEOPLE, ("45", "n/a", "4O", " 50 "))])
    cth = default_rows("cth", PEOPLE)
    cth[2]["lh_insula"] = "#VALUE!"
    d.write("cth", cth)
    c = load_ppmi(d.root)
    assert list(c.table["SDMT"].fillna(-1)) == [45.0, -1.0, -1.0, 50.0]
    assert math.isnan(c.table.loc["1003", "lh_insula"])
    note = next(n for n in c.report.notes if "Symbol_Digit" in n)
    assert "SDMTOTAL" in note and "2 non-numeric values" in note
    assert any("FS7_APARC_CTH" in n and "lh_insula" in n for n in c.report.notes)


def test_imaging_table_without_known_columns(tmp_path):
    d = build_download(tmp_path / "dl")
    d.write("cth", [{"PATNO": 1001, "EVENT_ID": "BL", "foo": 1.0}])
    with pytest.raises(DataError, match="none of the 68 cortical thickness columns") as e:
        load_ppmi(d.root)
    assert "FS7_APARC_CTH_05Jan2024.csv" in _one_line(e)


def test_fixture_csv_helper_round_trip():
    text = csv_text([{"A": 1, "B": None}, {"A": 2, "C": "x"}])
    assert text == "A,B,C\n1,,\n2,,x\n"
