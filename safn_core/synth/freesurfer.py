"""The FreeSurfer 7 tables (FS7_APARC_CTH, FS7_ASEG_VOL) written from the baseline MRI values.

The baseline scan is at SC or BL (a few participants have both: a rescan, and the BL one is used);
about a quarter have a V04 follow-up scan (thinner cortex, larger ventricles). Summary volumes
(``BrainSegVol``, ``TotalGrayVol`` …) and mean thickness are consistent sums of the structures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data import ppmi_catalog as cat
from safn_core.synth.fixed_constants import THICKNESS_AGEING
from safn_core.synth.population import EVENT_ORDER

REGION_AREA = {  # mm², one hemisphere: weights of the mean thickness
    "bankssts": 1000, "caudalanteriorcingulate": 650, "caudalmiddlefrontal": 2300,
    "cuneus": 1500, "entorhinal": 450, "fusiform": 3100, "inferiorparietal": 5000,
    "inferiortemporal": 3300, "isthmuscingulate": 1000, "lateraloccipital": 4900,
    "lateralorbitofrontal": 2700, "lingual": 3200, "medialorbitofrontal": 1800,
    "middletemporal": 3200, "parahippocampal": 650, "paracentral": 1400, "parsopercularis": 1600,
    "parsorbitalis": 700, "parstriangularis": 1400, "pericalcarine": 1500, "postcentral": 4200,
    "posteriorcingulate": 1100, "precentral": 4800, "precuneus": 4000,
    "rostralanteriorcingulate": 700, "rostralmiddlefrontal": 5800, "superiorfrontal": 7000,
    "superiorparietal": 5500, "superiortemporal": 3900, "supramarginal": 3900, "frontalpole": 250,
    "temporalpole": 450, "transversetemporal": 400, "insula": 2100,
}
_ASEG_HEMI_ORDER = ("Lateral_Ventricle", "Inf_Lat_Vent", "Cerebellum_White_Matter",
                    "Cerebellum_Cortex", "Thalamus", "Caudate", "Putamen", "Pallidum",
                    "Hippocampus", "Amygdala", "Accumbens_area", "VentralDC", "vessel",
                    "choroid_plexus")

ASEG_COLUMNS = (
    [f"Left_{s}" for s in _ASEG_HEMI_ORDER[:8]] + ["3rd_Ventricle", "4th_Ventricle", "Brain_Stem"]
    + [f"Left_{s}" for s in ("Hippocampus", "Amygdala")] + ["CSF"]
    + [f"Left_{s}" for s in ("Accumbens_area", "VentralDC", "vessel", "choroid_plexus")]
    + [f"Right_{s}" for s in _ASEG_HEMI_ORDER]
    + ["WM_hypointensities", "Optic_Chiasm", "CC_Posterior", "CC_Mid_Posterior", "CC_Central",
       "CC_Mid_Anterior", "CC_Anterior", "BrainSegVol", "BrainSegVolNotVent", "lhCortexVol",
       "rhCortexVol", "CortexVol", "lhCerebralWhiteMatterVol", "rhCerebralWhiteMatterVol",
       "CerebralWhiteMatterVol", "SubCortGrayVol", "TotalGrayVol", "SupraTentorialVol",
       "SupraTentorialVolNotVent", "MaskVol", "BrainSegVol_to_eTIV", "MaskVol_to_eTIV",
       cat.ETIV]
)
"""Columns of the FS7_ASEG_VOL table, in ``asegstats2table`` order, ``-`` written as ``_``."""
CTH_COLUMNS = list(cat.THICKNESS_FEATURES) + ["lh_MeanThickness", "rh_MeanThickness"]


def _aseg_with_summaries(v: pd.DataFrame) -> pd.DataFrame:
    """FreeSurfer's summary volumes from the structures (consistent sums)."""
    out = v.copy()
    both = lambda x: v[f"Left_{x}"] + v[f"Right_{x}"]  # noqa: E731
    out["CortexVol"] = v["lhCortexVol"] + v["rhCortexVol"]
    out["CerebralWhiteMatterVol"] = v["lhCerebralWhiteMatterVol"] + v["rhCerebralWhiteMatterVol"]
    subcort = sum(both(x) for x in ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus",
                                    "Amygdala", "Accumbens_area", "VentralDC"))
    out["SubCortGrayVol"] = subcort + 0.035 * subcort
    out["TotalGrayVol"] = out["CortexVol"] + out["SubCortGrayVol"] + both("Cerebellum_Cortex")
    ventricles = (both("Lateral_Ventricle") + both("Inf_Lat_Vent") + v["3rd_Ventricle"]
                  + v["4th_Ventricle"] + v["CSF"] + both("choroid_plexus"))
    not_vent = (out["TotalGrayVol"] + out["CerebralWhiteMatterVol"]
                + both("Cerebellum_White_Matter") + v["Brain_Stem"] + v["WM_hypointensities"]
                + v[["CC_Posterior", "CC_Mid_Posterior", "CC_Central", "CC_Mid_Anterior",
                     "CC_Anterior"]].sum(axis=1) + both("vessel") + v["Optic_Chiasm"])
    out["BrainSegVolNotVent"] = not_vent
    out["BrainSegVol"] = not_vent + ventricles
    infra = both("Cerebellum_Cortex") + both("Cerebellum_White_Matter") + v["Brain_Stem"]
    out["SupraTentorialVolNotVent"] = not_vent - infra
    out["SupraTentorialVol"] = out["BrainSegVol"] - infra - v["4th_Ventricle"]
    out["MaskVol"] = 0.93 * v[cat.ETIV] + 0.35 * out["BrainSegVol"]
    for c in ASEG_COLUMNS:
        if c not in ("BrainSegVol_to_eTIV", "MaskVol_to_eTIV"):
            out[c] = np.round(out[c], 6 if c == cat.ETIV else 1)
    out["BrainSegVol_to_eTIV"] = np.round(out["BrainSegVol"] / out[cat.ETIV], 6)
    out["MaskVol_to_eTIV"] = np.round(out["MaskVol"] / out[cat.ETIV], 6)
    return out[ASEG_COLUMNS]


def _cth_with_means(thick: pd.DataFrame) -> pd.DataFrame:
    """Thickness rounded as FreeSurfer writes it, with the area-weighted mean per hemisphere."""
    out = thick.round(3)
    area = np.array([REGION_AREA[r] for r in cat.DK_REGIONS], float)
    for h in cat.HEMISPHERES:
        cols = [f"{h}_{r}" for r in cat.DK_REGIONS]
        out[f"{h}_MeanThickness"] = np.round(out[cols].to_numpy() @ (area / area.sum()), 5)
    return out[CTH_COLUMNS]


def freesurfer_tables(P: pd.DataFrame, meta: pd.DataFrame, thick: pd.DataFrame,
                      vol: pd.DataFrame, rng: np.random.Generator
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FS7 rows: the baseline scan at SC or BL (a few with both: a rescan), follow-ups at V04."""
    pidx = meta["_pidx"].to_numpy()
    m = len(pidx)
    bl_event = np.where(rng.random(m) < 0.55, "SC", "BL")
    rescan = rng.random(m) < 0.03  # a second baseline scan: the BL one is used
    bl_event = np.where(rescan, "BL", bl_event)
    follow = rng.random(m) < 0.25
    rate_f = np.array([THICKNESS_AGEING[f.split("_", 1)[1]] for f in cat.THICKNESS_FEATURES])
    parts_t, parts_v = [], []

    def add(sel, event, t, v):
        rows = pd.DataFrame({"PATNO": P["PATNO"].to_numpy()[pidx[sel]], "EVENT_ID": event})
        month = np.where(event == "SC", P["sc_month"].to_numpy()[pidx[sel]],
                         np.where(event == "BL", P["enroll_month"].to_numpy()[pidx[sel]],
                                  P["fu_month"].to_numpy()[pidx[sel]]))
        extra = pd.DataFrame({"_month": month, "_pidx": pidx[sel]})
        thick_rows = _cth_with_means(t.iloc[sel].reset_index(drop=True))
        parts_t.append(pd.concat([rows, thick_rows, extra], axis=1))
        vol_rows = _aseg_with_summaries(v.iloc[sel].reset_index(drop=True))
        parts_v.append(pd.concat([rows.copy(), vol_rows, extra.copy()], axis=1))

    all_ = np.arange(m)
    add(all_, bl_event, thick, vol)
    rs = np.flatnonzero(rescan)
    if len(rs):
        t2 = thick.iloc[rs] * (1 + rng.normal(0, 0.012, (len(rs), thick.shape[1])))
        v2 = vol.iloc[rs] * (1 + rng.normal(0, 0.015, (len(rs), vol.shape[1])))
        t_full, v_full = thick.copy(), vol.copy()
        t_full.iloc[rs] = t2.to_numpy()
        v_full.iloc[rs] = v2.to_numpy()
        add(rs, np.array(["SC"] * len(rs), dtype=object), t_full, v_full)
    fo = np.flatnonzero(follow)
    if len(fo):
        t_full, v_full = thick.copy(), vol.copy()
        t_full.iloc[fo] = (thick.iloc[fo] * (1 - rate_f) * (1 + rng.normal(
            0, 0.012, (len(fo), thick.shape[1])))).to_numpy()
        shrink = np.array([1.03 if ("Vent" in c or c == "CSF") else 1.0 if c == cat.ETIV
                           else 0.995 for c in vol.columns])
        v_full.iloc[fo] = (vol.iloc[fo] * shrink * (1 + rng.normal(0, 0.015, (len(fo),
                                                                               vol.shape[1])))
                           ).to_numpy()
        add(fo, np.array(["V04"] * len(fo), dtype=object), t_full, v_full)
    cth = pd.concat(parts_t, ignore_index=True)
    aseg = pd.concat(parts_v, ignore_index=True)
    for df in (cth, aseg):
        df["_ev"] = df["EVENT_ID"].map(EVENT_ORDER)
    order = cth.sort_values(["PATNO", "_ev"], kind="stable").index
    cth = cth.loc[order].drop(columns="_ev").reset_index(drop=True)
    aseg = aseg.loc[order].drop(columns="_ev").reset_index(drop=True)
    return cth, aseg
