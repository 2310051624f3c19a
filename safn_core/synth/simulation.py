"""Draw one synthetic cohort: the public entry points `simulate` and `generate_truth`.

`simulate(cfg)` puts the parts together, each with its own random stream derived from
``cfg.seed``: sites and participants (`population`), latent severity and baseline totals
(`severity`), visit flags (`visits`) and every clinical table (`scales`, one spec per instrument
in `instruments`), baseline MRI values (`mri`) and the FreeSurfer rows (`freesurfer`), and the
ground truth (`truth`). `safn_core.synth.writer` turns the result into CSV files.

Only `numpy.random.Generator` streams derived from ``cfg.seed`` are used (model constants come
from a fixed stream, `fixed_constants`); dates are derived from the seed, never from today.
Facts and target statistics: ``docs/ppmi-data.md`` §3-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from safn_core.config import SynthConfig
from safn_core.synth.freesurfer import freesurfer_tables
from safn_core.synth.mri import draw_mri_values
from safn_core.synth.population import draw_demographics, draw_participants, draw_sites
from safn_core.synth.scales import draw_clinical_tables
from safn_core.synth.severity import baseline_totals, draw_latents
from safn_core.synth.truth import ground_truth
from safn_core.synth.visits import visit_flags


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


def simulate(cfg: SynthConfig) -> Simulation:
    """Draw the whole synthetic cohort for ``cfg`` (deterministic for ``cfg.seed``)."""
    r_site, r_people, r_demo, r_lat, r_flags, r_clin, r_mri, r_rows, r_dates = _rngs(cfg.seed, 9)
    sites = draw_sites(cfg, r_site)
    P = draw_participants(cfg, sites, r_people)
    draw_demographics(P, r_demo)
    z = draw_latents(P, r_lat)
    bl = baseline_totals(P, z)
    P["NHY_stage"] = bl["nhy"]
    flags = visit_flags(P, r_flags)
    tables = draw_clinical_tables(P, z, bl, flags, r_clin)
    meta, thick, vol = draw_mri_values(cfg, P, sites, bl["nhy"], r_mri)
    tables["cth"], tables["aseg"] = freesurfer_tables(P, meta, thick, vol, r_rows)
    # download date: a day in 2023-2024 derived from the seed; an older copy some months before
    download_day = int(r_dates.integers(0, 700))
    old_days = int(r_dates.integers(60, 400))
    truth = ground_truth(P, sites, tables, cfg.naming)
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
