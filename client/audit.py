"""The site's audit trail: a line per reply that left the site, describing what it carried.

A Flower mod on the whole ClientApp: after each handler (describe, train, evaluate), it appends
to the JSON-lines file named by the node config key ``audit-log`` (safn-client sets
``<site.state_dir>/audit/outgoing.jsonl``) the run (``run_id``: the run's own identity, as in
bundle.json and the privacy ledger, when the message carries it; ``flower_run_id``: Flower's,
new at each resume), the reply's records: array names, shapes and dtypes, metric names with
their scalar values or list lengths, config keys with their types, and the seconds the handler
took. Values of arrays and histogram lists are not copied (the audit must not become a second
copy of what was sent); a site's data-protection officer can read what kind of thing left,
when, for which run.
In simulation there is no ``audit-log`` and the mod does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message

from safn_core.federation.protocol import CONFIG, Config


def describe_reply(msg: Message, reply: Message) -> dict:
    entry: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "flower_run_id": msg.metadata.run_id, "type": msg.metadata.message_type}
    config = msg.content.config_records.get(CONFIG) if msg.has_content() else None
    if config is not None and Config.RUN_ID in config:
        # the run's own identity (bundle.json, the privacy ledger), stable across a resume,
        # which starts a new Flower run
        entry["run_id"] = str(config[Config.RUN_ID])
    if config is not None and Config.SERVER_ROUND in config:
        entry["round"] = int(config[Config.SERVER_ROUND])
    if reply.has_error():
        entry["error"] = reply.error.reason
        return entry
    records: dict = {}
    for name, rec in reply.content.array_records.items():
        records[name] = {"kind": "arrays", "arrays": {
            k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in rec.items()}}
    for name, rec in reply.content.metric_records.items():
        records[name] = {"kind": "metrics", "values": {
            k: ({"list_length": len(v)} if isinstance(v, list) else v) for k, v in rec.items()}}
    for name, rec in reply.content.config_records.items():
        records[name] = {"kind": "config", "values": {
            k: ({"list_length": len(v)} if isinstance(v, list) else
                v if isinstance(v, (bool, int, float)) else f"<{type(v).__name__} "
                                                             f"{len(v)}>")
            for k, v in rec.items()}}
    entry["records"] = records
    return entry


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Append a description of the reply to the site's audit log, if it keeps one."""
    started = time.perf_counter()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - started
    path = context.node_config.get("audit-log")
    if path:
        entry = describe_reply(msg, reply)
        entry["handler_seconds"] = round(seconds, 4)
        line = json.dumps(entry) + "\n"
        Path(str(path)).parent.mkdir(parents=True, exist_ok=True)
        # one write of one line in append mode: lines of concurrent processes never interleave
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    return reply
