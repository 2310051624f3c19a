"""Who is in the synthetic cohort: sites, participants, cohorts and demographics.

Sites get a size weight ~ Dirichlet(``site_size_alpha``), a PD/HC log-odds shift
~ N(0, ``site_ratio_spread``²) and a scanner (vendor, field strength, MRI-missing propensity).
Every site gets at least ``min_site_size`` complete (PD/HC with MRI) participants and the rest by a
multinomial draw; per-site PD counts are the expected counts rescaled to the exact totals.
Participants without MRI are spread by site weight × MRI-missing propensity (1.5 T sites miss
more). Demographics and visit months (SC, BL, V04) are drawn per cohort; dates are months since
year 0 (``year*12+month-1``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.config import SynthConfig
from safn_core.data import ppmi_catalog as cat

COHORTS = ("PD", "HC", "SWEDD", "Prodromal")
COHORT_CODE = {name: code for code, name in cat.COHORT_CODES.items()}
COHORT_DEFINITION = {"PD": "Parkinson's Disease", "HC": "Healthy Control", "SWEDD": "SWEDD",
                     "Prodromal": "Prodromal"}
LEGACY_ENROLL_CAT = {"PD": "PD", "HC": "HC", "SWEDD": "SWEDD", "Prodromal": "PRODROMA"}

VENDORS = ("Siemens", "GE", "Philips")
EVENT_ORDER = {"SC": 0, "BL": 1, "V04": 2, "V06": 3}
"""Order of the visits a participant has: screening, baseline, follow-ups."""

DEMOGRAPHICS = {  # age mean, age sd, P(male), education mean, education sd
    "PD": (61.7, 9.7, 0.65, 15.6, 3.0), "HC": (60.8, 11.3, 0.64, 16.0, 2.9),
    "SWEDD": (60.9, 10.0, 0.63, 15.0, 3.1), "Prodromal": (64.0, 7.0, 0.60, 15.8, 3.0),
}


def draw_sites(cfg: SynthConfig, rng: np.random.Generator) -> pd.DataFrame:
    """One row per site: CNO, folder name, size weight, PD/HC shift, scanner."""
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


def site_pd_counts(sizes: np.ndarray, shift: np.ndarray, n_pd: int, keep: int) -> np.ndarray:
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


def draw_participants(cfg: SynthConfig, sites: pd.DataFrame,
                      rng: np.random.Generator) -> pd.DataFrame:
    """Cohort, site, MRI availability and PATNO of every participant, sorted by PATNO."""
    k = len(sites)
    w = sites["weight"].to_numpy()
    shift = sites["ratio_shift"].to_numpy()
    n_cmp = cfg.n_pd + cfg.n_hc
    floor = min(cfg.min_site_size, n_cmp // k)
    sizes = floor + rng.multinomial(n_cmp - floor * k, w)
    site = np.repeat(np.arange(k), sizes)
    pd_per_site = site_pd_counts(sizes, shift, cfg.n_pd, min(2, cfg.n_hc // k, cfg.n_pd // k))
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


def draw_demographics(P: pd.DataFrame, rng: np.random.Generator) -> None:
    """Add age, sex, education, handedness, race, visit months and enrolment flags to ``P``."""
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

