"""Bytes sent per site per round, against the model's size.

Runs a short safn-sim federation on Flower (Ray backend) with a ClientApp mod that records the
size of every message a site receives and sends, serialised with Flower's own protobuf serde (what the Deployment Engine puts on the wire, before TLS/HTTP framing).

    .venv/bin/python benchmarks/sim_bytes.py
    .venv/bin/python benchmarks/sim_bytes.py --set federation.histogram_bins=200
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

from common import config, prepare

LOG = os.path.join(tempfile.gettempdir(), f"safn-bytes-{os.getpid()}")


def size(content) -> int:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def parts_of(content) -> dict[str, int]:
    """Bytes per record of a RecordDict (arrays, config, metrics ...)."""
    from flwr.app import RecordDict

    return {k: size(RecordDict({k: v})) for k, v in content.items()}


def kind_of(msg, default: str) -> str:
    """train / evaluate, or for QUERY messages the statistics round (describe, its secure sums)
    and a secure sum's redone phases after a dropout."""
    if default != "query":
        return default
    config = msg.content["config"]
    task = str(config.get("task", "describe"))
    if task == "describe" or "statistics" in str(config.get("secagg-context", "")):
        return "statistics"
    return f"secagg-retry ({task})"


def log_sizes(msg, context, call_next):
    """A ClientApp mod: log the size of every message a site receives and of its reply."""
    reply = call_next(msg, context)
    kind = msg.metadata.message_type.split(".")[0]  # query / train / evaluate
    row = {"kind": kind_of(msg, kind), "round": int(msg.content["config"].get("server-round", 0))
           if "config" in msg.content else 0,
           "received": size(msg.content), "sent": size(reply.content),
           "received_parts": parts_of(msg.content), "sent_parts": parts_of(reply.content)}
    with open(f"{LOG}-{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return reply


def instrumented_client_app():
    """The simulation's ClientApp with every message's size logged (`log_sizes`)."""
    from safn.simulations.client_app import simulation_client_app

    return simulation_client_app(mods=[log_sizes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    cfg = config(["simulation.compare=false", "federation.rounds=2", *args.overrides])
    run_dir, parts = prepare(cfg)
    os.environ["SAFN_BYTES_LOG"] = LOG
    import safn.simulations.client_app as real

    real.app = instrumented_client_app()  # run_flower_simulation imports `app` from here
    from safn.simulations.engine import run_flower_simulation

    try:
        run_flower_simulation(run_dir, cfg, len(parts))
        from safn_core.federation.checkpoint import load_checkpoint

        weights = load_checkpoint(run_dir).weights
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rows = []
    for f in glob.glob(f"{LOG}-*.jsonl"):
        rows += [json.loads(line) for line in open(f)]
        os.unlink(f)
    n_params = sum(v.size for v in weights.values())
    model_bytes = sum(v.nbytes for v in weights.values())
    print(f"model: {n_params:,} parameters, {model_bytes / 1e3:.1f} kB as float32; "
          f"{len(parts)} sites, {cfg.federation.histogram_bins} histogram bins")
    print(f"{'message':<12}{'site receives':>16}{'site sends':>14}   largest parts")
    per_round = {"received": 0.0, "sent": 0.0}
    for kind in ("statistics", "train", "evaluate"):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        rec = sum(r["received"] for r in sel) / len(sel)
        sent = sum(r["sent"] for r in sel) / len(sel)
        big = {**{f"in:{k}": v for k, v in sel[0]["received_parts"].items()},
               **{f"out:{k}": v for k, v in sel[0]["sent_parts"].items()}}
        top = ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in
                        sorted(big.items(), key=lambda kv: -kv[1])[:3])
        print(f"{kind:<12}{rec / 1e3:>13.1f} kB{sent / 1e3:>11.1f} kB   {top}")
        if kind != "statistics":
            per_round["received"] += rec
            per_round["sent"] += sent
    total = per_round["received"] + per_round["sent"]
    print(f"per site per round (train + evaluate): receives {per_round['received'] / 1e3:.1f} kB, "
          f"sends {per_round['sent'] / 1e3:.1f} kB, {total / 1e3:.1f} kB in all = "
          f"{total / model_bytes:.2f} x the model's size")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
