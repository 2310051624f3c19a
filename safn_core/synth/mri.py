"""Baseline MRI values: cortical thickness (68 DK regions) and subcortical/global volumes.

ComBat's model ``y = α + Xβ + γ_site·sd + δ_site·ε``: regional means and SDs of
``docs/ppmi-data.md`` §4, ageing, sex through eTIV, small PD effects growing with H&Y
(`THICKNESS_PD_EFFECT`, `VOLUME_PD_EFFECT`, Cohen's d), residuals with a global factor and a
left-right homologue factor, and scanner effects γ (γ̄_site ~ N(0, 0.25²), per-feature spread
U(0.15, 0.35)) and δ (δ² ~ InvGamma(20, 19)) when ``scanner_effects`` is on. The FreeSurfer
table rows are made from these values by `safn_core.synth.freesurfer`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.config import SynthConfig
from safn_core.data import ppmi_catalog as cat
from safn_core.synth.fixed_constants import THICKNESS_AGEING, THICKNESS_LR_SHARE

AGE_CENTRE = 62.0

THICKNESS_MEAN = {  # mm, FreeSurfer 7, healthy 60-65 y, 3 T
    "bankssts": 2.45, "caudalanteriorcingulate": 2.55, "caudalmiddlefrontal": 2.45,
    "cuneus": 1.85, "entorhinal": 3.25, "fusiform": 2.65, "inferiorparietal": 2.35,
    "inferiortemporal": 2.70, "isthmuscingulate": 2.40, "lateraloccipital": 2.05,
    "lateralorbitofrontal": 2.55, "lingual": 1.95, "medialorbitofrontal": 2.40,
    "middletemporal": 2.75, "parahippocampal": 2.60, "paracentral": 2.30,
    "parsopercularis": 2.45, "parsorbitalis": 2.55, "parstriangularis": 2.35,
    "pericalcarine": 1.65, "postcentral": 1.95, "posteriorcingulate": 2.45, "precentral": 2.45,
    "precuneus": 2.30, "rostralanteriorcingulate": 2.75, "rostralmiddlefrontal": 2.30,
    "superiorfrontal": 2.60, "superiorparietal": 2.15, "superiortemporal": 2.65,
    "supramarginal": 2.45, "frontalpole": 2.70, "temporalpole": 3.45,
    "transversetemporal": 2.20, "insula": 2.85,
}
THICKNESS_SD_FRACTION = 0.062  # residual SD = 6.2 % of the regional mean
THICKNESS_GLOBAL = 0.24  # share of residual variance on the global factor

# PD thinning order (ENIGMA-PD: occipital, parietal, temporal first), 19 regions x 2 hemispheres
_PD_REGIONS = ("lateraloccipital", "lingual", "cuneus", "pericalcarine", "superiorparietal",
               "inferiorparietal", "supramarginal", "precuneus", "postcentral", "fusiform",
               "inferiortemporal", "middletemporal", "superiortemporal", "bankssts",
               "parahippocampal", "temporalpole", "transversetemporal", "precentral",
               "caudalmiddlefrontal")
THICKNESS_PD_EFFECT: dict[str, float] = {
    f"{h}_{r}": float(d) for r, d in zip(_PD_REGIONS, np.linspace(-0.20, -0.09, len(_PD_REGIONS)))
    for h in cat.HEMISPHERES
}
"""Cohen's d of PD vs HC per cortical region (38 of 68), at the mean H&Y of the PD cohort."""

VOLUME_PD_EFFECT = {"Left_Putamen": -0.14, "Right_Putamen": -0.14, "Left_Amygdala": -0.13,
                    "Left_Thalamus": 0.13}
"""Cohen's d of PD vs HC per aseg volume (ENIGMA-PD); the others have none."""

HY_SEVERITY = {0: 0.0, 1: 0.8, 2: 1.15, 3: 1.6}
"""Multiplier of the MRI PD effect by (latent) H&Y stage: effects grow with stage."""

# aseg structures: name → (mean mm³, total SD as CV (or log-SD for skewed ones), ageing per year,
# eTIV exponent, factor group)
_ASEG_HEMI = {
    "Lateral_Ventricle": (14000, 0.45, 0.030, 0.6, "vent"),
    "Inf_Lat_Vent": (450, 0.40, 0.030, 0.6, "vent"),
    "Cerebellum_White_Matter": (14000, 0.12, -0.004, 0.7, "tissue"),
    "Cerebellum_Cortex": (50500, 0.10, -0.004, 0.7, "tissue"),
    "Thalamus": (7100, 750 / 7100, -0.005, 0.7, "tissue"),
    "Caudate": (3450, 450 / 3450, -0.005, 0.7, "tissue"),
    "Putamen": (4650, 550 / 4650, -0.005, 0.7, "tissue"),
    "Pallidum": (1950, 230 / 1950, -0.005, 0.7, "tissue"),
    "Hippocampus": (3950, 420 / 3950, -0.005, 0.7, "tissue"),
    "Amygdala": (1600, 220 / 1600, -0.005, 0.7, "tissue"),
    "Accumbens_area": (480, 90 / 480, -0.005, 0.7, "tissue"),
    "VentralDC": (4000, 450 / 4000, -0.004, 0.7, "tissue"),
    "vessel": (25, 0.40, 0.0, 0.3, "other"),
    "choroid_plexus": (900, 0.25, 0.010, 0.5, "vent"),
}
_ASEG_MID = {
    "3rd_Ventricle": (1400, 0.35, 0.025, 0.6, "vent"),
    "4th_Ventricle": (1800, 0.25, 0.005, 0.6, "vent"),
    "Brain_Stem": (21000, 2200 / 21000, -0.003, 0.7, "tissue"),
    "CSF": (1150, 0.25, 0.015, 0.6, "vent"),
    "WM_hypointensities": (1800, 0.60, 0.040, 0.5, "other"),
    "Optic_Chiasm": (200, 0.20, 0.0, 0.4, "other"),
    "CC_Posterior": (950, 120 / 950, -0.004, 0.5, "tissue"),
    "CC_Mid_Posterior": (450, 80 / 450, -0.004, 0.5, "tissue"),
    "CC_Central": (460, 90 / 460, -0.004, 0.5, "tissue"),
    "CC_Mid_Anterior": (480, 100 / 480, -0.004, 0.5, "tissue"),
    "CC_Anterior": (850, 130 / 850, -0.004, 0.5, "tissue"),
    "lhCortexVol": (232000, 0.095, -0.005, 0.8, "tissue"),
    "rhCortexVol": (233000, 0.095, -0.005, 0.8, "tissue"),
    "lhCerebralWhiteMatterVol": (225000, 0.11, -0.004, 0.8, "tissue"),
    "rhCerebralWhiteMatterVol": (226000, 0.11, -0.004, 0.8, "tissue"),
}
ETIV_MEAN = {0: 1.40e6, 1: 1.60e6}  # women, men
ETIV_LOGSD = 0.07
_LOG_ETIV_VAR = 0.64 * 0.36 * np.log(1.6 / 1.4) ** 2 + ETIV_LOGSD**2  # total var of log eTIV


def factor_residuals(rng, n, names, pairs, g, lam) -> np.ndarray:
    """Unit-variance residuals with a global factor (share g) and, for left/right homologues
    (``pairs``: feature -> pair id), a shared homologue factor (share lam[f])."""
    G = rng.standard_normal(n)
    n_pairs = max(pairs.values()) + 1 if pairs else 0
    H = rng.standard_normal((n, n_pairs))
    out = np.empty((n, len(names)))
    for j, f in enumerate(names):
        lam_f = lam.get(f, 0.0)
        h = H[:, pairs[f]] if f in pairs else 0.0
        out[:, j] = (np.sqrt(g) * G + np.sqrt(lam_f) * h
                     + np.sqrt(max(1 - g - lam_f, 0.0)) * rng.standard_normal(n))
    return out


def scanner_effects(cfg: SynthConfig, sites: pd.DataFrame, n_feat: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Additive γ and multiplicative δ per site and feature (0 and 1 without scanner effects)."""
    k = len(sites)
    if not cfg.scanner_effects:
        return np.zeros((k, n_feat)), np.ones((k, n_feat))
    gbar = rng.normal(0.0, 0.25, k)
    spread = rng.uniform(0.15, 0.35, k)
    gamma = gbar[:, None] + spread[:, None] * rng.standard_normal((k, n_feat))
    delta = np.sqrt(19.0 / rng.gamma(20.0, 1.0, (k, n_feat)))  # δ² ~ InvGamma(20, 19)
    return gamma, delta


def draw_mri_values(cfg: SynthConfig, P: pd.DataFrame, sites: pd.DataFrame,
                    nhy_stage: np.ndarray, rng: np.random.Generator
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Baseline MRI values of every participant with MRI: their rows (``_pidx``), cortical
    thickness, and volumes with eTIV."""
    sel = np.flatnonzero(P["has_mri"].to_numpy())
    m = len(sel)
    coh = P["cohort"].to_numpy()[sel]
    age = P["AGE_exact"].to_numpy()[sel] - AGE_CENTRE
    male = P["male"].to_numpy()[sel]
    site = P["site_idx"].to_numpy()[sel]
    stage = nhy_stage[sel].astype(int)
    sev = np.array([HY_SEVERITY.get(int(s), 1.0) for s in np.clip(stage, 0, 3)])
    sev = np.where(coh == "PD", sev, np.where(coh == "Prodromal", 0.3, 0.0))

    # ---- cortical thickness
    regions = list(cat.DK_REGIONS)
    feats = list(cat.THICKNESS_FEATURES)
    rate, lam_r = THICKNESS_AGEING, THICKNESS_LR_SHARE
    mean = np.array([THICKNESS_MEAN[f.split("_", 1)[1]] for f in feats])
    sd_res = THICKNESS_SD_FRACTION * mean
    rates = np.array([rate[f.split("_", 1)[1]] for f in feats])
    sd_tot = np.sqrt(sd_res**2 + (mean * rates * 10.0) ** 2)
    d = np.array([THICKNESS_PD_EFFECT.get(f, 0.0) for f in feats])
    pairs = {f: regions.index(f.split("_", 1)[1]) for f in feats}
    lam = {f: lam_r[f.split("_", 1)[1]] for f in feats}
    resid = factor_residuals(rng, m, feats, pairs, THICKNESS_GLOBAL, lam) * sd_res
    sys = mean * (1 - rates * age[:, None]) + sd_tot * d * sev[:, None]
    gamma, delta = scanner_effects(cfg, sites, len(feats), rng)
    thick = sys + sd_tot * gamma[site] + delta[site] * resid

    # ---- volumes (log scale), eTIV by sex
    etiv_sys = np.where(male == 1, ETIV_MEAN[1], ETIV_MEAN[0])
    log_etiv = np.log(etiv_sys) + ETIV_LOGSD * rng.standard_normal(m)
    etiv_c = log_etiv - np.log(1.53e6)
    vol_specs = {f"{s}_{x}": _ASEG_HEMI[x] for s in ("Left", "Right") for x in _ASEG_HEMI}
    vol_specs.update(_ASEG_MID)
    vnames = list(vol_specs)
    vpairs, vlam = {}, {}
    for i, x in enumerate(_ASEG_HEMI):
        for s in ("Left", "Right"):
            vpairs[f"{s}_{x}"] = i
            vlam[f"{s}_{x}"] = 0.7 if _ASEG_HEMI[x][4] == "vent" else 0.5
    vres = factor_residuals(rng, m, vnames, vpairs, 0.2, vlam)
    vent = rng.standard_normal(m)  # shared ventricular factor
    vols = np.empty((m, len(vnames)))
    vsd = np.empty(len(vnames))
    vsys = np.empty((m, len(vnames)))
    for j, f in enumerate(vnames):
        mu, spread, a, b, group = vol_specs[f]
        s_tot = spread if group in ("vent", "other") and spread >= 0.2 else np.sqrt(
            np.log1p(spread**2))
        s_res = np.sqrt(max(s_tot**2 - b**2 * _LOG_ETIV_VAR - (a * 10) ** 2, (0.4 * s_tot) ** 2))
        zres = vres[:, j] if group != "vent" else 0.6 * vent + 0.8 * vres[:, j]
        base = np.log(mu) - s_tot**2 / 2 + b * etiv_c + a * age
        pd_shift = VOLUME_PD_EFFECT.get(f, 0.0) * s_tot * sev
        vsys[:, j] = np.exp(base + pd_shift)
        vols[:, j] = np.exp(base + pd_shift + s_res * zres)
        vsd[j] = mu * s_tot
    vgamma, vdelta = scanner_effects(cfg, sites, len(vnames) + 1, rng)
    vols = vsys + vsd * vgamma[site, :-1] + vdelta[site, :-1] * (vols - vsys)
    vols = np.maximum(vols, 1.0)
    etiv = np.exp(log_etiv)
    etiv = etiv_sys + 1.1e5 * vgamma[site, -1] + vdelta[site, -1] * (etiv - etiv_sys)

    thick_df = pd.DataFrame(thick, columns=feats)
    vol_df = pd.DataFrame(vols, columns=vnames)
    vol_df[cat.ETIV] = etiv
    meta = pd.DataFrame({"_pidx": sel})
    return meta, thick_df, vol_df
