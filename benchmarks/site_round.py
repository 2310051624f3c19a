"""A site's compute per federated round: its local training and its evaluation, wall time.

Issue #27's budget: a site's compute per deployed round ≤ 2 s for 200 participants. This times
exactly what a site's ClientApp runs in a round (`Site.train`: ``federation.local_epochs`` epochs
from the global weights; `Site.evaluate`: the validation and test histograms), on one torch
thread as in every ClientApp, for a site of ``--participants`` people of the default synthetic
cohort with configs/simulation.yaml's settings; ``--set`` changes them (e.g. the model).
Messaging is not included: benchmarks/deploy_overhead.py measures a deployed round in all.

    .venv/bin/python benchmarks/site_round.py                      # the configured model
    .venv/bin/python benchmarks/site_round.py --set model.ensemble_size=1 --set model.wide=off

Prints mean ± SD over ``--repeats`` rounds (after one warm-up round) and MET / MISSED.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safn_core.config import load_config  # noqa: E402
from safn_core.data.sources import load_cohort  # noqa: E402
from safn_core.federation.aggregate import global_preprocessing  # noqa: E402
from safn_core.federation.site import Site, state_to_numpy  # noqa: E402
from safn_core.training.local import make_model  # noqa: E402

BUDGET_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "simulation.yaml", args.overrides)
    cohort = load_cohort(cfg.data, cfg.synth)
    rng = np.random.default_rng(0)
    ids = rng.choice(cohort.ids, size=min(args.participants, len(cohort)), replace=False)
    site = Site("bench", cohort.subset(ids), cfg)
    stats, counts = site.describe(check_cells=False)
    pre, class_counts = global_preprocessing(cohort.modalities, [stats], [counts])
    weights = state_to_numpy(make_model(cohort.modalities, cfg.model, 0))
    fed = cfg.federation
    train_s, eval_s = [], []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        new, _, _ = site.train(weights, pre, class_counts, model_cfg=cfg.model,
                               epochs=fed.local_epochs, seed=r)
        t1 = time.perf_counter()
        site.evaluate(new, pre, cfg.model, fed.histogram_bins, withhold=False)
        t2 = time.perf_counter()
        if r:  # the first round warms up
            train_s.append(t1 - t0)
            eval_s.append(t2 - t1)
    total = np.add(train_s, eval_s)
    n_params = sum(v.size for v in weights.values())
    print(f"site of {len(ids)} participants ({len(site.split.train)} training), "
          f"{fed.local_epochs} local epochs, batch {cfg.train.batch_size}, model "
          f"ensemble_size {cfg.model.ensemble_size}, wide {cfg.model.wide}, {n_params:,} "
          f"parameters, 1 thread")
    print(f"train {np.mean(train_s):.3f} ± {np.std(train_s, ddof=1):.3f} s, evaluate "
          f"{np.mean(eval_s):.3f} ± {np.std(eval_s, ddof=1):.3f} s, round "
          f"{total.mean():.3f} ± {total.std(ddof=1):.3f} s over {args.repeats} rounds")
    verdict = "MET" if total.mean() <= BUDGET_S else "MISSED"
    print(f"{verdict}: a site's compute per round {total.mean():.2f} s (budget ≤ {BUDGET_S} s)")


if __name__ == "__main__":
    main()
