"""The end of a run, as a site learns it: the coordinator's ``run-end`` message.

When a deployed run is over (completed, or stopped with its checkpoint kept), the ServerApp
tells every connected site (`safn.server.run_end`). The site's ClientApp records it in
``<site.state_dir>/run_end.json`` (written atomically; one file, the latest run's end) and says
so on the site's terminal. `safn-client` waits for that file to change: after a completed run
it stops its SuperNode and exits 0 (``--stay``: keeps serving, for the next run); after a
stopped run it stays connected, since the coordinator may ``--resume`` it. Without this message
a SuperNode cannot tell a finished run from a coordinator that crashed, and retries for ever.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safn.client.site_console import RUN_END_LINE, say
from safn_core.federation.protocol import CONFIG, SITE, Config, Describe, RunEnd
from safn_core.io import write_json

RUN_END_FILE = "run_end.json"


def record_run_end(msg, context):
    """The ClientApp's handler: write what the coordinator said about the run's end, and
    acknowledge it. (Flower is imported here: `safn-client` reads the file without it.)"""
    from flwr.app import ConfigRecord, Message, RecordDict

    from safn.client import site_context as sc

    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    end = {"run_id": str(config.get(Config.RUN_ID, "")),
           "flower_run_id": int(msg.metadata.run_id),
           "status": str(config[Config.RUN_STATUS]),
           "reason": str(config.get(Config.RUN_REASON, "")),
           "last_round": int(config.get(Config.LAST_ROUND, 0)),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(sc.state_dir(site, context) / RUN_END_FILE, end)
    say(describe_run_end(end))
    return Message(RecordDict({SITE: ConfigRecord({Describe.NAME: site.name})}), reply_to=msg)


def describe_run_end(end: dict) -> str:
    """``run end: the run (run id …, Flower run …) completed …`` (`RUN_END_LINE` first: the
    site's console knows the line by it)."""
    ids = f"run id {end['run_id']}, Flower run {end['flower_run_id']}"
    if end["status"] == RunEnd.COMPLETED:
        return (f"{RUN_END_LINE}the run ({ids}) completed at the coordinator after round "
                f"{end['last_round']}")
    return (f"{RUN_END_LINE}the coordinator stopped the run ({ids}) after round "
            f"{end['last_round']}: {end['reason']}")


def read_run_end(state_dir: Path) -> dict | None:
    """The last run end the site recorded, or None (none yet, or half a file)."""
    try:
        return json.loads((Path(state_dir) / RUN_END_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
