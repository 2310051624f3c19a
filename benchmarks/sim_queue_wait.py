"""Does shortening the simulation runtime's 1 s queue waits (the dropped ``sim_queue_wait``
patch of Flower's ``vce_api.Queue``) make a safn-sim run faster?

Flower's simulation workers read their queues with ``get(timeout=1.0)`` and look at the stop
event between reads, so the runtime may end up to a second after the ServerApp. The patch read
them with 20 ms timeouts. This script runs the same small simulation with Flower's queue and with
the short-wait one, alternating which goes first, for a few seeds, in one process, and prints
the wall times, the start-up + teardown part (where the saving would be) and the ratios of the
same seed. The short-wait queue is defined here, for the measurement only: safn no longer
patches it (docs/flower-patches.md).

    .venv/bin/python benchmarks/sim_queue_wait.py                      # 3 seeds, 3 rounds
    .venv/bin/python benchmarks/sim_queue_wait.py --seeds 1 2 3 4 --set federation.rounds=2
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import statistics

from common import config, flower, prepare


@contextlib.contextmanager
def short_queue_waits(wait: float = 0.02):
    """What the dropped patch did: Flower's simulation queues with at most ``wait`` s timeouts."""
    import flwr.server.superlink.fleet.vce.vce_api as vce

    class ShortWaitQueue(queue.Queue):
        def get(self, block=True, timeout=None):
            return super().get(block, None if timeout is None else min(timeout, wait))

    stock = vce.Queue
    vce.Queue = ShortWaitQueue
    try:
        yield
    finally:
        vce.Queue = stock


def one(cfg, short: bool) -> dict:
    run_dir, parts = prepare(cfg)
    try:
        with short_queue_waits() if short else contextlib.nullcontext():
            out = flower(run_dir, cfg, len(parts))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    base = ["simulation.compare=false", "federation.rounds=3"]  # configs/simulation.yaml's sites
    rows = []
    for i, seed in enumerate(args.seeds):
        cfg = config([*base, f"simulation.seed={seed}", *args.overrides])
        order = (False, True) if i % 2 == 0 else (True, False)
        got = {short: one(cfg, short) for short in order}
        stock, short = got[False], got[True]
        rows.append((seed, stock, short))
        print(f"seed {seed}: Flower's 1 s queue waits {stock['wall_s']:6.2f} s (start-up + "
              f"teardown {stock['startup_and_teardown_s']:5.2f} s); 20 ms waits "
              f"{short['wall_s']:6.2f} s ({short['startup_and_teardown_s']:5.2f} s); ratio "
              f"short/stock {short['wall_s'] / stock['wall_s']:.3f}", flush=True)
    ratios = [s["wall_s"] / f["wall_s"] for _, f, s in rows]
    saved = [f["wall_s"] - s["wall_s"] for _, f, s in rows]
    print(f"wall ratio short/stock: mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; seconds saved per run: mean {statistics.mean(saved):+.2f}, "
          f"min {min(saved):+.2f}, max {max(saved):+.2f}")


if __name__ == "__main__":
    main()
