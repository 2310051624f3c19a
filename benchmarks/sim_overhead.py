"""Simulation overhead: safn-sim's Flower run vs a plain in-process loop doing the same rounds.

Both run the same safn_core functions (statistics round, local training, evaluation, FedAvg) on
the same virtual sites with the same seeds; the script checks that they run the same rounds to
the same final pooled ROC-AUC and prints wall times, the Flower run's breakdown (Ray start-up
and ClientApp actors, statistics round, rounds) and the ratio. Target: ratio <= 2 for 5 sites x
20 rounds.

Equal work (`EQUAL_WORK`, after any ``--set``): the loop has neither model selection nor secure
aggregation, so the Flower run trains every round (no early stopping) and sums in the clear.

    .venv/bin/python benchmarks/sim_overhead.py                 # 5 sites x 20 rounds
    .venv/bin/python benchmarks/sim_overhead.py --set federation.rounds=5
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
from common import config, flower, in_process, prepare


class RayTimes:
    """Wall seconds spent in ``ray.init`` and ``ray.shutdown`` during the block (Ray's own start
    and stop: its GCS, raylet, agents and the ClientApp worker processes), by wrapping Ray's
    public functions; the rest of the Flower run's start-up and teardown is Flower's and safn's."""

    def __enter__(self):
        import ray

        self.ray, self.seconds = ray, {"ray.init": 0.0, "ray.shutdown": 0.0}
        self._stock = {name: getattr(ray, name.split(".")[1]) for name in self.seconds}
        for name, fn in self._stock.items():
            setattr(ray, name.split(".")[1], self._timed(name, fn))
        return self

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
        return call

    def __exit__(self, *exc):
        for name, fn in self._stock.items():
            setattr(self.ray, name.split(".")[1], fn)


EQUAL_WORK = ["federation.patience=null", "federation.secure_aggregation=false"]
"""What the in-process loop does: every round (no early stopping), plain sums (no masks)."""


def flower_stock_polling(run_dir, cfg, n):
    """Flower with its own 0.1 s poll intervals (no `safn_flower.patches.simulation` Grid
    wrapper, no dispatcher patch, for this run)."""
    stock = cfg.model_copy(deep=True)
    stock.simulation.fast_polling = False
    stock.simulation.many_sites_dispatcher = False
    return flower(run_dir, stock, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--also-slow-polling", action="store_true",
                    help="also run Flower with its stock 0.1 s polling (before/after the cut)")
    args = ap.parse_args()
    cfg = config(["simulation.compare=false", *args.overrides, *EQUAL_WORK])
    run_dir, parts = prepare(cfg)
    n = len(parts)
    try:
        loop = in_process(run_dir, cfg, n)
        with RayTimes() as ray_times:
            fl = flower(run_dir, cfg, n)
        if args.also_slow_polling:
            for f in (run_dir / "checkpoints").iterdir():
                f.unlink()
            (run_dir / "model").exists() and shutil.rmtree(run_dir / "model")
            slow_cfg = cfg.model_copy(deep=True)
            slow_cfg.simulation.fast_polling = False
            slow = flower_stock_polling(run_dir, slow_cfg, n)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    same = "n/a"
    print(f"{n} sites x {cfg.federation.rounds} rounds x {cfg.federation.local_epochs} local "
          f"epochs, strategy {cfg.federation.strategy}; rounds run: loop "
          f"{len(loop['state'].history)}, Flower {len(fl['history'])}")
    print(f"in-process loop : {loop['wall_s']:7.2f} s  ({loop['per_round_s']:.3f} s/round)")
    print(f"Flower (Ray)    : {fl['wall_s']:7.2f} s  ({fl['per_round_s']:.3f} s/round; "
          f"start-up + teardown {fl['startup_and_teardown_s']:.2f} s, statistics round "
          f"{fl['statistics_round_s']:.2f} s)")
    rest = fl["startup_and_teardown_s"] - sum(ray_times.seconds.values())
    print(f"  start-up + teardown: ray.init {ray_times.seconds['ray.init']:.2f} s, ray.shutdown "
          f"{ray_times.seconds['ray.shutdown']:.2f} s, the rest {rest:.2f} s; the statistics "
          f"round includes the ClientApp actors' first message (their imports)")
    print(f"ratio Flower / loop: {fl['wall_s'] / loop['wall_s']:.2f} in all, "
          f"{fl['per_round_s'] / loop['per_round_s']:.2f} per round")
    if args.also_slow_polling:
        print(f"Flower, stock polling: {slow['wall_s']:7.2f} s  ({slow['per_round_s']:.3f} s/round)"
              f"  -> ratio {slow['wall_s'] / loop['wall_s']:.2f} in all, "
              f"{slow['per_round_s'] / loop['per_round_s']:.2f} per round")
    a = fl["history"][-1].get("pooled") or {}
    b = loop["state"].history[-1].get("pooled") or {}
    if len(fl["history"]) != len(loop["state"].history):
        same = "NO (not the same rounds)"
    elif a and b:
        same = "yes" if np.isclose(a["roc_auc"], b["roc_auc"]) else "NO"
    print(f"same final pooled ROC-AUC in both engines: {same}")


if __name__ == "__main__":
    main()
