"""The synthetic PPMI-style download: layout, determinism, item/total consistency, statistics.

Reference values are the targets of ``docs/ppmi-data.md`` §3 (the generator's spec), with
tolerances derived from the sampling error of the default cohort (570 PD, 133 HC).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.config import SynthConfig
from safn_core.data import ppmi_catalog as cat
from safn_core.errors import DataError
from safn_core.synth import generate_truth, write_download
from safn_core.synth.mri import THICKNESS_PD_EFFECT

SMALL = dict(n_pd=60, n_hc=30, n_without_mri=20, n_swedd=6, n_prodromal=6, n_sites=3,
             min_site_size=15)
DATED = re.compile(r"^(?P<name>.+)_(?P<date>\d{2}[A-Z][a-z]{2}\d{4})\.csv$")

# docs/ppmi-data.md §3: (PD mean, PD SD, HC mean, HC SD) of the complete cohort at baseline
DOC = {
    "AGE": (61.7, 9.7, 60.8, 11.3),
    "EDUCYRS": (15.6, 3.0, 16.0, 2.9),
    "NP1": (5.6, 4.1, 2.9, 3.0),
    "NP2PTOT": (5.9, 4.2, 0.5, 1.0),
    "NP3TOT": (20.9, 8.9, 1.2, 2.2),
    "MCATOT": (27.1, 2.3, 28.2, 1.1),
    "UPSIT": (22.4, 8.2, 34.0, 4.9),
    "ESS": (5.8, 3.5, 5.6, 3.4),
    "RBDSQ": (4.1, 2.7, 2.8, 2.3),
    "SCOPA_AUT": (9.5, 6.2, 5.8, 3.7),
    "GDS": (2.3, 2.4, 1.3, 2.1),
    "STAI": (65.1, 18.4, 57.1, 14.1),
    "HVLT_IMMEDIATE": (24.5, 5.0, 26.0, 4.6),
    "SDMT": (41.2, 9.7, 46.8, 10.5),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def tables_by_name(root: Path) -> dict[str, list[Path]]:
    """File stem without its date → the dated files of that table (oldest first)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*.csv")):
        m = DATED.match(p.name)
        assert m, f"{p.name} lacks the _DDMonYYYY suffix"
        out.setdefault(m["name"], []).append(p)
    for name, paths in out.items():
        paths.sort(key=lambda p: pd.to_datetime(DATED.match(p.name)["date"], format="%d%b%Y"))
    return out


def read(root: Path, name: str) -> pd.DataFrame:
    """The newest copy of a table, read as PPMI is read (BOM-tolerant, blanks missing)."""
    path = tables_by_name(root)[name][-1]
    return pd.read_csv(path, encoding="utf-8-sig", keep_default_na=False, na_values=[""],
                       dtype={"EVENT_ID": str, "PAG_NAME": str, "PDSTATE": str})


def baseline(df: pd.DataFrame, events=("BL", "SC")) -> pd.DataFrame:
    """First available event per participant (independent of the generator's own helper)."""
    rank = df["EVENT_ID"].map({e: i for i, e in enumerate(events)})
    sub = df[rank.notna()].assign(_r=rank)
    return sub.sort_values(["PATNO", "_r"]).drop_duplicates("PATNO").set_index("PATNO")


def cohen_d(a: pd.Series, b: pd.Series) -> float:
    a, b = a.dropna(), b.dropna()
    pooled = np.sqrt(((len(a) - 1) * a.var() + (len(b) - 1) * b.var()) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled)


@pytest.fixture(scope="module")
def default_download(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "download"
    summary = write_download(SynthConfig(), out)
    return out, summary


@pytest.fixture(scope="module")
def truth() -> pd.DataFrame:
    return generate_truth(SynthConfig())


@pytest.fixture(scope="module")
def complete(truth) -> pd.DataFrame:
    c = truth[truth["complete"]].copy()
    c["NP1"] = c["NP1RTOT"] + c["NP1PTOT"]
    return c


# --------------------------------------------------------------------------------------------
# determinism and the output folder
# --------------------------------------------------------------------------------------------


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = write_download(SynthConfig(seed=7, **SMALL), tmp_path / "a")
    b = write_download(SynthConfig(seed=7, **SMALL), tmp_path / "b")
    write_download(SynthConfig(seed=8, **SMALL), tmp_path / "c")
    ba, bb, bc = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert ba == bb and a == b
    assert len(ba) == a["n_files"] and sorted(ba) == sorted(a["files"])
    assert set(bc) != set(ba) or any(bc[k] != ba[k] for k in ba)
    same_name = set(ba) & set(bc)
    assert sum(ba[k] != bc[k] for k in same_name) >= len(same_name) - 1 or set(ba) != set(bc)
    pd.testing.assert_frame_equal(generate_truth(SynthConfig(seed=7, **SMALL)),
                                  generate_truth(SynthConfig(seed=7, **SMALL)))


def test_non_empty_output_folder_raises_and_is_left_untouched(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _bytes(out)
    with pytest.raises(DataError, match="not empty"):
        write_download(SynthConfig(**SMALL), out)
    assert _bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial folder left
    a_file = tmp_path / "file.csv"
    a_file.write_text("x")
    with pytest.raises(DataError):
        write_download(SynthConfig(**SMALL), a_file)
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_download(SynthConfig(**SMALL), empty)  # an empty folder is fine
    assert any(empty.rglob("*.csv"))


# --------------------------------------------------------------------------------------------
# layout of a download
# --------------------------------------------------------------------------------------------


def test_layout_names_bom_and_older_dated_copies(default_download):
    root, summary = default_download
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    assert folders == {"_Subject_Characteristics", "Motor___MDS-UPDRS", "Non-motor_Assessments",
                       "Imaging"}
    found = tables_by_name(root)
    for key, spec in cat.TABLES.items():
        assert spec.write_name in found, f"{spec.write_name} missing"
        assert all(p.parent.name == spec.folder for p in found[spec.write_name])
    boms = [p.read_bytes().startswith(b"\xef\xbb\xbf") for p in root.rglob("*.csv")]
    assert any(boms) and not all(boms)
    # two dated copies: the newest has more rows, and a reader must take it
    multi = {name: paths for name, paths in found.items() if len(paths) > 1}
    assert {"Participant_Status", "MDS-UPDRS_Part_III"} <= set(multi)
    for name, (old, new) in multi.items():
        n_old = len(pd.read_csv(old, encoding="utf-8-sig"))
        n_new = len(pd.read_csv(new, encoding="utf-8-sig"))
        assert n_new > n_old, name
    dates = {DATED.match(p.name)["date"] for p in root.rglob("*.csv")}
    assert len(dates) == 2 and summary["download_date"] in dates


def test_status_demographics_and_visit_table_columns(default_download, truth):
    root, _ = default_download
    st = read(root, "Participant_Status")
    assert list(st.columns) == ["PATNO", "COHORT", "COHORT_DEFINITION", "ENROLL_DATE",
                                "ENROLL_AGE", "ENROLL_STATUS"]
    codes = {v: k for k, v in cat.COHORT_CODES.items()}
    merged = truth.set_index("PATNO").join(st.set_index("PATNO"))
    assert (merged["COHORT"] == merged["cohort"].map(codes)).all()
    assert st["ENROLL_DATE"].str.fullmatch(r"\d{2}/\d{4}").all()
    demo = read(root, "Demographics")
    assert set(demo["SEX"]) <= {0, 1} and set(demo["HANDED"].dropna()) <= {1, 2, 3}
    assert {"BIRTHDT", "RAWHITE", "RABLACK", "RAASIAN"} <= set(demo.columns)
    assert set(read(root, "Center-Subject_List").columns) == {"PATNO", "CNO"}
    assert set(read(root, "Age_at_visit").columns) == {"PATNO", "EVENT_ID", "AGE_AT_VISIT"}
    assert "EDUCYRS" in read(root, "Socio-Economics").columns
    for name in ("MDS-UPDRS_Part_III", "SCOPA-AUT", "Epworth_Sleepiness_Scale"):
        df = read(root, name)
        assert list(df.columns[:5]) == list(cat.VISIT_COLUMNS)
        assert list(df.columns[-2:]) == list(cat.VISIT_TRAILER)
        assert df["INFODT"].str.fullmatch(r"\d{2}/\d{4}").all()
    # items only, no totals, where PPMI ships none
    bookkeeping = set(cat.VISIT_COLUMNS) | set(cat.VISIT_TRAILER)
    for name, items in (("SCOPA-AUT", cat.SCOPA_ITEMS), ("Epworth_Sleepiness_Scale", cat.ESS_ITEMS),
                        ("State-Trait_Anxiety_Inventory", cat.STAI_ITEMS),
                        ("Geriatric_Depression_Scale__Short_Version_", cat.GDS_ITEMS),
                        ("REM_Sleep_Behavior_Disorder_Questionnaire",
                         cat.RBDSQ_CORE + cat.RBDSQ_NEURO)):
        assert set(read(root, name).columns) - bookkeeping == set(items), name


def test_visits_moca_at_sc_and_extra_rows(default_download):
    root, _ = default_download
    moca = read(root, "Montreal_Cognitive_Assessment__MoCA_")
    assert set(moca["EVENT_ID"]) <= {"SC", "V04"} and "BL" not in set(moca["EVENT_ID"])
    upsit = read(root, "University_of_Pennsylvania_Smell_Identification_Test__UPSIT_")
    assert {"SC", "BL", "V04"} <= set(upsit["EVENT_ID"])
    only_sc = set(upsit.loc[upsit.EVENT_ID == "SC", "PATNO"]) - set(
        upsit.loc[upsit.EVENT_ID == "BL", "PATNO"])
    assert only_sc  # some participants only have the SC fallback


def test_updrs3_on_off_rows_and_unable_to_rate(default_download, truth):
    root, _ = default_download
    u3 = read(root, "MDS-UPDRS_Part_III")
    pdstate = u3["PDSTATE"].fillna("")
    assert set(pdstate) == {"", "OFF", "ON"}
    assert set(u3.loc[pdstate == "", "PAG_NAME"]) == {"NUPDRS3"}
    assert set(u3.loc[pdstate == "OFF", "PAG_NAME"]) == {"NUPDR3OF"}
    assert set(u3.loc[pdstate == "ON", "PAG_NAME"]) == {"NUPDR3ON"}
    on = u3[pdstate == "ON"].set_index(["PATNO", "EVENT_ID"])
    off = u3[pdstate == "OFF"].set_index(["PATNO", "EVENT_ID"])
    assert len(on) and on.index.equals(off.index.intersection(on.index))
    off = off.loc[on.index]
    no101 = ~(on[list(cat.NP3_ITEMS)] == cat.UNABLE_TO_RATE).any(axis=1) & ~(
        off[list(cat.NP3_ITEMS)] == cat.UNABLE_TO_RATE).any(axis=1)
    assert no101.mean() > 0.9
    on_t, off_t = on.loc[no101, "NP3TOT"], off.loc[no101, "NP3TOT"]
    assert (on_t <= off_t).all() and (on_t[off_t > 0] < off_t[off_t > 0]).all()
    pd_ids = set(truth.loc[truth.cohort == "PD", "PATNO"])
    assert set(u3.loc[pdstate != "", "PATNO"]) <= pd_ids
    assert (u3.loc[(pdstate == "OFF") & (u3.EVENT_ID == "BL"), "PATNO"].nunique() > 0)
    items = u3[list(cat.NP3_ITEMS)]
    is101 = items == cat.UNABLE_TO_RATE
    assert 0 < is101.any(axis=1).sum() < 0.05 * len(u3)
    assert 0 < (u3["NHY"] == cat.UNABLE_TO_RATE).sum() < 0.05 * len(u3)
    rated = items.where(~is101)
    assert ((rated >= 0) & (rated <= 4) | rated.isna()).all().all()


# --------------------------------------------------------------------------------------------
# items and totals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table, items, total", [
    ("MDS-UPDRS_Part_I", cat.NP1_ITEMS, "NP1RTOT"),
    ("MDS-UPDRS_Part_I_Patient_Questionnaire", cat.NP1P_ITEMS, "NP1PTOT"),
    ("MDS-UPDRS_Part_II_Patient_Questionnaire", cat.NP2_ITEMS, "NP2PTOT"),
    ("MDS-UPDRS_Part_III", cat.NP3_ITEMS, "NP3TOT"),
    ("University_of_Pennsylvania_Smell_Identification_Test__UPSIT_", cat.UPSIT_BOOKLETS,
     "TOTAL_CORRECT"),
    ("Letter_-_Number_Sequencing", tuple(f"LNS{i}{t}" for i in range(1, 8) for t in "ABC"),
     "LNS_TOTRAW"),
    ("Benton_Judgment_of_Line_Orientation", cat.BENTON_ITEMS, "JLO_TOTRAW"),
    ("Montreal_Cognitive_Assessment__MoCA_", ("MCAALTTM", "MCACUBE", "MCACLCKC", "MCACLCKN",
                                              "MCACLCKH", "MCALION", "MCARHINO", "MCACAMEL",
                                              "MCAFDS", "MCABDS", "MCAVIGIL", "MCASER7",
                                              "MCASNTNC", "MCAVF", "MCAABSTR", "MCAREC1",
                                              "MCAREC2", "MCAREC3", "MCAREC4", "MCAREC5",
                                              "MCADATE", "MCAMONTH", "MCAYR", "MCADAY",
                                              "MCAPLACE", "MCACITY"), "MCATOT"),
])
def test_items_sum_to_shipped_totals(default_download, table, items, total):
    root, _ = default_download
    df = read(root, table)
    block = df[list(items)]
    rated = block.mask(block == cat.UNABLE_TO_RATE)  # 101: NP3TOT sums the rated items
    complete_rows = block.notna().all(axis=1)
    assert complete_rows.mean() > 0.95
    np.testing.assert_array_equal(df.loc[complete_rows, total].to_numpy(),
                                  rated[complete_rows].sum(axis=1).to_numpy())
    assert df.loc[~complete_rows, total].isna().all()  # a blank item leaves the total blank


def test_catalog_scoring_of_written_items_reproduces_truth(default_download, truth, complete):
    root, _ = default_download
    t = truth.set_index("PATNO")
    for table, feature, score in (
            ("SCOPA-AUT", "SCOPA_AUT", cat.score_scopa),
            ("Geriatric_Depression_Scale__Short_Version_", "GDS", cat.score_gds),
            ("State-Trait_Anxiety_Inventory", "STAI", cat.score_stai),
            ("REM_Sleep_Behavior_Disorder_Questionnaire", "RBDSQ", cat.score_rbdsq),
            ("Epworth_Sleepiness_Scale", "ESS", next(f.score for f in cat.CLINICAL_FEATURES
                                                     if f.name == "ESS"))):
        rows = baseline(read(root, table))
        scored = score(rows).reindex(t.index)
        np.testing.assert_array_equal(scored.to_numpy(float), t[feature].to_numpy(float),
                                      err_msg=feature)
        # the scored totals have the intended distribution (doc §3)
        c = scored[complete["PATNO"]].groupby(complete["cohort"].to_numpy()).agg(["mean", "std"])
        pd_m, pd_s, hc_m, hc_s = DOC[feature]
        for grp, m, s, n in (("PD", pd_m, pd_s, 570), ("HC", hc_m, hc_s, 133)):
            assert abs(c.loc[grp, "mean"] - m) < 4 * s / np.sqrt(n), (feature, grp)
            lo, hi = (0.55, 1.6) if s > m else (0.7, 1.3)  # zero-inflated counts: noisy SD
            assert lo * s < c.loc[grp, "std"] < hi * s, (feature, grp)
    # SCOPA codes: 9 in items 1-21 (catheter, scored 3) and in 22-25 (n/a, scored 0)
    sc = read(root, "SCOPA-AUT")
    assert (sc[list(cat.SCOPA_ITEMS[:21])] == 9).any().any()
    assert (sc[list(cat.SCOPA_ITEMS[21:])] == 9).any().any()
    # sex-specific SCOPA items: men answer 22-23, women 24-25
    demo = read(root, "Demographics").set_index("PATNO")
    male = demo.loc[sc["PATNO"], "SEX"].to_numpy() == 1
    assert sc.loc[male, ["SCAU24", "SCAU25"]].isna().all().all()
    assert sc.loc[~male, ["SCAU22", "SCAU23"]].isna().all().all()


# --------------------------------------------------------------------------------------------
# the cohort
# --------------------------------------------------------------------------------------------


def test_exact_counts_and_summary(truth, default_download):
    cfg = SynthConfig()
    _, summary = default_download
    comp = truth[truth["complete"]]
    assert (comp["cohort"] == "PD").sum() == cfg.n_pd == 570
    assert (comp["cohort"] == "HC").sum() == cfg.n_hc == 133
    pdhc = truth["cohort"].isin(["PD", "HC"])
    assert (pdhc & ~truth["has_mri"]).sum() == cfg.n_without_mri
    assert (truth["cohort"] == "SWEDD").sum() == cfg.n_swedd
    assert (truth["cohort"] == "Prodromal").sum() == cfg.n_prodromal
    assert truth["PATNO"].is_unique
    assert summary["complete"] == {"PD": 570, "HC": 133} and summary["n_complete"] == 703
    assert sum(summary["per_site"].values()) == len(truth)
    assert len(summary["sites"]) == cfg.n_sites
    for site in summary["sites"].values():
        assert site["complete_PD"] + site["complete_HC"] >= cfg.min_site_size
        assert site["complete_HC"] >= 2 and site["complete_PD"] >= 2
    sizes = np.array(list(summary["complete_per_site"].values()))
    assert sizes.max() > 1.5 * sizes.min()  # unequal sites
    # imaging only for participants with MRI, never a whole modality missing for complete ones
    assert truth.loc[~truth["has_mri"], list(cat.THICKNESS_FEATURES)].isna().all().all()
    assert comp[list(cat.THICKNESS_FEATURES) + list(cat.VOLUME_FEATURES)].notna().all().all()
    clinical = [f.name for f in cat.CLINICAL_FEATURES]
    assert comp[clinical].notna().any(axis=1).all()
    assert comp[["AGE", "SEX"]].notna().all().all()
    missing = comp[clinical].isna().mean()
    assert (missing < 0.08).all() and missing[["UPSIT", "SDMT"]].min() > 0
    assert 0.005 < missing.mean() < 0.05


def test_group_statistics_match_the_doc(complete):
    g = complete.groupby("cohort")
    for var, (pd_m, pd_s, hc_m, hc_s) in DOC.items():
        for grp, m, s, n in (("PD", pd_m, pd_s, 570), ("HC", hc_m, hc_s, 133)):
            x = g.get_group(grp)[var]
            assert abs(x.mean() - m) < 4 * s / np.sqrt(n), (var, grp, x.mean())
            # the SD of a zero-inflated count (SD > mean: HC UPDRS II/III, GDS) is very noisy
            lo, hi = (0.55, 1.6) if s > m else (0.7, 1.3)
            assert lo * s < x.std() < hi * s, (var, grp, x.std())
    for grp, share in (("PD", 0.65), ("HC", 0.64)):
        assert abs(g.get_group(grp)["SEX"].mean() - share) < 0.1
    pd_ = g.get_group("PD")
    hc = g.get_group("HC")
    nhy = pd_["NHY"].value_counts(normalize=True)
    assert abs(nhy.get(1.0, 0) - 0.44) < 0.08 and abs(nhy.get(2.0, 0) - 0.56) < 0.08
    assert nhy.get(3.0, 0) < 0.02
    assert (hc["NHY"].dropna() == 0).mean() > 0.96
    assert hc["MCATOT"].min() >= 27  # PPMI excluded HC with MoCA <= 26


def test_correlations_match_the_doc(complete):
    pd_ = complete[complete["cohort"] == "PD"]
    assert 0.35 < pd_["NP3TOT"].corr(pd_["NHY"], method="spearman") < 0.65
    assert 0.08 < pd_["AGE"].corr(pd_["NP3TOT"]) < 0.32
    assert -0.45 < complete["AGE"].corr(complete["MCATOT"]) < -0.15
    assert 0.15 < complete["EDUCYRS"].corr(complete["MCATOT"]) < 0.45
    assert -0.45 < complete["AGE"].corr(complete["UPSIT"]) < -0.15


def test_clinical_effects_large_mri_effects_small(complete):
    pd_ = complete[complete["cohort"] == "PD"]
    hc = complete[complete["cohort"] == "HC"]
    assert cohen_d(pd_["NP3TOT"], hc["NP3TOT"]) > 1.5
    assert cohen_d(pd_["UPSIT"], hc["UPSIT"]) < -1.0
    assert cohen_d(pd_["NP2PTOT"], hc["NP2PTOT"]) > 1.0
    mri = list(cat.THICKNESS_FEATURES) + list(cat.VOLUME_FEATURES)
    d = pd.Series({f: cohen_d(pd_[f], hc[f]) for f in mri})
    # site (scanner x PD/HC ratio) confounds a little, as in real multi-site data
    assert (d.abs() < 0.35).mean() >= 0.9 and d.abs().median() < 0.25
    # the thinning is where the model puts it (occipital/parietal/temporal, 38 regions)
    effect = [f for f in cat.THICKNESS_FEATURES if THICKNESS_PD_EFFECT.get(f, 0) < 0]
    others = [f for f in cat.THICKNESS_FEATURES if f not in effect]
    assert len(effect) == 38
    assert all(-0.20 <= THICKNESS_PD_EFFECT[f] <= -0.09 for f in effect)
    assert d[effect].mean() < d[others].mean() - 0.05


def test_mri_structure(complete):
    hc = complete[complete["cohort"] == "HC"]
    th = hc[list(cat.THICKNESS_FEATURES)]
    means = th.mean()
    assert means.min() > 1.5 and means.max() < 3.7
    region_mean = {r: (means[f"lh_{r}"] + means[f"rh_{r}"]) / 2 for r in cat.DK_REGIONS}
    ranked = sorted(region_mean, key=region_mean.get)
    assert ranked[0] == "pericalcarine" and set(ranked[:4]) >= {"cuneus", "postcentral"}
    assert set(ranked[-2:]) == {"temporalpole", "entorhinal"}
    th_all = complete[list(cat.THICKNESS_FEATURES)]
    ev = np.linalg.eigvalsh(np.corrcoef(th_all.to_numpy().T))
    assert 0.3 < ev[-1] / ev.sum() < 0.55  # global factor ≈ 40 %
    lr = np.mean([th_all[f"lh_{r}"].corr(th_all[f"rh_{r}"]) for r in cat.DK_REGIONS])
    assert 0.65 < lr < 0.85
    etiv = complete.groupby("SEX")[cat.ETIV].mean()
    assert 1.08 < etiv[1.0] / etiv[0.0] < 1.22
    for region, mean in (("Thalamus", 7100), ("Putamen", 4650), ("Hippocampus", 3950)):
        assert abs(complete[f"Left_{region}"].mean() / mean - 1) < 0.12
    old = complete["AGE"] > complete["AGE"].median()
    assert complete.loc[old, "Left_Hippocampus"].mean() < complete.loc[~old,
                                                                      "Left_Hippocampus"].mean()


def test_scanner_effects_switch():
    def site_spread(flag: bool) -> float:
        t = generate_truth(SynthConfig(seed=3, scanner_effects=flag))
        c = t[t["complete"] & (t["cohort"] == "HC")]
        z = (c[list(cat.THICKNESS_FEATURES)] - c[list(cat.THICKNESS_FEATURES)].mean()) / c[
            list(cat.THICKNESS_FEATURES)].std()
        return float(z.groupby(c["site"]).mean().abs().mean().mean())
    assert site_spread(True) > site_spread(False)


# --------------------------------------------------------------------------------------------
# per-site mode and legacy naming
# --------------------------------------------------------------------------------------------


def test_per_site_mode_partitions_participants(tmp_path):
    cfg = SynthConfig(per_site=True, **SMALL)
    summary = write_download(cfg, tmp_path / "sites")
    truth = generate_truth(cfg)
    folders = sorted(p.name for p in (tmp_path / "sites").iterdir())
    assert folders == sorted(truth["site_name"].unique()) == sorted(summary["per_site_folders"])
    seen: list[int] = []
    names = None
    for folder in folders:
        root = tmp_path / "sites" / folder
        found = tables_by_name(root)
        names = names or set(found)
        assert set(found) == names  # the same tables at every site
        ids = read(root, "Participant_Status")["PATNO"].tolist()
        assert set(ids) == set(truth.loc[truth["site_name"] == folder, "PATNO"])
        cno = read(root, "Center-Subject_List")["CNO"].unique()
        assert [str(c) for c in cno] == [folder.removeprefix("site_")]
        for name in ("MDS-UPDRS_Part_III", "FS7_APARC_CTH"):
            assert set(read(root, name)["PATNO"]) <= set(ids)
        seen += ids
    assert sorted(seen) == sorted(truth["PATNO"])  # an exact partition
    assert summary["complete"] == {"PD": cfg.n_pd, "HC": cfg.n_hc}


def test_legacy_naming(tmp_path):
    cfg = SynthConfig(naming="legacy", **SMALL)
    root = tmp_path / "legacy"
    write_download(cfg, root)
    found = tables_by_name(root)
    for key, spec in cat.TABLES.items():
        if key == "age":
            assert "Age_at_visit" not in found  # age from ENROLL_DATE - BIRTHDT
        else:
            assert spec.legacy_name in found, spec.legacy_name
    st = read(root, "Patient_Status")
    assert "COHORT" not in st.columns and set(st["ENROLL_CAT"]) == {"PD", "HC", "SWEDD",
                                                                      "PRODROMA"}
    demo = read(root, "Screening___Demographics")
    assert "SEX" not in demo.columns and set(demo["GENDER"]) <= {0, 1, 2}
    u3 = read(root, "MDS_UPDRS_Part_III")
    assert "PN3RIGRL" in u3.columns and "NP3RIGRL" not in u3.columns
    up = read(root, "University_of_Pennsylvania_Smell_ID_Test")
    assert "TOTAL_CORRECT" not in up.columns and set(cat.UPSIT_BOOKLETS) <= set(up.columns)
    truth = generate_truth(cfg).set_index("PATNO")
    months = lambda s: s.str[3:].astype(int) * 12 + s.str[:2].astype(int) - 1  # noqa: E731
    age = (months(st.set_index("PATNO")["ENROLL_DATE"])
           - months(demo.set_index("PATNO")["BIRTHDT"])) / 12.0
    np.testing.assert_allclose(age.reindex(truth.index), truth["AGE"], atol=1e-12)
    male = (demo.set_index("PATNO")["GENDER"] == 2).astype(float)
    np.testing.assert_array_equal(male.reindex(truth.index), truth["SEX"])


def test_real_loader_reads_the_download_as_the_truth_says(tmp_path):
    """Integration: the PPMI loader, with no special path, gives the ground truth exactly."""
    loader = pytest.importorskip("safn_core.data.ppmi_loader")
    cfg = SynthConfig(seed=5, **SMALL)
    write_download(cfg, tmp_path / "dl")
    cohort = loader.load_ppmi(tmp_path / "dl")
    truth = generate_truth(cfg)
    truth = truth[truth["complete"]].assign(PATNO=lambda t: t["PATNO"].astype(str))
    truth = truth.set_index("PATNO").loc[cohort.table.index]
    assert len(cohort.table) == cfg.n_pd + cfg.n_hc
    assert (cohort.table["label"] == truth["label"]).all()
    assert (cohort.table["site"] == truth["site"]).all()
    for f in cohort.features:
        np.testing.assert_allclose(cohort.table[f].to_numpy(float), truth[f].to_numpy(float),
                                   rtol=0, atol=1e-9, err_msg=f)
