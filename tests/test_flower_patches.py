"""The Flower patches: every target exists as expected on the installed Flower; applying is
checked first and announced; restoring gives stock Flower back."""

from __future__ import annotations

import pytest

from safn_flower import patches


def test_every_patch_target_is_where_and_what_the_patch_expects():
    assert patches.check() == []


def test_every_process_group_names_known_patches():
    for group in (patches.SIM, patches.SERVERAPP, patches.SUPERNODE, patches.SUPEREXEC):
        assert set(group) <= set(patches.PATCHES)
    used = {*patches.SIM, *patches.SERVERAPP, *patches.SUPERNODE, *patches.SUPEREXEC}
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
