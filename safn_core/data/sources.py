"""One entry point for every data source: `load_cohort(config)`.

``data.source`` selects a PPMI download (``ppmi``), a generic table with its mapping (``table``)
or the built-in synthetic cohort (``synthetic``), which is written as a PPMI-style download to a
temporary folder and read back through the real PPMI loader: there is no special path for it.
``data.target`` chooses the PPMI target (`safn_core.targets`); a table declares its own label in
its mapping.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safn_core.config import DataConfig, SynthConfig
from safn_core.data.cohort import Cohort, drop_incomplete
from safn_core.data.ppmi_catalog import PLAUSIBLE_RANGES, VOLUME_REGIONS
from safn_core.errors import DataError


def load_ppmi_folder(path: Path, data: DataConfig) -> Cohort:
    from safn_core.data.ppmi_loader import load_ppmi

    cohort = load_ppmi(path, exclude_motor=data.exclude_motor,
                       require_all_modalities=data.require_all_modalities,
                       normalise_volumes_by_etiv=data.normalise_volumes_by_etiv,
                       target=data.target)
    if not cohort.plausible_ranges:
        ranges = dict(PLAUSIBLE_RANGES)
        if data.normalise_volumes_by_etiv:  # regional volumes become fractions of eTIV
            for name in VOLUME_REGIONS:
                ranges.pop(name, None)
        cohort.plausible_ranges = {k: v for k, v in ranges.items() if k in cohort.features}
    return cohort


def load_cohort(data: DataConfig, synth: SynthConfig | None = None) -> Cohort:
    """Load the cohort ``data`` describes (the synthetic one is generated on the fly)."""
    if data.source == "ppmi":
        path = Path(data.path)
        if not path.is_dir():
            raise DataError(f"{path}: PPMI download folder not found (data.path); point it at "
                            "the folder you downloaded from LONI")
        return load_ppmi_folder(path, data)
    if data.source == "table":
        from safn_core.data.table_loader import load_table

        cohort = load_table(Path(data.path), Path(data.mapping))
        return drop_incomplete(cohort) if data.require_all_modalities else cohort
    from safn_core.synth import write_download

    synth = synth or SynthConfig()
    if synth.per_site:
        synth = synth.model_copy(update={"per_site": False})
    with tempfile.TemporaryDirectory(prefix="safn-synth-") as tmp:
        folder = Path(tmp) / "download"
        write_download(synth, folder)
        cohort = load_ppmi_folder(folder, data)
    cohort.report.source = f"synthetic (seed {synth.seed})"
    return cohort


def load_path(path: Path, data: DataConfig) -> Cohort:
    """Load whatever ``path`` is: a PPMI folder, or a table (then ``data.mapping`` is needed)."""
    path = Path(path)
    if path.is_dir():
        return load_ppmi_folder(path, data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give a PPMI download folder or a "
                        "CSV/Parquet table with --mapping")
    if data.mapping is None:
        raise DataError(f"{path}: a table needs its column mapping; pass --mapping MAPPING.yaml "
                        "(see docs/data.md)")
    from safn_core.data.table_loader import load_table

    cohort = load_table(path, Path(data.mapping))
    return drop_incomplete(cohort) if data.require_all_modalities else cohort
