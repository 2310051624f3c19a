"""Write a simulated cohort as a folder that looks like a real PPMI download.

`write_download(cfg, out)` draws the cohort (`safn_core.synth.simulation`), renders its files
(`safn_core.synth.download_files`, which describes the layout and conventions) and writes them
to a new folder, atomically; with ``cfg.per_site`` one download per site, each with only that
site's participants. It returns a summary of the cohort and the files.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np

from safn_core.config import SynthConfig
from safn_core.errors import DataError
from safn_core.synth.download_files import BASE_DATE, DownloadFile, date_suffix, render_files
from safn_core.synth.population import COHORTS
from safn_core.synth.simulation import Simulation, simulate


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file of that name exists; the synthetic download needs a new "
                        "or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not empty; nothing was written. Choose a "
                        "new folder or remove this one yourself")


def _partial_dir(out: Path) -> Path:
    """A new hidden sibling folder to write into (created with the user's umask)."""
    for i in range(1000):
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{i}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise DataError(f"{out.parent}: cannot create a temporary folder to write the download in")


def _summary(sim: Simulation, files: list[DownloadFile], per_site: bool) -> dict:
    P, sites, cfg = sim.participants, sim.sites, sim.cfg
    coh = P["cohort"]
    names = sites["site_name"].to_numpy()[P["site_idx"].to_numpy()]
    pdhc = coh.isin(["PD", "HC"])
    site_info = {}
    for s in sites.itertuples(index=False):
        m = names == s.site_name
        site_info[s.site_name] = {
            "CNO": int(s.CNO), "vendor": str(s.vendor), "field_T": float(s.field_T),
            "participants": int(m.sum()),
            **{c: int((m & (coh == c)).sum()) for c in COHORTS},
            "complete_PD": int((m & P["complete"] & (coh == "PD")).sum()),
            "complete_HC": int((m & P["complete"] & (coh == "HC")).sum()),
            "without_mri": int((m & pdhc & ~P["has_mri"]).sum()),
            "Prodromal_with_mri": int((m & P["has_mri"] & (coh == "Prodromal")).sum()),
        }
    rels = [f.rel for f in files]
    if per_site:
        rels = [f"{s}/{r}" for s in sites["site_name"] for r in rels]
    return {
        "seed": int(cfg.seed), "naming": cfg.naming,
        "download_date": date_suffix(BASE_DATE + dt.timedelta(days=sim.download_day)),
        "participants": {c: int((coh == c).sum()) for c in COHORTS},
        "complete": {c: int((P["complete"] & (coh == c)).sum()) for c in ("PD", "HC")},
        "n_complete": int(P["complete"].sum()),
        "without_mri": {c: int((~P["has_mri"] & (coh == c)).sum()) for c in ("PD", "HC")},
        # prodromal participants with MRI: the hc_prodromal_pd target's third class
        "Prodromal_with_mri": int((P["has_mri"] & (coh == "Prodromal")).sum()),
        "per_site": {k: v["participants"] for k, v in site_info.items()},
        "complete_per_site": {k: v["complete_PD"] + v["complete_HC"]
                              for k, v in site_info.items()},
        "sites": site_info,
        "per_site_folders": list(sites["site_name"]) if per_site else [],
        "n_files": len(rels),
        "files": rels,
    }


def write_download(cfg: SynthConfig, out: Path) -> dict:
    """Write the synthetic PPMI-style download ``cfg`` describes to the folder ``out``.

    ``out`` must not exist or be an empty folder (`DataError` otherwise; nothing is overwritten
    and an existing folder is left untouched). With ``cfg.per_site`` one download per site is
    written to ``out/<site_name>/`` (``site_<CNO>``), each holding only that site's participants,
    in the same format. The folder appears complete or not at all (written to a temporary sibling
    folder, then renamed). Returns a summary: participants per cohort, complete PD/HC, participants
    per site, files written (relative to ``out``).
    """
    out = Path(out)
    _check_target(out)
    sim = simulate(cfg)
    files = render_files(sim)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_dir(out)
    try:
        targets: list[tuple[Path, np.ndarray | None]] = []
        if cfg.per_site:
            names = sim.sites["site_name"].to_numpy()[sim.participants["site_idx"].to_numpy()]
            for site in sim.sites["site_name"]:
                ids = sim.participants["PATNO"].to_numpy()[names == site]
                targets.append((tmp / site, ids))
        else:
            targets.append((tmp, None))
        for root, ids in targets:
            for f in files:
                keep = None if ids is None else np.isin(f.patno, ids)
                path = root / f.rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f.payload(keep))
        _check_target(out)  # nothing appeared meanwhile
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(sim, files, cfg.per_site)
