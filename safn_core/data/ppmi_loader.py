"""Load a real PPMI download folder into a `Cohort`: one row per PD/HC participant at baseline.

The folder is the user's own PPMI download (tables as ``<Table>_<DDMonYYYY>.csv``, any folder
layout, older or 2023+ names; see ``docs/ppmi-data.md``). Every table name, column spelling,
item list and scoring rule comes from `ppmi_catalog`; finding and reading files is `ppmi_files`.
The steps: the tables as read for this load and its notes (`ppmi_download`), the baseline row of
each table (`ppmi_visits`), who is in the cohort and at which site (`ppmi_participants`), the
features of each modality (`ppmi_features`); this module puts them together, guards against
leakage and writes the load report.

Rules (each decision is also written to the `LoadReport`):

* **Participants and label.** ``Participant_Status.COHORT`` (1 PD, 2 HC, 3 SWEDD, 4 Prodromal)
  or the older ``Patient_Status.ENROLL_CAT`` strings. The target (``data.target``,
  `safn_core.targets`) keeps its cohorts and labels them 0..K-1: pd_vs_hc HC 0, PD 1;
  hc_prodromal_pd HC 0, Prodromal 1, PD 2; hy_stage HC 0, PD by baseline ``NHY`` (1 → 1, ≥ 2 → 2;
  PD with H&Y missing, 101 or 0 excluded and counted). Every other cohort (and a missing/unknown
  one) is excluded and counted as ``"cohort <name>"``. Participants whose ``ENROLL_STATUS`` says
  screen-failed, declined or excluded are excluded too (``"enrolment status <value>"``). A
  feature that defines the target (hy_stage: ``NHY``) is removed from the inputs, and the notes
  say so.
* **Baseline row, per table.** The BL row, else the SC row (MoCA: SC, else BL). A table without
  ``EVENT_ID`` is taken as one row per participant. Tables with no visit (demographics,
  socio-economics, centre list) prefer BL, then SC, then any row.
* **Duplicates.** Several rows of one participant at the chosen visit: the latest ``LAST_UPDATE``
  (``MM/YYYY`` or a timestamp; unparsable = oldest), then the highest ``REC_ID``, then the last row
  of the file — deterministic, and noted. MDS-UPDRS III is chosen first by state: never an ON row
  (``PDSTATE`` ON or ``PAG_NAME`` NUPDR3ON) if another exists; blank ``PDSTATE`` (untreated) before
  OFF; then ``PAG_NAME`` by `UPDRS3_PAG_PREFERENCE`.
* **101 ("unable to rate")** in MDS-UPDRS III items and ``NHY`` is missing. ``NP3TOT``: the shipped
  total is kept when no item of the row is 101; when any item is 101 the total is recomputed from
  the items, which makes it missing (a partial sum is not a Part III total). Without a shipped
  total it is the item sum (missing when any item is missing).
* **Numbers.** Everything is read as text; a column is converted to numbers where most of its values
  are numbers, and the other values (junk) become missing, counted per file and column in the notes.
* **Age.** ``Age_at_visit.AGE_AT_VISIT`` at BL/SC, else ``ENROLL_AGE``, else ``ENROLL_DATE`` −
  ``BIRTHDT`` (``MM/YYYY``; a bare year counts as mid-year). **Sex** 1 = male from ``SEX`` (0 F,
  1 M) or the older ``GENDER`` (0/1 female, 2 male). **Handedness** 1 R, 2 L, 3 mixed as the
  one-hot ``HANDED_LEFT``/``HANDED_MIXED`` (right = 0, 0).
* **Modalities.** A participant has a modality when any of its features is non-missing. With
  ``require_all_modalities`` a participant missing one is dropped, counted under the first missing
  modality (``"missing modality thickness"``), so that the per-reason counts add up; without it, a
  participant with no feature at all is still dropped (``"no feature data"``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from safn_core.data.cohort import ID, LABEL, SITE, Cohort, Modality
from safn_core.data.ppmi_catalog import TABLES, is_forbidden_feature, ppmi_modalities
from safn_core.data.ppmi_download import PATNO, PpmiDownload, plural
from safn_core.data.ppmi_features import clinical, modality_features, tables_needed
from safn_core.data.ppmi_participants import hy_labels, read_status, sites, target_participants
from safn_core.errors import DataError
from safn_core.targets import PD_VS_HC, Target, check_inputs, target_for


def load_ppmi(path, *, exclude_motor: bool = False, require_all_modalities: bool = True,
              normalise_volumes_by_etiv: bool = False, target: Target | str = PD_VS_HC) -> Cohort:
    """Read a PPMI download folder into a baseline `Cohort` of ``target`` (see the module doc).

    ``exclude_motor`` drops MDS-UPDRS I-III totals and H&Y; ``require_all_modalities`` keeps only
    participants with every modality; ``normalise_volumes_by_etiv`` divides the aseg volumes (not
    eTIV itself) by eTIV; ``target`` (a `Target` or a built-in name: pd_vs_hc, hc_prodromal_pd,
    hy_stage) chooses the cohorts and the label. Raises `DataError` for a missing folder, missing
    tables or unreadable files.
    """
    target = target_for(target) if isinstance(target, str) else target
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"PPMI folder {root} does not exist; set data.path to the folder of your "
                        "PPMI download")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; data.path must be the folder that holds "
                        "the PPMI CSV tables")
    dl = PpmiDownload(root)
    return _load(dl, target_modalities(dl, ppmi_modalities(exclude_motor), target),
                 require_all_modalities, normalise_volumes_by_etiv, target)


def target_modalities(dl: PpmiDownload, modalities, target: Target) -> tuple[Modality, ...]:
    """``modalities`` without the features that define ``target`` (stated in the notes)."""
    if not target.defined_by:
        return tuple(modalities)
    dl.note(f"{', '.join(target.defined_by)} define{'s' if len(target.defined_by) == 1 else ''} "
            f"the target {target.name}: removed from the inputs")
    out = tuple(Modality(m.name, tuple(f for f in m.features if f not in target.defined_by),
                         m.side) for m in modalities)
    return tuple(m for m in out if m.features)


def _check_tables(dl: PpmiDownload, modalities) -> None:
    needed = tables_needed(modalities)
    if not needed & set(dl.found):
        names = sorted({n for k in needed for n in TABLES[k].names})
        raise DataError(f"no feature table found under {dl.root} (searched all subfolders "
                        f"for <Table>_<DDMonYYYY>.csv named {', '.join(names)}); point "
                        "data.path at the complete PPMI download folder")


def _load(dl: PpmiDownload, modalities, require_all: bool, norm_etiv: bool,
          target: Target = PD_VS_HC) -> Cohort:
    report = dl.report
    status = read_status(dl)
    _check_tables(dl, modalities)

    report.cohorts = {str(k): int(v) for k, v in status["cohort"].value_counts().items()}
    keep, ids, excluded = target_participants(status, target)
    if "NHY" in target.defined_by:  # hy_stage: PD labelled by the baseline H&Y (read, not input)
        keep, ids = hy_labels(dl, keep, ids, excluded, clinical(dl, ids, ("NHY",))["NHY"])
    who = "/".join(reversed(target.cohorts))  # PD/HC, PD/Prodromal/HC

    parts = [modality_features(dl, m, ids, status, norm_etiv=norm_etiv) for m in modalities]
    features = pd.concat(parts, axis=1)
    names = [f for m in modalities for f in m.features]
    check_inputs(target, names, "the PPMI feature list")
    bad = [f for f in names if is_forbidden_feature(f)]
    if bad or list(features.columns) != names:
        raise RuntimeError(f"bug in safn: leakage guard — feature list {bad or 'mismatch'}")
    features = features[names].astype("float64")

    present = pd.DataFrame({m.name: features[list(m.features)].notna().any(axis=1)
                            for m in modalities}, index=ids)
    missing_counts = {m: int((~present[m]).sum()) for m in present.columns}
    if any(missing_counts.values()):
        dl.note(f"{who} participants missing each modality: "
                + ", ".join(f"{m} {n}" for m, n in missing_counts.items()))
    none = ~present.any(axis=1)
    drop = none.copy()
    if none.any():
        excluded["no feature data"] = int(none.sum())
    if require_all:
        for m in present.columns:
            miss = ~present[m] & ~drop
            if miss.any():
                excluded[f"missing modality {m}"] = int(miss.sum())
            drop |= miss
    kept = ids[~drop.to_numpy()]

    table = pd.DataFrame(index=kept)
    table[SITE] = sites(dl, kept, status)
    table[LABEL] = keep["label"].reindex(kept).astype("int64")
    table = pd.concat([table, features.loc[kept]], axis=1)
    table.index.name = ID

    all_ids = set()
    for key in dl.read_keys():
        if key != "status":
            all_ids |= set(dl.raw(key)[PATNO].dropna())
    orphans = len(all_ids - set(status.index))
    if orphans:
        dl.note(f"{plural(orphans, 'participant')} in feature tables without a status row: "
                "ignored")

    report.excluded = excluded
    report.missing_rate = {f: float(table[f].isna().mean()) if len(table) else 1.0
                           for f in names}
    report.modality_present = {m: int(present.loc[kept, m].sum()) for m in present.columns}
    if len(table) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in excluded.items()) or "none"
        raise DataError(f"{dl.root}: no {' or '.join(reversed(target.cohorts))} participant "
                        f"left after exclusions "
                        f"({reasons}); check the download, or set "
                        "data.require_all_modalities: false")
    for lab in reversed(range(target.n_classes)):
        if not (table[LABEL] == lab).any():
            dl.note(f"no {target.classes[lab]} participant in the cohort")
    if target.defined_by:  # the defining table was read twice (label, features): notes once
        report.notes = list(dict.fromkeys(report.notes))
    return Cohort(table, modalities, report, label_names=target.classes, target=target)
