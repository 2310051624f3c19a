"""A site's SuperNode process (`safn.client.supernode`). One entry point: `prepare`.

Patches (each checked before it is applied, announced in one line, restorable):

- `APP_APPROVAL`: the site runs only app bundles it approved by sha256;
- `POLL_INTERVAL`: an idle SuperNode pulls from the SuperLink every ``site.poll_interval`` s
  (Flower: 3 s) and looks for a ClientApp's reply every `LOCAL_WAIT` s (Flower: 0.5 s);
- `HEARTBEAT`: a heartbeat every `HEARTBEAT_INTERVAL` s (Flower: 30 s);
- `SESSION_TAKEOVER`: a SuperNode restarted after a crash ends its own previous session;
- `core.OBJECT_PULL_BACKOFF`: a message's objects are retried after 20 ms, not 1 s;
- `OBJECT_CONCURRENCY`: all of a message's objects are pulled / pushed at once, not 2 at a time
  (each wave of requests waits one round trip on a slow link);
- `CONFIRM_IN_BACKGROUND`: the receipt of a message is confirmed while its ClientApp runs, not
  before it starts (one round trip less per message);
- `REQUEST_LOG`: with ``SAFN_FLEET_REQUEST_LOG`` set, one JSON line per Fleet request (a
  diagnostic: how many requests a round costs, and how long each took).

Warm ClientApps need no patch here: `safn.client.supernode` starts its own SuperExec
(`safn.client.superexec`) and runs Flower's SuperNode with ``--isolation process`` (a public option).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path

from safn_flower.patches import core
from safn_flower.patches.core import Patch, replace, target

HEARTBEAT_INTERVAL = 10
"""Seconds between a SuperNode's heartbeats (Flower: 30; the SuperLink accepts 10 to 1800). A
site that crashed is then seen offline within 2 x 10 s instead of 60 s, so a round stops waiting
for it sooner and the site can reconnect sooner."""

SESSION_TAKEOVER_GRACE = 5.0
"""Seconds a restarted SuperNode waits between ending its previous session and activating a new
one. A message the SuperLink delivered to the old session is never delivered again, and the
ServerApp fails it only when it polls while the node is offline; the grace is longer than the
coordinator's slowest poll (``server.poll_interval`` <= 3 s), so it always does, instead of
waiting ``federation.round_timeout`` for a reply nobody will send."""

LOCAL_WAIT = 0.01
"""Seconds between two looks at a SuperNode's own in-memory state while it waits for the
ClientApp's reply (Flower: 0.5). The look costs microseconds and no network request, unlike a
pull from the SuperLink (``site.poll_interval``)."""


class PollClock:
    """The ``time`` module with ``sleep`` capped at ``interval`` seconds (stands in for the
    module-level ``time`` of a Flower module whose polling loop sleeps a fixed time).

    With ``local``, a sleep shorter than ``local_below`` seconds is capped at ``local`` instead:
    Flower's SuperNode sleeps 3 s between pulls from the SuperLink (a network request) and 0.5 s
    between looks at its own state for a ClientApp's reply (no request)."""

    stands_in_for_time = True  # `core.is_time_module` accepts it

    def __init__(self, interval: float, local: float | None = None, local_below: float = 1.0):
        self.interval, self.local, self.local_below = interval, local, local_below

    def sleep(self, seconds: float) -> None:
        if self.local is not None and seconds < self.local_below:
            time.sleep(min(seconds, self.local))
        else:
            time.sleep(min(seconds, self.interval))

    def __getattr__(self, name):
        return getattr(time, name)

def _install_app_approval(verify: Callable[[object, Callable], bool]) -> None:
    """Every app bundle (FAB) the SuperLink announces goes through ``verify(fab, flower_verify)``
    in the SuperNode process, before it is stored and before any ClientApp starts. Flower only
    enters its own check when trusted entities are set, and only for FABs from a SuperLink that
    marks them verifiable: remember whether it did, then always enter the check with ours."""
    from flwr.supernode import start_client_internal as sci

    flower_verify = sci._verify_fab
    flower_pull = sci._pull_and_store_message

    def verify_fab(fab, _trusted_entities) -> bool:
        return verify(fab, flower_verify)

    def pull(**kwargs):
        get_fab = kwargs["get_fab"]

        def get_fab_checked(fab_hash, run_id):
            fab = get_fab(fab_hash, run_id)
            if fab.verifications.get("valid_license"):
                fab.verifications["safn-superlink-license"] = "1"
            fab.verifications["valid_license"] = "safn-approval"
            return fab

        kwargs["get_fab"] = get_fab_checked
        kwargs["trusted_entities"] = {"safn-approval": ""}  # always enter Flower's check
        return flower_pull(**kwargs)

    replace(APP_APPROVAL, sci, "_verify_fab", verify_fab)
    replace(APP_APPROVAL, sci, "_pull_and_store_message", pull)

def _install_poll_interval(interval: float = 3.0, local: float = LOCAL_WAIT) -> None:
    """Pulls from the SuperLink every ``interval`` s when idle; the reply of a ClientApp is
    looked for every ``local`` s (`LOCAL_WAIT`), so that it leaves as soon as it is there."""
    from flwr.supernode import start_client_internal as sci

    replace(POLL_INTERVAL, sci, "time", PollClock(interval, local=local))

def _install_heartbeat(interval: int = HEARTBEAT_INTERVAL) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    replace(HEARTBEAT, heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", interval)
    replace(HEARTBEAT, fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", interval)

OBJECT_WORKERS = 8
"""Objects of one message pulled or pushed at once (Flower: 2, and never more than the site's
CPU cores). A message of safn's is 5 to 7 objects: at 2 at a time that is 3 waves of requests
each way, each waiting one round trip; at 8 it is one. The requests mostly wait on the network,
so the site's core count is no limit."""


def _install_object_concurrency(workers: int = OBJECT_WORKERS) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    def get_num_workers(max_concurrent: int) -> int:
        return max(1, workers)

    replace(OBJECT_CONCURRENCY, inflatable_utils, "get_num_workers", get_num_workers)


def _install_confirm_in_background() -> None:
    """Flower confirms a pulled message with one more request, and waits for its answer before
    the ClientApp starts. The confirmation only lets the SuperLink free its copy (the message
    was already claimed when it was pulled), so it is sent from a background thread while the
    ClientApp runs; a confirmation that fails is logged, nothing else depends on it."""
    import queue
    import threading
    from logging import WARNING

    from flwr.common.logger import log
    from flwr.supernode import fleet_http_connection as conn

    flower_make = conn.make_confirm_message_received_fn_protobuf
    pending: queue.Queue = queue.Queue()

    def work() -> None:
        while True:
            confirm, object_id = pending.get()
            try:
                confirm(object_id)
            except Exception as exc:  # noqa: BLE001 (logged: nothing depends on it)
                log(WARNING, "safn: confirming the receipt of message %s failed (%s); the "
                             "coordinator frees its copy at the run's end", object_id, exc)

    # a daemon: a confirmation that Flower keeps retrying (13 min on a dead link) must never
    # keep a stopped SuperNode from exiting (a ThreadPoolExecutor's workers are joined at exit)
    threading.Thread(target=work, name="safn-confirm", daemon=True).start()

    def make(confirm_protobuf, node, run_id):
        confirm = flower_make(confirm_protobuf, node, run_id)

        def in_background(object_id: str) -> None:
            pending.put((confirm, object_id))

        return in_background

    replace(CONFIRM_IN_BACKGROUND, conn, "make_confirm_message_received_fn_protobuf", make)


REQUEST_LOG_ENV = "SAFN_FLEET_REQUEST_LOG"


def _install_request_log(path: str) -> None:
    """One JSON line per Fleet HTTP request in ``path`` (appended): ``{"t": unix time at the
    answer, "rpc": Flower's method name, "s": seconds, "ok": answered without an error}``.
    Retries are requests of their own."""
    import json
    import threading

    from flwr.supercore.protobuf import client as protobuf_client

    fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (the process's life)
    lock = threading.Lock()
    flower_send = protobuf_client.ProtobufClient._send

    def send(self, context, *args, **kwargs):
        start, ok = time.perf_counter(), False
        try:
            response = flower_send(self, context, *args, **kwargs)
            ok = not response.is_error
            return response
        finally:
            line = json.dumps({"t": round(time.time(), 4), "rpc": context.rpc_method,
                               "s": round(time.perf_counter() - start, 4), "ok": ok})
            with lock:
                fh.write(line + "\n")

    replace(REQUEST_LOG, protobuf_client.ProtobufClient, "_send", send)


def read_node_id(path: Path) -> int | None:
    """The node id a SuperNode of this site last activated as (None: never, or unreadable)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def write_node_id(path: Path, node_id: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{node_id}\n")
    os.replace(tmp, path)

def _install_session_takeover(node_id_file: str, grace: float = SESSION_TAKEOVER_GRACE,
                                sleep: Callable[[float], None] = time.sleep) -> None:
    """A SuperNode restarted after a crash ends its own previous session, then activates.

    Flower's SuperLink activates a node only when it is offline, and a killed SuperNode stays
    online until it has missed its heartbeats (up to 2 x `HEARTBEAT_INTERVAL`); a restarted one
    is refused meanwhile and exits. Every activation records the node id in ``node_id_file``;
    before the next one, the SuperNode sends that id a DeactivateNode (the Fleet call a SuperNode
    makes when it stops cleanly; the SuperLink accepts it only signed with the node's own key),
    waits ``grace`` seconds (`SESSION_TAKEOVER_GRACE`) and activates. An id that is not this
    key's node (a new federation) is answered 401 and skipped without waiting."""
    from logging import INFO

    import httpx
    from flwr.common.logger import log
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode import fleet_http_connection as conn

    path = Path(node_id_file)

    class TakeoverClient(conn.FleetHttpClient):  # noqa: N802 (Flower's method names)
        previous_ended = False

        def ActivateNode(self, request):  # noqa: N802
            previous = read_node_id(path)
            if previous is not None and not self.previous_ended:
                self._end_session(previous)  # a transport error: Flower's retry calls us again
                self.previous_ended = True
            response = super().ActivateNode(request)
            write_node_id(path, response.node_id)
            return response

        def _end_session(self, node_id: int) -> None:
            try:
                self.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
                what = "ended this site's previous session, which had not timed out"
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == httpx.codes.UNAUTHORIZED:
                    return  # not this key's node at this SuperLink: no session of ours to end
                what = "this site's previous session had already ended"
            log(INFO, "safn: %s (node %s); activating in %.0f s", what, node_id, grace)
            sleep(grace)

    replace(SESSION_TAKEOVER, conn, "FleetHttpClient", TakeoverClient)

def fleet_client(value) -> str | None:
    """Flower's Fleet HTTP client class, looked up by name when the connection is opened."""
    from flwr.supernode import fleet_http_connection as conn

    if not inspect.isclass(value):
        return f"is {value!r}, expected a class"
    missing = [m for m in ("ActivateNode", "DeactivateNode", "from_server_address")
               if not callable(getattr(value, m, None))]
    if missing:
        return f"lacks {missing}"
    if "FleetHttpClient" not in conn.http_request_response.__wrapped__.__code__.co_names:
        return "is no longer what http_request_response opens its connection with"
    return None


_SCI = "flwr.supernode.start_client_internal"

APP_APPROVAL = Patch(
    "supernode_app_approval",
    "a site runs only app bundles it approved by sha256 (Flower refuses every bundle from an "
    "open-source SuperLink, or runs any when no trusted entities are set)",
    (target(_SCI, "_verify_fab", core.params("fab", "trusted_entities")),
     target(_SCI, "_pull_and_store_message",
            core.params("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                        "pull_object", "confirm_message_received", "trusted_entities"))),
    _install_app_approval)

POLL_INTERVAL = Patch(
    "supernode_poll_interval",
    "an idle SuperNode sleeps 3 s between pulls, and 0.5 s between looks at its own state while "
    "it waits for a ClientApp's reply",
    (target(_SCI, "time", core.module_sleeps(_SCI, {"3", "0.5"})),),
    _install_poll_interval)

HEARTBEAT = Patch(
    "supernode_heartbeat", "a SuperNode announces a heartbeat every 30 s",
    (target("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", core.is_int),
     target("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL", core.is_int)),
    _install_heartbeat)

SESSION_TAKEOVER = Patch(
    "supernode_session_takeover",
    "a restarted SuperNode is refused activation while its previous session has not timed out "
    "(2 heartbeats), and exits",
    (target("flwr.supernode.fleet_http_connection", "FleetHttpClient", fleet_client),
     target("flwr.proto.fleet_pb2", "DeactivateNodeRequest", lambda v: None
            if "node_id" in v.DESCRIPTOR.fields_by_name else "has no node_id field")),
    _install_session_takeover)

_IU = "flwr.supercore.inflatable.inflatable_utils"
_CONN = "flwr.supernode.fleet_http_connection"

OBJECT_CONCURRENCY = Patch(
    "supernode_object_concurrency",
    "a SuperNode pulls and pushes a message's objects 2 at a time (and never more than its CPU "
    "cores), one round trip per 2 objects",
    (target(_IU, "get_num_workers", core.params("max_concurrent")),
     target(_IU, "pull_objects", core.calls("get_num_workers")),
     target(_IU, "push_object_contents_from_iterable", core.calls("get_num_workers"))),
    _install_object_concurrency)

CONFIRM_IN_BACKGROUND = Patch(
    "supernode_confirm_in_background",
    "a SuperNode waits for the SuperLink to acknowledge the receipt of a message before its "
    "ClientApp starts",
    (target(_CONN, "make_confirm_message_received_fn_protobuf",
            core.params("confirm_message_received_protobuf", "node", "run_id")),
     target(_CONN, "http_request_response",
            core.source_says("make_confirm_message_received_fn_protobuf(",
                             "confirm_message_received,"))),
    _install_confirm_in_background)

REQUEST_LOG = Patch(
    "supernode_request_log",
    "a SuperNode keeps no account of its requests to the SuperLink",
    (target("flwr.supercore.protobuf.client", "ProtobufClient._send",
            core.params("self", "context", "stream")),),
    _install_request_log)

PATCHES = (APP_APPROVAL, POLL_INTERVAL, HEARTBEAT, SESSION_TAKEOVER, core.OBJECT_PULL_BACKOFF,
           OBJECT_CONCURRENCY, CONFIRM_IN_BACKGROUND, REQUEST_LOG)
"""Every patch of this process (`tests/test_flower_patches.py` checks them)."""


def prepare(verify: Callable[[object, Callable], bool], poll_interval: float,
            node_id_file: str | None = None, request_log: str | None = None,
            object_workers: int = OBJECT_WORKERS,
            confirm_in_background: bool = True) -> tuple[str, ...]:
    """Patch this SuperNode process: app bundles go through ``verify(fab, flower_verify)``, an
    idle SuperNode pulls every ``poll_interval`` s, heartbeats every `HEARTBEAT_INTERVAL` s,
    quick object pulls, all of a message's objects at once, its receipt confirmed in the
    background, with ``node_id_file`` the takeover of its own previous session, and with
    ``request_log`` an account of every Fleet request (``object_workers`` 0 and
    ``confirm_in_background`` False keep Flower's own transfers, for comparisons). Checked first
    (`FlowerPatchError`), announced in one line; returns the names applied."""
    chosen = [(APP_APPROVAL, {"verify": verify}),
              (POLL_INTERVAL, {"interval": poll_interval}),
              (HEARTBEAT, {}), (core.OBJECT_PULL_BACKOFF, {})]
    if object_workers:
        chosen.append((OBJECT_CONCURRENCY, {"workers": object_workers}))
    if confirm_in_background:
        chosen.append((CONFIRM_IN_BACKGROUND, {}))
    if node_id_file:
        chosen.append((SESSION_TAKEOVER, {"node_id_file": node_id_file}))
    if request_log:
        chosen.append((REQUEST_LOG, {"path": request_log}))
    return core.apply(chosen)
