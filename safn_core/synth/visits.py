"""Visit rows of the clinical tables: which rows an instrument has, their totals and bookkeeping.

Per instrument (`VisitPlan` of its spec): a missing BL row, BL moved to SC (MoCA: always SC), an
SC retest, a V04 follow-up, and rows that lose one item. A retest scatters around the latent BL
total (0.3 sd), V04 adds PD's progression (noise 0.5 sd).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.synth.instruments import INSTRUMENTS, Instrument
from safn_core.synth.population import EVENT_ORDER


def visit_flags(P: pd.DataFrame, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Per instrument and participant: missing, moved, retest, blank, follow-up flags."""
    n = len(P)
    flags = {}
    for key, spec in INSTRUMENTS.items():
        plan = spec.plan
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


def visit_rows(P: pd.DataFrame, spec: Instrument, fl: dict[str, np.ndarray]) -> pd.DataFrame:
    """Row skeleton of one instrument: participant index, event, month and role of each row."""
    plan = spec.plan
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


def row_totals(rows: pd.DataFrame, P: pd.DataFrame, spec: Instrument, bl: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Total of every row: the latent BL total, a retest around it, or the V04 value."""
    pidx = rows["_pidx"].to_numpy()
    role = rows["_role"].to_numpy()
    base = bl[pidx].astype(float)
    sd = spec.sd
    lo, hi = spec.score_range
    is_pd = (P["cohort"].to_numpy()[pidx] == "PD")
    retest = base + rng.normal(0, 0.3 * sd, len(base))
    prog = np.where(is_pd, spec.progression, 0.0)
    fu = base + prog + rng.normal(0, 0.5 * sd, len(base))
    tot = np.where(role == "base", base, np.where(role == "retest", retest, fu))
    return np.clip(np.round(tot), lo, hi).astype(np.int64)


def blank_one_item(values: dict[str, np.ndarray], items: list[str], blank: np.ndarray,
                   rng: np.random.Generator) -> None:
    """Blank one random item in the rows flagged ``blank`` (item-level missingness)."""
    rows = np.flatnonzero(blank)
    which = rng.integers(0, len(items), len(rows))
    for r, w in zip(rows, which):
        values[items[w]][r] = np.nan


def table_rows(rows: pd.DataFrame, pag: str | np.ndarray, values: dict[str, np.ndarray],
               P: pd.DataFrame) -> pd.DataFrame:
    """The rows of a clinical table: PATNO, EVENT_ID, PAG_NAME, INFODT, the values, and the
    bookkeeping columns ``_month``, ``_pidx``, ``_role``."""
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


def add_total(values: dict[str, np.ndarray], items, total: str) -> None:
    """The shipped total: the sum of the items, blank when an item is blank."""
    block = np.column_stack([values[c] for c in items])
    values[total] = np.where(np.isnan(block).any(axis=1), np.nan, np.nansum(block, axis=1))

