"""The latent participant model behind the synthetic PPMI-style download.

`simulate(cfg)` draws one cohort: sites (sizes, PD/HC ratio, scanner), participants (cohort, site,
MRI availability, demographics, dates), latent traits per clinical domain, every visit row of every
clinical table (items generated from the latent totals, so that items always sum to totals), the
FreeSurfer rows, and the participant-level ground truth. `safn_core.synth.writer` turns the result
into CSV files; `generate_truth(cfg)` returns the ground truth only.

Model (facts and target statistics: ``docs/ppmi-data.md`` §3-4):

* **Sites.** Site weights ~ Dirichlet(``site_size_alpha``); every site gets at least
  ``min_site_size`` complete (PD/HC with MRI) participants (fewer only when ``n_sites`` times it
  exceeds ``n_pd + n_hc``) and the rest by a multinomial draw. The PD/HC log-odds of a site is
  shifted by N(0, ``site_ratio_spread``²); per-site PD counts are the expected counts, rescaled
  so that the totals are exactly ``n_pd`` and ``n_hc`` (every site keeps two of each class when
  the counts allow). Participants without MRI are spread over sites by weight × a scanner-
  dependent MRI-missing propensity (1.5 T sites miss more).
* **Clinical scales** are a Gaussian copula: each scale has a latent z = loadings · (age, education,
  motor, non-motor, cognition, olfaction, mood, sleep factors) + unique noise, mapped by the
  quantile function of a per-cohort target marginal (negative binomial for symptom counts,
  beta-binomial for UPSIT, categorical for H&Y and HC MoCA ≥ 27, rounded normal for SDMT/LNS).
  Items are then drawn *given the total* (weighted sampling of score units without replacement,
  item weights per instrument, higher levels of an item less likely, PD asymmetry and tremor
  profile for Part III), so totals are exact sums of items.
* **MRI** follows ComBat's model ``y = α + Xβ + γ_site·sd + δ_site·ε``: regional means and SDs of
  the doc, ageing, sex through eTIV, small PD effects growing with H&Y (`THICKNESS_PD_EFFECT`,
  `VOLUME_PD_EFFECT`, Cohen's d), residuals with a global factor and a left-right homologue factor,
  and scanner effects γ (γ̄_site ~ N(0, 0.25²), per-feature spread U(0.15, 0.35)) and δ
  (δ² ~ InvGamma(20, 19)) when ``scanner_effects`` is on.

Only `numpy.random.Generator` streams derived from ``cfg.seed`` are used; model constants come from
a fixed stream that does not depend on the seed. Dates are months since year 0 (``year*12+month-1``)
and are derived from the seed, never from today.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import ndtr

from safn_core.config import SynthConfig
from safn_core.data import ppmi_catalog as cat

COHORTS = ("PD", "HC", "SWEDD", "Prodromal")
COHORT_CODE = {name: code for code, name in cat.COHORT_CODES.items()}
COHORT_DEFINITION = {"PD": "Parkinson's Disease", "HC": "Healthy Control", "SWEDD": "SWEDD",
                     "Prodromal": "Prodromal"}
LEGACY_ENROLL_CAT = {"PD": "PD", "HC": "HC", "SWEDD": "SWEDD", "Prodromal": "PRODROMA"}

VENDORS = ("Siemens", "GE", "Philips")
EVENT_ORDER = {"SC": 0, "BL": 1, "V04": 2, "V06": 3}
AGE_CENTRE = 62.0

_CONSTANTS_SEED = 20240531  # model constants (item difficulties, ageing rates): seed-independent


# --------------------------------------------------------------------------------------------
# Target marginals (per cohort) of every clinical scale
# --------------------------------------------------------------------------------------------


def _u(z: np.ndarray) -> np.ndarray:
    return np.clip(ndtr(z), 1e-12, 1 - 1e-12)


@dataclass(frozen=True)
class Marginal:
    """Quantile map of one scale's total: ``value = offset + sign * base.ppf(u)``.

    ``kind``: ``nb`` (mean, sd), ``bb`` (n, mean, sd), ``cat`` (values, probs), ``norm`` (mean, sd).
    With ``sign = -1`` (deficit scales, e.g. MoCA = 30 − deficit) ``u`` is flipped so that a
    higher latent z always gives a higher value.
    """

    kind: str
    params: tuple
    offset: float = 0.0
    sign: int = 1
    lo: float = 0.0
    hi: float = np.inf

    def ppf(self, z: np.ndarray) -> np.ndarray:
        u = _u(z) if self.sign > 0 else _u(-z)
        if self.kind == "nb":
            mean, sd = self.params
            p = mean / sd**2
            r = mean * p / (1 - p)
            base = stats.nbinom.ppf(u, r, p)
        elif self.kind == "bb":
            n, mean, sd = self.params
            q = mean / n
            rho = (sd**2 / (n * q * (1 - q)) - 1) / (n - 1)
            ab = 1 / rho - 1
            base = stats.betabinom.ppf(u, n, q * ab, (1 - q) * ab)
        elif self.kind == "cat":
            values, probs = self.params
            cdf = np.cumsum(probs) / np.sum(probs)
            base = np.asarray(values, float)[np.minimum(np.searchsorted(cdf, u), len(values) - 1)]
        elif self.kind == "norm":
            mean, sd = self.params
            base = np.round(mean + sd * stats.norm.ppf(u))
        else:  # pragma: no cover
            raise ValueError(self.kind)
        return np.clip(self.offset + self.sign * base, self.lo, self.hi)


def _nb(mean, sd, hi):
    return Marginal("nb", (mean, sd), hi=hi)


def _deficit(top, mean, sd):
    return Marginal("nb", (mean, sd), offset=top, sign=-1, lo=0, hi=top)


MARGINALS: dict[str, dict[str, Marginal]] = {
    # MDS-UPDRS I, rater + patient questionnaire (13 items, 0-52)
    "updrs1": {"PD": _nb(5.6, 4.1, 52), "HC": _nb(2.9, 3.0, 52), "SWEDD": _nb(7.0, 4.8, 52),
               "Prodromal": _nb(5.5, 4.2, 52)},
    "updrs2": {"PD": _nb(5.9, 4.2, 52), "HC": _nb(0.5, 1.0, 52), "SWEDD": _nb(6.5, 5.0, 52),
               "Prodromal": _nb(2.0, 2.6, 52)},
    "updrs3": {"PD": _nb(20.9, 8.9, 132), "HC": _nb(1.2, 2.2, 132), "SWEDD": _nb(14.0, 8.0, 132),
               "Prodromal": _nb(3.5, 3.6, 132)},
    "nhy": {"PD": Marginal("cat", ((1, 2, 3), (0.44, 0.553, 0.007))),
            "HC": Marginal("cat", ((0, 1), (0.99, 0.01))),
            "SWEDD": Marginal("cat", ((0, 1, 2), (0.10, 0.55, 0.35))),
            "Prodromal": Marginal("cat", ((0, 1), (0.92, 0.08)))},
    # MoCA: 30 - deficit; HC with MoCA <= 26 were excluded by PPMI: 27..30 only
    "moca": {"PD": _deficit(30, 2.9, 2.3),
             "HC": Marginal("cat", ((27, 28, 29, 30), (0.38, 0.24, 0.23, 0.15))),
             "SWEDD": _deficit(30, 2.8, 2.4), "Prodromal": _deficit(30, 2.6, 2.3)},
    "upsit": {"PD": Marginal("bb", (40, 22.4, 8.2)), "HC": Marginal("bb", (40, 34.0, 4.9)),
              "SWEDD": Marginal("bb", (40, 31.0, 6.5)),
              "Prodromal": Marginal("bb", (40, 19.0, 8.0))},
    "ess": {"PD": _nb(5.8, 3.5, 24), "HC": _nb(5.6, 3.4, 24), "SWEDD": _nb(6.5, 4.0, 24),
            "Prodromal": _nb(6.6, 4.0, 24)},
    "rbdsq": {"PD": _nb(4.1, 2.7, 13), "HC": _nb(2.8, 2.3, 13), "SWEDD": _nb(4.3, 3.0, 13),
              "Prodromal": _nb(7.0, 3.3, 13)},
    "scopa": {"PD": _nb(9.5, 6.2, 69), "HC": _nb(5.8, 3.7, 69), "SWEDD": _nb(11.0, 7.0, 69),
              "Prodromal": _nb(11.0, 7.0, 69)},
    "gds": {"PD": _nb(2.3, 2.4, 15), "HC": _nb(1.3, 2.1, 15), "SWEDD": _nb(3.0, 3.0, 15),
            "Prodromal": _nb(2.5, 2.6, 15)},
    "stai": {"PD": Marginal("nb", (25.1, 18.4), offset=40, hi=160),
             "HC": Marginal("nb", (17.1, 14.1), offset=40, hi=160),
             "SWEDD": Marginal("nb", (30.0, 20.0), offset=40, hi=160),
             "Prodromal": Marginal("nb", (24.0, 17.0), offset=40, hi=160)},
    "hvlt": {"PD": _deficit(36, 11.5, 5.0), "HC": _deficit(36, 10.0, 4.6),
             "SWEDD": _deficit(36, 12.0, 5.2), "Prodromal": _deficit(36, 11.0, 5.0)},
    "sdmt": {"PD": Marginal("norm", (41.2, 9.7), lo=0, hi=110),
             "HC": Marginal("norm", (46.8, 10.5), lo=0, hi=110),
             "SWEDD": Marginal("norm", (40.0, 10.0), lo=0, hi=110),
             "Prodromal": Marginal("norm", (42.0, 10.0), lo=0, hi=110)},
    "lns": {"PD": Marginal("norm", (10.6, 2.7), lo=0, hi=21),
            "HC": Marginal("norm", (11.0, 2.6), lo=0, hi=21),
            "SWEDD": Marginal("norm", (10.3, 2.8), lo=0, hi=21),
            "Prodromal": Marginal("norm", (10.8, 2.7), lo=0, hi=21)},
    "benton": {"PD": _deficit(30, 4.4, 3.8), "HC": _deficit(30, 3.8, 3.5),
               "SWEDD": _deficit(30, 4.8, 4.0), "Prodromal": _deficit(30, 4.2, 3.7)},
}

FLUENCY_MEANS = {"PD": (20.5, 13.3, 15.2), "HC": (21.6, 14.2, 16.0), "SWEDD": (19.8, 13.0, 14.8),
                 "Prodromal": (20.8, 13.6, 15.4)}
FLUENCY_SDS = (5.4, 4.0, 3.9)

DEMOGRAPHICS = {  # age mean, age sd, P(male), education mean, education sd
    "PD": (61.7, 9.7, 0.65, 15.6, 3.0), "HC": (60.8, 11.3, 0.64, 16.0, 2.9),
    "SWEDD": (60.9, 10.0, 0.63, 15.0, 3.1), "Prodromal": (64.0, 7.0, 0.60, 15.8, 3.0),
}

# latent loadings of each scale's z on (age_z, edu_z, motor, nonmotor, cognition, olfaction, mood,
# sleep); the unique noise fills the variance up to 1
FACTORS = ("age", "edu", "M", "N", "C", "O", "A", "S")
LOADINGS: dict[str, dict[str, float]] = {
    "updrs3": {"age": 0.22, "M": 0.96},
    "updrs2": {"M": 0.55, "N": 0.35, "age": 0.05},
    "updrs1": {"N": 0.65, "A": 0.25, "S": 0.15},
    "moca": {"C": 0.95},
    "upsit": {"age": -0.32, "O": 0.85, "C": 0.1},
    "ess": {"S": 0.6, "N": 0.25},
    "rbdsq": {"S": 0.5, "N": 0.25},
    "scopa": {"N": 0.6, "M": 0.15, "age": 0.1},
    "gds": {"A": 0.75, "N": 0.2},
    "stai": {"A": 0.8, "N": 0.15},
    "hvlt": {"C": 0.65},
    "sdmt": {"C": 0.6, "age": -0.25},
    "lns": {"C": 0.55},
    "fluency": {"C": 0.55},
    "benton": {"C": 0.4},
}
COGNITION_AGE, COGNITION_EDU = -0.38, 0.35  # C = -0.38 age_z + 0.35 edu_z + noise
HY_LOADING = 0.65  # H&Y latent = 0.65 * Part III latent + noise → Spearman ≈ 0.5

# --------------------------------------------------------------------------------------------
# Item structures (weights: how readily an item takes score units; decay: relative weight of
# each further level of the same item)
# --------------------------------------------------------------------------------------------

NP1_WEIGHTS = {"NP1COG": 0.8, "NP1HALL": 0.15, "NP1DPRS": 0.6, "NP1ANXS": 0.7, "NP1APAT": 0.4,
               "NP1DDS": 0.05, "NP1SLPN": 1.3, "NP1SLPD": 1.3, "NP1PAIN": 1.0, "NP1URIN": 1.2,
               "NP1CNST": 0.9, "NP1LTHD": 0.7, "NP1FATG": 1.0}
NP2_WEIGHTS = (0.6, 0.7, 0.3, 0.5, 0.7, 0.4, 1.2, 0.8, 0.7, 1.3, 0.6, 0.5, 0.1)
NP3_WEIGHTS = {
    "NP3SPCH": 0.5, "NP3FACXP": 1.0, "NP3RIGN": 0.6, "NP3RIGRU": 1.0, "NP3RIGLU": 1.0,
    "NP3RIGRL": 0.7, "NP3RIGLL": 0.7, "NP3FTAPR": 1.2, "NP3FTAPL": 1.2, "NP3HMOVR": 1.0,
    "NP3HMOVL": 1.0, "NP3PRSPR": 1.0, "NP3PRSPL": 1.0, "NP3TTAPR": 0.9, "NP3TTAPL": 0.9,
    "NP3LGAGR": 0.7, "NP3LGAGL": 0.7, "NP3RISNG": 0.2, "NP3GAIT": 0.6, "NP3FRZGT": 0.04,
    "NP3PSTBL": 0.15, "NP3POSTR": 0.5, "NP3BRADY": 0.9, "NP3PTRMR": 0.5, "NP3PTRML": 0.5,
    "NP3KTRMR": 0.45, "NP3KTRML": 0.45, "NP3RTARU": 0.8, "NP3RTALU": 0.8, "NP3RTARL": 0.3,
    "NP3RTALL": 0.3, "NP3RTALJ": 0.15, "NP3RTCON": 0.8,
}
NP3_TREMOR = {"NP3PTRMR", "NP3PTRML", "NP3KTRMR", "NP3KTRML", "NP3RTARU", "NP3RTALU", "NP3RTARL",
              "NP3RTALL", "NP3RTALJ", "NP3RTCON"}
NP3_AXIAL = {"NP3SPCH", "NP3FACXP", "NP3RIGN", "NP3RISNG", "NP3GAIT", "NP3FRZGT", "NP3PSTBL",
             "NP3POSTR", "NP3BRADY"}
NP3_101_ITEMS = ("NP3RISNG", "NP3GAIT", "NP3FRZGT", "NP3PSTBL", "NP3RIGN", "NP3RIGLL", "NP3RIGRL",
                 "NP3TTAPL", "NP3LGAGR")
"""Items that are most often "unable to rate" (101) in practice: axial items, lower limbs."""


def _np3_side(item: str) -> str | None:
    if item in ("NP3RIGRU", "NP3RIGRL", "NP3PTRMR", "NP3KTRMR", "NP3RTARU", "NP3RTARL") or (
            item.endswith("R") and item[:6] in ("NP3FTA", "NP3HMO", "NP3PRS", "NP3TTA", "NP3LGA")):
        return "R"
    if item in ("NP3RIGLU", "NP3RIGLL", "NP3PTRML", "NP3KTRML", "NP3RTALU", "NP3RTALL") or (
            item.endswith("L") and item[:6] in ("NP3FTA", "NP3HMO", "NP3PRS", "NP3TTA", "NP3LGA")):
        return "L"
    return None


ESS_WEIGHTS = (1.2, 1.4, 0.6, 1.0, 1.8, 0.1, 0.9, 0.15)
RBDSQ_WEIGHTS = (1.5, 0.6, 0.8, 1.0, 0.3, 1.0, 0.4, 0.5, 0.3, 1.2, 1.3, 1.2)
SCOPA_WEIGHTS = (0.4, 0.8, 0.4, 0.5, 1.2, 1.0, 0.1, 1.2, 0.6, 0.8, 0.7, 1.0, 1.5, 0.6, 0.4, 0.05,
                 0.5, 0.6, 0.5, 0.4, 0.6, 0.8, 0.6, 0.7, 0.5)
SCOPA_URINARY = tuple(f"SCAU{i}" for i in range(8, 14))
GDS_WEIGHTS = (0.4, 1.3, 0.6, 0.8, 0.5, 0.6, 0.3, 0.4, 1.0, 1.2, 0.2, 0.4, 1.1, 0.2, 0.5)
UPSIT_WEIGHTS = (1.0, 0.95, 1.05, 0.9)

MOCA_ITEMS = {  # item: (max, weight of losing its points)
    "MCAALTTM": (1, 0.6), "MCACUBE": (1, 0.8), "MCACLCKC": (1, 0.3), "MCACLCKN": (1, 0.35),
    "MCACLCKH": (1, 0.6), "MCALION": (1, 0.03), "MCARHINO": (1, 0.2), "MCACAMEL": (1, 0.12),
    "MCAFDS": (1, 0.1), "MCABDS": (1, 0.4), "MCAVIGIL": (1, 0.15), "MCASER7": (3, 0.45),
    "MCASNTNC": (2, 0.6), "MCAVF": (1, 0.7), "MCAABSTR": (2, 0.5), "MCAREC1": (1, 0.9),
    "MCAREC2": (1, 0.9), "MCAREC3": (1, 0.9), "MCAREC4": (1, 0.9), "MCAREC5": (1, 0.9),
    "MCADATE": (1, 0.25), "MCAMONTH": (1, 0.04), "MCAYR": (1, 0.04), "MCADAY": (1, 0.05),
    "MCAPLACE": (1, 0.02), "MCACITY": (1, 0.02),
}
LNS_ITEMS = tuple(f"LNS{lvl}{t}" for lvl in range(1, 8) for t in "ABC")
RBDSQ_EXTRA_NEURO = {"PD": ("PARKISM", 0.35), "SWEDD": ("PARKISM", 0.25), "HC": ("DEPRS", 0.05),
                     "Prodromal": ("DEPRS", 0.10)}

# --------------------------------------------------------------------------------------------
# MRI model constants
# --------------------------------------------------------------------------------------------

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
THICKNESS_SD_FRACTION = 0.062  # residual SD = 6.2 % of the regional mean
THICKNESS_GLOBAL = 0.24  # share of residual variance on the global factor
THICKNESS_HOMOLOGUE = (0.40, 0.52)  # share on the left-right homologue factor (per region, uniform)

_CONST = np.random.default_rng(_CONSTANTS_SEED)
THICKNESS_AGEING = dict(zip(cat.DK_REGIONS, _CONST.uniform(0.002, 0.0035, len(cat.DK_REGIONS))))
"""Thinning per year of age, as a fraction of the regional mean (0.2-0.35 %/yr)."""
THICKNESS_LR_SHARE = dict(zip(cat.DK_REGIONS, _CONST.uniform(*THICKNESS_HOMOLOGUE,
                                                             len(cat.DK_REGIONS))))
STAI_WEIGHTS = _CONST.uniform(0.5, 1.5, 40)
BENTON_WEIGHTS = _CONST.lognormal(0.0, 0.8, 30)
del _CONST

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
_ASEG_HEMI_ORDER = ("Lateral_Ventricle", "Inf_Lat_Vent", "Cerebellum_White_Matter",
                    "Cerebellum_Cortex", "Thalamus", "Caudate", "Putamen", "Pallidum",
                    "Hippocampus", "Amygdala", "Accumbens_area", "VentralDC", "vessel",
                    "choroid_plexus")
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


# --------------------------------------------------------------------------------------------
# The simulation result
# --------------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """One drawn cohort: participants, sites, every table (numeric, canonical 2023 columns, with
    ``_month`` = visit month and ``_pidx`` = participant row), the ground truth and the dates."""

    cfg: SynthConfig
    participants: pd.DataFrame
    sites: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    truth: pd.DataFrame
    download_day: int
    old_copy_days: int


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, 0x5AF])
    return [np.random.default_rng(s) for s in ss.spawn(n)]




# --------------------------------------------------------------------------------------------
# Item allocation
# --------------------------------------------------------------------------------------------


def allocate(rng: np.random.Generator, totals, caps, weights, decay: float = 1.0) -> np.ndarray:
    """Split each row's total into item scores: an (n, k) integer array whose rows sum to the
    totals (clipped to the sum of the row's caps).

    Every item ``i`` of row ``r`` offers ``caps[r, i]`` score units; unit ``j`` (0-based) of item
    ``i`` has weight ``weights[r, i] * decay**j``. ``total`` units are drawn without replacement
    with these weights (Gumbel top-k), so light items and high levels are rarely used.
    """
    totals = np.asarray(totals, dtype=np.int64)
    n = len(totals)
    weights = np.broadcast_to(np.asarray(weights, float), (n, np.shape(weights)[-1]))
    k = weights.shape[1]
    caps = np.broadcast_to(np.asarray(caps, np.int64), (n, k))
    maxcap = caps.max(axis=0) if n else np.zeros(k, np.int64)
    item = np.repeat(np.arange(k), maxcap)
    level = np.concatenate([np.arange(c) for c in maxcap]) if maxcap.sum() else np.zeros(0, int)
    if n == 0 or len(item) == 0:
        return np.zeros((n, k), np.int64)
    w = weights[:, item] * decay ** level[None, :]
    keys = np.log(np.maximum(w, 1e-300)) + rng.gumbel(size=w.shape)
    keys[level[None, :] >= caps[:, item]] = -np.inf
    order = np.argsort(-keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(len(item)), order.shape), axis=1)
    t = np.minimum(totals, caps.sum(axis=1))
    chosen = (ranks < t[:, None]).astype(np.int64)
    onehot = np.zeros((len(item), k), np.int64)
    onehot[np.arange(len(item)), item] = 1
    return chosen @ onehot


# --------------------------------------------------------------------------------------------
# Sites and participants
# --------------------------------------------------------------------------------------------


def _sites(cfg: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    k = cfg.n_sites
    weight = rng.dirichlet(np.full(k, cfg.site_size_alpha))
    cno = np.sort(rng.choice(np.arange(10, 10 + max(290, 3 * k)), size=k, replace=False))
    shift = rng.normal(0.0, cfg.site_ratio_spread, k) if cfg.site_ratio_spread > 0 else np.zeros(k)
    vendor = np.asarray(VENDORS)[rng.choice(3, size=k, p=[0.5, 0.3, 0.2])]
    field_t = np.where(rng.random(k) < 0.7, 3.0, 1.5)
    mri_missing = np.where(field_t == 1.5, 1.8, 1.0) * rng.lognormal(0.0, 0.35, k)
    return pd.DataFrame({
        "site": [str(c) for c in cno], "site_name": [f"site_{c}" for c in cno], "CNO": cno,
        "weight": weight, "ratio_shift": shift, "vendor": vendor, "field_T": field_t,
        "mri_missing": mri_missing,
    })


def _site_pd_counts(sizes: np.ndarray, shift: np.ndarray, n_pd: int, keep: int) -> np.ndarray:
    """PD count per site: expected counts ``size * sigmoid(b + shift)`` with ``b`` solved so that
    they add up to ``n_pd``, rounded by largest remainder; every site keeps ``keep`` of each class
    where its size allows. The totals are exact."""
    sizes = np.asarray(sizes, np.int64)
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (sizes / (1 + np.exp(-(mid + shift)))).sum() < n_pd:
            lo = mid
        else:
            hi = mid
    expected = sizes / (1 + np.exp(-(lo + shift)))
    counts = np.floor(expected).astype(np.int64)
    order = np.argsort(-(expected - counts), kind="stable")
    counts[order[: n_pd - counts.sum()]] += 1
    low = np.minimum(keep, sizes)
    high = np.maximum(sizes - np.minimum(keep, sizes - low), low)
    for _ in range(int(sizes.sum()) + 1):  # move single participants until within bounds
        under, over = np.flatnonzero(counts < low), np.flatnonzero(counts > high)
        if not len(under) and not len(over):
            break
        if len(under):
            donors = np.flatnonzero(counts > low)
            j = under[0]
            i = donors[np.argmax((counts - low)[donors])]
            counts[i] -= 1
            counts[j] += 1
        else:
            takers = np.flatnonzero(counts < high)
            j = over[0]
            i = takers[np.argmax((high - counts)[takers])]
            counts[j] -= 1
            counts[i] += 1
    return counts


def _assign(cfg: SynthConfig, sites: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Cohort, site and MRI availability of every participant (PATNO assigned later)."""
    k = len(sites)
    w = sites["weight"].to_numpy()
    shift = sites["ratio_shift"].to_numpy()
    n_cmp = cfg.n_pd + cfg.n_hc
    floor = min(cfg.min_site_size, n_cmp // k)
    sizes = floor + rng.multinomial(n_cmp - floor * k, w)
    site = np.repeat(np.arange(k), sizes)
    pd_per_site = _site_pd_counts(sizes, shift, cfg.n_pd, min(2, cfg.n_hc // k, cfg.n_pd // k))
    is_pd = np.zeros(n_cmp, bool)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for s in range(k):
        members = starts[s] + rng.permutation(sizes[s])
        is_pd[members[: pd_per_site[s]]] = True
    frames = [pd.DataFrame({"cohort": np.where(is_pd, "PD", "HC"), "site_idx": site,
                            "has_mri": True})]
    # PD/HC without MRI: site by weight x MRI-missing propensity, class by the site's ratio
    if cfg.n_without_mri:
        pm = w * sites["mri_missing"].to_numpy()
        per = rng.multinomial(cfg.n_without_mri, pm / pm.sum())
        s_nm = np.repeat(np.arange(k), per)
        base = np.log(cfg.n_pd / cfg.n_hc)
        p_pd = 1 / (1 + np.exp(-(base + shift[s_nm])))
        frames.append(pd.DataFrame({"cohort": np.where(rng.random(len(s_nm)) < p_pd, "PD", "HC"),
                                    "site_idx": s_nm, "has_mri": False}))
    for name, n, p_mri in (("SWEDD", cfg.n_swedd, 0.7), ("Prodromal", cfg.n_prodromal, 0.65)):
        if n:
            s_x = np.repeat(np.arange(k), rng.multinomial(n, w))
            frames.append(pd.DataFrame({"cohort": name, "site_idx": s_x,
                                        "has_mri": rng.random(n) < p_mri}))
    people = pd.concat(frames, ignore_index=True)
    people = people.iloc[rng.permutation(len(people))].reset_index(drop=True)
    # PATNO: PD/HC/SWEDD in the 3000s-4000s like PPMI's original cohort, prodromal above 10000
    main = (people["cohort"] != "Prodromal").to_numpy()
    patno = np.zeros(len(people), np.int64)
    n_main = int(main.sum())
    patno[main] = rng.choice(np.arange(3000, 3000 + 3 * n_main + 10), n_main, replace=False)
    lo = max(10001, 3000 + 3 * n_main + 1000)
    patno[~main] = rng.choice(np.arange(lo, lo + 5 * int((~main).sum()) + 10), int((~main).sum()),
                              replace=False)
    people["PATNO"] = patno
    people = people.sort_values("PATNO", kind="stable").reset_index(drop=True)
    people["complete"] = people["cohort"].isin(["PD", "HC"]) & people["has_mri"]
    return people


def _demographics(P: pd.DataFrame, rng: np.random.Generator) -> None:
    n = len(P)
    coh = P["cohort"].to_numpy()
    age = np.empty(n)
    male = np.empty(n, bool)
    edu = np.empty(n)
    for name, (am, asd, pm, em, esd) in DEMOGRAPHICS.items():
        m = coh == name
        k = int(m.sum())
        age[m] = am + asd * rng.standard_normal(k)
        male[m] = rng.random(k) < pm
        edu[m] = em + esd * rng.standard_normal(k)
    age = np.clip(age, 30.0, 92.0)
    age_months = np.round(age * 12).astype(np.int64)
    prod = coh == "Prodromal"
    enroll = np.where(prod, rng.integers(2014 * 12, 2017 * 12 + 12, n),
                      rng.integers(2010 * 12 + 6, 2013 * 12 + 6, n))
    P["enroll_month"] = enroll
    P["sc_month"] = enroll - rng.integers(0, 3, n)
    P["fu_month"] = enroll + 12 + rng.integers(-1, 2, n)
    P["birth_month"] = enroll - age_months
    P["age_months"] = age_months
    P["AGE_exact"] = age_months / 12.0
    P["male"] = male.astype(int)
    P["EDUCYRS_raw"] = np.clip(np.round(edu), 5, 26)
    u = rng.random(n)
    P["HANDED_raw"] = np.where(u < 0.89, 1, np.where(u < 0.97, 2, 3))
    u = rng.random(n)
    race = np.where(u < 0.925, "RAWHITE", np.where(u < 0.95, "RABLACK", np.where(
        u < 0.97, "RAASIAN", np.where(u < 0.975, "RAINDALS", np.where(u < 0.98, "RAHAWOPI",
                                                                        "RANOS")))))
    for flag in ("RAINDALS", "RAASIAN", "RABLACK", "RAHAWOPI", "RAWHITE", "RANOS"):
        P[flag] = (race == flag).astype(int)
    P["HISPLAT"] = (rng.random(n) < 0.02).astype(int)
    P["CHLDBEAR"] = np.where(male, np.nan, (age < 50) & (rng.random(n) < 0.6)).astype(float)
    P["fu"] = rng.random(n) < 0.7
    u = rng.random(n)
    P["ENROLL_STATUS"] = np.where(u < 0.86, "Enrolled", np.where(u < 0.93, "Withdrew", "Complete"))
    P["edu_missing"] = rng.random(n) < 0.005
    P["handed_missing"] = rng.random(n) < 0.01


def _latents(P: pd.DataFrame, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Latent z per scale (before the marginal's quantile map), plus per-participant profiles."""
    n = len(P)
    f = {
        "age": (P["AGE_exact"].to_numpy() - 61.5) / 10.0,
        "edu": (P["EDUCYRS_raw"].to_numpy() - 15.7) / 3.0,
    }
    for name in ("M", "N", "A", "S", "O"):
        f[name] = rng.standard_normal(n)
    c_rest = np.sqrt(max(1 - COGNITION_AGE**2 - COGNITION_EDU**2, 0.05))
    f["C"] = COGNITION_AGE * f["age"] + COGNITION_EDU * f["edu"] + c_rest * rng.standard_normal(n)
    z = {}
    for scale, load in LOADINGS.items():
        s = sum(v * f[k] for k, v in load.items())
        rest = np.sqrt(max(1 - sum(v * v for v in load.values()), 0.02))
        z[scale] = s + rest * rng.standard_normal(n)
    z["nhy"] = HY_LOADING * z["updrs3"] + np.sqrt(1 - HY_LOADING**2) * rng.standard_normal(n)
    return z


def _bl_totals(P: pd.DataFrame, z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    coh = P["cohort"].to_numpy()
    out = {}
    for scale, margs in MARGINALS.items():
        v = np.zeros(len(P))
        for name, m in margs.items():
            sel = coh == name
            v[sel] = m.ppf(z[scale][sel])
        out[scale] = v.astype(np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Visit rows of the clinical tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowPlan:
    """Which visit rows an instrument has: missing BL row, BL moved to SC, SC retest, V04."""

    p_missing: float
    p_item_blank: float
    p_moved: float = 0.02
    p_sc_repeat: float = 0.03
    p_fu: float = 0.85
    sc_only: bool = False  # MoCA: collected at SC, not BL


PLANS = {
    "updrs1": RowPlan(0.005, 0.006, p_moved=0.0, p_sc_repeat=0.5),
    "updrs2": RowPlan(0.005, 0.005, p_moved=0.0, p_sc_repeat=0.5),
    "updrs3": RowPlan(0.005, 0.0, p_moved=0.0, p_sc_repeat=0.6),
    "moca": RowPlan(0.01, 0.0, sc_only=True),
    "upsit": RowPlan(0.035, 0.01, p_moved=0.04),
    "ess": RowPlan(0.015, 0.01),
    "rbdsq": RowPlan(0.015, 0.01),
    "scopa": RowPlan(0.02, 0.02),
    "gds": RowPlan(0.015, 0.01),
    "stai": RowPlan(0.02, 0.025),
    "hvlt": RowPlan(0.02, 0.005),
    "lns": RowPlan(0.02, 0.005),
    "fluency": RowPlan(0.02, 0.01),
    "sdmt": RowPlan(0.03, 0.0),
    "benton": RowPlan(0.025, 0.01),
}
P_UPDRS3_101 = 0.015  # Part III rows with one item "unable to rate"
P_NHY_101 = 0.01
P_BL_TREATED = 0.08  # PD with an OFF + ON pair at BL (treatment started before BL)
P_FU_TREATED = 0.7  # PD treated by V04

PROGRESSION = {  # (PD mean change at V04, retest SD as a fraction of the marginal SD)
    "updrs1": 1.0, "updrs2": 1.5, "updrs3": 3.0, "moca": -0.3, "upsit": -0.5, "ess": 0.3,
    "rbdsq": 0.2, "scopa": 1.0, "gds": 0.2, "stai": 0.5, "hvlt": -0.3, "sdmt": -1.0, "lns": -0.1,
    "fluency": -0.5, "benton": 0.0,
}
SCALE_SD = {"updrs1": 4.0, "updrs2": 4.0, "updrs3": 8.0, "moca": 2.0, "upsit": 7.0, "ess": 3.5,
            "rbdsq": 2.5, "scopa": 6.0, "gds": 2.3, "stai": 17.0, "hvlt": 5.0, "sdmt": 10.0,
            "lns": 2.7, "fluency": 10.0, "benton": 3.7}
SCALE_RANGE = {"updrs1": (0, 52), "updrs2": (0, 52), "updrs3": (0, 132), "moca": (0, 30),
               "upsit": (0, 40), "ess": (0, 24), "rbdsq": (0, 13), "scopa": (0, 69),
               "gds": (0, 15), "stai": (40, 160), "hvlt": (0, 36), "sdmt": (0, 110),
               "lns": (0, 21), "fluency": (0, 150), "benton": (0, 30)}


def _plan_flags(P: pd.DataFrame, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    n = len(P)
    flags = {}
    for key, plan in PLANS.items():
        missing = rng.random(n) < plan.p_missing
        moved = ~missing & (rng.random(n) < plan.p_moved)
        repeat = ~moved & (rng.random(n) < plan.p_sc_repeat)
        if plan.sc_only:
            repeat[:] = False
        blank = rng.random(n) < plan.p_item_blank
        fu = P["fu"].to_numpy() & (rng.random(n) < plan.p_fu)
        flags[key] = {"missing": missing, "moved": moved, "repeat": repeat, "blank": blank,
                      "fu": fu}
    # a complete participant always keeps at least one clinical value
    ok = np.zeros(n, bool)
    for fl in flags.values():
        ok |= ~fl["missing"] & ~fl["blank"]
        ok |= fl["missing"] & fl["repeat"]
    fix = P["complete"].to_numpy() & ~ok
    flags["updrs3"]["missing"][fix] = False
    flags["updrs3"]["blank"][fix] = False
    flags["_protect"] = {"updrs3": fix}
    return flags


def _rows(P: pd.DataFrame, key: str, fl: dict[str, np.ndarray]) -> pd.DataFrame:
    """Row skeleton of one instrument: participant index, event, month and role of each row."""
    plan = PLANS[key]
    idx = np.arange(len(P))
    base_ev = np.where(fl["moved"] | plan.sc_only, "SC", "BL")
    parts = []
    b = ~fl["missing"]
    parts.append(pd.DataFrame({"_pidx": idx[b], "EVENT_ID": base_ev[b], "_role": "base"}))
    r = fl["repeat"]
    parts.append(pd.DataFrame({"_pidx": idx[r], "EVENT_ID": "SC", "_role": "retest"}))
    f = fl["fu"]
    parts.append(pd.DataFrame({"_pidx": idx[f], "EVENT_ID": "V04", "_role": "fu"}))
    rows = pd.concat(parts, ignore_index=True)
    month = np.where(rows["EVENT_ID"] == "SC", P["sc_month"].to_numpy()[rows["_pidx"]],
                     np.where(rows["EVENT_ID"] == "BL", P["enroll_month"].to_numpy()[rows["_pidx"]],
                              P["fu_month"].to_numpy()[rows["_pidx"]]))
    rows["_month"] = month
    rows["_blank"] = (rows["_role"] == "base").to_numpy() & fl["blank"][rows["_pidx"]]
    rows["_ev"] = rows["EVENT_ID"].map(EVENT_ORDER)
    rows = rows.sort_values(["_pidx", "_ev"], kind="stable").reset_index(drop=True)
    return rows.drop(columns="_ev")


def _row_totals(rows: pd.DataFrame, P: pd.DataFrame, key: str, bl: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Total of every row: the latent BL total, a retest around it, or the V04 value."""
    pidx = rows["_pidx"].to_numpy()
    role = rows["_role"].to_numpy()
    base = bl[pidx].astype(float)
    sd = SCALE_SD[key]
    lo, hi = SCALE_RANGE[key]
    is_pd = (P["cohort"].to_numpy()[pidx] == "PD")
    retest = base + rng.normal(0, 0.3 * sd, len(base))
    prog = np.where(is_pd, PROGRESSION[key], 0.0)
    fu = base + prog + rng.normal(0, 0.5 * sd, len(base))
    tot = np.where(role == "base", base, np.where(role == "retest", retest, fu))
    return np.clip(np.round(tot), lo, hi).astype(np.int64)


def _blank_one(values: dict[str, np.ndarray], items: list[str], blank: np.ndarray,
               rng: np.random.Generator) -> None:
    """Blank one random item in the rows flagged ``blank`` (item-level missingness)."""
    rows = np.flatnonzero(blank)
    which = rng.integers(0, len(items), len(rows))
    for r, w in zip(rows, which):
        values[items[w]][r] = np.nan


def _frame(rows: pd.DataFrame, pag: str | np.ndarray, values: dict[str, np.ndarray],
           P: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"PATNO": P["PATNO"].to_numpy()[rows["_pidx"]],
                        "EVENT_ID": rows["EVENT_ID"].to_numpy(), "PAG_NAME": pag,
                        "INFODT": rows["_month"].to_numpy()})
    body = pd.DataFrame({k: v if np.asarray(v).dtype == object else np.asarray(v, float)
                         for k, v in values.items()}, index=out.index)
    out = pd.concat([out, body], axis=1)
    out["_month"] = rows["_month"].to_numpy()
    out["_pidx"] = rows["_pidx"].to_numpy()
    out["_role"] = rows["_role"].to_numpy()
    return out


def _with_total(values: dict[str, np.ndarray], items, total: str) -> None:
    block = np.column_stack([values[c] for c in items])
    values[total] = np.where(np.isnan(block).any(axis=1), np.nan, np.nansum(block, axis=1))


def _clinical(P: pd.DataFrame, z: dict, bl: dict, flags: dict,
              rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    coh = P["cohort"].to_numpy()

    # ---- MDS-UPDRS I (rater + patient questionnaire), one visit row set for both tables
    fl = flags["updrs1"]
    rows = _rows(P, "updrs1", fl)
    tot = _row_totals(rows, P, "updrs1", bl["updrs1"], rng)
    items = list(cat.NP1_ITEMS) + list(cat.NP1P_ITEMS)
    w = np.array([NP1_WEIGHTS[c] for c in items]) * rng.lognormal(0, 0.35, (len(rows), len(items)))
    sc = allocate(rng, tot, 4, w, decay=0.35)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(items)}
    in_pq = rng.random(len(rows)) < 0.6  # which of the two tables loses an item
    r_vals = {c: vals[c] for c in cat.NP1_ITEMS}
    p_vals = {c: vals[c] for c in cat.NP1P_ITEMS}
    _blank_one(r_vals, list(cat.NP1_ITEMS), rows["_blank"].to_numpy() & ~in_pq, rng)
    _blank_one(p_vals, list(cat.NP1P_ITEMS), rows["_blank"].to_numpy() & in_pq, rng)
    src = np.where(rng.random(len(rows)) < 0.85, 1.0, np.where(rng.random(len(rows)) < 0.5, 2, 3))
    r_vals = {"NUPSOURC": src, **r_vals}
    _with_total(r_vals, cat.NP1_ITEMS, "NP1RTOT")
    p_vals = {"NUPSOURC": src, **p_vals}
    _with_total(p_vals, cat.NP1P_ITEMS, "NP1PTOT")
    tables["updrs1"] = _frame(rows, "NUPDRS1", r_vals, P)
    tables["updrs1pq"] = _frame(rows, "NUPDRS1P", p_vals, P)

    # ---- MDS-UPDRS II
    rows = _rows(P, "updrs2", flags["updrs2"])
    tot = _row_totals(rows, P, "updrs2", bl["updrs2"], rng)
    w = np.array(NP2_WEIGHTS) * rng.lognormal(0, 0.35, (len(rows), len(cat.NP2_ITEMS)))
    sc = allocate(rng, tot, 4, w, decay=0.35)
    vals = {"NUPSOURC": np.where(rng.random(len(rows)) < 0.9, 1.0, 3.0)}
    vals.update({c: sc[:, i].astype(float) for i, c in enumerate(cat.NP2_ITEMS)})
    _blank_one(vals, list(cat.NP2_ITEMS), rows["_blank"].to_numpy(), rng)
    _with_total(vals, cat.NP2_ITEMS, "NP2PTOT")
    tables["updrs2"] = _frame(rows, "NUPDRS2P", vals, P)

    tables["updrs3"] = _updrs3(P, bl, flags, rng)

    # ---- MoCA (at SC)
    rows = _rows(P, "moca", flags["moca"])
    tot = _row_totals(rows, P, "moca", bl["moca"], rng)
    names = list(MOCA_ITEMS)
    caps = np.array([MOCA_ITEMS[c][0] for c in names])
    lost = allocate(rng, 30 - tot, caps, np.array([MOCA_ITEMS[c][1] for c in names]), decay=0.7)
    vals = {c: (caps[i] - lost[:, i]).astype(float) for i, c in enumerate(names)}
    vals["MCATOT"] = np.sum([vals[c] for c in names], axis=0)
    tables["moca"] = _frame(rows, "MOCA", vals, P)

    # ---- UPSIT: four booklets of 10 odours
    rows = _rows(P, "upsit", flags["upsit"])
    tot = _row_totals(rows, P, "upsit", bl["upsit"], rng)
    sc = allocate(rng, tot, 10, np.array(UPSIT_WEIGHTS), decay=1.0)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(cat.UPSIT_BOOKLETS)}
    _blank_one(vals, list(cat.UPSIT_BOOKLETS), rows["_blank"].to_numpy(), rng)
    _with_total(vals, cat.UPSIT_BOOKLETS, "TOTAL_CORRECT")
    tables["upsit"] = _frame(rows, "UPSIT", vals, P)

    # ---- Epworth
    rows = _rows(P, "ess", flags["ess"])
    tot = _row_totals(rows, P, "ess", bl["ess"], rng)
    w = np.array(ESS_WEIGHTS) * rng.lognormal(0, 0.3, (len(rows), 8))
    sc = allocate(rng, tot, 3, w, decay=0.6)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(cat.ESS_ITEMS)}
    _blank_one(vals, list(cat.ESS_ITEMS), rows["_blank"].to_numpy(), rng)
    tables["ess"] = _frame(rows, "EPWORTH", vals, P)

    # ---- RBDSQ: 12 yes/no items + one point for a neurological disease
    rows = _rows(P, "rbdsq", flags["rbdsq"])
    tot = _row_totals(rows, P, "rbdsq", bl["rbdsq"], rng)
    rcoh = coh[rows["_pidx"].to_numpy()]
    neuro_flag = np.full(len(rows), "", dtype=object)
    for name, (flag, p) in RBDSQ_EXTRA_NEURO.items():
        sel = (rcoh == name) & (rng.random(len(rows)) < p)
        neuro_flag[sel] = flag
    neuro = (neuro_flag != "") & (tot >= 1)
    core = allocate(rng, tot - neuro, 1, np.array(RBDSQ_WEIGHTS), decay=1.0)
    vals = {c: core[:, i].astype(float) for i, c in enumerate(cat.RBDSQ_CORE)}
    for c in cat.RBDSQ_NEURO:
        vals[c] = (neuro & (neuro_flag == c)).astype(float)
    _blank_one(vals, list(cat.RBDSQ_CORE), rows["_blank"].to_numpy(), rng)
    tables["rbdsq"] = _frame(rows, "REMSLEEP", vals, P)

    # ---- SCOPA-AUT: 21 core items + 2 sex-specific items (22-23 men, 24-25 women)
    rows = _rows(P, "scopa", flags["scopa"])
    tot = _row_totals(rows, P, "scopa", bl["scopa"], rng)
    male = P["male"].to_numpy()[rows["_pidx"].to_numpy()].astype(bool)
    caps = np.full((len(rows), 25), 3)
    caps[male, 23:25] = 0
    caps[~male, 21:23] = 0
    w = np.array(SCOPA_WEIGHTS) * rng.lognormal(0, 0.3, (len(rows), 25))
    sc = allocate(rng, tot, caps, w, decay=0.4).astype(float)
    sc[male, 23:25] = np.nan
    sc[~male, 21:23] = np.nan
    vals = {c: sc[:, i] for i, c in enumerate(cat.SCOPA_ITEMS)}
    for c in SCOPA_URINARY:  # 9 = uses a catheter, scored as 3
        hit = (vals[c] == 3) & (rng.random(len(rows)) < 0.2)
        vals[c] = np.where(hit, 9.0, vals[c])
    for c in cat.SCOPA_ITEMS[21:]:  # 9 = not applicable / not sexually active, scored as 0
        hit = (vals[c] == 0) & (rng.random(len(rows)) < 0.3)
        vals[c] = np.where(hit, 9.0, vals[c])
    _blank_one(vals, list(cat.SCOPA_ITEMS[:21]), rows["_blank"].to_numpy(), rng)
    tables["scopa"] = _frame(rows, "SCOPAAUT", vals, P)

    # ---- GDS-15: depressive answers; the five positive items are answered "no" (0) when
    # depressive
    rows = _rows(P, "gds", flags["gds"])
    tot = _row_totals(rows, P, "gds", bl["gds"], rng)
    dep = allocate(rng, tot, 1, np.array(GDS_WEIGHTS), decay=1.0)
    vals = {}
    for i, c in enumerate(cat.GDS_ITEMS):
        vals[c] = (1 - dep[:, i] if c in cat.GDS_POSITIVE else dep[:, i]).astype(float)
    _blank_one(vals, list(cat.GDS_ITEMS), rows["_blank"].to_numpy(), rng)
    tables["gds"] = _frame(rows, "GDSSHORT", vals, P)

    # ---- STAI: 40 items 1-4; anxiety-absent items are reversed (5 - x)
    rows = _rows(P, "stai", flags["stai"])
    tot = _row_totals(rows, P, "stai", bl["stai"], rng)
    w = STAI_WEIGHTS * rng.lognormal(0, 0.25, (len(rows), 40))
    sym = allocate(rng, tot - 40, 3, w, decay=0.55)
    vals = {}
    for i, c in enumerate(cat.STAI_ITEMS):
        vals[c] = (4 - sym[:, i] if c in cat.STAI_REVERSED else sym[:, i] + 1).astype(float)
    _blank_one(vals, list(cat.STAI_ITEMS), rows["_blank"].to_numpy(), rng)
    tables["stai"] = _frame(rows, "STAI", vals, P)

    # ---- HVLT-R: three learning trials of 12 words, delayed recall, recognition
    rows = _rows(P, "hvlt", flags["hvlt"])
    tot = _row_totals(rows, P, "hvlt", bl["hvlt"], rng)
    w = np.array([0.7] * 12 + [1.0] * 12 + [1.3] * 12) * np.tile(0.93 ** np.arange(12), 3)
    words = allocate(rng, tot, 1, w, decay=1.0)
    vals = {c: words[:, 12 * t:12 * (t + 1)].sum(axis=1).astype(float)
            for t, c in enumerate(cat.HVLT_TRIALS)}
    t3 = vals["HVLTRT3"]
    vals["HVLTRDLY"] = np.clip(np.round(0.85 * t3 + rng.normal(0, 1.5, len(rows))), 0, 12)
    vals["HVLTREC"] = np.clip(np.round(11.2 - np.abs(rng.normal(0, 1.0, len(rows)))), 0, 12)
    vals["HVLTFPRL"] = np.minimum(rng.poisson(0.3, len(rows)), 6).astype(float)
    vals["HVLTFPUN"] = np.minimum(rng.poisson(0.4, len(rows)), 6).astype(float)
    _blank_one(vals, list(cat.HVLT_TRIALS), rows["_blank"].to_numpy(), rng)
    tables["hvlt"] = _frame(rows, "HVLT", vals, P)

    # ---- Letter-number sequencing: 7 levels x 3 trials, 0/1, harder levels later
    rows = _rows(P, "lns", flags["lns"])
    tot = _row_totals(rows, P, "lns", bl["lns"], rng)
    w = np.exp(-0.7 * np.repeat(np.arange(7), 3))
    sc = allocate(rng, tot, 1, w, decay=1.0)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(LNS_ITEMS)}
    _blank_one(vals, list(LNS_ITEMS), rows["_blank"].to_numpy(), rng)
    _with_total(vals, LNS_ITEMS, "LNS_TOTRAW")
    tables["lns"] = _frame(rows, "LNSPD", vals, P)

    # ---- Semantic fluency: animals, vegetables, fruit (no shipped total)
    rows = _rows(P, "fluency", flags["fluency"])
    pidx = rows["_pidx"].to_numpy()
    zf = z["fluency"][pidx]
    role = rows["_role"].to_numpy()
    zf = np.where(role == "base", zf, 0.85 * zf + 0.53 * rng.standard_normal(len(rows)))
    rcoh = coh[pidx]
    vals = {}
    for j, c in enumerate(cat.FLUENCY_ITEMS):
        mean = np.array([FLUENCY_MEANS[x][j] for x in rcoh])
        e = 0.8 * zf + 0.6 * rng.standard_normal(len(rows))
        vals[c] = np.clip(np.round(mean + FLUENCY_SDS[j] * e), 0, 60)
    _blank_one(vals, list(cat.FLUENCY_ITEMS), rows["_blank"].to_numpy(), rng)
    tables["fluency"] = _frame(rows, "SFT", vals, P)

    # ---- Symbol digit modalities
    rows = _rows(P, "sdmt", flags["sdmt"])
    tot = _row_totals(rows, P, "sdmt", bl["sdmt"], rng)
    tables["sdmt"] = _frame(rows, "SDM", {"SDMTOTAL": tot.astype(float)}, P)

    # ---- Benton judgment of line orientation: 30 items 0/1
    rows = _rows(P, "benton", flags["benton"])
    tot = _row_totals(rows, P, "benton", bl["benton"], rng)
    sc = allocate(rng, tot, 1, BENTON_WEIGHTS, decay=1.0)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(cat.BENTON_ITEMS)}
    _blank_one(vals, list(cat.BENTON_ITEMS), rows["_blank"].to_numpy(), rng)
    _with_total(vals, cat.BENTON_ITEMS, "JLO_TOTRAW")
    tables["benton"] = _frame(rows, "BENTONOD", vals, P)
    return tables


def _updrs3(P: pd.DataFrame, bl: dict, flags: dict,
            rng: np.random.Generator) -> pd.DataFrame:
    """MDS-UPDRS III rows: untreated rows, OFF + ON pairs for treated PD, 101 codes, H&Y."""
    fl = flags["updrs3"]
    coh = P["cohort"].to_numpy()
    n = len(P)
    rows = _rows(P, "updrs3", fl)
    pidx = rows["_pidx"].to_numpy()
    role = rows["_role"].to_numpy()
    tot = _row_totals(rows, P, "updrs3", bl["updrs3"], rng)
    is_pd = coh == "PD"
    bl_treated = is_pd & (rng.random(n) < P_BL_TREATED)
    fu_treated = is_pd & (rng.random(n) < P_FU_TREATED)
    treated = np.where(role == "base", bl_treated[pidx] & (rows["EVENT_ID"] == "BL").to_numpy(),
                       np.where(role == "fu", fu_treated[pidx], False))
    # per-participant item profile: asymmetry (PD starts on one side) and tremor dominance
    right_first = rng.random(n) < 0.55
    other = np.where(np.isin(coh, ["PD", "SWEDD"]), rng.uniform(0.25, 0.75, n), 1.0)
    tremor = np.where(np.isin(coh, ["PD", "SWEDD"]), rng.lognormal(0, 0.7, n), 0.7)
    items = list(cat.NP3_ITEMS)
    w = np.tile(np.array([NP3_WEIGHTS[c] for c in items]), (len(rows), 1))
    for j, c in enumerate(items):
        side = _np3_side(c)
        if side is not None:
            affected = right_first[pidx] == (side == "R")
            w[:, j] *= np.where(affected, 1.0, other[pidx])
        if c in NP3_TREMOR:
            w[:, j] *= tremor[pidx]
    w *= rng.lognormal(0, 0.3, w.shape)
    off = allocate(rng, tot, 4, w, decay=0.35)
    # H&Y per row: the latent stage at base rows, allowed to drift at V04
    nhy_bl = bl["nhy"][pidx].astype(float)
    drift = (role == "fu") & is_pd[pidx] & (nhy_bl == 1) & (rng.random(len(rows)) < 0.15)
    nhy = nhy_bl + drift
    # ON rows: lower scores, mostly through tremor and limb items
    on_w = np.array([0.5 if c in NP3_AXIAL else 1.5 if c in NP3_TREMOR else 1.2 for c in items])
    tr = np.flatnonzero(treated)
    on_total = np.round(tot[tr] * rng.uniform(0.55, 0.85, len(tr))).astype(np.int64)
    on_total = np.where(tot[tr] >= 1, np.minimum(on_total, tot[tr] - 1), 0)
    reduction = allocate(rng, tot[tr] - on_total, off[tr], on_w, decay=1.0)
    on = off[tr] - reduction

    def block(scores, sel, state, pag, treat, nhy_v):
        vals = {"PDTRTMNT": np.full(len(sel), float(treat)),
                "PDSTATE": np.full(len(sel), state, dtype=object)}
        vals.update({c: scores[:, j].astype(float) for j, c in enumerate(items)})
        vals["NP3TOT"] = scores.sum(axis=1).astype(float)
        vals["DYSKPRES"] = np.zeros(len(sel))
        vals["DYSKIRAT"] = np.full(len(sel), np.nan)
        vals["NHY"] = nhy_v
        return _frame(rows.iloc[sel].reset_index(drop=True), pag, vals, P)

    untreated = np.flatnonzero(~treated)
    parts = [
        block(off[untreated], untreated, "", "NUPDRS3", 0, nhy[untreated]),
        block(off[tr], tr, "OFF", "NUPDR3OF", 1, nhy[tr]),
        block(on, tr, "ON", "NUPDR3ON", 1, nhy[tr]),
    ]
    df = pd.concat(parts, ignore_index=True)
    df["PDSTATE"] = df["PDSTATE"].astype(object)
    # 101 = unable to rate: one item of some rows (NP3TOT then sums the rated items), NHY of some
    protect = flags["_protect"]["updrs3"][df["_pidx"].to_numpy()]
    hit = (rng.random(len(df)) < P_UPDRS3_101) & ~protect
    which = rng.choice(NP3_101_ITEMS, size=len(df))
    for r in np.flatnonzero(hit):
        c = which[r]
        df.loc[r, "NP3TOT"] = df.loc[r, "NP3TOT"] - df.loc[r, c]
        df.loc[r, c] = float(cat.UNABLE_TO_RATE)
    nhy_hit = (rng.random(len(df)) < P_NHY_101) & ~protect
    df.loc[nhy_hit, "NHY"] = float(cat.UNABLE_TO_RATE)
    df["_ev"] = df["EVENT_ID"].map(EVENT_ORDER)
    df["_pag"] = df["PAG_NAME"].map({"NUPDRS3": 0, "NUPDR3OF": 1, "NUPDR3ON": 2})
    df = df.sort_values(["_pidx", "_ev", "_pag"], kind="stable").reset_index(drop=True)
    return df.drop(columns=["_ev", "_pag"])


# --------------------------------------------------------------------------------------------
# MRI
# --------------------------------------------------------------------------------------------


def _factor_residuals(rng, n, names, pairs, g, lam) -> np.ndarray:
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


def _scanner(cfg: SynthConfig, sites: pd.DataFrame, n_feat: int, rng: np.random.Generator):
    k = len(sites)
    if not cfg.scanner_effects:
        return np.zeros((k, n_feat)), np.ones((k, n_feat))
    gbar = rng.normal(0.0, 0.25, k)
    spread = rng.uniform(0.15, 0.35, k)
    gamma = gbar[:, None] + spread[:, None] * rng.standard_normal((k, n_feat))
    delta = np.sqrt(19.0 / rng.gamma(20.0, 1.0, (k, n_feat)))  # δ² ~ InvGamma(20, 19)
    return gamma, delta


def _mri(cfg: SynthConfig, P: pd.DataFrame, sites: pd.DataFrame, nhy_stage: np.ndarray,
         rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Baseline MRI values of every participant with MRI (truth) and the FS7 table rows."""
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
    resid = _factor_residuals(rng, m, feats, pairs, THICKNESS_GLOBAL, lam) * sd_res
    sys = mean * (1 - rates * age[:, None]) + sd_tot * d * sev[:, None]
    gamma, delta = _scanner(cfg, sites, len(feats), rng)
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
    vres = _factor_residuals(rng, m, vnames, vpairs, 0.2, vlam)
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
    vgamma, vdelta = _scanner(cfg, sites, len(vnames) + 1, rng)
    vols = vsys + vsd * vgamma[site, :-1] + vdelta[site, :-1] * (vols - vsys)
    vols = np.maximum(vols, 1.0)
    etiv = np.exp(log_etiv)
    etiv = etiv_sys + 1.1e5 * vgamma[site, -1] + vdelta[site, -1] * (etiv - etiv_sys)

    thick_df = pd.DataFrame(thick, columns=feats)
    vol_df = pd.DataFrame(vols, columns=vnames)
    vol_df[cat.ETIV] = etiv
    meta = pd.DataFrame({"_pidx": sel})
    return meta, thick_df, vol_df


def _aseg_derived(v: pd.DataFrame) -> pd.DataFrame:
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


def _cth_table(thick: pd.DataFrame) -> pd.DataFrame:
    out = thick.round(3)
    area = np.array([REGION_AREA[r] for r in cat.DK_REGIONS], float)
    for h in cat.HEMISPHERES:
        cols = [f"{h}_{r}" for r in cat.DK_REGIONS]
        out[f"{h}_MeanThickness"] = np.round(out[cols].to_numpy() @ (area / area.sum()), 5)
    return out[CTH_COLUMNS]


def _mri_rows(P: pd.DataFrame, meta: pd.DataFrame, thick: pd.DataFrame, vol: pd.DataFrame,
              rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
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
        parts_t.append(pd.concat([rows, _cth_table(t.iloc[sel].reset_index(drop=True)), extra],
                                 axis=1))
        parts_v.append(pd.concat([rows.copy(), _aseg_derived(v.iloc[sel].reset_index(drop=True)),
                                  extra.copy()], axis=1))

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


# --------------------------------------------------------------------------------------------
# Ground truth: what the PPMI rules give for each participant
# --------------------------------------------------------------------------------------------


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


def _truth(P: pd.DataFrame, sites: pd.DataFrame, tables: dict[str, pd.DataFrame],
           naming: str) -> pd.DataFrame:
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


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def simulate(cfg: SynthConfig) -> Simulation:
    """Draw the whole synthetic cohort for ``cfg`` (deterministic for ``cfg.seed``)."""
    r_site, r_people, r_demo, r_lat, r_flags, r_clin, r_mri, r_rows, r_dates = _rngs(cfg.seed, 9)
    sites = _sites(cfg, r_site)
    P = _assign(cfg, sites, r_people)
    _demographics(P, r_demo)
    z = _latents(P, r_lat)
    bl = _bl_totals(P, z)
    P["NHY_stage"] = bl["nhy"]
    flags = _plan_flags(P, r_flags)
    tables = _clinical(P, z, bl, flags, r_clin)
    meta, thick, vol = _mri(cfg, P, sites, bl["nhy"], r_mri)
    tables["cth"], tables["aseg"] = _mri_rows(P, meta, thick, vol, r_rows)
    # download date: a day in 2023-2024 derived from the seed; an older copy some months before
    download_day = int(r_dates.integers(0, 700))
    old_days = int(r_dates.integers(60, 400))
    truth = _truth(P, sites, tables, cfg.naming)
    return Simulation(cfg=cfg, participants=P, sites=sites, tables=tables, truth=truth,
                      download_day=download_day, old_copy_days=old_days)


def generate_truth(cfg: SynthConfig | None = None) -> pd.DataFrame:
    """Participant-level ground truth of the synthetic download ``cfg`` describes.

    One row per participant (every cohort), sorted by PATNO: ``PATNO``, ``cohort`` (PD, HC, SWEDD,
    Prodromal), ``site`` (the CNO, as the loader reports it), ``site_name`` (the per-site folder),
    ``has_mri``, ``complete`` (PD/HC with all four modalities), ``label`` (1 PD, 0 HC, NaN other),
    every feature of `ppmi_catalog.ppmi_modalities` exactly as the PPMI rules derive it from the
    written files (NaN where missing, e.g. an item left blank or a 101 code), and a few extras:
    ``mri_event``, ``scanner_vendor``, ``scanner_field_T``, ``NHY_stage`` (latent H&Y before any
    101 code), ``updrs3_bl_treated`` (an OFF + ON pair at BL).
    """
    return simulate(cfg or SynthConfig()).truth
