"""Tiny hand-built PPMI downloads for the loader tests.

`build_download` writes a complete download (every catalog table) for a handful of participants
with simple, hand-checkable values (see `EXPECTED`); a test then overwrites or removes single tables
with `Download.write` / `Download.remove` to create the quirk it checks.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from safn_core.data.ppmi_catalog import (
    BENTON_ITEMS, DK_REGIONS, ESS_ITEMS, ETIV, FLUENCY_ITEMS, GDS_ITEMS, HVLT_TRIALS, NP1_ITEMS,
    NP1P_ITEMS, NP2_ITEMS, NP3_ITEMS, RBDSQ_CORE, RBDSQ_NEURO, SCOPA_ITEMS, STAI_ITEMS, TABLES,
    UPSIT_BOOKLETS, VOLUME_FEATURES,
)

DATE = "05Jan2024"
COHORT_CODE = {"PD": 1, "HC": 2, "SWEDD": 3, "Prodromal": 4}
LEGACY_CAT = {"PD": "PD", "HC": "HC", "SWEDD": "SWEDD", "Prodromal": "PRODROMA"}


@dataclass
class Person:
    patno: int
    cohort: str = "PD"
    site: str = "10"
    mri: bool = True


PEOPLE = (Person(1001, "PD", "10"), Person(1002, "HC", "10"), Person(1003, "PD", "20"),
          Person(1004, "HC", "20"))

# Values every default participant gets (PD / HC where they differ), checked by hand:
EXPECTED = {
    "NP1RTOT": 6.0, "NP1PTOT": 7.0, "NP2PTOT": 13.0, "NP3TOT": (33.0, 0.0), "NHY": (2.0, 0.0),
    "MCATOT": (27.0, 29.0), "UPSIT": (22.0, 34.0), "ESS": 8.0, "RBDSQ": 3.0,
    "SCOPA_AUT": 23.0,  # items 1-23 = 1, items 24-25 blank
    "GDS": 5.0,  # every answer 0: the five positive items score 1 each
    "STAI": 99.0,  # every answer 2: 19 reversed items score 3, 21 others score 2
    "HVLT_IMMEDIATE": 27.0, "LNS": 10.0, "SEMANTIC_FLUENCY": 50.0, "SDMT": 45.0, "BENTON": 25.0,
    "AGE": 63.5, "SEX": 1.0, "EDUCYRS": 16.0, "HANDED_LEFT": 0.0, "HANDED_MIXED": 0.0,
}
THICKNESS = 2.5
VOLUME = 1000.0
ETIV_VALUE = 1.5e6


def _visit(p: Person, event: str = "BL", **values) -> dict:
    return {"REC_ID": f"R{p.patno}{event}", "PATNO": p.patno, "EVENT_ID": event,
            "PAG_NAME": "", "INFODT": "02/2012", **values, "ORIG_ENTRY": "02/2012",
            "LAST_UPDATE": "2020-06-01 10:00:00.0"}


def default_rows(key: str, people, legacy: bool = False) -> list[dict]:
    """The rows of one table for ``people`` (a default participant per `EXPECTED`)."""
    rows = []
    for p in people:
        pd_ = p.cohort == "PD"
        if key == "status":
            if legacy:
                rows.append({"PATNO": p.patno, "ENROLL_CAT": LEGACY_CAT[p.cohort],
                             "ENROLL_DATE": "02/2012", "ENROLL_STATUS": "Enrolled"})
            else:
                rows.append({"PATNO": p.patno, "COHORT": COHORT_CODE[p.cohort],
                             "COHORT_DEFINITION": p.cohort, "ENROLL_DATE": "02/2012",
                             "ENROLL_AGE": 63.4, "ENROLL_STATUS": "Enrolled"})
        elif key == "center":
            rows.append({"PATNO": p.patno, "CNO": p.site})
        elif key == "demographics":
            base = {"REC_ID": f"D{p.patno}", "PATNO": p.patno, "EVENT_ID": "SC",
                    "BIRTHDT": "08/1948", "HANDED": 1}
            rows.append({**base, "GENDER": 2} if legacy else {**base, "SEX": 1})
        elif key == "age":
            if not legacy:
                rows.append({"PATNO": p.patno, "EVENT_ID": "BL", "AGE_AT_VISIT": 63.5})
                rows.append({"PATNO": p.patno, "EVENT_ID": "V04", "AGE_AT_VISIT": 64.5})
        elif key == "socio":
            rows.append({"REC_ID": f"S{p.patno}", "PATNO": p.patno, "EVENT_ID": "SC",
                         "EDUCYRS": 16})
        elif key == "updrs1":
            rows.append(_visit(p, **{i: 1 for i in NP1_ITEMS}, NP1RTOT=6))
        elif key == "updrs1pq":
            rows.append(_visit(p, **{i: 1 for i in NP1P_ITEMS}, NP1PTOT=7))
        elif key == "updrs2":
            rows.append(_visit(p, **{i: 1 for i in NP2_ITEMS}, NP2PTOT=13))
        elif key == "updrs3":
            items = {i: (1 if pd_ else 0) for i in NP3_ITEMS}
            if legacy:
                items["PN3RIGRL"] = items.pop("NP3RIGRL")
            row = _visit(p, PDSTATE="", **items, NP3TOT=33 if pd_ else 0, NHY=2 if pd_ else 0)
            row["PAG_NAME"] = "NUPDRS3"
            rows.append(row)
        elif key == "moca":
            rows.append(_visit(p, "SC", MCATOT=27 if pd_ else 29))
        elif key == "upsit":
            if legacy:
                rows.append(_visit(p, **dict(zip(UPSIT_BOOKLETS, (5, 5, 6, 6) if pd_ else
                                                 (8, 8, 9, 9)))))
            else:
                rows.append(_visit(p, TOTAL_CORRECT=22 if pd_ else 34))
        elif key == "ess":
            rows.append(_visit(p, **{i: 1 for i in ESS_ITEMS}))
        elif key == "rbdsq":
            core = {i: int(k < 3) for k, i in enumerate(RBDSQ_CORE)}
            rows.append(_visit(p, **core, **{i: 0 for i in RBDSQ_NEURO}))
        elif key == "scopa":
            rows.append(_visit(p, **{i: (1 if k < 23 else "") for k, i in enumerate(SCOPA_ITEMS)}))
        elif key == "gds":
            rows.append(_visit(p, **{i: 0 for i in GDS_ITEMS}))
        elif key == "stai":
            rows.append(_visit(p, **{i: 2 for i in STAI_ITEMS}))
        elif key == "hvlt":
            rows.append(_visit(p, **dict(zip(HVLT_TRIALS, (8, 9, 10)))))
        elif key == "lns":
            rows.append(_visit(p, LNS_TOTRAW=10))
        elif key == "fluency":
            rows.append(_visit(p, **dict(zip(FLUENCY_ITEMS, (20, 15, 15)))))
        elif key == "sdmt":
            rows.append(_visit(p, SDMTOTAL=45))
        elif key == "benton":
            rows.append(_visit(p, **{i: int(k < 25) for k, i in enumerate(BENTON_ITEMS)}))
        elif key == "cth" and p.mri:
            row = {"PATNO": p.patno, "EVENT_ID": "BL"}
            row.update({f"{h}_{r}": THICKNESS for h in ("lh", "rh") for r in DK_REGIONS})
            row.update({"lh_MeanThickness": THICKNESS, "rh_MeanThickness": THICKNESS})
            rows.append(row)
        elif key == "aseg" and p.mri:
            row = {"PATNO": p.patno, "EVENT_ID": "BL"}
            row.update({f: VOLUME for f in VOLUME_FEATURES if f != ETIV})
            row.update({"CSF": 900.0, ETIV: ETIV_VALUE})
            rows.append(row)
    return rows


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    if columns is None:
        columns = list(dict.fromkeys(c for r in rows for c in r))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c, "") for c in columns])
    return buf.getvalue()


class Download:
    """A download folder being written; `paths` maps table key → the file written for it."""

    def __init__(self, root: Path, *, legacy: bool = False, flat: bool = False,
                 date: str = DATE, bom: bool = False):
        self.root = Path(root)
        self.legacy, self.flat, self.date, self.bom = legacy, flat, date, bom
        self.paths: dict[str, Path] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str, *, date: str | None = None, name: str | None = None,
                 folder: str | None = None) -> Path:
        spec = TABLES[key]
        name = name or (spec.legacy_name if self.legacy else spec.write_name)
        date = self.date if date is None else date
        stem = f"{name}_{date}" if date else name
        folder = "" if self.flat else (spec.folder if folder is None else folder)
        return self.root / folder / f"{stem}.csv"

    def write(self, key: str, rows: list[dict], *, columns: list[str] | None = None,
              bom: bool | None = None, **where) -> Path:
        """Write (or overwrite) one table; ``where`` = date / name / folder of `path_for`."""
        path = self.path_for(key, **where)
        if not where and key in self.paths:
            path = self.paths[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        text = csv_text(rows, columns)
        path.write_bytes((b"\xef\xbb\xbf" if (self.bom if bom is None else bom) else b"")
                         + text.encode("utf-8"))
        if not where:
            self.paths[key] = path
        return path

    def remove(self, key: str) -> None:
        self.paths.pop(key).unlink()


def build_download(root: Path, people=PEOPLE, *, legacy: bool = False, flat: bool = False,
                   bom: bool = False, skip: tuple[str, ...] = (), date: str = DATE) -> Download:
    """A complete tiny download of ``people``: every catalog table but those in ``skip``."""
    d = Download(root, legacy=legacy, flat=flat, bom=bom, date=date)
    for key in TABLES:
        if key in skip or (legacy and key == "age"):
            continue
        rows = default_rows(key, people, legacy)
        if rows:
            d.write(key, rows)
    return d
