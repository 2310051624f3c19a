"""ComBat harmonisation: are the scanner effects gone, and is the disease signal kept?

Four measurements, each over seeds (default 0, 1, 2), mean ± SD:

1. **Site prediction** from the 90 imaging features (multinomial logistic regression, 5-fold
   stratified CV; the seed shuffles the folds) on the synthetic cohort of configs/simulation.yaml
   (5 sites with scanner effects): raw, and harmonised with ComBat fitted inside each training
   fold (`combat_pooled` on the fold's training rows; its test rows adjusted with their site's
   training-fold estimates). Chance = the largest site's share. Target: harmonised accuracy
   within 0.05 of chance.
2. **PD-vs-HC, centralised and federated**: complete `safn-sim` runs on the synthetic cohort
   restricted to imaging + demographics (benchmarks/cohorts.py), with and without
   ``harmonisation.method=combat``; the seed sets ``train.seed`` and ``federation.split_seed``.
   Federated = the federation's selected model; centralised = safn-sim's pooled comparator
   (trained on the union of the same training splits, harmonised with the same fit). ROC-AUC
   and balanced accuracy on the pooled test set. Target: no loss of ROC-AUC beyond its spread
   (mean with − mean without ≥ −SD of the runs without).
3. **Leave-one-site-out** (``simulation.loso=true``): each site held out of a federation of the
   others; under harmonisation the held-out site adjusts itself from its own participants with
   the federation's fit (no labels). Mean ROC-AUC and balanced accuracy over held-out sites.
4. **The label-imbalance effect**: the diagnosis is not a ComBat covariate (it would be needed
   at apply time), so where the share of PD differs between sites part of the disease effect
   looks like a site effect. Measured on synthetic cohorts without scanner effects (so that
   ComBat has nothing to remove) with the sites' PD/HC log-odds spread 0 (similar shares) and
   1.5 (very different): the mean over imaging features of |Cohen's d| (PD vs HC) after ComBat
   as a fraction of before (1.0: the disease effect fully kept).

    .venv/bin/python benchmarks/harmonisation.py                  # everything, 3 seeds
    .venv/bin/python benchmarks/harmonisation.py --parts site imbalance --seeds 0 1
    .venv/bin/python benchmarks/harmonisation.py --out table.md

``--out`` writes the tables and per-seed figures as JSON (``.json``) or markdown (``.md``).
Runs happen in a temporary folder, removed unless ``--keep``. A failed run is reported and left
out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = ROOT / "configs" / "simulation.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("site", "federated", "loso", "imbalance")
CHANCE_TARGET = 0.05


def mean_sd(values) -> dict:
    v = np.asarray([float(x) for x in values if x is not None and np.isfinite(x)])
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v)}


def fmt(s: dict) -> str:
    return "-" if not s["n"] else f"{s['mean']:.3f} ± {s['sd']:.3f}"


def _cohort(overrides: list[str]):
    from safn_core.config import load_config
    from safn_core.data.sources import load_cohort

    cfg = load_config(CONFIG, ["harmonisation.method=combat", *overrides])
    return cfg, load_cohort(cfg.data, cfg.synth)


# ------------------------------------------------------------------------- 1. site prediction


def site_prediction(seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from safn_core.data.cohort import SITE
    from safn_core.harmonisation import combat_pooled, harmonise_sites
    from safn_core.harmonisation.setup import combat_spec

    cfg, cohort = _cohort([])
    spec = combat_spec(cfg.harmonisation, cohort.modalities)
    table = cohort.table
    sites = table[SITE].astype(str).to_numpy()
    chance = float(pd.Series(sites).value_counts(normalize=True).max())
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    right = {"raw": 0, "harmonised": 0}
    for train, test in folds.split(table, sites):
        tr, te = table.iloc[train], table.iloc[test]
        fit, adjustments = combat_pooled(tr, spec, empirical_bayes=cfg.harmonisation.empirical_bayes,
                                         parametric=cfg.harmonisation.parametric,
                                         min_cell=cfg.data.min_cell)
        data = {"raw": (tr, te), "harmonised": (harmonise_sites(fit, adjustments, tr),
                                                 harmonise_sites(fit, adjustments, te))}
        for kind, (a, b) in data.items():
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
            clf.fit(a[list(spec.features)].to_numpy(), sites[train])
            right[kind] += int((clf.predict(b[list(spec.features)].to_numpy())
                                == sites[test]).sum())
    return {"seed": seed, "chance": chance, **{k: v / len(table) for k, v in right.items()}}


# ------------------------------------------------------------------------- 4. imbalance


def cohens_d(table: pd.DataFrame, features) -> float:
    from safn_core.data.cohort import LABEL

    pd_, hc = table[table[LABEL] == 1], table[table[LABEL] == 0]
    d = []
    for f in features:
        pooled = np.sqrt((pd_[f].var(ddof=1) + hc[f].var(ddof=1)) / 2)
        d.append(abs(pd_[f].mean() - hc[f].mean()) / pooled)
    return float(np.mean(d))


def imbalance(seed: int) -> dict:
    from safn_core.harmonisation import combat_pooled, harmonise_sites
    from safn_core.harmonisation.setup import combat_spec

    out = {"seed": seed}
    for spread in (0.0, 1.5):
        cfg, cohort = _cohort([f"synth.seed={seed}", "synth.scanner_effects=false",
                               f"synth.site_ratio_spread={spread}"])
        spec = combat_spec(cfg.harmonisation, cohort.modalities)
        fit, adjustments = combat_pooled(cohort.table, spec, min_cell=cfg.data.min_cell)
        after = harmonise_sites(fit, adjustments, cohort.table)
        shares = cohort.table.groupby("site")["label"].mean()
        out[f"spread_{spread}"] = {
            "pd_share_range": [float(shares.min()), float(shares.max())],
            "d_before": cohens_d(cohort.table, spec.features),
            "d_after": cohens_d(after, spec.features)}
        out[f"spread_{spread}"]["kept"] = (out[f"spread_{spread}"]["d_after"]
                                           / out[f"spread_{spread}"]["d_before"])
    return out


# ------------------------------------------------------------------------- 2./3. safn-sim


def sim_run(seed: int, harmonised: bool, loso: bool, work: Path, data: list[str],
            user: list[str]) -> dict:
    name = f"{'loso' if loso else 'fed'}-{'combat' if harmonised else 'none'}-{seed}"
    run_work = work / name
    out = run_work / "run"
    sets = [*data, f"train.seed={seed}", f"federation.split_seed={seed}",
            f"simulation.site_state_dir={run_work / 'sites'}",
            f"simulation.compare={'false' if loso else 'true'}",
            f"simulation.loso={'true' if loso else 'false'}",
            f"harmonisation.method={'combat' if harmonised else 'none'}", *user]
    cmd = [str(BIN / "safn-sim"), "--config", str(CONFIG), "--out", str(out),
           *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not (out / "results.json").is_file():
        tail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())[-600:]
        return {"seed": seed, "failed": tail or f"exit status {proc.returncode}"}
    results = json.loads((out / "results.json").read_text())
    if loso:
        sites = results["loso"]["sites"]
        return {"seed": seed, "roc_auc": float(np.mean([s["roc_auc"] for s in sites])),
                "balanced_accuracy": float(np.mean([s["balanced_accuracy"] for s in sites])),
                "per_site": {s["held_out"]: s["roc_auc"] for s in sites}}
    rows = {r["kind"]: r for r in results["comparison"]["rows"]}
    return {"seed": seed, **{f"{k}_{m}": rows[k][m] for k in ("pooled", "federated")
                             for m in ("roc_auc", "balanced_accuracy")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="override for every safn-sim run")
    ap.add_argument("--out", type=Path, help="write the tables here: .json or .md")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safn-harmonisation-")).resolve()
    res: dict = {}
    lines: list[str] = []
    failed = False
    try:
        if "site" in args.parts:
            runs = [site_prediction(s) for s in args.seeds]
            res["site"] = runs
            raw, harm = mean_sd(r["raw"] for r in runs), mean_sd(r["harmonised"] for r in runs)
            chance = runs[0]["chance"]
            met = abs(harm["mean"] - chance) <= CHANCE_TARGET
            lines += ["Site prediction from the 90 imaging features (5-fold CV, logistic "
                      f"regression; chance = the largest site's share, {chance:.3f})", "",
                      "| features | accuracy |", "|---|---:|", f"| raw | {fmt(raw)} |",
                      f"| ComBat (fitted in each training fold) | {fmt(harm)} |", "",
                      f"- harmonised site prediction within {CHANCE_TARGET} of chance: "
                      f"{'MET' if met else '**MISSED**'} ({harm['mean']:.3f} vs {chance:.3f})",
                      ""]
            print("\n".join(lines[-9:]), flush=True)
        if {"federated", "loso"} & set(args.parts):
            from cohorts import export

            exp = export("synthetic:imaging_demographics", work / "cohort", CONFIG, [])
            data = ["data.source=table", f"data.path={exp['path']}",
                    f"data.mapping={exp['mapping']}"]
        if "federated" in args.parts:
            runs = {h: [sim_run(s, h, False, work, data, args.overrides) for s in args.seeds]
                    for h in (False, True)}
            res["federated"] = {str(h): v for h, v in runs.items()}
            failed |= any("failed" in r for v in runs.values() for r in v)
            ok = {h: [r for r in v if "failed" not in r] for h, v in runs.items()}
            lines += ["PD vs HC on imaging + demographics (synthetic, 5 natural sites; pooled "
                      "test set; majority-class baseline: ROC-AUC 0.500, balanced accuracy "
                      "0.500)", "",
                      "| model | harmonisation | ROC-AUC | balanced accuracy |",
                      "|---|---|---:|---:|"]
            for kind in ("pooled", "federated"):
                for h in (False, True):
                    lines.append(f"| {'centralised (pooled comparator)' if kind == 'pooled' else 'federated'} "
                                 f"| {'ComBat' if h else 'none'} | "
                                 f"{fmt(mean_sd(r[f'{kind}_roc_auc'] for r in ok[h]))} | "
                                 f"{fmt(mean_sd(r[f'{kind}_balanced_accuracy'] for r in ok[h]))} |")
            lines.append("")
            for kind in ("pooled", "federated"):
                without = mean_sd(r[f"{kind}_roc_auc"] for r in ok[False])
                with_ = mean_sd(r[f"{kind}_roc_auc"] for r in ok[True])
                met = with_["mean"] - without["mean"] >= -without["sd"]
                lines.append(f"- {kind}: no ROC-AUC loss beyond its spread: "
                             f"{'MET' if met else '**MISSED**'} ({with_['mean']:.3f} with, "
                             f"{without['mean']:.3f} ± {without['sd']:.3f} without)")
            lines.append("")
            print("\n".join(lines[-12:]), flush=True)
        if "loso" in args.parts:
            runs = {h: [sim_run(s, h, True, work, data, args.overrides) for s in args.seeds]
                    for h in (False, True)}
            res["loso"] = {str(h): v for h, v in runs.items()}
            failed |= any("failed" in r for v in runs.values() for r in v)
            ok = {h: [r for r in v if "failed" not in r] for h, v in runs.items()}
            lines += ["Leave-one-site-out (imaging + demographics; mean over held-out sites)",
                      "", "| harmonisation | ROC-AUC | balanced accuracy |", "|---|---:|---:|"]
            for h in (False, True):
                lines.append(f"| {'ComBat (held-out site adjusts itself)' if h else 'none'} | "
                             f"{fmt(mean_sd(r['roc_auc'] for r in ok[h]))} | "
                             f"{fmt(mean_sd(r['balanced_accuracy'] for r in ok[h]))} |")
            lines.append("")
            print("\n".join(lines[-6:]), flush=True)
        if "imbalance" in args.parts:
            runs = [imbalance(s) for s in args.seeds]
            res["imbalance"] = runs
            lines += ["The label-imbalance effect (no scanner effects: ComBat has nothing to "
                      "remove; mean |Cohen's d| PD vs HC over the imaging features)", "",
                      "| PD/HC log-odds spread across sites | PD share of sites | d before | "
                      "d after ComBat | kept |", "|---|---|---:|---:|---:|"]
            for spread in (0.0, 1.5):
                k = f"spread_{spread}"
                share = (f"{np.mean([r[k]['pd_share_range'][0] for r in runs]):.2f} – "
                         f"{np.mean([r[k]['pd_share_range'][1] for r in runs]):.2f}")
                lines.append(f"| {spread} | {share} | "
                             f"{fmt(mean_sd(r[k]['d_before'] for r in runs))} | "
                             f"{fmt(mean_sd(r[k]['d_after'] for r in runs))} | "
                             f"{fmt(mean_sd(r[k]['kept'] for r in runs))} |")
            lines.append("")
            print("\n".join(lines[-6:]), flush=True)
        for part, v in res.items():
            for r in (v if isinstance(v, list) else [x for xs in v.values() for x in xs]):
                if "failed" in r:
                    print(f"[{part} seed {r['seed']}] FAILED: {r['failed']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(lines) + "\n"
    print()
    print(f"Seeds {', '.join(map(str, args.seeds))}; mean ± SD over seeds.")
    print(table)
    if args.out:
        args.out.write_text(table if args.out.suffix.lower() == ".md" else
                            json.dumps({"seeds": args.seeds, "results": res}, indent=2,
                                       default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
