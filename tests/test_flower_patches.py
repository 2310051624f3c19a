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
