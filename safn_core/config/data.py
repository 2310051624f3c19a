"""Where a cohort comes from: the data section and the built-in synthetic cohort (synth)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from safn_core.config.base import Section


class SynthConfig(Section):
    """The built-in synthetic PPMI-style cohort (`safn-synth`).

    ``n_pd`` and ``n_hc`` count participants with all four modalities; the generator adds
    participants without MRI and SWEDD/prodromal participants around them, as a real download has.

    Severity targets (``data.target``): the defaults are PPMI's original de novo cohort, with few
    prodromal participants (65, ≈65 % with MRI). For ``hc_prodromal_pd`` use
    ``synth.n_prodromal: 300`` (≈ a PPMI 2.0-like share of prodromal enrolment; with the default
    5 sites and seed 0 that gives 195 prodromal participants with every modality, 18-83 per
    site). ``hy_stage`` needs no change: PD's H&Y is drawn with PPMI's baseline shares (stage 1
    ≈44 %, 2 ≈55 %, 3 <1 %, `safn_core.synth.instruments.HOEHN_YAHR`); stage 3 joins class
    "H&Y >=2". The defaults stay as they are so that every pd_vs_hc figure stays reproducible.
    """

    seed: int = 0
    n_pd: int = Field(570, ge=2)
    n_hc: int = Field(133, ge=2)
    n_without_mri: int = Field(297, ge=0, description="PD/HC participants with no baseline MRI")
    n_swedd: int = Field(64, ge=0)
    n_prodromal: int = Field(65, ge=0)
    n_sites: int = Field(5, ge=1, le=200)
    site_size_alpha: float = Field(2.0, gt=0, description="Dirichlet concentration of site sizes")
    min_site_size: int = Field(40, ge=1, description="floor on complete participants per site")
    site_ratio_spread: float = Field(0.35, ge=0, description="SD of the site's PD/HC log-odds shift")
    scanner_effects: bool = True
    naming: Literal["2023", "legacy"] = "2023"
    per_site: bool = Field(False, description="write one download per site instead of one")


class DataConfig(Section):
    """Where a cohort comes from and how it is read."""

    source: Literal["synthetic", "ppmi", "table"] = "synthetic"
    path: Path | None = Field(None, description="PPMI download folder, or the CSV/Parquet table")
    mapping: Path | None = Field(None, description="YAML column mapping for source: table")
    target: Literal["pd_vs_hc", "hc_prodromal_pd", "hy_stage"] = Field(
        "pd_vs_hc", description="what the model predicts (safn_core/targets.py): pd_vs_hc, "
                                "hc_prodromal_pd (3 ordered classes) or hy_stage (HC, H&Y 1, "
                                "H&Y >= 2); a table's mapping declares its own label instead")
    exclude_motor: bool = Field(False, description="drop MDS-UPDRS I-III totals and H&Y")
    require_all_modalities: bool = Field(
        True, description="keep only participants with every modality (the paper's cohort)")
    normalise_volumes_by_etiv: bool = False
    min_cell: int = Field(5, ge=1, description="smallest group a statistic may describe")

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source in ("ppmi", "table") and self.path is None:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.source == "table" and self.mapping is None:
            raise ValueError("data.mapping is required when data.source is 'table'")
        if self.source == "table" and self.target != "pd_vs_hc":
            raise ValueError(f"data.target {self.target!r} is a PPMI target; a table's mapping "
                             "declares its own label (label.values, label.ordered): remove "
                             "data.target")
        return self
