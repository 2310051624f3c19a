"""Many virtual sites on Flower's Simulation Engine: seconds per round and memory, by site count.

A 10x synthetic cohort (5,700 PD + 1,330 HC, the reference cohort's make-up) is split IID into
each number of sites in ``--sites`` (1000 sites: ~7 participants each) and federated for
``--rounds`` rounds with safn-sim's Flower run, one run per site count. For each it prints the
seconds per round (and per round per site: constant when time is linear in sites), the peak
resident memory of the whole process tree (this process, Ray's GCS and raylet, the ClientApp
actors; sampled every 0.25 s) and that memory at the end of every round (it must not grow with
rounds).

Settings a thousand sites of ~7 people force, printed with the figures:

- ``data.min_cell=1``: with 2, no site of ~4 training participants (0-1 HC) could send
  statistics; with 1, sites without an HC in their training split still refuse (every round
  reports how many sites trained);
- ``federation.secure_aggregation=false``: pairwise masking costs every site one mask per other
  site, quadratic in sites (1000 sites: ~1000 ChaCha20 streams of the model per site per round);
  secure aggregation at this scale needs a sparse masking graph, which safn does not have.
- ``simulation.many_sites_dispatcher=true``: Flower's dispatcher scans every stored message
  once per node every 0.1 s; the patched one asks only for nodes that have a message
  (`safn_flower.patches.simulation`; compare with ``--set simulation.many_sites_dispatcher=false``).

    .venv/bin/python benchmarks/sim_many_sites.py                    # 250, 500, 1000 sites
    .venv/bin/python benchmarks/sim_many_sites.py --sites 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from common import PeakMemory, Sampler, config, flower, prepare, tree_rss_mb

MEMORY_TARGET_MB = 4096
FORCED = ["data.min_cell=1", "federation.secure_aggregation=false",
          "simulation.many_sites_dispatcher=true"]


class RoundMemory(Sampler):
    """The process tree's resident memory each time the run's history gains a round (an event:
    the ServerApp writes ``history.json`` at the end of every round)."""

    def __init__(self, run_dir: Path, root: int, interval: float = 0.25):
        super().__init__(interval)
        self.path, self.root = run_dir / "history.json", root
        self.by_round: list[float] = []

    def _rounds(self) -> int:
        try:
            return len(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return len(self.by_round)

    def sample(self) -> None:
        while self._rounds() > len(self.by_round):
            self.by_round.append(tree_rss_mb(self.root))


def one(n_sites: int, rounds: int, overrides: list[str]) -> dict:
    import os

    cfg = config(["simulation.compare=false", "simulation.partition=iid",
                  f"simulation.n_sites={n_sites}", f"federation.rounds={rounds}",
                  "federation.patience=null", "synth.n_pd=5700", "synth.n_hc=1330",
                  "synth.n_without_mri=0", "synth.n_swedd=0", "synth.n_prodromal=0",
                  *FORCED, *overrides])
    t0 = time.perf_counter()
    run_dir, parts = prepare(cfg)
    ready = time.perf_counter() - t0
    try:
        with PeakMemory() as mem, RoundMemory(run_dir, os.getpid()) as per_round:
            fl = flower(run_dir, cfg, len(parts))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    trained = [len(e.get("sites_trained") or []) for e in fl["history"]]
    rounds_s = [e["seconds"] for e in fl["history"]]
    return {"sites": len(parts), "participants": sum(len(v) for v in parts.values()),
            "prepare_s": ready, "wall_s": fl["wall_s"], "rounds_s": rounds_s,
            "statistics_round_s": fl["statistics_round_s"],
            "startup_and_teardown_s": fl["startup_and_teardown_s"],
            "peak_mb": mem.peak_mb, "round_mb": per_round.by_round,
            "sites_trained": trained, "cpus_per_site": cfg.simulation.num_cpus_per_site}


def growth_per_round(mb: list[float]) -> float:
    """Least-squares slope of memory over rounds 2.. (round 1 includes the actors' warm-up)."""
    ys = mb[1:]
    if len(ys) < 2:
        return float("nan")
    xs = list(range(len(ys)))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="250,500,1000", help="comma-separated site counts")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    counts = [int(x) for x in args.sites.split(",")]
    print(f"forced for many tiny sites: {', '.join(FORCED)}")
    rows = []
    for n in counts:
        r = one(n, args.rounds, args.overrides)
        rows.append(r)
        steady = r["rounds_s"][1:] or r["rounds_s"]
        print(f"{r['sites']:5d} sites ({r['participants']} participants, prepared in "
              f"{r['prepare_s']:.0f} s): {statistics.fmean(steady):.2f} s/round "
              f"(rounds 2-{len(r['rounds_s'])}; round 1 {r['rounds_s'][0]:.2f} s), "
              f"statistics round {r['statistics_round_s']:.1f} s, start-up + teardown "
              f"{r['startup_and_teardown_s']:.1f} s; sites trained per round "
              f"{r['sites_trained']}; peak {r['peak_mb']:.0f} MiB; end of each round "
              f"{[round(m) for m in r['round_mb']]} MiB (growth "
              f"{growth_per_round(r['round_mb']):+.1f} MiB/round)", flush=True)
    print()
    print("| sites | s/round (rounds 2..) | ms/round per site | statistics round s | "
          "peak MiB | MiB at end of rounds | growth MiB/round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        steady = r["rounds_s"][1:] or r["rounds_s"]
        per = [s / r["sites"] * 1000 for s in steady]
        print(f"| {r['sites']} | {statistics.fmean(steady):.2f} ± "
              f"{statistics.pstdev(steady):.2f} | {statistics.fmean(per):.1f} | "
              f"{r['statistics_round_s']:.1f} | {r['peak_mb']:.0f} | "
              f"{', '.join(str(round(m)) for m in r['round_mb'])} | "
              f"{growth_per_round(r['round_mb']):+.1f} |")
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        per_site = [statistics.fmean(r["rounds_s"][1:] or r["rounds_s"]) / r["sites"]
                    for r in (first, last)]
        print(f"time per round per site, {last['sites']} vs {first['sites']} sites: "
              f"{per_site[1] / per_site[0]:.2f}x (1.00 = linear in sites)")
    verdict = "MET" if last["peak_mb"] <= MEMORY_TARGET_MB else "MISSED"
    print(f"peak memory at {last['sites']} sites: {last['peak_mb']:.0f} MiB, target <= "
          f"{MEMORY_TARGET_MB} MiB: {verdict}")


if __name__ == "__main__":
    main()
