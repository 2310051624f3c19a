"""The Flower patches: every target exists as expected on the installed Flower; applying is
checked first and announced; restoring gives stock Flower back."""

from __future__ import annotations

import pytest

from safn_flower import patches


def test_every_patch_target_is_where_and_what_the_patch_expects():
    assert patches.check() == []


def test_every_process_group_names_known_patches():
    groups = (patches.SIM, patches.SIM_CLUSTER, patches.SERVERAPP, patches.SUPERNODE,
              patches.SUPEREXEC)
    for group in groups:
        assert set(group) <= set(patches.PATCHES)
    used = {name for group in groups for name in group}
    assert used == set(patches.PATCHES)


def test_apply_announces_once_and_restore_undoes(capsys):
    import flwr.server.superlink.fleet.vce.vce_api as vce
    import flwr.superlink.grid.inmemory_grid as grid

    patches.restore(patches.SIM)  # an earlier simulation in this process may have applied them
    stock_defaults = grid.InMemoryGrid.__init__.__defaults__
    stock_dispatch = vce.add_messages_to_queue
    try:
        assert patches.apply({n: {} for n in patches.SIM}) == patches.SIM
        assert grid.InMemoryGrid.__init__.__defaults__ == (0.01,)
        assert vce.add_messages_to_queue is not stock_dispatch
        line = capsys.readouterr().err.strip().splitlines()
        assert len(line) == 1 and "sim_grid_pull_interval, sim_dispatch_interval" in line[0]
        assert patches.apply({n: {} for n in patches.SIM}) == ()  # already applied: no-op
    finally:
        patches.restore(patches.SIM)
    assert grid.InMemoryGrid.__init__.__defaults__ == stock_defaults
    assert vce.add_messages_to_queue is stock_dispatch


def test_a_moved_target_is_refused_before_anything_is_patched(monkeypatch):
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils

    stock = dict(inflatable_utils.pull_objects.__kwdefaults__)
    monkeypatch.delattr(http_grid, "time")  # as if a Flower upgrade dropped it
    with pytest.raises(patches.FlowerPatchError, match="serverapp_grid_polling.*http_grid.time"):
        patches.apply({n: {} for n in patches.SERVERAPP})
    assert inflatable_utils.pull_objects.__kwdefaults__ == stock  # nothing half-applied


def test_a_changed_signature_is_reported(monkeypatch):
    import flwr.server.superlink.fleet.vce.vce_api as vce

    monkeypatch.setattr(vce, "add_messages_to_queue", lambda state, queue: None)
    problems = patches.check(["sim_dispatch_interval"])
    assert problems and "parameters ('state', 'queue')" in problems[0]


def test_unknown_patch_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown Flower patches"):
        patches.apply({"no_such_patch": {}})


def test_poll_clock_caps_sleep_only():
    import time

    clock = patches.PollClock(0.0)
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
        patches.apply({"supernode_session_takeover": {"node_id_file": str(node_file),
                                                      "sleep": slept.append}}, announce=False)
        try:
            client = conn.FleetHttpClient.from_server_address("127.0.0.1:1", True)
            client.ActivateNode(object())
            return client
        finally:
            patches.restore(["supernode_session_takeover"])

    start()  # first start: no previous session, nothing to end
    assert calls == [("activate",)] and slept == []
    assert patches.read_node_id(node_file) == 42
    assert conn.FleetHttpClient is Fleet  # restored

    calls.clear()
    client = start()  # restarted (e.g. after SIGKILL): its session may still be online
    assert calls == [("deactivate", 42), ("activate",)]
    assert slept == [patches.SESSION_TAKEOVER_GRACE]
    calls.clear()
    client.ActivateNode(object())  # Flower's retry of the activation: the session is ended once
    assert calls == [("activate",)]

    for code, waits in ((412, True), (401, False)):
        calls.clear()
        slept.clear()
        answers["deactivate"] = status(code)
        start()
        assert calls == [("deactivate", 42), ("activate",)]
        assert slept == ([patches.SESSION_TAKEOVER_GRACE] if waits else [])

    # the SuperLink not reachable yet: the error goes to Flower's retry, which asks again
    calls.clear()
    slept.clear()
    answers["deactivate"] = httpx.ConnectError("refused")
    patches.apply({"supernode_session_takeover": {"node_id_file": str(node_file),
                                                  "sleep": slept.append}}, announce=False)
    try:
        client = conn.FleetHttpClient.from_server_address("127.0.0.1:1", True)
        with pytest.raises(httpx.ConnectError):
            client.ActivateNode(object())
        answers.pop("deactivate")
        client.ActivateNode(object())
    finally:
        patches.restore(["supernode_session_takeover"])
    assert calls == [("deactivate", 42), ("deactivate", 42), ("activate",)]
    assert slept == [patches.SESSION_TAKEOVER_GRACE]


def test_a_reply_whose_upload_never_completes_is_given_up_on_not_waited_for_for_hours():
    """serverapp_reply_upload_wait: the Grid's pull of a reply's objects is bounded (a site
    killed while sending its update), other pulls keep Flower's own bound."""
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils as iu

    tries = []

    def never_there(object_id):  # the sender died before it uploaded this object
        tries.append(object_id)
        raise iu.ObjectUnavailableError(object_id)

    assert http_grid.pull_objects.__kwdefaults__["max_time"] == 7200  # Flower's: 2 hours
    patches.apply({"serverapp_reply_upload_wait": {"seconds": 0}}, announce=False)
    try:
        with pytest.raises(iu.ObjectPullError, match="timeout or retry limit"):
            http_grid.pull_objects(["obj"], never_there)
        assert tries == ["obj"]  # given up at the bound (0 s here), not after 2 hours
        assert iu.pull_objects.__kwdefaults__["max_time"] == 7200  # other pulls unchanged
        assert patches.check(["serverapp_reply_upload_wait"]) == []  # re-checkable once applied
    finally:
        patches.restore(["serverapp_reply_upload_wait"])
    assert http_grid.pull_objects is iu.pull_objects
    assert patches.REPLY_UPLOAD_WAIT == 30


def test_supernode_waits_for_a_clientapp_reply_in_short_steps_but_polls_the_superlink_slowly(
        monkeypatch):
    """supernode_poll_interval: Flower's SuperNode sleeps 3 s between pulls from the SuperLink
    (capped at the site's poll interval) and 0.5 s between looks at its own state for a reply
    (capped at `LOCAL_WAIT`: no network request)."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = patches.PollClock(0.2, local=patches.LOCAL_WAIT)
    clock.sleep(3)    # idle: the next pull from the SuperLink
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    assert slept == [0.2, patches.LOCAL_WAIT]
    assert patches.LOCAL_WAIT <= 0.01


def test_the_supernode_sleeps_only_where_the_poll_clock_expects(monkeypatch):
    """A Flower upgrade that adds or changes a sleep in the SuperNode's loop is reported (the
    clock tells the two waits apart by their length)."""
    import inspect

    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci).replace("time.sleep(0.5)", "time.sleep(0.7)")
    monkeypatch.setattr(inspect, "getsource", lambda module: source)
    problems = patches.check(["supernode_poll_interval"])
    assert problems and "sleeps ['0.7', '3'], expected ['0.5', '3']" in problems[0]


WAITING_SUPEREXEC = """
import os, sys, time
from pathlib import Path
from safn_flower import patches
clock = patches.WakeClock(int(os.environ[patches.WAKE_FD_ENV]), idle=60)
Path(sys.argv[1]).write_text("imported")  # the preload, done before it says it is ready
os.write(int(os.environ[patches.READY_FD_ENV]), b"ready")
print("ready", flush=True)
t = time.monotonic()
clock.sleep(60)
print(f"woke {time.monotonic() - t:.3f}", flush=True)
clock.sleep(60)  # the SuperNode (the pipe's writer) is gone: end of file, no wait
print("eof", clock.fd, flush=True)
"""


def test_a_supernode_wakes_its_superexec_when_it_stores_a_message(tmp_path):
    """supernode_warm_superexec + superexec_wakeup: Flower's SuperNode starts the SuperExec and
    goes on (to connect) only once it said it is ready; storing a message for a ClientApp
    writes to a pipe, and the SuperExec's poll sleep ends at once instead of after its
    interval; when the SuperNode has gone, the sleep does not spin on the closed pipe."""
    import subprocess
    import sys

    marker = tmp_path / "preloaded"
    swap = patches._SuperExecSwap([sys.executable, "-c", WAITING_SUPEREXEC, str(marker)])
    proc = swap.Popen(["flower-superexec"], stdout=subprocess.PIPE, text=True)
    try:
        assert marker.read_text() == "imported"  # Popen returned after the preload
        assert proc.stdout.readline().strip() == "ready"
        stored = []

        class State:  # Flower's NodeState, as far as the wrapper sees it
            def store_message(self, message):
                stored.append(message)

            def get_node_id(self):
                return 7

        state = patches._WakingState(State(), swap.wake)
        state.store_message("msg")
        woke = proc.stdout.readline().split()
        assert stored == ["msg"] and state.get_node_id() == 7
        assert woke[0] == "woke" and float(woke[1]) < 30  # not the 60 s poll
        for fd in swap._wake_fds:  # the SuperNode exits
            import os

            os.close(fd)
        swap._wake_fds.clear()
        assert proc.stdout.readline().split() == ["eof", "None"]
    finally:
        proc.kill()
        proc.wait()


def test_a_superexec_that_dies_before_it_is_ready_does_not_hold_the_supernode():
    import subprocess
    import sys

    swap = patches._SuperExecSwap([sys.executable, "-c", "raise SystemExit(3)"], ready_wait=600)
    proc = swap.Popen(["flower-superexec"], stderr=subprocess.DEVNULL)
    assert proc.wait(60) == 3  # Popen returned at its exit (end of file), not after 600 s


def test_warm_superexec_wraps_app_approval_and_restores_in_reverse(monkeypatch):
    """Two SuperNode patches wrap Flower's ``_pull_and_store_message``: restoring them (in any
    order of names) gives Flower's own function back."""
    from flwr.supernode import start_client_internal as sci

    stock = sci._pull_and_store_message
    patches.apply({"supernode_app_approval": {"verify": lambda fab, flower: True},
                   "supernode_warm_superexec": {"command": ["true"]}}, announce=False)
    try:
        assert sci._pull_and_store_message is not stock
    finally:
        patches.restore(["supernode_app_approval", "supernode_warm_superexec"])
    assert sci._pull_and_store_message is stock


def test_the_simulation_runtime_reads_its_queues_with_short_waits():
    """sim_queue_wait: Flower's simulation workers block up to 1 s on an empty queue before
    they see the stop event; the patched queue returns (Empty) after at most 20 ms, and still
    hands over what is in it."""
    import queue
    import time

    import flwr.server.superlink.fleet.vce.vce_api as vce

    patches.restore(["sim_queue_wait"])
    assert vce.Queue is queue.Queue
    patches.apply({"sim_queue_wait": {}}, announce=False)
    try:
        q = vce.Queue()
        t = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=1.0)  # what vce_api.worker calls
        assert time.monotonic() - t < 0.5
        q.put("message")
        assert q.get(timeout=1.0) == "message"
    finally:
        patches.restore(["sim_queue_wait"])
    assert vce.Queue is queue.Queue
