"""Federated vs pooled vs local-only ROC-AUC on the default simulation (5 sites, 3 seeds).

Each seed is one complete `safn-sim` run (Flower Simulation Engine, configs/simulation.yaml),
with the seed applied to the model initialisation and training (train.seed) and to every site's
train/validation/test split (federation.split_seed). Every model is scored on the pooled test
set: the union of the sites' test splits. Targets: federated within 0.01 ROC-AUC of pooled, and
above the best local-only model.

    .venv/bin/python benchmarks/fed_vs_pooled.py
    .venv/bin/python benchmarks/fed_vs_pooled.py --set data.exclude_motor=true   # harder task
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def one_run(seed: int, overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"safn-fvp-{seed}-")) / "run"
    sets = [f"train.seed={seed}", f"federation.split_seed={seed}", *overrides]
    cmd = [str(BIN / "safn-sim"), "--config", str(ROOT / "configs" / "simulation.yaml"),
           "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"seed {seed}: safn-sim failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    comparison = json.loads((out / "results.json").read_text())["comparison"]
    shutil.rmtree(out.parent, ignore_errors=True)
    rows = comparison["rows"]
    auc = {r["kind"]: r["roc_auc"] for r in rows if r["kind"] != "local"}
    return {"seed": seed, "pooled": auc["pooled"], "federated": auc["federated"],
            "best_local": auc["best-local"],
            "best_local_site": next(r["model"] for r in rows if r["kind"] == "best-local"),
            "n_test": comparison["evaluated_on"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    rows = []
    print(f"{'seed':>4} {'pooled':>8} {'federated':>10} {'gap':>8} {'best local':>11} "
          f"{'fed - best local':>17}")
    for seed in args.seeds:
        r = one_run(seed, args.overrides)
        rows.append(r)
        print(f"{seed:>4} {r['pooled']:>8.4f} {r['federated']:>10.4f} "
              f"{r['federated'] - r['pooled']:>+8.4f} {r['best_local']:>11.4f} "
              f"{r['federated'] - r['best_local']:>+17.4f}   {r['best_local_site']}",
              flush=True)
    gap = np.array([r["federated"] - r["pooled"] for r in rows])
    over = np.array([r["federated"] - r["best_local"] for r in rows])
    print(f"evaluated on: {rows[0]['n_test']}")
    print(f"federated - pooled ROC-AUC: mean {gap.mean():+.4f} (SD {gap.std(ddof=1):.4f}); "
          f"within 0.01 in {int((np.abs(gap) <= 0.01).sum())}/{len(rows)} seeds")
    print(f"federated - best local-only: mean {over.mean():+.4f}; federated >= best local-only "
          f"in {int((over >= 0).sum())}/{len(rows)} seeds")


if __name__ == "__main__":
    main()
