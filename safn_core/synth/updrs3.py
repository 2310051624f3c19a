"""MDS-UPDRS Part III rows: untreated rows, OFF + ON pairs for treated PD, 101 codes, H&Y.

Items are drawn given the total with a per-participant profile: PD starts on one side (the other
side's items weigh less) and some participants are tremor-dominant. ON rows lose score mostly on
tremor and limb items. Some rows have one item, or H&Y, "unable to rate" (101); ``NP3TOT`` then
sums the rated items.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data import ppmi_catalog as cat
from safn_core.synth.allocation import allocate
from safn_core.synth.instruments import Instrument
from safn_core.synth.population import EVENT_ORDER
from safn_core.synth.visits import row_totals, table_rows, visit_rows

NP3_TREMOR = {"NP3PTRMR", "NP3PTRML", "NP3KTRMR", "NP3KTRML", "NP3RTARU", "NP3RTALU", "NP3RTARL",
              "NP3RTALL", "NP3RTALJ", "NP3RTCON"}
NP3_AXIAL = {"NP3SPCH", "NP3FACXP", "NP3RIGN", "NP3RISNG", "NP3GAIT", "NP3FRZGT", "NP3PSTBL",
             "NP3POSTR", "NP3BRADY"}
NP3_101_ITEMS = ("NP3RISNG", "NP3GAIT", "NP3FRZGT", "NP3PSTBL", "NP3RIGN", "NP3RIGLL", "NP3RIGRL",
                 "NP3TTAPL", "NP3LGAGR")
"""Items that are most often "unable to rate" (101) in practice: axial items, lower limbs."""


def np3_side(item: str) -> str | None:
    """The body side an item rates ("R", "L"), or None for axial and midline items."""
    if item in ("NP3RIGRU", "NP3RIGRL", "NP3PTRMR", "NP3KTRMR", "NP3RTARU", "NP3RTARL") or (
            item.endswith("R") and item[:6] in ("NP3FTA", "NP3HMO", "NP3PRS", "NP3TTA", "NP3LGA")):
        return "R"
    if item in ("NP3RIGLU", "NP3RIGLL", "NP3PTRML", "NP3KTRML", "NP3RTALU", "NP3RTALL") or (
            item.endswith("L") and item[:6] in ("NP3FTA", "NP3HMO", "NP3PRS", "NP3TTA", "NP3LGA")):
        return "L"
    return None


P_UPDRS3_101 = 0.015  # Part III rows with one item "unable to rate"
P_NHY_101 = 0.01
P_BL_TREATED = 0.08  # PD with an OFF + ON pair at BL (treatment started before BL)
P_FU_TREATED = 0.7  # PD treated by V04


def draw_updrs3(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
                rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """The ``updrs3`` table (rows sorted by participant, visit, then untreated/OFF/ON)."""
    fl = flags[spec.key]
    coh = P["cohort"].to_numpy()
    n = len(P)
    rows = visit_rows(P, spec, fl)
    pidx = rows["_pidx"].to_numpy()
    role = rows["_role"].to_numpy()
    tot = row_totals(rows, P, spec, bl[spec.key], rng)
    is_pd = coh == "PD"
    bl_treated = is_pd & (rng.random(n) < P_BL_TREATED)
    fu_treated = is_pd & (rng.random(n) < P_FU_TREATED)
    treated = np.where(role == "base", bl_treated[pidx] & (rows["EVENT_ID"] == "BL").to_numpy(),
                       np.where(role == "fu", fu_treated[pidx], False))
    # per-participant item profile: asymmetry (PD starts on one side) and tremor dominance
    right_first = rng.random(n) < 0.55
    other = np.where(np.isin(coh, ["PD", "SWEDD"]), rng.uniform(0.25, 0.75, n), 1.0)
    tremor = np.where(np.isin(coh, ["PD", "SWEDD"]), rng.lognormal(0, 0.7, n), 0.7)
    items = list(spec.items)
    w = np.tile(np.asarray(spec.weights, float), (len(rows), 1))
    for j, c in enumerate(items):
        side = np3_side(c)
        if side is not None:
            affected = right_first[pidx] == (side == "R")
            w[:, j] *= np.where(affected, 1.0, other[pidx])
        if c in NP3_TREMOR:
            w[:, j] *= tremor[pidx]
    w *= rng.lognormal(0, spec.jitter, w.shape)
    off = allocate(rng, tot, spec.caps, w, decay=spec.decay)
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
        return table_rows(rows.iloc[sel].reset_index(drop=True), pag, vals, P)

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
    return {spec.key: df.drop(columns=["_ev", "_pag"])}
