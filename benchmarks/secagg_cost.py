"""What secure aggregation costs: seconds per round and bytes per site per round, with and without.

Two settings, each variant run in the same process one after the other, order alternated per
repeat, the same seeds, the same splits:

- 5 virtual sites (safn-sim's Flower run on Ray, the default synthetic cohort, the default model),
  the real ClientApp with every message measured by a mod (`sim_bytes.log_sizes`) with Flower's
  own protobuf serde (what goes on the wire before TLS/HTTP framing);
- 3 deployed sites on 127.0.0.1 (real safn-server / safn-client, TLS + SuperNode
  authentication, small model, as tests/test_deploy.py), bytes from Flower's own run account.

Targets (issue): ≤ 1.25× the round time and ≤ 1.1× the bytes of plain aggregation.

    .venv/bin/python benchmarks/secagg_cost.py                     # both settings
    .venv/bin/python benchmarks/secagg_cost.py --skip-deploy --repeats 3 --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config, prepare  # noqa: E402

VARIANTS = {"plain": "federation.secure_aggregation=false",
            "secure": "federation.secure_aggregation=true"}


def _mean_sd(xs: list[float]) -> str:
    return (f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1
            else f"{xs[0]:.3f}")


def simulated(variant: str, rounds: int, seed: int, overrides: list[str]) -> dict:
    import sim_bytes

    cfg = config(["simulation.compare=false", f"federation.rounds={rounds}",
                  f"train.seed={seed}", VARIANTS[variant], *overrides])
    run_dir, parts = prepare(cfg)
    import safn.simulations.client_app as real

    stock = real.app
    real.app = sim_bytes.instrumented_client_app()
    from safn.simulations.engine import run_flower_simulation

    try:
        run_flower_simulation(run_dir, cfg, len(parts))
        history = json.loads((run_dir / "history.json").read_text())
    finally:
        real.app = stock
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = []
    for f in glob.glob(f"{sim_bytes.LOG}-*.jsonl"):
        rows += [json.loads(line) for line in open(f)]
        os.unlink(f)
    per_round = [r for r in rows if r["kind"] in ("train", "evaluate")]
    once = [r for r in rows if r["kind"] == "statistics"]
    n = len(parts)
    return {"round_s": statistics.mean(e["seconds"] for e in history),
            "bytes_site_round": sum(r["received"] + r["sent"] for r in per_round) / (n * rounds),
            "statistics_bytes_site": sum(r["received"] + r["sent"] for r in once) / n,
            "retries": sum(len((e.get("secure_sum") or {}).get("retries", [])) for e in history)}


def deployed(variant: str, rounds: int, root: Path, material: dict) -> dict:
    import yaml

    from tests.deploy_harness import SITES, Federation

    fed = Federation(material, root / f"{variant}-{time.monotonic_ns()}", rounds=rounds)
    cfg = yaml.safe_load(fed.server_yaml.read_text())
    cfg["federation"]["secure_aggregation"] = variant == "secure"
    fed.server_yaml.write_text(yaml.safe_dump(cfg))
    try:
        server, _ = fed.start()
        code = server.wait(1800)
    finally:
        fed.stop_all()
    if code != 0:
        raise SystemExit(f"deployed {variant}: safn-server exited {code}:\n"
                         f"{server.output()[-3000:]}")
    history = json.loads((fed.run_dir / "history.json").read_text())
    flower = json.loads((fed.run_dir / "flower_run.json").read_text())
    traffic = flower.get("network-traffic") or {}
    total = sum(v for v in traffic.values() if isinstance(v, (int, float)))
    return {"round_s": statistics.median(e["seconds"] for e in history),
            "bytes_site_round": total / (len(SITES) * rounds), "traffic": traffic}


def report(title: str, results: dict[str, list[dict]]) -> None:
    print(title)
    for key, unit in (("round_s", "s per round"), ("bytes_site_round", "bytes per site/round")):
        plain = [r[key] for r in results["plain"]]
        secure = [r[key] for r in results["secure"]]
        ratios = [s / p for s, p in zip(secure, plain)]
        print(f"  {unit:<22} plain {_mean_sd(plain):>22}   secure {_mean_sd(secure):>22}   "
              f"ratio {_mean_sd(ratios)}")
    extra = results["secure"][0]
    if "statistics_bytes_site" in extra:
        print(f"  statistics round, once per run: plain "
              f"{results['plain'][0]['statistics_bytes_site'] / 1e3:.1f} kB per site, secure "
              f"{extra['statistics_bytes_site'] / 1e3:.1f} kB per site")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="seeds / runs per variant")
    ap.add_argument("--skip-deploy", action="store_true")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="override for the simulated setting (repeatable)")
    args = ap.parse_args()
    if not args.skip_sim:
        sim = {"plain": [], "secure": []}
        for seed in range(args.repeats):
            order = list(VARIANTS) if seed % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                sim[variant].append(simulated(variant, args.rounds, seed, args.overrides))
        report(f"5 virtual sites (Flower Simulation Engine), {args.rounds} rounds, "
               f"{args.repeats} seeds, mean ± SD:", sim)
    if not args.skip_deploy:
        from tests.deploy_harness import make_material

        root = Path(tempfile.mkdtemp(prefix="safn-secagg-bench-"))
        material = make_material(root / "material")
        dep = {"plain": [], "secure": []}
        for i in range(args.repeats):
            order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                dep[variant].append(deployed(variant, args.rounds, root, material))
        report(f"3 deployed sites on 127.0.0.1 (TLS + auth, small model), {args.rounds} rounds, "
               f"{args.repeats} runs each, median round, mean ± SD over runs:", dep)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
