"""Telling the sites that a deployed run is over (`safn.client.run_end` is the site's side).

Flower's SuperNode cannot tell a run that ended from a coordinator that crashed: once the
SuperLink is gone it retries for ever. So the ServerApp's last act is one QUERY message
(``task: run-end``) to every connected site, saying whether the run completed or stopped (with
the reason) and after which round; a site that completed its run then leaves (`safn-client`
exits 0) and one whose run stopped stays, for a ``--resume``. A site still connected that has
not answered within the timeout is only reported: the run's outcome is already written.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from safn_core.federation.events import Event, EventLog
from safn_core.federation.protocol import CONFIG, Config, Task


def tell_sites_run_ended(grid: Grid, shared_text: str, run_id: str, status: str, reason: str,
                         last_round: int, timeout: float,
                         events: EventLog) -> list[int]:
    """Send the run-end message to every connected site; the node ids that acknowledged it."""
    config = {Config.TASK: Task.RUN_END, Config.SAFN_CONFIG: shared_text, Config.RUN_ID: run_id,
              Config.RUN_STATUS: status, Config.RUN_REASON: reason,
              Config.LAST_ROUND: int(last_round)}
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    told = [r.metadata.src_node_id for r in grid.send_and_receive(messages, timeout=timeout)
            if not r.has_error()]
    # a site that recorded the end leaves at once, and Flower may then turn its sent reply into
    # an error ("objects unavailable"): only a site still connected without answering waits on
    waiting = (set(nodes) - set(told)) & set(grid.get_node_ids())
    if waiting:
        events.emit(Event.RUN_END_UNACKNOWLEDGED, waiting=len(waiting), sites=len(nodes),
                    timeout=timeout)
    return told
