"""100 virtual sites on Flower's Simulation Engine: peak memory and seconds per round.

A larger synthetic cohort (default 10 x the reference: 5,700 PD + 1,330 HC) is split IID into
100 sites (~70 participants each) and federated for a few rounds with safn-sim's Flower run.
Peak memory is the resident memory of the whole process tree (this process, Ray's GCS and
raylet, the ClientApp actors), sampled every 0.25 s. Memory grows with concurrent actors (one per
CPU), not with the number of virtual sites.

    .venv/bin/python benchmarks/sim_many_sites.py
    .venv/bin/python benchmarks/sim_many_sites.py --set simulation.n_sites=1000
"""

from __future__ import annotations

import argparse
import shutil
import time

from common import PeakMemory, config, flower, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    cfg = config(["simulation.compare=false", "simulation.partition=iid",
                  "simulation.n_sites=100", "federation.rounds=5", "synth.n_pd=5700",
                  "synth.n_hc=1330", "synth.n_without_mri=0", "synth.n_swedd=0",
                  "synth.n_prodromal=0", "data.min_cell=2", *args.overrides])
    t0 = time.perf_counter()
    run_dir, parts = prepare(cfg)
    print(f"cohort and {len(parts)} virtual sites ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(len(v) for v in parts.values())} participants)")
    try:
        with PeakMemory() as mem:
            fl = flower(run_dir, cfg, len(parts))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    last = fl["history"][-1]
    print(f"{len(parts)} sites x {cfg.federation.rounds} rounds x {cfg.federation.local_epochs} "
          f"local epochs, {cfg.simulation.num_cpus_per_site:g} CPU per ClientApp actor")
    print(f"Flower run {fl['wall_s']:.1f} s: {fl['per_round_s']:.2f} s/round "
          f"(statistics round incl. Ray and actor start-up {fl['statistics_round_s']:.1f} s, "
          f"rest of start-up and teardown {fl['startup_and_teardown_s']:.1f} s)")
    print(f"peak resident memory of the process tree: {mem.peak_mb:.0f} MiB")
    if last.get("pooled"):
        print(f"last round: pooled ROC-AUC {last['pooled']['roc_auc']:.3f} on {last['n_test']} "
              f"test participants at {last['sites_reported']} sites "
              f"({len(last['sites_withheld'])} below min_cell)")


if __name__ == "__main__":
    main()
