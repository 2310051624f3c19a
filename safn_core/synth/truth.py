"""The participant-level ground truth: what the PPMI rules give for each participant.

Clinical features are the catalog's scoring of the baseline row (BL, else SC; MoCA SC, else BL;
a 101 "unable to rate" code is missing), imaging the BL scan (else SC), demographics as the
loader derives them for the naming in use, plus a few extras (latent H&Y, scanner, treated BL).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data import ppmi_catalog as cat


def baseline_rows(df: pd.DataFrame, events=cat.BASELINE_EVENTS) -> pd.DataFrame:
    """One row per PATNO at the first available event of ``events``; for MDS-UPDRS III the
    untreated/OFF row before an ON row. Indexed by PATNO."""
    rank = df["EVENT_ID"].map({e: i for i, e in enumerate(events)})
    sub = df[rank.notna()].assign(_r=rank[rank.notna()])
    if "PDSTATE" in sub.columns:
        sub = sub.assign(_on=(sub["PDSTATE"].astype(object).fillna("") == "ON").astype(int))
    else:
        sub = sub.assign(_on=0)
    sub = sub.sort_values(["PATNO", "_r", "_on"], kind="stable")
    sub = sub.drop_duplicates("PATNO", keep="first")
    return sub.drop(columns=["_r", "_on"]).set_index("PATNO")


def ground_truth(P: pd.DataFrame, sites: pd.DataFrame, tables: dict[str, pd.DataFrame],
                 naming: str) -> pd.DataFrame:
    """One row per participant (see `safn_core.synth.simulation.generate_truth`)."""
    ids = pd.Index(P["PATNO"].to_numpy(), name="PATNO")
    site_idx = P["site_idx"].to_numpy()
    cohort = P["cohort"].to_numpy()
    T: dict[str, np.ndarray] = {
        "PATNO": ids.to_numpy(), "cohort": cohort,
        "site": sites["site"].to_numpy()[site_idx],
        "site_name": sites["site_name"].to_numpy()[site_idx],
        "has_mri": P["has_mri"].to_numpy(), "complete": P["complete"].to_numpy(),
        "label": pd.Series(cohort).map(cat.LABELS).to_numpy(dtype=float),
    }
    # clinical: the catalog's scoring of the baseline row (BL, else SC; MoCA SC, else BL)
    for f in cat.CLINICAL_FEATURES:
        rows = baseline_rows(tables[f.table], f.events)
        if f.table == "updrs3":  # 101 = unable to rate → missing; NP3TOT of such a row missing
            rows = rows.copy()
            items = list(cat.NP3_ITEMS)
            is101 = rows[items] == cat.UNABLE_TO_RATE
            rows[items] = rows[items].mask(is101)
            rows.loc[is101.any(axis=1), "NP3TOT"] = np.nan
            rows["NHY"] = rows["NHY"].mask(rows["NHY"] == cat.UNABLE_TO_RATE)
        if f.table == "upsit" and naming == "legacy":
            rows = rows.drop(columns="TOTAL_CORRECT")
        T[f.name] = pd.to_numeric(f.score(rows), errors="coerce").reindex(ids).to_numpy(float)
    # demographics
    if naming == "legacy":  # no Age_at_visit: ENROLL_DATE - BIRTHDT, both MM/YYYY
        T["AGE"] = ((P["enroll_month"] - P["birth_month"]) / 12.0).to_numpy()
    else:  # Age_at_visit at BL, one decimal
        T["AGE"] = np.round(P["age_months"].to_numpy() / 12.0, 1)
    T["SEX"] = P["male"].to_numpy().astype(float)
    T["EDUCYRS"] = np.where(P["edu_missing"], np.nan, P["EDUCYRS_raw"]).astype(float)
    handed = np.where(P["handed_missing"], np.nan, P["HANDED_raw"]).astype(float)
    T["HANDED_LEFT"] = np.where(np.isnan(handed), np.nan, (handed == 2).astype(float))
    T["HANDED_MIXED"] = np.where(np.isnan(handed), np.nan, (handed == 3).astype(float))
    # imaging: the BL scan, else SC
    for key, feats in (("cth", cat.THICKNESS_FEATURES), ("aseg", cat.VOLUME_FEATURES)):
        rows = baseline_rows(tables[key]).reindex(ids)
        for c in feats:
            T[c] = rows[c].to_numpy(float)
    T["mri_event"] = baseline_rows(tables["cth"])["EVENT_ID"].reindex(ids).to_numpy()
    T["scanner_vendor"] = sites["vendor"].to_numpy()[site_idx]
    T["scanner_field_T"] = sites["field_T"].to_numpy()[site_idx]
    T["NHY_stage"] = P["NHY_stage"].to_numpy()
    u3 = tables["updrs3"]
    treated_bl = u3.loc[(u3["EVENT_ID"] == "BL") & (u3["PDSTATE"] == "OFF"), "PATNO"].unique()
    T["updrs3_bl_treated"] = np.isin(ids.to_numpy(), treated_bl)
    feature_order = [f for m in cat.ppmi_modalities() for f in m.features]
    cols = ["PATNO", "cohort", "site", "site_name", "has_mri", "complete", "label"]
    extra = ["mri_event", "scanner_vendor", "scanner_field_T", "NHY_stage", "updrs3_bl_treated"]
    return pd.DataFrame({c: T[c] for c in cols + feature_order + extra})

