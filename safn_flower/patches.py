"""Every patch safn makes to private Flower 1.42 internals, in one place, checked before use.

Flower 1.42 hard-codes waits tuned for large deployments (a SuperNode sleeps 3 s between pulls,
the ServerApp's Grid 3 s between polls, object pulls back off 1 s, 2 s, 4 s … up to 10 s, the
simulation's in-memory Grid and dispatcher poll every 0.1 s) and has no hook for a site's own
app approval or for warm ClientApps. For a SAFN round (half a megabyte each way, well under a
second of compute) the waits are nearly all of the time. Each `Patch` below changes one private
attribute, and nothing else Flower does.

Rules, because these are someone else's private internals:

- `check` looks at every target *before* anything is patched: the module imports, the attribute
  exists, and its signature / defaults are the ones these patches were written against. A
  mismatch (a Flower upgrade moved or changed it) raises `FlowerPatchError` naming the patch and
  what changed; nothing is half-applied. `tests/test_flower_patches.py` runs the checks, so an
  upgrade fails the suite rather than a run.
- `apply` says in one line, on stderr, which patches it applied.
- `restore` undoes a patch in this process (benchmarks compare against stock Flower).

Patches by process: the simulation driver (`SIM`; on a Ray cluster also `SIM_CLUSTER`), a
deployed ServerApp (`SERVERAPP`), a site's SuperNode (`SUPERNODE`) and its warm SuperExec
(`SUPEREXEC`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FLOWER_SERIES = "1.42."
"""The Flower release series every target below was checked against."""

OBJECT_PULL_BACKOFF = (0.02, 0.25)
"""First retry of a message object after 20 ms, doubling up to 250 ms (Flower: 1 s up to 10 s)."""

REPLY_UPLOAD_WAIT = 30.0
"""Seconds a deployed ServerApp keeps trying to pull the objects of a reply that is still being
uploaded (Flower: 7200). A site killed while sending its update leaves a reply whose model object
never arrives, and Flower's Grid pulls the replies of a round one after the other: without a
bound, every other site's reply waits until the SuperLink drops the upload (3 minutes) and is
lost when that runs past ``federation.round_timeout``. With it, that one reply becomes an error
("Reply message objects are unavailable"), the round goes on with the others. A live site's
upload of a few MB takes well under a second on any link where a federation is usable."""

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


class FlowerPatchError(RuntimeError):
    """A patch target is missing or not what the patch was written against."""


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

    def __init__(self, interval: float, local: float | None = None, local_below: float = 1.0):
        self.interval, self.local, self.local_below = interval, local, local_below

    def sleep(self, seconds: float) -> None:
        if self.local is not None and seconds < self.local_below:
            time.sleep(min(seconds, self.local))
        else:
            time.sleep(min(seconds, self.interval))

    def __getattr__(self, name):
        return getattr(time, name)


@dataclass(frozen=True)
class Target:
    """One private attribute: ``module.attr`` (``attr`` may be dotted, e.g. a method)."""

    module: str
    attr: str

    def owner_and_name(self):
        obj = importlib.import_module(self.module)
        *path, name = self.attr.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    def get(self):
        owner, name = self.owner_and_name()
        return getattr(owner, name)

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}"


def _params(*names: str) -> Callable[[object], str | None]:
    """Expect a callable whose parameters are exactly ``names`` (in order)."""
    def check(value) -> str | None:
        found = tuple(inspect.signature(value).parameters)
        return None if found == names else f"parameters {found}, expected {names}"
    return check


def _kwdefaults(*keys: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        found = set((value.__kwdefaults__ or {}))
        missing = set(keys) - found
        return None if not missing else f"keyword defaults lack {sorted(missing)}"
    return check


def _is_time_module(value) -> str | None:
    return None if value is time or isinstance(value, PollClock) else \
        f"is {value!r}, expected the time module"


def _calls(*names: str) -> Callable[[object], str | None]:
    """Expect a function whose code still calls ``names`` (what the patch replaces it for)."""
    def check(value) -> str | None:
        code = getattr(value, "__code__", None)
        if code is None:
            return f"is {value!r}, expected a function"
        missing = [n for n in names if n not in code.co_names]
        return None if not missing else f"no longer calls {missing}"
    return check


def _module_sleeps(module: str, expected: set[str]) -> Callable[[object], str | None]:
    """Expect a ``time`` module whose owner ``module`` calls ``time.sleep`` with exactly the
    constant arguments ``expected`` (what a `PollClock` with ``local`` tells apart)."""
    def check(value) -> str | None:
        import re

        problem = _is_time_module(value)
        if problem:
            return problem
        source = inspect.getsource(importlib.import_module(module))
        found = set(re.findall(r"time\.sleep\(([^)]*)\)", source))
        return None if found == expected else \
            f"sleeps {sorted(found)}, expected {sorted(expected)}"
    return check


def _queue_class(value) -> str | None:
    """Flower's simulation queues: ``queue.Queue`` in ``vce_api``, read with 1 s timeouts."""
    import queue
    import re

    if not (inspect.isclass(value) and issubclass(value, queue.Queue)):
        return f"is {value!r}, expected queue.Queue"
    from flwr.server.superlink.fleet.vce import vce_api

    found = set(re.findall(r"\.get\(timeout=([^)]*)\)", inspect.getsource(vce_api)))
    return None if found == {"1.0"} else f"queues are read with timeouts {sorted(found)}, " \
                                          "expected ['1.0']"


def _is_int(value) -> str | None:
    return None if isinstance(value, int) else f"is {value!r}, expected an int"


def _is_subprocess(value) -> str | None:
    import subprocess

    return None if value is subprocess or hasattr(value, "Popen") else \
        f"is {value!r}, expected the subprocess module"


def _fleet_client(value) -> str | None:
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


def _is_class(name: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        return None if inspect.isclass(value) and hasattr(value, "launch") else \
            f"is {value!r}, expected the class {name} with a launch method"
    return check


@dataclass(frozen=True)
class Patch:
    """One patch: what it changes, why, how its targets are checked."""

    name: str
    why: str
    targets: tuple[tuple[Target, Callable[[object], str | None]], ...]

    def problems(self) -> list[str]:
        out = []
        for target, check in self.targets:
            try:
                value = target.get()
            except (ImportError, AttributeError) as exc:
                out.append(f"{self.name}: {target} not found ({exc})")
                continue
            problem = check(value)
            if problem:
                out.append(f"{self.name}: {target} {problem}")
        return out


def _t(module: str, attr: str, check) -> tuple[Target, Callable]:
    return Target(module, attr), check


_SCI = "flwr.supernode.start_client_internal"

PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("sim_grid_pull_interval",
          "the simulation's in-memory Grid waits 0.1 s between pulls for replies",
          (_t("flwr.superlink.grid.inmemory_grid", "InMemoryGrid.__init__",
              _params("self", "state_factory", "pull_interval")),)),
    Patch("sim_ray_left_running",
          "the simulation's Ray backend shuts Ray down when the run ends, before safn-sim on a "
          "Ray cluster can read where the ClientApps ran and remove the sites' mirrors",
          (_t("flwr.server.superlink.fleet.vce.backend.raybackend", "RayBackend.terminate",
              _calls("terminate_all_actors", "shutdown")),)),
    Patch("sim_queue_wait",
          "the simulation's message workers wait up to 1 s on their queues before they see "
          "that the run has ended",
          (_t("flwr.server.superlink.fleet.vce.vce_api", "Queue", _queue_class),
           _t("flwr.server.superlink.fleet.vce.vce_api", "run_api", _calls("Queue")))),
    Patch("sim_dispatch_interval",
          "the simulation's dispatcher waits 0.1 s before handing a message to a Ray actor",
          (_t("flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue",
              _params("state", "queue", "nodes_mapping", "f_stop")),
           _t("flwr.server.superlink.linkstate.in_memory_linkstate",
              "InMemoryLinkState.__init__", _calls("message_ins_store", "lock")),
           _t("flwr.server.superlink.linkstate.in_memory_linkstate",
              "InMemoryLinkState.get_message_ins",
              _calls("message_ins_store", "dst_node_id", "delivered_at")))),
    Patch("object_pull_backoff",
          "fetching a message's objects backs off 1 s, 2 s, 4 s … while they are in transit",
          (_t("flwr.supercore.inflatable.inflatable_utils", "pull_objects",
              _kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object")),
           _t("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
              _kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object")))),
    Patch("serverapp_reply_upload_wait",
          "a deployed ServerApp waits up to 2 h for the objects of a reply whose sender died "
          "while uploading it, and meanwhile pulls no other site's reply",
          (_t("flwr.superlink.grid.http_grid", "pull_objects",
              lambda v: _kwdefaults("max_time")(getattr(v, "__wrapped__", v))),)),
    Patch("serverapp_grid_polling",
          "a deployed ServerApp's Grid sleeps 3 s between polls for replies",
          (_t("flwr.superlink.grid.http_grid", "time", _is_time_module),)),
    Patch("supernode_app_approval",
          "a site runs only app bundles it approved by sha256 (Flower refuses every bundle from "
          "an open-source SuperLink, or runs any when no trusted entities are set)",
          (_t(_SCI, "_verify_fab", _params("fab", "trusted_entities")),
           _t(_SCI, "_pull_and_store_message",
              _params("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                      "pull_object", "confirm_message_received", "trusted_entities")))),
    Patch("supernode_poll_interval",
          "an idle SuperNode sleeps 3 s between pulls, and 0.5 s between looks at its own state "
          "while it waits for a ClientApp's reply",
          (_t(_SCI, "time", _module_sleeps(_SCI, {"3", "0.5"})),)),
    Patch("supernode_heartbeat", "a SuperNode announces a heartbeat every 30 s",
          (_t("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", _is_int),
           _t("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL", _is_int))),
    Patch("supernode_session_takeover",
          "a restarted SuperNode is refused activation while its previous session has not timed "
          "out (2 heartbeats), and exits",
          (_t("flwr.supernode.fleet_http_connection", "FleetHttpClient", _fleet_client),
           _t("flwr.proto.fleet_pb2", "DeactivateNodeRequest", lambda v: None
              if "node_id" in v.DESCRIPTOR.fields_by_name else "has no node_id field"))),
    Patch("supernode_warm_superexec",
          "the SuperNode starts stock flower-superexec, which starts a fresh Python per message "
          "and looks for new tasks only at its next poll",
          (_t(_SCI, "subprocess", _is_subprocess),
           _t(_SCI, "_pull_and_store_message", _calls("create_task", "store_message")))),
    Patch("superexec_wakeup",
          "the SuperExec looks for a new task to start every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s",
          (_t("flwr.supercore.superexec.run_superexec", "time",
              _module_sleeps("flwr.supercore.superexec.run_superexec",
                             {"task_poll_interval"})),)),
    Patch("superexec_forking_executor",
          "the SuperExec starts every ClientApp as a fresh process (2-3 s of imports each)",
          (_t("flwr.supercore.superexec.executor.factory", "SubprocessExecutor",
              _is_class("SubprocessExecutor")),
           _t("flwr.supercore.superexec.executor.subprocess_executor",
              "SubprocessExecutor.launch", _params("self", "spec")),
           _t("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND", lambda v: None
              if isinstance(v, dict) else f"is {v!r}, expected a dict"))),
)}

SIM = ("sim_grid_pull_interval", "sim_dispatch_interval", "sim_queue_wait")
SIM_CLUSTER = ("sim_ray_left_running",)
"""Also in the simulation driver, on an existing Ray cluster (`simulations.ray_cluster`)."""
SERVERAPP = ("serverapp_grid_polling", "serverapp_reply_upload_wait", "object_pull_backoff")
SUPERNODE = ("supernode_app_approval", "supernode_poll_interval", "supernode_heartbeat",
             "supernode_session_takeover", "object_pull_backoff", "supernode_warm_superexec")
SUPEREXEC = ("object_pull_backoff", "superexec_forking_executor", "superexec_wakeup")

_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}


def flower_version() -> str:
    import flwr

    return flwr.__version__


def check(names=tuple(PATCHES)) -> list[str]:
    """Every problem with the targets of ``names`` (empty: all present and as expected)."""
    version = flower_version()
    out = [] if version.startswith(FLOWER_SERIES) else [
        f"Flower {version} is installed; these patches were checked on {FLOWER_SERIES}x"]
    for name in names:
        out += PATCHES[name].problems()
    return out


def _set(patch: str, owner, attr: str, value) -> None:
    """Replace ``owner.attr``, remembering the stock value once (for `restore`)."""
    _ORIGINALS.setdefault(patch, []).append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)


def restore(names=None) -> None:
    """Undo patches applied in this process (all of them by default), the last applied first
    (two patches may wrap the same function)."""
    for name in reversed([n for n in _ORIGINALS if names is None or n in names]):
        for owner, attr, value in reversed(_ORIGINALS.pop(name, [])):
            setattr(owner, attr, value)


def applied() -> tuple[str, ...]:
    return tuple(_ORIGINALS)


def apply(settings: dict[str, dict] | None = None, *, names=None, announce=True) -> tuple[str, ...]:
    """Check, then apply the patches ``names`` (default: those in ``settings``), each with its
    keyword settings; already applied ones are left alone. Raises `FlowerPatchError` before
    changing anything when a target is not as expected."""
    settings = dict(settings or {})
    names = tuple(names or settings)
    todo = [n for n in dict.fromkeys(names) if n not in _ORIGINALS]
    unknown = [n for n in todo if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown Flower patches {unknown}; known: {sorted(PATCHES)}")
    problems = check(todo)
    if problems:
        raise FlowerPatchError("cannot patch Flower safely: " + "; ".join(problems))
    for name in todo:
        _APPLY[name](**settings.get(name, {}))
    if todo and announce:
        print(f"safn: patched Flower {flower_version()} internals: {', '.join(todo)}",
              file=sys.stderr, flush=True)
    return tuple(todo)


# -- the patches themselves ---------------------------------------------------------------------

def _sim_grid_pull_interval(interval: float = 0.01) -> None:
    import flwr.superlink.grid.inmemory_grid as grid

    _set("sim_grid_pull_interval", grid.InMemoryGrid.__init__, "__defaults__", (interval,))


def _sim_ray_left_running() -> None:
    """The backend's actors are ended as before; Ray itself is left to safn-sim, which shuts it
    down after reading the cluster's state (`simulations.ray_cluster`)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    _set("sim_ray_left_running", raybackend.RayBackend, "terminate", terminate)


def _sim_queue_wait(wait: float = 0.02) -> None:
    """The queues of Flower's simulation runtime (messages to the ClientApp workers, replies to
    the state) are read with at most ``wait`` s timeouts instead of 1 s: a worker waiting on an
    empty queue looks at the stop event that often, so the runtime ends right after the
    ServerApp instead of up to a second later (a wake-up costs microseconds)."""
    import queue

    import flwr.server.superlink.fleet.vce.vce_api as vce

    class ShortWaitQueue(queue.Queue):
        def get(self, block=True, timeout=None):
            return super().get(block, None if timeout is None else min(timeout, wait))

    _set("sim_queue_wait", vce, "Queue", ShortWaitQueue)


def _nodes_with_undelivered(state, nodes_mapping) -> list:
    """The nodes that have a message not yet handed out, from one look at the state's store.

    Flower's dispatcher asks ``get_message_ins`` once per node per sweep, and each call reads
    (and checks) every stored message: N nodes x M messages per sweep, which at 1000 virtual
    sites was most of the driver's CPU. Asking only for the nodes that have one keeps Flower's own
    checks and delivery marking, once per message."""
    with state.lock:
        pending = {m.metadata.dst_node_id for m in list(state.message_ins_store.values())
                   if m.metadata.delivered_at == ""}
    return [node_id for node_id in nodes_mapping if node_id in pending]


def _sim_dispatch_interval(interval: float = 0.01) -> None:
    """Flower's own dispatcher loop with a shorter wait (longer with many nodes, so that polling
    stays cheap), asking only for nodes that have a message (`_nodes_with_undelivered`)."""
    import flwr.server.superlink.fleet.vce.vce_api as vce

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        wait = max(interval, 2e-4 * len(nodes_mapping))
        while not f_stop.is_set():
            for node_id in _nodes_with_undelivered(state, nodes_mapping):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(wait)

    _set("sim_dispatch_interval", vce, "add_messages_to_queue", add_messages_to_queue)


def _object_pull_backoff(initial: float = OBJECT_PULL_BACKOFF[0],
                         cap: float = OBJECT_PULL_BACKOFF[1]) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__)
        defaults.update(initial_backoff=initial, backoff_cap=cap,
                        max_tries_per_object=max(defaults.get("max_tries_per_object") or 0, 5000))
        _set("object_pull_backoff", fn, "__kwdefaults__", defaults)


def _serverapp_reply_upload_wait(seconds: float = REPLY_UPLOAD_WAIT) -> None:
    """The Grid's pulls of reply objects give up after ``seconds`` (other pulls unchanged)."""
    import flwr.superlink.grid.http_grid as http_grid

    pull_objects = http_grid.pull_objects

    def pull_reply_objects(*args, **kwargs):
        kwargs.setdefault("max_time", seconds)
        return pull_objects(*args, **kwargs)

    pull_reply_objects.__wrapped__ = pull_objects

    _set("serverapp_reply_upload_wait", http_grid, "pull_objects", pull_reply_objects)


def _serverapp_grid_polling(interval: float = 0.2) -> None:
    import flwr.superlink.grid.http_grid as http_grid

    _set("serverapp_grid_polling", http_grid, "time", PollClock(interval))


def _supernode_app_approval(verify: Callable[[object, Callable], bool]) -> None:
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

    _set("supernode_app_approval", sci, "_verify_fab", verify_fab)
    _set("supernode_app_approval", sci, "_pull_and_store_message", pull)


def _supernode_poll_interval(interval: float = 3.0, local: float = LOCAL_WAIT) -> None:
    """Pulls from the SuperLink every ``interval`` s when idle; the reply of a ClientApp is
    looked for every ``local`` s (`LOCAL_WAIT`), so that it leaves as soon as it is there."""
    from flwr.supernode import start_client_internal as sci

    _set("supernode_poll_interval", sci, "time", PollClock(interval, local=local))


def _supernode_heartbeat(interval: int = HEARTBEAT_INTERVAL) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    _set("supernode_heartbeat", heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", interval)
    _set("supernode_heartbeat", fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", interval)


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


def _supernode_session_takeover(node_id_file: str, grace: float = SESSION_TAKEOVER_GRACE,
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

    _set("supernode_session_takeover", conn, "FleetHttpClient", TakeoverClient)


WAKE_FD_ENV = "SAFN_SUPEREXEC_WAKE_FD"
"""The file descriptor on which a warm SuperExec is told that its SuperNode has a new task."""

READY_FD_ENV = "SAFN_SUPEREXEC_READY_FD"
"""The file descriptor on which a warm SuperExec says it has imported what ClientApps need."""

SUPEREXEC_READY_WAIT = 600.0
"""Seconds a SuperNode waits for its warm SuperExec to be ready before it connects anyway."""


class _SuperExecSwap:
    """Stands in for ``subprocess`` inside Flower's SuperNode: the SuperExec it starts is
    ``command`` instead of ``flower-superexec``, with the read end of a pipe (`WAKE_FD_ENV`)
    on which `wake` tells it that a task is waiting, and the write end of one
    (`READY_FD_ENV`) on which it says it is ready. ``Popen`` returns once it is (or has
    exited, or ``ready_wait`` s have passed): Flower's SuperNode starts its SuperExec before it
    connects, so the site is online only when it can answer at once, and the coordinator's
    round timeouts never count a site's start-up."""

    def __init__(self, command: list[str], ready_wait: float = SUPEREXEC_READY_WAIT):
        import subprocess

        self._subprocess, self._command = subprocess, list(command)
        self._wake_fds: list[int] = []
        self.ready_wait = ready_wait

    def Popen(self, command, *args, **kwargs):  # noqa: N802  (mirrors subprocess.Popen)
        if not (command and command[0] == "flower-superexec"):
            return self._subprocess.Popen(command, *args, **kwargs)
        wake_read, wake_write = os.pipe()
        ready_read, ready_write = os.pipe()
        os.set_blocking(wake_write, False)  # a full pipe already says "wake up"
        env = dict(kwargs.pop("env", None) or os.environ)
        env[WAKE_FD_ENV], env[READY_FD_ENV] = str(wake_read), str(ready_write)
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), wake_read, ready_write)
        try:
            proc = self._subprocess.Popen([*self._command, *command[1:]], *args, env=env,
                                          **kwargs)
        finally:
            os.close(wake_read)
            os.close(ready_write)
        self._wake_fds.append(wake_write)
        try:
            self._wait_ready(ready_read)
        finally:
            os.close(ready_read)
        return proc

    def _wait_ready(self, fd: int) -> None:
        """Until the SuperExec writes to ``fd`` or closes it (it exited), at most
        ``ready_wait`` s."""
        import select

        select.select([fd], [], [], self.ready_wait)

    def wake(self) -> None:
        for fd in list(self._wake_fds):
            try:
                os.write(fd, b"!")
            except BlockingIOError:
                pass
            except OSError:  # the SuperExec has exited
                self._wake_fds.remove(fd)
                os.close(fd)

    def __getattr__(self, name):
        return getattr(self._subprocess, name)


class _WakingState:
    """A SuperNode's NodeState whose ``store_message`` also wakes the SuperExec (passed only to
    Flower's ``_pull_and_store_message``, which stores a message right after creating its task;
    everything else is the state itself)."""

    def __init__(self, state, wake: Callable[[], None]):
        self._state, self._wake = state, wake

    def store_message(self, *args, **kwargs):
        out = self._state.store_message(*args, **kwargs)
        self._wake()
        return out

    def __getattr__(self, name):
        return getattr(self._state, name)


def _supernode_warm_superexec(command: list[str],
                              ready_wait: float = SUPEREXEC_READY_WAIT) -> None:
    """The SuperNode starts ``command`` as its SuperExec and connects once it is ready (see
    `_SuperExecSwap`), and tells it of every message it stores for a ClientApp (the SuperExec
    then starts the ClientApp at once instead of at its next poll, while the SuperNode is
    still pulling the message's objects)."""
    from flwr.supernode import start_client_internal as sci

    swap = _SuperExecSwap(command, ready_wait)
    flower_pull = sci._pull_and_store_message

    def pull(**kwargs):
        kwargs["state"] = _WakingState(kwargs["state"], swap.wake)
        return flower_pull(**kwargs)

    _set("supernode_warm_superexec", sci, "subprocess", swap)
    _set("supernode_warm_superexec", sci, "_pull_and_store_message", pull)


class WakeClock:
    """The ``time`` module for Flower's SuperExec loop: ``sleep`` ends early when a byte arrives
    on ``fd`` (its SuperNode has a task), and otherwise lasts at least ``idle`` seconds (the
    poll only catches what a wake-up missed). When the SuperNode has gone (end of file), plain
    sleeps."""

    def __init__(self, fd: int, idle: float):
        self.fd, self.idle = fd, idle

    def sleep(self, seconds: float) -> None:
        import select

        if self.fd is None:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.fd], [], [], max(seconds, self.idle))
        if ready and not os.read(self.fd, 4096):
            os.close(self.fd)
            self.fd = None

    def __getattr__(self, name):
        return getattr(time, name)


def _superexec_wakeup(fd: int, idle: float = 1.0) -> None:
    from flwr.supercore.superexec import run_superexec

    _set("superexec_wakeup", run_superexec, "time", WakeClock(fd, idle))


def _superexec_forking_executor(launch_clientapp: Callable[[list[str]], bool]) -> None:
    """ClientApps started by ``launch_clientapp(args)`` (a fork of the warm process) with the
    same ``flwr-clientapp`` arguments Flower would use; it returns False to let Flower start a
    subprocess instead."""
    from flwr.supercore.constant import (TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
                                         TASK_TYPE_TO_COMMAND, TaskType)
    from flwr.supercore.superexec.executor import factory
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class ForkingExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with ClientApps forked from this warm process."""

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
                return super().launch(spec)
            command = TASK_TYPE_TO_COMMAND[spec.task_type]
            args = [command, TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                    spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            if not launch_clientapp(args):
                return super().launch(spec)
            return LaunchResult.accepted()

    _set("superexec_forking_executor", factory, "SubprocessExecutor", ForkingExecutor)


_APPLY: dict[str, Callable[..., None]] = {
    "sim_grid_pull_interval": _sim_grid_pull_interval,
    "sim_dispatch_interval": _sim_dispatch_interval,
    "sim_queue_wait": _sim_queue_wait,
    "sim_ray_left_running": _sim_ray_left_running,
    "object_pull_backoff": _object_pull_backoff,
    "serverapp_grid_polling": _serverapp_grid_polling,
    "serverapp_reply_upload_wait": _serverapp_reply_upload_wait,
    "supernode_app_approval": _supernode_app_approval,
    "supernode_poll_interval": _supernode_poll_interval,
    "supernode_heartbeat": _supernode_heartbeat,
    "supernode_session_takeover": _supernode_session_takeover,
    "supernode_warm_superexec": _supernode_warm_superexec,
    "superexec_forking_executor": _superexec_forking_executor,
    "superexec_wakeup": _superexec_wakeup,
}
assert set(_APPLY) == set(PATCHES)
