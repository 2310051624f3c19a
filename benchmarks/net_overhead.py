"""Deployment across hosts: seconds, bytes and Fleet requests per round of a real 3-site secure
federation on the multi-host test bed (tests/netbed.py), at 0 / 50 / 200 ms round trip and a
10 Mbit/s site upload, beside the same federation on 127.0.0.1, in one run (issue #29).

Each configuration is one run of safn-server and three safn-client processes (TLS, SuperNode
authentication, secure aggregation on, safn's default SAFN model, 1 local epoch), started by
tests/deploy_harness.py; the configurations alternate (bed0, 50ms, 200ms, up10, loopback, then
again for ``--repeats``):

- ``loopback``: the coordinator and the sites on 127.0.0.1 of this host (no test bed);
- ``bed0``: the test bed, each site reaching ``coordinator.safn.test`` through its own link of
  the fault proxy, no shaping;
- ``50ms`` / ``200ms``: every site's link delayed 25 / 100 ms each way;
- ``up10``: every site's upload limited to 10 Mbit/s (1.25 MB/s), no delay.

Per configuration: seconds per training round (median of history.json's ``seconds``), the
statistics round with the secure-aggregation key exchange (timing.json, less the wait for the
sites to connect), the logistic floor (its fit and its evaluation, round 0), the whole run's
wall time; bytes per site and round up and down (the proxy's counters, sampled every 0.1 s and
split at the run's events: ``events.jsonl``'s statistics, logistic and round events); Fleet
requests per site and round (each SuperNode's ``SAFN_FLEET_REQUEST_LOG``, one JSON line per
HTTP request), and per rpc for one round; the ratios against bed0 and loopback, and issue
#29's targets.

    .venv/bin/python benchmarks/net_overhead.py                       # every configuration
    .venv/bin/python benchmarks/net_overhead.py --rounds 2 --configs bed0 50ms
    .venv/bin/python benchmarks/net_overhead.py --repeats 3 --json /tmp/net.json

Needs root and ``ip`` (network namespaces), like the test bed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from common import Sampler  # noqa: E402
from deploy_overhead import local_compute  # noqa: E402
from tests import netbed as nb  # noqa: E402
from tests.deploy_harness import SITES, Federation, federations, make_material  # noqa: E402

FLOWER_TRANSFERS = {"SAFN_OBJECT_WORKERS": "0", "SAFN_CONFIRM_IN_BACKGROUND": "0"}
"""Flower's own message transfers, without #29's cuts (objects 2 at a time, the receipt
confirmed before the ClientApp starts): the baseline."""

# name -> (label, the proxy's settings on every site's link (None: loopback, no test bed),
#          environment of every process of the run)
CONFIGS = {
    "bed0": ("bed 0 ms", {}, {}),
    "50ms": ("bed 50 ms RTT", {"delay_ms": 25}, {}),
    "200ms": ("bed 200 ms RTT", {"delay_ms": 100}, {}),
    "up10": ("bed 10 Mbit/s up", {"up_rate": 1.25e6}, {}),
    "loopback": ("loopback", None, {}),
    "bed0-flower": ("bed 0 ms, Flower's transfers", {}, FLOWER_TRANSFERS),
    "50ms-flower": ("bed 50 ms RTT, Flower's transfers", {"delay_ms": 25}, FLOWER_TRANSFERS),
    "200ms-flower": ("bed 200 ms RTT, Flower's transfers", {"delay_ms": 100}, FLOWER_TRANSFERS),
    # one cut at a time switched off: which of them pays
    "bed0-2objects": ("bed 0 ms, objects 2 at a time", {}, {"SAFN_OBJECT_WORKERS": "0"}),
    "50ms-2objects": ("bed 50 ms RTT, objects 2 at a time", {"delay_ms": 25},
                      {"SAFN_OBJECT_WORKERS": "0"}),
}
REQUEST_LOG = "SAFN_FLEET_REQUEST_LOG"
BOUND = 3600  # a failure bound for one run, never a synchronisation


class RunFailed(RuntimeError):
    """A configuration's run did not complete (safn-server's exit status and output)."""


class ProxyBytes(Sampler):
    """The proxy's byte counters with their wall-clock time, every ``interval`` seconds."""

    def __init__(self, bed, interval: float = 0.1):
        super().__init__(interval)
        self.bed, self.samples = bed, []

    def sample(self) -> None:
        try:
            self.samples.append((time.time(), self.bed.control.stats()))
        except (OSError, ValueError):
            pass  # the next sample counts

    def at(self, t: float) -> dict:
        """The counters as of time ``t``: the first sample at or after it (else the last)."""
        return next((s for when, s in self.samples if when >= t), self.samples[-1][1])


@contextmanager
def environment(key: str, value: str):
    """``key=value`` in this process's environment (the harness's processes inherit it)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def read_jsonl(path: Path) -> list[dict] | None:
    """A JSON-lines file's complete lines; None when there is no such file."""
    if not path.is_file():
        return None
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut short when the process was ended
    return out


def phases(events: list[dict], t_start: float, t_end: float) -> list[tuple[str, float, float]]:
    """(phase, start, end) in wall-clock time, each phase named by the event that ends it:
    start-up (to the sites connected), the statistics round (with secure aggregation's key
    exchange; after harmonisation, to the second secure sum), the logistic floor's fit, each round
    (round 0: the floor's evaluation), then the run's end."""
    # secure_statistics ends the (secure) statistics round; the "statistics" event comes later
    ends = {"sites_connected": "start-up", "secure_statistics": "statistics",
            "logistic": "floor fit"}
    marks: dict[str, float] = {}
    for e in events:
        if e["event"] in ends:
            marks[ends[e["event"]]] = e["time"]  # the last of each
        elif e["event"] == "round":
            marks[f"round {e['entry']['round']}"] = e["time"]
    out, start = [], t_start
    for name, end in sorted(marks.items(), key=lambda m: m[1]) + [("end", t_end)]:
        out.append((name, start, end))
        start = end
    return out


def run_config(material: dict, folder: Path, config: str,
               rounds: int) -> tuple[Federation, dict]:
    label, shape, run_env = CONFIGS[config]
    (folder / "bed").mkdir(parents=True)
    bed_context = (nullcontext() if shape is None
                   else nb.netbed(folder / "bed", SITES))
    with bed_context as bed, federations(material, folder) as make:
        fed = make(net=bed, rounds=rounds, secure_aggregation=True, round_timeout=900,
                   wait_for_sites=600)
        server_yaml = yaml.safe_load(fed.server_yaml.read_text())
        server_yaml.pop("model")  # the harness's small model: back to safn's defaults
        fed.server_yaml.write_text(yaml.safe_dump(server_yaml))
        if bed is not None and shape:
            bed.shape_all(**shape)
        sampler = ProxyBytes(bed) if bed is not None else nullcontext()
        with sampler, ExitStack() as settings:
            for key, value in run_env.items():
                settings.enter_context(environment(key, value))
            t_start, t0 = time.time(), time.perf_counter()
            server = fed.server()
            server.wait_for_output(r"run \d+ submitted", 600)
            for name in SITES:
                with environment(REQUEST_LOG, str(fed.folder / f"fleet_requests_{name}.jsonl")):
                    fed.site(name, activation_wait=600)
            code = server.wait(BOUND)
            wall, t_end = time.perf_counter() - t0, time.time()
    if code != 0:
        raise RunFailed(f"{config}: safn-server exited {code}:\n{server.output()[-3000:]}")
    return fed, measure(fed, config, sampler if bed is not None else None, t_start, t_end, wall)


def measure(fed: Federation, config: str, sampler: ProxyBytes | None, t_start: float,
            t_end: float, wall: float) -> dict:
    """The figures of one finished run, from its run folder, request logs and byte samples."""
    run = fed.run_dir
    history = json.loads((run / "history.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    flower = json.loads((run / "flower_run.json").read_text())
    events = read_jsonl(run / "events.jsonl") or []
    spans = phases(events, t_start, t_end)
    requests = {name: read_jsonl(fed.folder / f"fleet_requests_{name}.jsonl") for name in SITES}
    per_phase = {}
    for phase, a, b in spans:
        row: dict = {"seconds": b - a}
        if sampler is not None and sampler.samples:
            before, after = sampler.at(a), sampler.at(b)
            row["bytes"] = {s: {d: after[s][d] - before[s][d] for d in ("up", "down")}
                            for s in SITES}
        if all(r is not None for r in requests.values()):
            inside = {s: [q for q in r if a <= q["t"] < b] for s, r in requests.items()}
            row["requests"] = {s: len(q) for s, q in inside.items()}
            row["failed"] = {s: sum(1 for x in q if not x.get("ok", True))
                             for s, q in inside.items()}
            row["rpc"] = {s: dict(Counter(x["rpc"] for x in q)) for s, q in inside.items()}
            row["request_s"] = {s: sum(x.get("s", 0.0) for x in q) for s, q in inside.items()}
        per_phase[phase] = row
    return {"config": config, "label": CONFIGS[config][0], "wall_s": wall,
            "rounds_s": [e["seconds"] for e in history if e["round"] >= 1],
            "round0_s": next((e["seconds"] for e in history if e["round"] == 0), None),
            "participants": [len(e.get("sites_trained", SITES)) for e in history
                             if e["round"] >= 1],
            "timing": timing, "phases": per_phase, "shape": CONFIGS[config][1],
            "flower_network_traffic": flower.get("network-traffic"),
            "requests_logged": all(r is not None for r in requests.values())}


# --- figures of one run ---------------------------------------------------------------------

def training(r: dict) -> list[dict]:
    return [row for name, row in r["phases"].items()
            if name.startswith("round ") and name != "round 0"]


def per_site_round(r: dict, key: str, direction: str | None = None) -> float | None:
    """The median over the training rounds of the mean over the sites of ``key``."""
    rows = [row for row in training(r) if key in row]
    if not rows:
        return None
    values = [statistics.mean((row[key][s][direction] if direction else row[key][s])
                              for s in SITES) for row in rows]
    return statistics.median(values)


def per_site_phase(r: dict, phase: str, key: str, direction: str | None = None) -> float | None:
    row = r["phases"].get(phase, {})
    if key not in row:
        return None
    return statistics.mean((row[key][s][direction] if direction else row[key][s]) for s in SITES)


def figures(r: dict) -> dict:
    t = r["timing"]
    return {
        "s/round": statistics.median(r["rounds_s"]),
        "statistics s": t["statistics_round_s"] - t.get("waiting_for_sites_s", 0.0),
        "floor fit s": r["phases"].get("floor fit", {}).get("seconds"),
        "round 0 s": r["round0_s"],
        "wall s": r["wall_s"],
        "up kB/round": kb(per_site_round(r, "bytes", "up")),
        "down kB/round": kb(per_site_round(r, "bytes", "down")),
        "req/round": per_site_round(r, "requests"),
        "stat up kB": kb(per_site_phase(r, "statistics", "bytes", "up")),
        "stat down kB": kb(per_site_phase(r, "statistics", "bytes", "down")),
        "stat req": per_site_phase(r, "statistics", "requests"),
        "floor up kB": kb(sum_phases(r, ("floor fit", "round 0"), "up")),
        "floor down kB": kb(sum_phases(r, ("floor fit", "round 0"), "down")),
        "floor req": sum_phases(r, ("floor fit", "round 0"), None),
    }


def sum_phases(r: dict, names, direction: str | None) -> float | None:
    key = "bytes" if direction else "requests"
    values = [per_site_phase(r, n, key, direction) for n in names]
    return None if any(v is None for v in values) else sum(values)


def kb(x: float | None) -> float | None:
    return None if x is None else x / 1e3


# --- printing -------------------------------------------------------------------------------

def summary(values: list) -> tuple[float, float] | None:
    """(mean, SD) over the repeats; None when a figure is missing."""
    if not values or any(v is None for v in values):
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(s: tuple[float, float] | None, digits: int = 2) -> str:
    if s is None:
        return "n/a"
    mean, sd = s
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def ratio(runs: dict, config: str, ref: str, key: str) -> tuple[float, float] | None:
    """Mean ± SD over the repeats of ``key``'s ratio to the reference run of the same repeat."""
    if ref not in runs or config not in runs:
        return None
    pairs = [(figures(a)[key], figures(b)[key]) for a, b in zip(runs[config], runs[ref])]
    if any(x is None or not y for x, y in pairs):
        return None
    return summary([x / y for x, y in pairs])


def report(runs: dict[str, list[dict]], rounds: int, repeats: int, local: dict | None) -> None:
    print(f"3 sites, secure aggregation on, safn's default SAFN model, {rounds} rounds "
          f"(1 local epoch), TLS + SuperNode authentication; "
          + (f"mean ± SD over {repeats} repeats" if repeats > 1 else "one run per configuration"))
    if local:
        print(f"local compute of a round (train + evaluate, in this process, default model): "
              f"slowest site {local['max_s']:.2f} s, three sites {local['sum_s']:.2f} s")
    cols = [("configuration", 17), ("s/round", 13), ("vs bed0", 12), ("vs loopback", 12),
            ("statistics s", 13), ("floor fit s", 12), ("round 0 s", 12), ("wall s", 12),
            ("up kB/rnd/site", 15), ("down kB/rnd/site", 17), ("bytes vs bed0", 14),
            ("req/rnd/site", 13)]
    print(" ".join(f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, w) in enumerate(cols)))
    for config, rs in runs.items():
        f = {k: summary([figures(r)[k] for r in rs]) for k in figures(rs[0])}
        bytes_ratio = ratio(runs, config, "bed0", "up kB/round")
        down_ratio = ratio(runs, config, "bed0", "down kB/round")
        cells = [rs[0]["label"], fmt(f["s/round"]), fmt(ratio(runs, config, "bed0", "s/round")),
                 fmt(ratio(runs, config, "loopback", "s/round")), fmt(f["statistics s"]),
                 fmt(f["floor fit s"]), fmt(f["round 0 s"]), fmt(f["wall s"], 1),
                 fmt(f["up kB/round"], 0), fmt(f["down kB/round"], 0),
                 "n/a" if bytes_ratio is None else f"{fmt(bytes_ratio)} / {fmt(down_ratio)}",
                 fmt(f["req/round"], 1)]
        print(" ".join(f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, (_, w)) in
                       enumerate(zip(cells, cols))))
    print("statistics s: timing.json's statistics_round_s less its wait for the sites to "
          "connect (the round with secure aggregation's key exchange); floor fit s: the "
          "logistic floor's Newton rounds (secure sums); round 0 s: the floor's evaluation; "
          "bytes vs bed0: up / down; bytes at the TCP level through each site's proxy link "
          "(TLS, HTTP and heartbeats included), loopback has no proxy")
    print("\nbefore the training rounds, per site (once per run):")
    print(f"{'configuration':<17} {'statistics up/down kB':>22} {'requests':>9} "
          f"{'floor up/down kB':>17} {'requests':>9}")
    for config, rs in runs.items():
        f = {k: summary([figures(r)[k] for r in rs]) for k in figures(rs[0])}
        print(f"{rs[0]['label']:<17} "
              f"{fmt(f['stat up kB'], 0) + ' / ' + fmt(f['stat down kB'], 0):>22} "
              f"{fmt(f['stat req'], 0):>9} "
              f"{fmt(f['floor up kB'], 0) + ' / ' + fmt(f['floor down kB'], 0):>17} "
              f"{fmt(f['floor req'], 0):>9}")
    print("\nFleet requests of one training round per rpc (site_a, the last round, first repeat):")
    for config, rs in runs.items():
        last = training(rs[0])[-1] if training(rs[0]) else {}
        rpc = last.get("rpc", {}).get("site_a")
        print(f"  {rs[0]['label']:<17} "
              + ("n/a (no request log: SAFN_FLEET_REQUEST_LOG not written by this SuperNode)"
                 if rpc is None else ", ".join(f"{k.rsplit('/', 1)[-1]} {v}"
                                             for k, v in sorted(rpc.items()))
                 + f"; {last['request_s']['site_a']:.1f} s summed over its requests "
                   "(they overlap)"))
    print("\nissue #29's targets:")
    r50 = ratio(runs, "50ms", "bed0", "s/round")
    if r50 is not None:
        print(f"  a round at 50 ms RTT ≤ 2× bed 0 ms: {fmt(r50)}× "
              f"({'met' if r50[0] <= 2 else 'missed'})")
    s50 = ratio(runs, "50ms", "bed0", "statistics s")
    if s50 is not None:
        print(f"  the statistics round (with the key exchange) at 50 ms RTT ≤ 2× bed 0 ms: "
              f"{fmt(s50)}× ({'met' if s50[0] <= 2 else 'missed'})")
    for config in runs:
        up, down = (ratio(runs, config, "bed0", k) for k in ("up kB/round", "down kB/round"))
        if config != "bed0" and up is not None:
            ok = up[0] <= 1.05 and down[0] <= 1.05
            print(f"  bytes per round per site, {CONFIGS[config][0]} vs bed 0 ms: up {fmt(up)}×, "
                  f"down {fmt(down)}× ({'met' if ok else 'missed'}: unchanged within 5 %)")
    for ours, flowers in (("bed0", "bed0-flower"), ("50ms", "50ms-flower"),
                          ("200ms", "200ms-flower")):
        t = ratio(runs, ours, flowers, "s/round")
        if t is not None:
            up, down = (ratio(runs, ours, flowers, k) for k in ("up kB/round", "down kB/round"))
            req = ratio(runs, ours, flowers, "req/round")
            print(f"  #29's cuts, {CONFIGS[ours][0]} vs Flower's transfers: s/round {fmt(t)}×, "
                  f"bytes up {fmt(up)}× / down {fmt(down)}×, requests {fmt(req)}× "
                  f"(bytes {'unchanged or lower' if up and down and max(up[0], down[0]) <= 1.05 else 'HIGHER'})")
    t50 = ratio(runs, "50ms-flower", "bed0-flower", "s/round")
    if t50 is not None:
        print(f"  without the cuts, a round at 50 ms RTT / bed 0 ms: {fmt(t50)}×")
    print("\nrounds (s): " + "; ".join(
        f"{config} " + " | ".join(", ".join(f"{x:.1f}" for x in r["rounds_s"]) for r in rs)
        for config, rs in runs.items()))
    short = {c: [r["participants"] for r in rs] for c, rs in runs.items()
             if any(p is not None and p < len(SITES) for r in rs for p in r["participants"])}
    if short:
        print(f"warning: rounds with fewer than {len(SITES)} sites: {short}")
    again = {c: [r.get("attempts", 1) for r in rs] for c, rs in runs.items()
             if any(r.get("attempts", 1) > 1 for r in rs)}
    if again:
        print(f"note: runs that failed first and were run again (attempts): {again}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", type=Path, help="write every raw figure to this file")
    ap.add_argument("--retries", type=int, default=1,
                    help="run a configuration again this many times when it fails")
    ap.add_argument("--no-local", action="store_true",
                    help="skip the in-process local compute of a round")
    args = ap.parse_args()
    why = nb.available()
    if why is not None and any(CONFIGS[c][1] is not None for c in args.configs):
        raise SystemExit(f"no network test bed here: {why}")
    root = Path(tempfile.mkdtemp(prefix="safn-net-bench-"))
    material = make_material(root / "material", SITES,
                             hosts=(nb.COORDINATOR, "127.0.0.1", "localhost"))
    order = [c for c in CONFIGS if c in args.configs]
    runs: dict[str, list[dict]] = {c: [] for c in order}
    local, first_fed = None, None
    for k in range(args.repeats):
        for config in order:
            folder = root / f"{config}-{k}"
            print(f"[{time.strftime('%H:%M:%S')}] {config}, repeat {k + 1}", flush=True)
            for attempt in range(args.retries + 1):
                try:
                    fed, result = run_config(material, folder / f"try{attempt}", config,
                                             args.rounds)
                    break
                except RunFailed as failed:  # a loaded host: say so, and run it again
                    print(f"run failed ({'retrying' if attempt < args.retries else 'giving up'}"
                          f"): {failed}", flush=True)
                    if attempt == args.retries:
                        raise SystemExit(1)
            result["attempts"] = attempt + 1
            runs[config].append(result)
            first_fed = first_fed or fed
    if not args.no_local:
        # the first run's config (default model) and its sites' prepared cohorts
        local = local_compute(first_fed, args.rounds)
    report(runs, args.rounds, args.repeats, local)
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "repeats": args.repeats,
                                         "local_compute": local, "runs": runs}, indent=1))
        print(f"raw figures: {args.json}")


if __name__ == "__main__":
    main()
