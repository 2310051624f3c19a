"""Deployment overhead: seconds per round of a real 3-site federation on 127.0.0.1 against the
local compute of a round, and where the rest goes.

Starts safn-server and three safn-client processes exactly as tests/test_deploy.py does (TLS,
SuperNode authentication, the sites' app approval; a small SAFN model), once per variant:

- ``safn``: safn's defaults (warm ClientApps forked from a pre-imported SuperExec that the
  SuperNode wakes when a message arrives, 0.2 s polling of SuperNodes and ServerApp, 10 ms looks
  for a ClientApp's reply, 10 s heartbeats);
- ``poll50ms``: safn's, polling every 50 ms instead of 200 ms;
- ``stock``: Flower's own behaviour (a fresh ``flwr-clientapp`` process per message, 3 s polls).

The baseline, measured in this process on the same sites' prepared cohorts with the run's
settings: one site's local training + evaluation (the limit of a round when sites run in
parallel on their own machines), and the three sites' sum (the limit on this one host).

    .venv/bin/python benchmarks/deploy_overhead.py                  # every variant, 5 rounds
    .venv/bin/python benchmarks/deploy_overhead.py --variants safn --rounds 10
    .venv/bin/python benchmarks/deploy_overhead.py --variants safn --profile

``--profile`` adds where the CPU goes (`process_cpu`): CPU seconds per process role (SuperLink,
ServerApp, SuperNodes, SuperExecs, forked ClientApps, ``flwr`` CLI calls, ...) in each phase
(coordinator start-up, sites starting, the statistics round to its first reply and the rest,
round 1, later rounds, the run's end), next to the whole host's busy CPU seconds (other work on
the machine shows as the difference). The statistics round's seconds are also split into the
wait for the sites to connect and the round itself (timing.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from process_cpu import ProcessCpu, table  # noqa: E402
from tests.deploy_harness import SITES, Federation, make_material  # noqa: E402

VARIANTS = {
    "safn": ({}, {}),
    "poll50ms": ({"poll_interval": 0.05}, {"SAFN_POLL_INTERVAL": "0.05"}),
    "stock": ({"poll_interval": 3.0}, {"SAFN_WARM_CLIENTAPPS": "0", "SAFN_POLL_INTERVAL": "3"}),
}


def phase_of(fed: Federation) -> str:
    """Which phase the run is in, from the SuperLink's log (sites activated, replies pushed)
    and the ServerApp's progress.log (statistics round done, rounds done)."""
    def read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    if len(fed.procs) <= len(SITES):
        return "coordinator start-up (SuperLink, site keys, run submitted)"
    if (fed.run_dir / "federation_status.json").exists():
        return "run end (bundle, report, processes stopping)"
    progress = read(fed.run_dir / "progress.log").splitlines()
    done = sum(1 for line in progress if line.startswith("round "))
    if done:
        return "round 2 and later"
    if any(line.startswith("statistics round:") for line in progress):
        return "round 1"
    link = read(fed.run_dir / "superlink.log")
    if link.count("Activated node_id") < len(SITES):
        return "sites starting (safn-client to SuperNode active)"
    if "Push replies from node_id" not in link:
        return "statistics round: to the first reply (warm SuperExec start, first message)"
    return "statistics round: the rest"


def run_variant(material: dict, folder: Path, rounds: int, variant: str,
                profile: bool = False) -> dict:
    server_extra, site_env = VARIANTS[variant]
    fed = Federation(material, folder, rounds=rounds)
    if server_extra:
        import yaml

        cfg = yaml.safe_load(fed.server_yaml.read_text())
        cfg["server"].update(server_extra)
        fed.server_yaml.write_text(yaml.safe_dump(cfg))
    sampler = ProcessCpu(lambda: phase_of(fed)) if profile else contextlib.nullcontext()
    try:
        with sampler:
            t0 = time.perf_counter()
            server = fed.server()
            while "submitted" not in server.output():
                time.sleep(0.2)
            from tests.deploy_harness import BIN, Proc

            for name in SITES:
                poll = site_env.get("SAFN_POLL_INTERVAL")
                path = fed.site_yaml(name, **({"poll_interval": float(poll)} if poll else {}))
                fed.procs.append(Proc(name, [str(BIN / "safn-client"), "--site", str(path)],
                                      fed.folder / f"{name}.log", site_env))
            code = server.wait(1800)
            wall = time.perf_counter() - t0
    finally:
        fed.stop_all()
    if code != 0:
        raise SystemExit(f"{variant}: safn-server exited {code}:\n{server.output()[-3000:]}")
    history = json.loads((fed.run_dir / "history.json").read_text())
    timing = json.loads((fed.run_dir / "timing.json").read_text())
    flower = json.loads((fed.run_dir / "flower_run.json").read_text())
    seconds = [e["seconds"] for e in history]
    # each site's ClientApp handler time per round (its audit log): set-up + compute
    handler: dict[int, dict[str, float]] = {}
    for name in SITES:
        log = fed.folder / f"state_{name}" / "audit" / "outgoing.jsonl"
        for line in log.read_text().splitlines():
            e = json.loads(line)
            if "round" in e:
                site_rounds = handler.setdefault(e["round"], {})
                site_rounds[name] = site_rounds.get(name, 0.0) + e.get("handler_seconds", 0.0)
    per_round = [max(v.values()) for _, v in sorted(handler.items())]
    return {"fed": fed, "wall_s": wall, "rounds_s": seconds, "handler_s": per_round,
            "statistics_round_s": timing["statistics_round_s"], "timing": timing,
            "flower": flower, "phases": sampler.by_phase() if profile else None}


def local_compute(fed: Federation, rounds: int) -> dict:
    """One round of each site's local work (train + evaluate), in this process."""
    import numpy as np
    import torch

    from safn_core.config import load_config
    from safn_core.data.cohort_store import read_cohort
    from safn_core.federation.run_folder import load_run_config
    from safn_core.federation.shared_config import (shared_config, shared_config_text,
                                                    site_run_config)
    from safn_core.federation.site import Site, state_to_numpy
    from safn_core.preprocess import Preprocessor
    from safn_core.training.local import make_model

    torch.set_num_threads(1)
    run_cfg = load_run_config(fed.run_dir.resolve())
    shared = shared_config(shared_config_text(run_cfg))
    ckpt_pre = json.loads((fed.run_dir / "model" / "preprocessing.json").read_text())
    pre = Preprocessor.from_state(ckpt_pre)
    counts = json.loads((fed.run_dir / "model" / "bundle.json").read_text())["class_counts"]
    state = state_to_numpy(make_model(pre.modalities, shared.model, 0))
    per_site = {}
    for name in SITES:
        own = load_config(fed.site_yaml(name))
        cfg = site_run_config(shared, own)
        cohort = read_cohort(Path(own.site.state_dir).resolve() / "cohort" / "cohort.json")
        site = Site(name, cohort, cfg)
        times = []
        for r in range(rounds):
            t = time.perf_counter()
            weights, _, _ = site.train(state, pre, counts, model_cfg=cfg.model,
                                       epochs=cfg.federation.local_epochs, seed=r)
            site.evaluate(weights, pre, cfg.model, cfg.federation.histogram_bins)
            times.append(time.perf_counter() - t)
        per_site[name] = float(np.median(times))
    return {"max_s": max(per_site.values()), "sum_s": sum(per_site.values()),
            "per_site_s": per_site}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile", action="store_true",
                    help="also print CPU seconds per process role and phase (from /proc)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safn-deploy-bench-"))
    material = make_material(root / "material")
    results = {v: run_variant(material, root / v, args.rounds, v, args.profile)
               for v in args.variants}
    local = local_compute(next(iter(results.values()))["fed"], args.rounds)
    print(f"3 sites on 127.0.0.1, TLS + SuperNode authentication, {args.rounds} rounds, "
          f"small SAFN model (d_model 16)")
    print(f"local compute of a round (train 1 epoch + evaluate), measured in-process: "
          f"one site {local['max_s']:.2f} s (slowest), three sites {local['sum_s']:.2f} s "
          f"({', '.join(f'{k} {v:.2f}' for k, v in local['per_site_s'].items())})")
    header = (f"{'variant':<8} {'s/round (median)':>17} {'overhead vs 1 site':>19} "
              f"{'vs 3 sites':>11} {'statistics round':>17} {'wall':>7} "
              f"{'ClientApp CPU s':>16} {'ServerApp s':>12} {'MB sent+recv':>13}")
    print(header + f" {'ClientApp handlers/round':>25}")
    for name, r in results.items():
        med = statistics.median(r["rounds_s"])
        flower = r["flower"]
        compute = flower.get("compute-time", {})
        traffic = flower.get("network-traffic", {})
        mb = sum(v for v in traffic.values() if isinstance(v, (int, float))) / 1e6
        print(f"{name:<8} {med:>17.2f} {med - local['max_s']:>19.2f} "
              f"{med - local['sum_s']:>11.2f} {r['statistics_round_s']:>17.2f} "
              f"{r['wall_s']:>7.1f} {compute.get('clientapp-seconds', float('nan')):>16.1f} "
              f"{compute.get('serverapp-seconds', float('nan')):>12.1f} {mb:>13.2f} "
              f"{statistics.median(r['handler_s']):>25.2f}")
    if "safn" in results:
        ref = statistics.median(results["safn"]["rounds_s"])
        for name, r in results.items():
            if name != "safn":
                print(f"ratio {name} / safn seconds per round: "
                      f"{statistics.median(r['rounds_s']) / ref:.2f}")
    print("ClientApp handlers/round: the slowest site's train + evaluate handler time in the "
          "deployed ClientApp (per-message set-up + compute), from the sites' audit logs; the "
          "rest of a round is message transport, polling and the coordinator's work")
    for name, r in results.items():
        wait = r["timing"].get("waiting_for_sites_s")
        if wait is not None:
            print(f"{name}: statistics round {r['statistics_round_s']:.2f} s = waiting for the "
                  f"sites to connect {wait:.2f} s (sites started after the run was submitted) "
                  f"+ the round itself {r['statistics_round_s'] - wait:.2f} s")
    for name, r in results.items():
        if r["phases"]:
            print(f"\n{name}: where the CPU goes, by phase and process role")
            print(table(r["phases"]))
    print("rounds (s): " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v["rounds_s"])
                                     for k, v in results.items()))


if __name__ == "__main__":
    main()
