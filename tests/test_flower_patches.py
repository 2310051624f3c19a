"""The Flower patches (`safn_flower.patches`): every target exists as expected on the installed
Flower; applying is checked first and announced; restoring gives stock Flower back; the public
seams that replaced former patches behave as Flower's own code; the Flower log lines safn reads
are still logged in those words."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest

from safn_flower.patches import core, log_wording, serverapp, simulation, superexec
from safn_flower.patches import supernode as sn

ALL = (serverapp.PATCHES + sn.PATCHES + superexec.PATCHES + simulation.PATCHES
       + log_wording.PATCHES)


def test_every_patch_target_is_where_and_what_the_patch_expects():
    assert core.check(ALL) == []


def test_each_patch_has_its_own_apply_and_a_unique_name():
    names = [p.name for p in dict.fromkeys(ALL)]
    assert len(names) == len(set(names))
    for patch in dict.fromkeys(ALL):
        assert patch.targets
        assert (patch.install is None) == (patch in log_wording.PATCHES), patch.name
    # what the issue dropped or replaced by a public seam is gone
    assert not {"sim_queue_wait", "sim_grid_pull_interval", "serverapp_grid_polling",
                "superexec_wakeup", "supernode_warm_superexec"} & set(names)


# -- the ServerApp: a Grid wrapper (seam) and the reply pulls (patch) ----------------------------

class FakeGrid:
    """A Grid as far as `PollingGrid` sees it: replies become available on the nth pull."""

    def __init__(self, ready_after: dict[str, int]):
        self.ready_after, self.pulls, self.other = dict(ready_after), 0, "grid attribute"

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))
               for mid in sorted(message_ids) if self.ready_after.get(mid, 10**9) <= self.pulls]
        for m in out:
            self.ready_after.pop(m.metadata.reply_to_message_id)
        return out

    def get_node_ids(self):
        return [1, 2]


def test_the_polling_grid_pulls_until_every_reply_is_in_waiting_its_own_interval(monkeypatch):
    slept: list = []
    monkeypatch.setattr(time, "sleep", slept.append)
    grid = serverapp.PollingGrid(FakeGrid({"a": 1, "b": 3}), poll_interval=0.05)
    replies = grid.send_and_receive(["a", "b"], timeout=None)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    assert slept == [0.05, 0.05] and grid.grid.pulls == 3
    assert grid.get_node_ids() == [1, 2] and grid.other == "grid attribute"  # the rest is the Grid's
    assert serverapp.PollingGrid(grid, 0.2).grid is grid.grid  # never wrapped twice


def test_the_polling_grid_returns_what_came_when_the_timeout_passes():
    grid = serverapp.PollingGrid(FakeGrid({"a": 1}), poll_interval=0.01)
    t = time.monotonic()
    replies = grid.send_and_receive(["a", "never"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.15 < time.monotonic() - t < 2


def test_prepare_wraps_a_deployed_grid_and_patches_its_reply_pulls_once(capsys):
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.superlink.grid.http_grid import HttpGrid

    stock = http_grid.pull_objects
    core.restore(["serverapp_reply_pulls"])
    try:
        grid = serverapp.prepare(HttpGrid(token="t"), 0.2)
        assert isinstance(grid, serverapp.PollingGrid) and grid.poll_interval == 0.2
        assert http_grid.pull_objects is not stock
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "serverapp_reply_pulls" in err[0]
        serverapp.prepare(HttpGrid(token="t"), 0.2)  # already applied: not again, not announced
        assert capsys.readouterr().err == ""
    finally:
        core.restore(["serverapp_reply_pulls"])
    assert http_grid.pull_objects is stock
    # a simulation's in-memory Grid is only wrapped
    assert isinstance(serverapp.prepare(FakeGrid({}), 0.01), serverapp.PollingGrid)
    assert http_grid.pull_objects is stock


def test_a_moved_target_is_refused_before_anything_is_patched(monkeypatch):
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.superlink.grid.http_grid import HttpGrid

    monkeypatch.delattr(http_grid.HttpGrid, "pull_messages")  # as if an upgrade moved it
    stock = http_grid.pull_objects
    with pytest.raises(core.FlowerPatchError,
                       match="serverapp_reply_pulls.*HttpGrid.pull_messages"):
        serverapp.prepare(HttpGrid(token="t"), 0.2)
    assert http_grid.pull_objects is stock and "serverapp_reply_pulls" not in core.applied()


def test_a_reply_whose_upload_never_completes_is_given_up_on_not_waited_for_for_hours():
    """serverapp_reply_pulls: the Grid's pull of a reply's objects is bounded (a site killed
    while sending its update) and retried quickly; other pulls keep Flower's defaults."""
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils as iu

    tries = []

    def never_there(object_id):  # the sender died before it uploaded this object
        tries.append(object_id)
        raise iu.ObjectUnavailableError(object_id)

    assert http_grid.pull_objects.__kwdefaults__["max_time"] == 7200  # Flower's: 2 hours
    core.apply([(serverapp.REPLY_PULLS, {"seconds": 0})], announce=False)
    try:
        with pytest.raises(iu.ObjectPullError, match="timeout or retry limit"):
            http_grid.pull_objects(["obj"], never_there)
        assert tries == ["obj"]  # given up at the bound (0 s here), not after 2 hours
        assert iu.pull_objects.__kwdefaults__["max_time"] == 7200  # other pulls unchanged
        assert core.check([serverapp.REPLY_PULLS]) == []  # re-checkable once applied
    finally:
        core.restore(["serverapp_reply_pulls"])
    assert http_grid.pull_objects is iu.pull_objects
    assert serverapp.REPLY_UPLOAD_WAIT == 30


# -- the simulation driver ----------------------------------------------------------------------

def test_simulation_patches_only_what_is_asked_and_restores_it(capsys):
    import flwr.server.superlink.fleet.vce.vce_api as vce
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    stock_dispatch, stock_terminate = vce.add_messages_to_queue, RayBackend.terminate
    app = object()
    with simulation.prepare(app, fast_polling=False) as run:
        assert run is app and vce.add_messages_to_queue is stock_dispatch
    assert capsys.readouterr().err == ""  # nothing patched, nothing announced
    with simulation.prepare(app, fast_polling=True, many_sites_dispatcher=True,
                            ray_cluster=True) as run:
        from flwr.serverapp import ServerApp

        assert isinstance(run, ServerApp)  # runs ``app`` with a PollingGrid
        assert vce.add_messages_to_queue is not stock_dispatch
        assert RayBackend.terminate is not stock_terminate
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sim_dispatch_interval, sim_ray_left_running" in err[0]
    assert vce.add_messages_to_queue is stock_dispatch and RayBackend.terminate is stock_terminate
    # fast polling alone: the dispatcher's sweeps 10 ms apart, nothing for a Ray cluster
    with simulation.prepare(app, fast_polling=True):
        assert vce.add_messages_to_queue is not stock_dispatch
        assert RayBackend.terminate is stock_terminate
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith("internals: sim_dispatch_interval")
    assert vce.add_messages_to_queue is stock_dispatch


def test_the_dispatcher_hands_out_every_pending_message_with_either_sweep():
    """Flower's sweep (every node asked) and the many-sites one (only nodes with a message)
    put the same messages in the queue."""
    import queue
    import threading

    import flwr.server.superlink.fleet.vce.vce_api as vce

    class State:
        def __init__(self):
            self.lock = threading.Lock()
            self.pending = {1: ["m1"], 3: ["m3a", "m3b"]}
            self.message_ins_store = {
                m: type("M", (), {"metadata": type("D", (), {"dst_node_id": n,
                                                             "delivered_at": ""})()})()
                for n, ms in self.pending.items() for m in ms}
            self.asked = []

        def get_message_ins(self, node_id, limit):
            self.asked.append(node_id)
            out = self.pending.get(node_id, [])[:limit]
            self.pending[node_id] = self.pending.get(node_id, [])[limit:]
            return out

    for only_pending in (False, True):
        with simulation.prepare(object(), fast_polling=not only_pending,
                                many_sites_dispatcher=only_pending):
            state, q, stop = State(), queue.Queue(), threading.Event()
            worker = threading.Thread(target=vce.add_messages_to_queue,
                                      args=(state, q, {1: 0, 2: 1, 3: 2}, stop))
            worker.start()
            got = [q.get(timeout=30) for _ in range(3)]
            stop.set()
            worker.join(30)
        assert sorted(got) == ["m1", "m3a", "m3b"]
        assert (2 in state.asked) is (not only_pending)  # only Flower's sweep asks node 2


def test_the_fast_simulation_server_app_runs_the_app_with_a_polling_grid():
    seen = []
    app = simulation.polled_server_app(lambda grid, context: seen.append((grid, context)))
    inner = FakeGrid({})
    app(inner, "context")
    ((grid, context),) = seen
    assert isinstance(grid, serverapp.PollingGrid) and grid.grid is inner
    assert grid.poll_interval == simulation.GRID_POLL_INTERVAL and context == "context"


def test_a_changed_signature_is_reported(monkeypatch):
    import flwr.server.superlink.fleet.vce.vce_api as vce

    monkeypatch.setattr(vce, "add_messages_to_queue", lambda state, queue: None)
    problems = core.check([simulation.DISPATCH])
    assert problems and "parameters ('state', 'queue')" in problems[0]


# -- a site's SuperNode ------------------------------------------------------------------------

def test_poll_clock_caps_sleep_only():
    clock = sn.PollClock(0.0)
    t0 = time.monotonic()
    clock.sleep(30)
    assert time.monotonic() - t0 < 5 and clock.monotonic() >= t0


def test_a_restarted_supernode_ends_its_previous_session_then_activates(monkeypatch, tmp_path):
    """supernode_session_takeover, on a stand-in for Flower's Fleet HTTP client: the node id of
    the last activation is kept; the next process deactivates it (once), waits the grace, and
    activates; a 412 (already offline) also waits, a 401 (not this key's node) does not."""
    import httpx
    from flwr.supernode import fleet_http_connection as conn

    calls: list = []
    answers: dict = {}

    class Fleet:  # what the patch relies on: Flower's class and method names
        def __init__(self, *args, **kwargs):
            pass

        @classmethod
        def from_server_address(cls, *args, **kwargs):
            return cls()

        def ActivateNode(self, request):  # noqa: N802
            calls.append(("activate",))
            return type("Response", (), {"node_id": 42})()

        def DeactivateNode(self, request):  # noqa: N802
            calls.append(("deactivate", request.node_id))
            answer = answers.get("deactivate")
            if isinstance(answer, Exception):
                raise answer
            return None

    def status(code: int) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "https://superlink/v1/fleet/deactivate-node")
        return httpx.HTTPStatusError("x", request=request,
                                     response=httpx.Response(code, request=request))

    monkeypatch.setattr(conn, "FleetHttpClient", Fleet)
    node_file = tmp_path / "state" / "node_id"
    slept: list = []

    def start():
        """One SuperNode process: the patch applied, then Flower's connection opened."""
        core.apply([(sn.SESSION_TAKEOVER, {"node_id_file": str(node_file),
                                           "sleep": slept.append})], announce=False)
        try:
            client = conn.FleetHttpClient.from_server_address("127.0.0.1:1", True)
            client.ActivateNode(object())
            return client
        finally:
            core.restore(["supernode_session_takeover"])

    start()  # first start: no previous session, nothing to end
    assert calls == [("activate",)] and slept == []
    assert sn.read_node_id(node_file) == 42
    assert conn.FleetHttpClient is Fleet  # restored

    calls.clear()
    client = start()  # restarted (e.g. after SIGKILL): its session may still be online
    assert calls == [("deactivate", 42), ("activate",)]
    assert slept == [sn.SESSION_TAKEOVER_GRACE]
    calls.clear()
    client.ActivateNode(object())  # Flower's retry of the activation: the session is ended once
    assert calls == [("activate",)]

    for code, waits in ((412, True), (401, False)):
        calls.clear()
        slept.clear()
        answers["deactivate"] = status(code)
        start()
        assert calls == [("deactivate", 42), ("activate",)]
        assert slept == ([sn.SESSION_TAKEOVER_GRACE] if waits else [])

    # the SuperLink not reachable yet: the error goes to Flower's retry, which asks again
    calls.clear()
    slept.clear()
    answers["deactivate"] = httpx.ConnectError("refused")
    core.apply([(sn.SESSION_TAKEOVER, {"node_id_file": str(node_file),
                                       "sleep": slept.append})], announce=False)
    try:
        client = conn.FleetHttpClient.from_server_address("127.0.0.1:1", True)
        with pytest.raises(httpx.ConnectError):
            client.ActivateNode(object())
        answers.pop("deactivate")
        client.ActivateNode(object())
    finally:
        core.restore(["supernode_session_takeover"])
    assert calls == [("deactivate", 42), ("deactivate", 42), ("activate",)]
    assert slept == [sn.SESSION_TAKEOVER_GRACE]


def test_supernode_waits_for_a_clientapp_reply_in_short_steps_but_polls_the_superlink_slowly(
        monkeypatch):
    """supernode_poll_interval: Flower's SuperNode sleeps 3 s between pulls from the SuperLink
    (capped at the site's poll interval) and 0.5 s between looks at its own state for a reply
    (capped at `LOCAL_WAIT`: no network request)."""
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = sn.PollClock(0.2, local=sn.LOCAL_WAIT)
    clock.sleep(3)    # idle: the next pull from the SuperLink
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    assert slept == [0.2, sn.LOCAL_WAIT]
    assert sn.LOCAL_WAIT <= 0.01


def test_the_supernode_sleeps_only_where_the_poll_clock_expects(monkeypatch):
    """A Flower upgrade that adds or changes a sleep in the SuperNode's loop is reported (the
    clock tells the two waits apart by their length)."""
    import inspect

    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci).replace("time.sleep(0.5)", "time.sleep(0.7)")
    monkeypatch.setattr(inspect, "getsource", lambda module: source)
    problems = core.check([sn.POLL_INTERVAL])
    assert problems and "sleeps ['0.7', '3'], expected ['0.5', '3']" in problems[0]


def test_supernode_prepare_applies_its_patches_and_restore_gives_flower_back():
    from flwr.supercore.inflatable import inflatable_utils as iu
    from flwr.supernode import start_client_internal as sci

    stock_pull, stock_defaults = sci._pull_and_store_message, dict(iu.pull_objects.__kwdefaults__)
    names = sn.prepare(lambda fab, flower: True, 0.2)
    try:
        assert names == ("supernode_app_approval", "supernode_poll_interval",
                         "supernode_heartbeat", "object_pull_backoff",
                         "supernode_object_concurrency", "supernode_confirm_in_background")
        assert sci._pull_and_store_message is not stock_pull
        assert iu.pull_objects.__kwdefaults__["initial_backoff"] == 0.02
    finally:
        core.restore(names)
    assert sci._pull_and_store_message is stock_pull
    assert iu.pull_objects.__kwdefaults__ == stock_defaults


def test_a_messages_objects_are_pushed_all_at_once_not_two_at_a_time():
    """Six objects whose pushes each wait until all six are in flight: Flower's own transfer
    (2 at a time, at most the CPU count) cannot finish; with the patch, one wave does."""
    import threading

    from flwr.supercore.inflatable import inflatable_utils as iu

    def push_all(timeout: float) -> None:
        barrier = threading.Barrier(6, timeout=timeout)
        iu.push_object_contents_from_iterable(
            [(f"o{i}", b"x") for i in range(6)], lambda oid, content: barrier.wait())

    with pytest.raises(threading.BrokenBarrierError):
        push_all(0.5)  # stock: never 6 at once (a negative check: a slow machine cannot pass it)
    names = core.apply([(sn.OBJECT_CONCURRENCY, {"workers": 8})], announce=False)
    try:
        push_all(60)  # all six in flight together: the barrier opens
    finally:
        core.restore(names)


def test_a_messages_receipt_is_confirmed_in_the_background():
    import threading

    from flwr.supernode import fleet_http_connection as conn

    release, sent = threading.Event(), []

    def confirm_protobuf(request):
        release.wait(60)
        sent.append(request)

    names = core.apply([(sn.CONFIRM_IN_BACKGROUND, {})], announce=False)
    try:
        from flwr.proto.node_pb2 import Node

        node = Node(node_id=7)
        conn.make_confirm_message_received_fn_protobuf(confirm_protobuf, node, 3)("m1")
        assert sent == []  # returned while the confirmation still waits for its answer
        release.set()
        deadline = time.monotonic() + 60
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent and sent[0].message_object_id == "m1" and sent[0].run_id == 3
    finally:
        core.restore(names)


def test_the_request_log_has_one_line_per_fleet_request(tmp_path):
    import httpx
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.supercore.protobuf.client import ProtobufClient

    log = tmp_path / "requests.jsonl"
    names = core.apply([(sn.REQUEST_LOG, {"path": str(log)})], announce=False)
    try:
        client = ProtobufClient("http://superlink.test")
        answers = iter([200, 503])
        client._client = httpx.Client(transport=httpx.MockTransport(
            lambda request: httpx.Response(next(answers), content=b"")))
        call = dict(path="/v1/fleet/pull-messages", rpc_method="PullMessages",
                    request=PullMessagesRequest(), response_type=PullMessagesResponse)
        client._unary_unary(**call)
        with pytest.raises(httpx.HTTPStatusError):
            client._unary_unary(**call)
    finally:
        core.restore(names)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["rpc"], e["ok"]) for e in lines] == [("PullMessages", True), ("PullMessages", False)]
    assert all(e["s"] >= 0 and e["t"] > 1.7e9 for e in lines)


# -- the warm SuperExec: started by safn.client.supernode, Flower's --isolation process --------------

def test_the_warm_superexec_is_started_with_flowers_own_arguments():
    from safn.client.supernode import superexec_command

    cmd = superexec_command(["--superlink", "x:1", "--host", "0.0.0.0", "--port", "9123"])
    assert cmd[1:3] == ["-m", "safn.client.superexec"]
    assert cmd[3:] == ["--insecure", "--runtime-api-address", "127.0.0.1:9123",
                       "--parent-pid", str(os.getpid())]
    assert superexec_command([])[5] == "127.0.0.1:9094"  # Flower's default Runtime API port


READY_SUPEREXEC = """
import os, signal, sys
from pathlib import Path
from safn.client.superexec import READY_FD_ENV
Path(sys.argv[1]).write_text("imported")  # the preload, done before it says it is ready
os.write(int(os.environ[READY_FD_ENV]), b"ready")
signal.pause()  # runs on until the test kills it (stdin may be /dev/null under xdist: EOF at once)
"""


def test_the_supernode_goes_on_once_its_superexec_is_ready(tmp_path):
    import subprocess

    from safn.client.supernode import start_warm_superexec

    marker = tmp_path / "preloaded"
    proc = start_warm_superexec([sys.executable, "-c", READY_SUPEREXEC, str(marker)])
    try:
        assert marker.read_text() == "imported"  # returned after the preload, not before
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    dead = start_warm_superexec([sys.executable, "-c", "raise SystemExit(3)"], ready_wait=600)
    assert dead.wait(60) == 3  # returned at its exit (end of file), not after 600 s
    assert subprocess  # noqa: the module is what start_warm_superexec uses


def test_superexec_prepare_forks_clientapps_and_restores():
    from flwr.supercore.superexec.executor import factory
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    names = superexec.prepare(lambda args: True)
    try:
        assert "superexec_forking_executor" in names
        assert factory.SubprocessExecutor is not SubprocessExecutor
        assert issubclass(factory.SubprocessExecutor, SubprocessExecutor)
    finally:
        core.restore(names)
    assert factory.SubprocessExecutor is SubprocessExecutor


# -- the Flower log lines safn reads -------------------------------------------------------------

def test_the_log_lines_safn_reads_are_still_logged_so():
    log_wording.check_superlink_log()
    log_wording.check_supernode_log()


def test_a_reworded_log_line_stops_the_process_that_reads_it(monkeypatch):
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.supernode import start_client_internal as sci

    def _push_messages(**kwargs):
        print("Sent!")  # a Flower that says it differently

    monkeypatch.setattr(sci, "_push_messages", _push_messages)
    with pytest.raises(core.FlowerPatchError, match="log_reply_sent.*Sent successfully"):
        log_wording.check_supernode_log()

    def activate_node(request, state):
        return None

    monkeypatch.setattr(fleet_handlers, "activate_node", activate_node)
    with pytest.raises(core.FlowerPatchError, match="log_node_events.*Activated node_id"):
        log_wording.check_superlink_log()


def test_the_parsers_match_the_wording_that_is_checked():
    """What safn.server.cli / safn.server.superlink / safn.client.site_console match is what the checks find in
    Flower's source (the format strings filled in as Flower fills them)."""
    from safn.client.cli import REFUSED_MARK
    from safn.client.site_console import SiteConsole
    from safn.server.cli import NODE_EVENT
    from safn.server.superlink import REFUSED

    assert NODE_EVENT.search("INFO :      [Fleet.ActivateNode] Activated node_id=%s" % 7)
    assert NODE_EVENT.search("[Fleet.DeactivateNode] Deactivated node_id=%s" % 7)
    err = ("Attempted to register SuperNode with public key: b'k', exception: "
           "No SuperNode found with the given public key.")
    assert REFUSED.search("[%s][ApiError:%d] %s" % ("/v1/fleet/activate-node", 2004, err))
    assert REFUSED_MARK in "Exit Code: %s\n" % 305
    shown = []
    term = SiteConsole("h:1", "log", shown.append)
    term.feed("WARNING :  " + "Connection attempt failed, retrying in %.2f seconds" % 1.2)
    term.feed("INFO :  " + "Connection successful after %.2f seconds and %s tries." % (3, 2))
    term.feed("INFO :  Sent successfully")
    assert term.replies_sent == 1 and len(shown) == 2


def test_the_warm_superexec_waits_for_its_supernodes_runtime_api():
    """Started before its SuperNode, the SuperExec polls only once the Runtime API listens (no
    "Connection attempt failed" from Flower's retry, which a site's terminal reads as lost
    contact); it gives up waiting after its bound."""
    import socket

    from safn.client.superexec import wait_for_runtime_api

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        t = time.monotonic()
        wait_for_runtime_api(["--insecure", "--runtime-api-address", f"127.0.0.1:{port}"], 30)
        assert time.monotonic() - t < 5
    t = time.monotonic()
    wait_for_runtime_api(["--runtime-api-address", f"127.0.0.1:{port}"], 0.3)  # closed now
    assert 0.25 < time.monotonic() - t < 5


def test_a_pending_confirmation_never_keeps_a_supernode_from_exiting(tmp_path):
    """A confirmation stuck on a dead link (Flower retries it for minutes) must not hold the
    process at exit: the interpreter ends while it is still waiting."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import threading\n"
        "from safn_flower.patches import core, supernode as sn\n"
        "from flwr.proto.node_pb2 import Node\n"
        "from flwr.supernode import fleet_http_connection as conn\n"
        "core.apply([(sn.CONFIRM_IN_BACKGROUND, {})], announce=False)\n"
        "forever = threading.Event()\n"
        "conn.make_confirm_message_received_fn_protobuf(lambda r: forever.wait(), Node(node_id=1),"
        " 1)('m')\n"
        "print('queued', flush=True)\n")
    import subprocess
    from pathlib import Path

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0 and "queued" in done.stdout, done.stderr
