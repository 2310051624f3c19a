"""Every visit row of every clinical table, each instrument drawn from its spec.

`draw_from_spec` draws any instrument whose items follow from its total alone (MDS-UPDRS II, MoCA,
UPSIT, Epworth, GDS, STAI, LNS, SDMT, Benton). Instruments with more structure keep a drawer of
their own, still reading items, weights and decay from their spec: MDS-UPDRS I (two tables),
RBDSQ (a neurological-disease point), SCOPA-AUT (sex-specific items, code 9), HVLT-R (words of
three trials, recall, recognition), semantic fluency (no total) and MDS-UPDRS III
(`safn_core.synth.updrs3`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from safn_core.data import ppmi_catalog as cat
from safn_core.synth.allocation import allocate
from safn_core.synth.instruments import (
    FLUENCY_MEANS, FLUENCY_SDS, INSTRUMENTS, RBDSQ_EXTRA_NEURO, SCOPA_URINARY, Instrument,
)
from safn_core.synth.updrs3 import draw_updrs3
from safn_core.synth.visits import add_total, blank_one_item, row_totals, table_rows, visit_rows

Tables = dict[str, pd.DataFrame]


def item_weights(spec: Instrument, n: int, rng: np.random.Generator) -> np.ndarray:
    """The spec's item weights, times a per-row lognormal factor when the spec jitters them."""
    w = np.asarray(spec.weights, float)
    if spec.jitter:
        w = w * rng.lognormal(0, spec.jitter, (n, len(spec.weights)))
    return w


def _rows_and_totals(spec: Instrument, P: pd.DataFrame, bl: dict, flags: dict,
                     rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    rows = visit_rows(P, spec, flags[spec.key])
    return rows, row_totals(rows, P, spec, bl[spec.key], rng)


def draw_from_spec(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
                   rng: np.random.Generator) -> Tables:
    """Rows of an instrument whose items are the spec's split of each row's total."""
    rows, tot = _rows_and_totals(spec, P, bl, flags, rng)
    if not spec.items:  # the total only
        return {spec.key: table_rows(rows, spec.page, {spec.total: tot.astype(float)}, P)}
    n = len(rows)
    units = tot - spec.floor if spec.top is None else spec.top - tot
    scores = allocate(rng, units, spec.caps, item_weights(spec, n, rng), decay=spec.decay)
    vals = spec.source(n, rng) if spec.source else {}
    caps = np.broadcast_to(np.asarray(spec.caps), len(spec.items))
    for i, c in enumerate(spec.items):
        code = spec.answer(c, scores[:, i], caps[i]) if spec.answer else scores[:, i]
        vals[c] = code.astype(float)
    if spec.blanks:
        blank_one_item(vals, list(spec.items), rows["_blank"].to_numpy(), rng)
    if spec.total:
        add_total(vals, spec.items, spec.total)
    return {spec.key: table_rows(rows, spec.page, vals, P)}


def draw_updrs1(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
                rng: np.random.Generator) -> Tables:
    """MDS-UPDRS I: rater part and patient questionnaire, one visit row set for both tables."""
    rows, tot = _rows_and_totals(spec, P, bl, flags, rng)
    items = list(spec.items)
    sc = allocate(rng, tot, spec.caps, item_weights(spec, len(rows), rng), decay=spec.decay)
    vals = {c: sc[:, i].astype(float) for i, c in enumerate(items)}
    in_pq = rng.random(len(rows)) < 0.6  # which of the two tables loses an item
    r_vals = {c: vals[c] for c in cat.NP1_ITEMS}
    p_vals = {c: vals[c] for c in cat.NP1P_ITEMS}
    blank_one_item(r_vals, list(cat.NP1_ITEMS), rows["_blank"].to_numpy() & ~in_pq, rng)
    blank_one_item(p_vals, list(cat.NP1P_ITEMS), rows["_blank"].to_numpy() & in_pq, rng)
    src = np.where(rng.random(len(rows)) < 0.85, 1.0, np.where(rng.random(len(rows)) < 0.5, 2, 3))
    r_vals = {"NUPSOURC": src, **r_vals}
    add_total(r_vals, cat.NP1_ITEMS, "NP1RTOT")
    p_vals = {"NUPSOURC": src, **p_vals}
    add_total(p_vals, cat.NP1P_ITEMS, "NP1PTOT")
    return {"updrs1": table_rows(rows, spec.page, r_vals, P),
            "updrs1pq": table_rows(rows, "NUPDRS1P", p_vals, P)}


def draw_rbdsq(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
               rng: np.random.Generator) -> Tables:
    """RBDSQ: 12 yes/no items + one point for a neurological disease."""
    rows, tot = _rows_and_totals(spec, P, bl, flags, rng)
    rcoh = P["cohort"].to_numpy()[rows["_pidx"].to_numpy()]
    neuro_flag = np.full(len(rows), "", dtype=object)
    for name, (flag, p) in RBDSQ_EXTRA_NEURO.items():
        sel = (rcoh == name) & (rng.random(len(rows)) < p)
        neuro_flag[sel] = flag
    neuro = (neuro_flag != "") & (tot >= 1)
    core = allocate(rng, tot - neuro, spec.caps, item_weights(spec, len(rows), rng),
                    decay=spec.decay)
    vals = {c: core[:, i].astype(float) for i, c in enumerate(spec.items)}
    for c in cat.RBDSQ_NEURO:
        vals[c] = (neuro & (neuro_flag == c)).astype(float)
    blank_one_item(vals, list(spec.items), rows["_blank"].to_numpy(), rng)
    return {spec.key: table_rows(rows, spec.page, vals, P)}


def draw_scopa(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
               rng: np.random.Generator) -> Tables:
    """SCOPA-AUT: 21 core items + 2 sex-specific items (22-23 men, 24-25 women); code 9 for a
    catheter (scored 3) and for not applicable (scored 0)."""
    rows, tot = _rows_and_totals(spec, P, bl, flags, rng)
    male = P["male"].to_numpy()[rows["_pidx"].to_numpy()].astype(bool)
    caps = np.full((len(rows), 25), spec.caps)
    caps[male, 23:25] = 0
    caps[~male, 21:23] = 0
    w = item_weights(spec, len(rows), rng)
    sc = allocate(rng, tot, caps, w, decay=spec.decay).astype(float)
    sc[male, 23:25] = np.nan
    sc[~male, 21:23] = np.nan
    vals = {c: sc[:, i] for i, c in enumerate(spec.items)}
    for c in SCOPA_URINARY:  # 9 = uses a catheter, scored as 3
        hit = (vals[c] == 3) & (rng.random(len(rows)) < 0.2)
        vals[c] = np.where(hit, 9.0, vals[c])
    for c in spec.items[21:]:  # 9 = not applicable / not sexually active, scored as 0
        hit = (vals[c] == 0) & (rng.random(len(rows)) < 0.3)
        vals[c] = np.where(hit, 9.0, vals[c])
    blank_one_item(vals, list(spec.items[:21]), rows["_blank"].to_numpy(), rng)
    return {spec.key: table_rows(rows, spec.page, vals, P)}


def draw_hvlt(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
              rng: np.random.Generator) -> Tables:
    """HVLT-R: three learning trials of 12 words, delayed recall, recognition, false positives."""
    rows, tot = _rows_and_totals(spec, P, bl, flags, rng)
    words = allocate(rng, tot, spec.caps, item_weights(spec, len(rows), rng), decay=spec.decay)
    vals = {c: words[:, 12 * t:12 * (t + 1)].sum(axis=1).astype(float)
            for t, c in enumerate(spec.items)}
    t3 = vals["HVLTRT3"]
    vals["HVLTRDLY"] = np.clip(np.round(0.85 * t3 + rng.normal(0, 1.5, len(rows))), 0, 12)
    vals["HVLTREC"] = np.clip(np.round(11.2 - np.abs(rng.normal(0, 1.0, len(rows)))), 0, 12)
    vals["HVLTFPRL"] = np.minimum(rng.poisson(0.3, len(rows)), 6).astype(float)
    vals["HVLTFPUN"] = np.minimum(rng.poisson(0.4, len(rows)), 6).astype(float)
    blank_one_item(vals, list(spec.items), rows["_blank"].to_numpy(), rng)
    return {spec.key: table_rows(rows, spec.page, vals, P)}


def draw_fluency(spec: Instrument, P: pd.DataFrame, z: dict, bl: dict, flags: dict,
                 rng: np.random.Generator) -> Tables:
    """Semantic fluency: animals, vegetables, fruit, each from the latent (no shipped total)."""
    rows = visit_rows(P, spec, flags[spec.key])
    pidx = rows["_pidx"].to_numpy()
    zf = z[spec.key][pidx]
    role = rows["_role"].to_numpy()
    zf = np.where(role == "base", zf, 0.85 * zf + 0.53 * rng.standard_normal(len(rows)))
    rcoh = P["cohort"].to_numpy()[pidx]
    vals = {}
    for j, c in enumerate(spec.items):
        mean = np.array([FLUENCY_MEANS[x][j] for x in rcoh])
        e = 0.8 * zf + 0.6 * rng.standard_normal(len(rows))
        vals[c] = np.clip(np.round(mean + FLUENCY_SDS[j] * e), 0, 60)
    blank_one_item(vals, list(spec.items), rows["_blank"].to_numpy(), rng)
    return {spec.key: table_rows(rows, spec.page, vals, P)}


OWN_DRAWERS: dict[str, Callable[..., Tables]] = {
    "updrs1": draw_updrs1, "updrs3": draw_updrs3, "rbdsq": draw_rbdsq, "scopa": draw_scopa,
    "hvlt": draw_hvlt, "fluency": draw_fluency,
}
"""Instruments not drawn by `draw_from_spec`."""


def draw_clinical_tables(P: pd.DataFrame, z: dict, bl: dict, flags: dict,
                         rng: np.random.Generator) -> Tables:
    """Every clinical table, instruments in the order of `INSTRUMENTS`."""
    tables: Tables = {}
    for key, spec in INSTRUMENTS.items():
        tables.update(OWN_DRAWERS.get(key, draw_from_spec)(spec, P, z, bl, flags, rng))
    return tables
