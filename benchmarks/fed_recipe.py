"""Which federated training recipe for small sites: the same rows of fed_vs_pooled.py per recipe.

Each recipe is a set of overrides of configs/simulation.yaml (strategy, local epochs, learning
rate, weight decay, FedProx μ, FedAdam/FedYogi server learning rate). Every recipe runs the same
rows and seeds as `benchmarks/fed_vs_pooled.py` (same splits, the same selection rule for every
model: `federation.select`), and its pooled and local-only comparators train with the same
recipe's local settings, so a recipe is judged by federated − pooled and federated − best
local-only, not by how it moves the comparators. The winner by mean federated − pooled over rows
(ties: federated − best local-only) is what configs/simulation.yaml and the deployment examples
use.

    .venv/bin/python benchmarks/fed_recipe.py                                # every recipe
    .venv/bin/python benchmarks/fed_recipe.py --recipes default fedprox --rows ad_iid
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fed_vs_pooled import BY_NAME, one_run, stats  # noqa: E402  (benchmarks/ is on sys.path)

RECIPES = {
    "default": [],
    "1_local_epoch": ["federation.local_epochs=1"],
    "4_local_epochs": ["federation.local_epochs=4"],
    "lr_3e-3": ["train.lr=0.003"],
    "weight_decay_1e-2": ["train.weight_decay=0.01"],
    "fedprox_0.1": ["federation.strategy=fedprox", "federation.proximal_mu=0.1"],
    "fedadam_0.01": ["federation.strategy=fedadam", "federation.server_lr=0.01"],
    "fedyogi_0.01": ["federation.strategy=fedyogi", "federation.server_lr=0.01"],
}
ROWS = ["no_motor", "ad_iid", "ad_dirichlet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=list(BY_NAME))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="safn-recipe-")).resolve()
    cache: dict = {}
    table = {}
    try:
        for recipe in args.recipes:
            per_row = {}
            for name in args.rows:
                runs = [one_run(BY_NAME[name], seed, work, RECIPES[recipe], cache)
                        for seed in args.seeds]
                failed = [r for r in runs if "failed" in r]
                for r in failed:
                    print(f"{recipe} {name} seed {r['seed']}: FAILED: {r['failed']}", flush=True)
                per_row[name] = {k: stats(runs, k) for k in
                                 ("federated", "fed_minus_pooled", "fed_minus_best_local",
                                  "selected_round")}
                s = per_row[name]
                if s["federated"] is not None:
                    print(f"{recipe:>18} {name:>14}: federated {s['federated']['mean']:.3f} ± "
                          f"{s['federated']['sd']:.3f}  fed − pooled "
                          f"{s['fed_minus_pooled']['mean']:+.3f} ± "
                          f"{s['fed_minus_pooled']['sd']:.3f}  fed − best local "
                          f"{s['fed_minus_best_local']['mean']:+.3f}  selected round "
                          f"{s['selected_round']['mean']:.1f}", flush=True)
            table[recipe] = per_row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nmean over rows (each row: mean over seeds)")
    print(f"{'recipe':>18}  {'fed − pooled':>12}  {'fed − best local':>16}  worst row")
    score = {}
    for recipe, per_row in table.items():
        gaps = {n: s["fed_minus_pooled"]["mean"] for n, s in per_row.items()
                if s["fed_minus_pooled"] is not None}
        over = [s["fed_minus_best_local"]["mean"] for s in per_row.values()
                if s["fed_minus_best_local"] is not None]
        if not gaps:
            continue
        worst = min(gaps, key=gaps.get)
        score[recipe] = (float(np.mean(list(gaps.values()))), float(np.mean(over)))
        print(f"{recipe:>18}  {score[recipe][0]:>+12.3f}  {score[recipe][1]:>+16.3f}  "
              f"{worst} {gaps[worst]:+.3f}")
    if score:
        best = max(score, key=lambda k: score[k])
        print(f"\nbest recipe: {best} {RECIPES[best] or '(configs/simulation.yaml as is)'}")


if __name__ == "__main__":
    main()
