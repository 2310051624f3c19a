"""Latent severity: the factors behind every clinical scale, and each participant's baseline totals.

Factors per participant: age and education (standardised), motor ``M``, non-motor ``N``,
cognition ``C`` (partly explained by age and education), olfaction ``O``, mood ``A``, sleep ``S``.
Each instrument's latent z = its loadings · factors + unique noise (unit variance), mapped to its
baseline total by the per-cohort `Marginal` of its spec; H&Y follows the Part III latent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.synth.instruments import HOEHN_YAHR, INSTRUMENTS

FACTORS = ("age", "edu", "M", "N", "C", "O", "A", "S")
COGNITION_AGE, COGNITION_EDU = -0.38, 0.35  # C = -0.38 age_z + 0.35 edu_z + noise
HY_LOADING = 0.65  # H&Y latent = 0.65 * Part III latent + noise → Spearman ≈ 0.5
LATENT_DRAW_ORDER = ("updrs3", "updrs2", "updrs1", "moca", "upsit", "ess", "rbdsq", "scopa", "gds",
                     "stai", "hvlt", "sdmt", "lns", "fluency", "benton")
"""Order in which the instruments' unique noise is drawn (part of the seed's meaning)."""


def draw_latents(P: pd.DataFrame, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Latent z per instrument (before the marginal's quantile map) and ``nhy`` for H&Y."""
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
    for scale in LATENT_DRAW_ORDER:
        load = INSTRUMENTS[scale].loadings
        s = sum(v * f[k] for k, v in load.items())
        rest = np.sqrt(max(1 - sum(v * v for v in load.values()), 0.02))
        z[scale] = s + rest * rng.standard_normal(n)
    z["nhy"] = HY_LOADING * z["updrs3"] + np.sqrt(1 - HY_LOADING**2) * rng.standard_normal(n)
    return z


def baseline_totals(P: pd.DataFrame, z: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each participant's baseline total of every instrument with a total, and ``nhy``."""
    coh = P["cohort"].to_numpy()
    marginals = {key: spec.marginals for key, spec in INSTRUMENTS.items() if spec.marginals}
    marginals["nhy"] = HOEHN_YAHR
    out = {}
    for scale, margs in marginals.items():
        v = np.zeros(len(P))
        for name, m in margs.items():
            sel = coh == name
            v[sel] = m.ppf(z[scale][sel])
        out[scale] = v.astype(np.int64)
    return out
