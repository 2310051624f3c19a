"""Unit tests of the deployment parts that need no running federation: the model's wire format,
the coordinator's reading of refusals, the site's pre-flight checks and the CLIs' input errors."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from safn_core.errors import ConfigError
from safn_core.federation.wire import Layout, LayoutMismatch
from tests.deploy_harness import BIN, ROOT, env


def test_the_model_vector_round_trips_exactly_and_refuses_another_layout():
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.normal(size=(3, 4)).astype(np.float32),
             "a.bias": rng.normal(size=4).astype(np.float32),
             "b": rng.normal(size=(2, 2, 2)).astype(np.float32)}
    layout = Layout.of(state)
    vec = layout.flatten(state)
    assert vec.shape == (12 + 4 + 8,) and vec.dtype == np.float32
    back = layout.unflatten(vec)
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    # float64 (after an adaptive server step) is kept, never rounded to float32
    wide = {k: v.astype(np.float64) + 1e-12 for k, v in state.items()}
    assert layout.flatten(wide).dtype == np.float64
    np.testing.assert_array_equal(layout.unflatten(layout.flatten(wide))["b"], wide["b"])
    with pytest.raises(LayoutMismatch):
        layout.unflatten(vec[:-1])
    other = Layout.of({**state, "b": np.zeros((2, 4), np.float32)})
    assert other.fingerprint() != layout.fingerprint()
    with pytest.raises(LayoutMismatch, match="safn version"):
        other.check(layout.fingerprint())
    with pytest.raises(LayoutMismatch):
        layout.flatten({"a.bias": state["a.bias"], **state})
    with pytest.raises(TypeError, match="not floating point"):
        Layout.of({"steps": np.zeros(1, np.int64)})


def _pem_line(openssh_pub: str) -> tuple[str, str]:
    """A SuperLink refusal log line for a key, and that key's ssh-keygen fingerprint."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(openssh_pub.encode())
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    logged = pem.replace("\n", "\\n")
    line = ("ERROR : [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode "
            f"with public key: b'{logged}' , exception: No SuperNode found with the given "
            "public key.")
    fp = subprocess.run(["ssh-keygen", "-lf", "/dev/stdin"], input=openssh_pub, text=True,
                        capture_output=True).stdout.split()[1]
    return line, fp


def test_a_refusal_in_the_superlink_log_names_the_key_as_ssh_keygen_does(tmp_path):
    from safn.server.superlink import openssh_fingerprint, refusal

    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                    str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_text()
    line, fp = _pem_line(pub)
    note = refusal(line)
    assert note.startswith("REFUSED a site") and fp in note
    assert openssh_fingerprint(tmp_path / "k.pub") == fp
    again = line.replace("No SuperNode found with the given public key",
                         "SuperNode with node ID 7 could not be activated")
    assert "not timed out" in refusal(again)
    assert refusal("INFO : [Fleet.ActivateNode] Activated node_id=1") is None
    assert base64  # (imported for readers: fingerprints are base64 without padding)


def _site_file(tmp_path: Path, **site) -> Path:
    certs = tmp_path / "certs"  # real material: the pre-flight reads the CA and the key
    if not certs.exists():
        subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                        str(certs), "--sites", "s", "--hosts", "127.0.0.1"], check=True,
                       capture_output=True)
    key = tmp_path / "site.key"
    key.write_bytes((certs / "sites" / "s.key").read_bytes())
    key.chmod(0o600)
    (tmp_path / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    body = {"site": {"name": "s", "root_certificates": "ca.pem", "private_key": "site.key",
                     "approved_apps": ["a" * 64], "state_dir": "state", **site}}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _check(path: Path, insecure: bool = False):
    from safn.client.preflight import check_security, require_site
    from safn_core.config import load_config

    cfg = load_config(path)
    require_site(cfg, path)
    check_security(cfg, path, insecure)


def test_site_preflight_names_the_key_to_fix(tmp_path):
    _check(_site_file(tmp_path))  # all present: no error
    with pytest.raises(ConfigError, match="site.private_key.*file not found"):
        _check(_site_file(tmp_path, private_key="missing.key"))
    path = _site_file(tmp_path)
    (tmp_path / "site.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        _check(path)
    with pytest.raises(ConfigError, match="approved_apps.*trusted_entities"):
        _check(_site_file(tmp_path, approved_apps=[]))
    with pytest.raises(ConfigError, match="root_certificates' is not set"):
        _check(_site_file(tmp_path, root_certificates=None))
    _check(_site_file(tmp_path, root_certificates=None, private_key=None), insecure=True)
    with pytest.raises(ConfigError, match="not a sha256"):
        _check(_site_file(tmp_path, approved_apps=["abc"]))
    (tmp_path / "nosite.yaml").write_text("data: {min_cell: 5}\n")
    with pytest.raises(ConfigError, match="no 'site:' section"):
        _check(tmp_path / "nosite.yaml")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=cwd, env=env(), timeout=120)


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "server.yaml").write_text(yaml.safe_dump({"server": {"sites": {}}}))
    out = _cli("safn-server", "--config", "server.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "server.certificates" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
    for name in ("ca.pem", "superlink.pem", "superlink.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "server.yaml").write_text(yaml.safe_dump({"server": {"certificates": "."}}))
    out = _cli("safn-server", "--config", "server.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "'server.sites' is empty" in out.stderr
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(
        {"server": {"certificates": ".", "sites": {"a": "a.pub"}},
         "federation": {"secure_aggregation": False}}))
    out = _cli("safn-server", "--config", "server.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "server.sites.a" in out.stderr and "not found" in out.stderr
    out = _cli("safn-client", cwd=tmp_path)
    assert out.returncode == 2 and "--site" in out.stderr
    path = _site_file(tmp_path, approved_apps=[])
    out = _cli("safn-client", "--site", str(path), cwd=tmp_path)
    assert out.returncode == 2 and "approved_apps" in out.stderr and "Traceback" not in out.stderr
    out = _cli("safn-client", "--site", str(path), "--insecure", cwd=tmp_path)
    assert "WARNING: --insecure" in out.stderr


def test_the_app_hash_is_the_bundle_flower_builds_and_needs_no_config():
    from safn_flower.fab import APP_SOURCE, app_hash

    out = subprocess.run([str(BIN / "safn-server"), "--app-hash"], capture_output=True,
                         text=True, env=env())
    assert out.returncode == 0 and out.stdout.strip() == app_hash(APP_SOURCE)
    assert len(out.stdout.strip()) == 64
    text = (ROOT / "safn_flower" / "flwr_app" / "safn" / "pyproject.toml").read_text()
    assert 'serverapp = "safn.server.app:app"' in text and 'clientapp = "safn.client.app:app"' in text
    assert sys.executable  # the components resolve to this installation's packages


class _Grid:
    """A Grid whose connected nodes change over time (a site leaving)."""

    def __init__(self, schedule):
        self.schedule, self.calls = schedule, 0

    def get_node_ids(self):
        self.calls += 1
        return self.schedule(self.calls)


def test_a_run_below_min_sites_for_longer_than_the_wait_stops_with_a_message():
    from safn.server.site_waits import SitesMissing, wait_for_nodes

    # two sites stay: no wait
    assert wait_for_nodes(_Grid(lambda c: [1, 2]), 2, 5, lambda n: True, "in round 3") == [1, 2]
    # a site comes back within the wait
    grid = _Grid(lambda c: [1] if c < 3 else [1, 2])
    assert wait_for_nodes(grid, 2, 5, lambda n: True, "in round 3") == [1, 2]
    # one site only, for longer than the wait
    with pytest.raises(SitesMissing, match=r"only 1 of the 2 sites needed were connected in "
                                           r"round 3, for 0 s \(federation.wait_for_sites\)"):
        wait_for_nodes(_Grid(lambda c: [1]), 2, 0.3, lambda n: True, "in round 3")
    # a connected node that is not usable (e.g. withheld its statistics) does not count
    with pytest.raises(SitesMissing):
        wait_for_nodes(_Grid(lambda c: [1, 9]), 2, 0.3, lambda n: n != 9, "in round 1")
    # none at all is said as such, not as "only 0"
    with pytest.raises(SitesMissing, match=r"^no site was connected at the start of the run"):
        wait_for_nodes(_Grid(lambda c: []), 2, 0.1, lambda n: True, "at the start of the run")


def _strategy(fed, names: dict[int, str], events=None):
    """The SAFN strategy around Flower's, as the coordinator builds it (no secure sums)."""
    from safn.server.strategies import flower_strategy
    from safn.server.strategy import RunSites, SafnStrategy, StrategyOptions

    return SafnStrategy(flower_strategy(fed), StrategyOptions.from_config(fed, 0),
                        RunSites(names, frozenset(names)), events=events)


def _lines():
    """An event log that keeps what it would show, in English."""
    from safn_core.federation.event_text import shown
    from safn_core.federation.events import EventLog

    lines = []
    return EventLog(None, shown(lines.append)), lines


def test_the_strategy_waits_for_eligible_sites_then_stops_the_run():
    from safn_core.config import FederationConfig
    from safn.server.site_waits import SitesMissing

    strategy = _strategy(FederationConfig(min_sites=2, wait_for_sites=0.3), {1: "a", 2: "b"})
    chosen = strategy.choose(_Grid(lambda c: [1, 2]), 1.0, 0, 1)
    assert sorted(chosen.get_node_ids()) == [1, 2]
    with pytest.raises(SitesMissing, match="in round 4"):
        strategy.choose(_Grid(lambda c: [1, 3]), 1.0, 0, 4)


class _Clock:
    """A fake monotonic clock that only the fake sleep moves: waits take no real time."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_round_waits_for_a_reconnecting_site_of_the_run_and_reports_it():
    from safn.server.site_waits import await_rejoin

    sites = {1: "site_a", 2: "site_b", 3: "site_c"}
    (events, lines), clock, away = _lines(), _Clock(), set()

    def wait(grid, timeout=60):
        return await_rejoin(grid, sites, away, timeout, 3, events, clock, clock.sleep,
                            interval=1.0)

    # every site connected: no wait, nothing said
    assert wait(_Grid(lambda c: [1, 2, 3])) == {1, 2, 3}
    assert lines == [] and clock.sleeps == []
    # site_c is back at the 5th look: the round waits for it, and says so
    assert wait(_Grid(lambda c: [1, 2] if c < 5 else [1, 2, 3])) == {1, 2, 3}
    assert lines == ["round 3: waiting up to 60 s for site_c to reconnect "
                     "(federation.rejoin_wait)", "round 3: site_c reconnected after 4 s"]
    assert clock.now == 4 and away == set()
    # a node that is not part of the run (never sent statistics) is not waited for
    lines.clear()
    assert await_rejoin(_Grid(lambda c: [1, 2]), {1: "site_a", 2: "site_b"}, away, 60,
                        3, events, clock, clock.sleep) == {1, 2}
    assert lines == [] and clock.now == 4
    # rejoin_wait 0: never wait
    assert wait(_Grid(lambda c: [1, 2]), timeout=0) == {1, 2} and lines == []


def test_a_site_that_stays_away_costs_one_wait_then_is_waited_for_again_once_back():
    from safn.server.site_waits import await_rejoin

    sites = {1: "site_a", 2: "site_b", 3: "site_c"}
    (events, lines), clock, away = _lines(), _Clock(), set()

    def wait(grid, when):
        return await_rejoin(grid, sites, away, 30, int(when.split()[1]), events, clock,
                            clock.sleep, interval=1.0)

    assert wait(_Grid(lambda c: [1, 2]), "round 4") == {1, 2}
    assert clock.now == 30 and away == {3}  # the whole wait, bounded
    assert lines[-1] == ("round 4: site_c did not reconnect within 30 s; going on without it "
                         "(not waited for again until it is back)")
    # the next rounds go on at once
    n = len(lines)
    assert wait(_Grid(lambda c: [1, 2]), "round 5") == {1, 2}
    assert clock.now == 30 and len(lines) == n
    # it came back (connected at a round's start): it is part of the run again...
    assert wait(_Grid(lambda c: [1, 2, 3]), "round 6") == {1, 2, 3} and away == set()
    # ...so when it disappears again, a round waits for it again
    assert wait(_Grid(lambda c: [1, 2] if c < 3 else [1, 2, 3]), "round 7") == {1, 2, 3}
    assert lines[-1] == "round 7: site_c reconnected after 2 s"
    # two sites away: one wait for both, each reported when back
    lines.clear()
    wait(_Grid(lambda c: [1] if c < 2 else [1, 3] if c < 4 else [1, 2, 3]), "round 8")
    assert lines == ["round 8: waiting up to 30 s for site_b, site_c to reconnect "
                     "(federation.rejoin_wait)", "round 8: site_c reconnected after 1 s",
                     "round 8: site_b reconnected after 3 s"]


def test_the_strategy_waits_for_a_reconnecting_site_before_it_draws_a_training_round(
        monkeypatch):
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from safn_core.config import FederationConfig

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a ServerApp
        monkeypatch.setattr(TaskIdentity, key, value)

    assert FederationConfig().rejoin_wait == 60
    events, lines = _lines()
    strategy = _strategy(FederationConfig(min_sites=2, rejoin_wait=30),
                         {1: "site_a", 2: "site_b", 3: "site_c"}, events)
    assert strategy.options.rejoin_wait == 30
    grid = _Grid(lambda c: [1, 2] if c < 2 else [1, 2, 3])  # site_c back at the second look
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    messages = list(strategy.configure_train(2, arrays, ConfigRecord({}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert lines == ["round 2: waiting up to 30 s for site_c to reconnect "
                     "(federation.rejoin_wait)", "round 2: site_c reconnected after 0 s"]
    # evaluation does not wait: it takes the sites connected now
    lines.clear()
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord({}),
                                                _Grid(lambda c: [1, 2])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2] and lines == []


def test_a_site_gone_mid_round_is_named_in_the_rejections(monkeypatch):
    """The SuperLink answers for a node that stopped heartbeating (src: the SuperLink itself);
    the rejection still names the site the instruction was for."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message)
    from flwr.supercore.task_identity import TaskIdentity

    from safn_core.config import FederationConfig
    from safn_core.federation.event_text import rejection_text

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a ServerApp
        monkeypatch.setattr(TaskIdentity, key, value)
    strategy = _strategy(FederationConfig(min_sites=2, rejoin_wait=0),
                         {11: "site_a", 12: "site_b", 13: "site_c"})
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    sent = list(strategy.configure_train(4, arrays, ConfigRecord({}),
                                         _Grid(lambda c: [11, 12, 13])))
    for m in sent:  # what pushing them does (flwr.superlink.grid.http_grid)
        m.metadata.__dict__["_message_id"] = m.object_id
    to_c = next(m for m in sent if m.metadata.dst_node_id == 13)
    gone = create_message_error_unavailable_res_message(to_c.metadata, "node_unavail")
    assert gone.metadata.src_node_id not in strategy.sites.names
    strategy.aggregate_train(4, [gone])
    record = strategy.record()
    assert record.round == 4 and [x["site"] for x in record.rejected] == ["site_c", "-"]
    assert "Node Unavailable" in rejection_text(record.rejected[0])


# -- what a site's terminal shows (safn.client.site_console) ------------------------------------


def _flower(level: str, message: str) -> str:
    """A line as Flower's console handler writes it (colour codes included)."""
    return f"\x1b[92m{level} \x1b[0m:      {message}\n"


def test_the_site_terminal_shows_safn_lines_one_loss_of_contact_and_each_error_once():
    from safn.client.site_console import SITE_MARK, SiteConsole

    shown: list[str] = []
    term = SiteConsole("coord:9092", "/state/supernode.log", shown.append)
    lines = [_flower("INFO", "[RUN 12]"), _flower("INFO", "Receiving: train message (ID: 1)"),
             f"{SITE_MARK}round 1: trained on 76 participants, loss 0.1459\n",
             "12/01/2026 19:18:28:DEBUG:Loading ClientApp `safn.client.app:app`\n",
             _flower("INFO", "safn: app bundle sha256 ab is approved by this site"),
             _flower("INFO", "safn: app bundle sha256 ab is approved by this site")]
    lines += [_flower("WARNING", "Connection attempt failed, retrying in 1.20 seconds")] * 40
    lines += [_flower("INFO", "Connection successful after 30.00 seconds and 12 tries."),
              _flower("ERROR", "SSL/TLS handshake error detected."),
              _flower("ERROR", "SSL/TLS handshake error detected."),
              "Traceback (most recent call last):\n", '  File "x.py", line 1\n']
    for line in lines:
        term.feed(line)
    assert shown == [
        "round 1: trained on 76 participants, loss 0.1459",
        "safn: app bundle sha256 ab is approved by this site",
        "lost contact with the coordinator at coord:9092; Flower keeps retrying (details in "
        "/state/supernode.log)",
        "contact with the coordinator at coord:9092 is back",
        "flower: SSL/TLS handshake error detected.",
        "a Flower process failed; its traceback is in /state/supernode.log"]


def test_the_run_end_counts_as_acknowledged_only_once_a_reply_left_after_it():
    from safn.client.site_console import RUN_END_LINE, SITE_MARK, SiteConsole

    term = SiteConsole("coord:9092", "log", lambda line: None)
    term.feed(_flower("INFO", "Sent successfully"))  # the evaluate reply, before the end
    assert not term.run_end_acknowledged
    term.feed(f"{SITE_MARK}{RUN_END_LINE}the run (run id r, Flower run 1) completed\n")
    term.feed(_flower("INFO", "Sending: query message (ID: 9)"))
    assert not term.run_end_acknowledged
    term.feed(_flower("INFO", "Sent successfully"))
    assert term.run_end_acknowledged


# -- is the coordinator there (safn.client.reachability) ----------------------------------------


class _ProbeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_a_site_says_at_once_that_nothing_answers_and_waits_for_the_coordinator():
    from safn.client.reachability import Reach, wait_for_coordinator

    clock, said = _ProbeClock(), []
    answers = iter([Reach("refused", "connection refused")] * 3 + [Reach("ok")])
    waited = wait_for_coordinator("h:1", None, "site.yaml", 60, said.append, clock, clock.sleep,
                                  lambda *a: next(answers))
    assert waited == 3
    assert said[0].startswith("nothing answers at h:1 (connection refused)")
    assert "site.superlink = h:1 (in site.yaml)" in said[0] and "site.connect_wait" in said[0]
    assert said[1] == "the coordinator answers at h:1 after 3 s"


def test_a_site_stops_after_its_connect_wait_and_at_once_on_a_tls_mismatch():
    from safn.client.reachability import CoordinatorUnreachable, Reach, wait_for_coordinator

    clock = _ProbeClock()
    with pytest.raises(CoordinatorUnreachable, match=r"^the host name 'coord' in "
                       r"site.superlink = coord:9 \(in s.yaml\) does not resolve .*waited 5 s"):
        wait_for_coordinator("coord:9", None, "s.yaml", 5, lambda line: None, clock,
                             clock.sleep, lambda *a: Reach("dns", "Name or service not known"))
    clock, said = _ProbeClock(), []
    with pytest.raises(CoordinatorUnreachable, match=r"not issued for 'coord' \(it is for: "
                                                     r"localhost, 127.0.0.1\)"):
        wait_for_coordinator("coord:9", Path("ca.pem"), "s.yaml", 60, said.append, clock,
                             clock.sleep, lambda *a: Reach("tls-name", "localhost, 127.0.0.1"))
    assert clock.t == 0 and said == []  # no waiting for what cannot change


# -- the coordinator's account of its sites and checkpoints ---------------------------------


def test_the_coordinator_names_the_sites_online_and_those_it_waits_for():
    from safn.server.cli import online_line

    nodes = {"site_a": "11", "site_b": "22", "site_c": "33"}
    assert online_line({"11", "33"}, nodes) == \
        "sites online: site_a, site_c (2 of 3; waiting for site_b)"
    assert online_line({"11", "22", "33"}, nodes) == "sites online: site_a, site_b, site_c (3 of 3)"
    assert online_line({"11", "99"}, nodes) == \
        "sites online: site_a, 1 unnamed (2 of 3; waiting for site_b, site_c)"
    assert online_line({"5"}, {}) == "sites online: 1"


def test_a_stopped_run_mentions_a_checkpoint_only_when_it_has_one(tmp_path):
    from safn_core.federation.checkpoint import (RunState, checkpoint_note, checkpointed_round,
                                                 save_checkpoint)

    assert checkpointed_round(tmp_path) is None
    assert checkpoint_note(tmp_path) == "no round was completed, so there is no checkpoint"
    state = RunState(3, {"w": np.zeros(2)}, {}, [5, 5], {}, [], {}, {}, None)
    save_checkpoint(tmp_path, state)
    assert checkpointed_round(tmp_path) == 3
    assert checkpoint_note(tmp_path) == \
        f"the checkpoint of round 3 is kept in {tmp_path / 'checkpoints'}"


def test_a_site_leaves_after_a_completed_run_and_stays_for_a_stopped_one(tmp_path):
    from safn.client.cli import SiteNode, key_fingerprint
    from safn.client.site_console import RUN_END_LINE, SITE_MARK, SiteConsole
    from safn_core.config import load_config
    from safn_core.io import write_json
    from safn.server.superlink import openssh_fingerprint

    cfg = load_config(_site_file(tmp_path, state_dir=str(tmp_path / "state")))
    # the refusal message names the key by the fingerprint ssh-keygen gives its .pub
    assert key_fingerprint(cfg.site) == openssh_fingerprint(tmp_path / "certs" / "sites" / "s.pub")
    end_file = tmp_path / "state" / "run_end.json"
    write_json(end_file, {"run_id": "r0", "status": "completed"})  # an earlier run's end

    def node(stay: bool) -> SiteNode:
        n = SiteNode(cfg, tmp_path / "site.yaml", insecure=False, stay=stay)
        n.terminal = SiteConsole("h:1", "log", lambda line: None)
        for line in (f"{SITE_MARK}{RUN_END_LINE}…", "INFO :  Sent successfully"):
            n.terminal.feed(line)  # the acknowledgement has left
        n.stop = lambda *a: setattr(n, "stopping", True)
        return n

    leaving, staying = node(stay=False), node(stay=True)
    for n in (leaving, staying):
        n._check_run_end()  # the file predates this safn-client: nothing happens
        assert not n.stopping and n.ended is None
    write_json(end_file, {"run_id": "r1", "status": "stopped", "reason": "x"})
    for n in (leaving, staying):
        n._check_run_end()  # a stopped run may be resumed: both stay
        assert not n.stopping and n.ended is None
    write_json(end_file, {"run_id": "r1", "status": "completed"})
    leaving._check_run_end()
    staying._check_run_end()
    assert leaving.stopping and leaving.ended["status"] == "completed"
    assert not staying.stopping and staying.ended is None


def test_the_run_end_reports_only_sites_still_connected_without_an_answer(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from safn.server.run_end import tell_sites_run_ended

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a ServerApp
        monkeypatch.setattr(TaskIdentity, key, value)

    class Reply:
        def __init__(self, node: int, error: bool):
            self.metadata = type("M", (), {"src_node_id": node})()
            self._error = error

        def has_error(self) -> bool:
            return self._error

    class Grid:
        def __init__(self, online_after: set[int]):
            self.online, self.online_after, self.sent = {1, 2, 3}, online_after, []

        def get_node_ids(self):
            return sorted(self.online)

        def send_and_receive(self, messages, timeout):
            self.sent = messages
            self.online = self.online_after  # sites that recorded the end have left
            # 1 answered; 2 left right after answering (Flower made its reply an error); 3 is
            # connected and silent
            return [Reply(1, False), Reply(2, True)]

    events, said = _lines()
    grid = Grid(online_after={3})
    assert tell_sites_run_ended(grid, "cfg", "run-1", "completed", "", 4, 30, events) == [1]
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 3]
    config = grid.sent[0].content["config"]
    assert (config["task"], config["run-status"], config["last-round"]) == ("run-end",
                                                                           "completed", 4)
    assert said == ["1 of 3 connected sites did not acknowledge the end of the run within 30 s; "
                    "they keep waiting until stopped"]
    said.clear()
    tell_sites_run_ended(Grid(online_after=set()), "cfg", "run-1", "stopped", "x", 2, 30,
                         events)
    assert said == []


def test_the_coordinator_reads_sites_connecting_from_the_log_not_every_few_seconds(
        tmp_path, monkeypatch):
    """Each `flwr` CLI call is a Python process of about two CPU seconds, which a small
    coordinator's federation needs itself: safn-server says at once that a site connected or
    left, from the SuperLink's log; it lists the sites at the start and, while waiting for
    them, every 30 s, and asks for the run's state every 30 s and at once when the ServerApp
    wrote its final status."""
    import json
    import time as real_time
    from types import SimpleNamespace

    import safn.server.cli as cli_mod
    from safn_core.processes import LogFollower
    from safn.server.cli import Deployment

    link_log = tmp_path / "superlink.log"
    link_log.write_text("")
    (tmp_path / "progress.log").write_text("")
    calls = {"nodes": [], "run_info": []}
    clock = SimpleNamespace(t=0.0, iteration=0)

    class Cli:
        def nodes(self):
            calls["nodes"].append(clock.iteration)
            return [{"node-id": "11", "status": "online"}] if clock.iteration >= 2 else []

        def run_info(self, run_id):
            calls["run_info"].append(clock.iteration)
            done = (tmp_path / "federation_status.json").exists()
            return {"status": "finished:completed" if done else "running", "run-id": run_id}

        @staticmethod
        def run_id_of(info):
            return str(info["run-id"])

    class Time:  # 6 s pass between two looks of the loop; the sites and ServerApp act on cue
        time = staticmethod(real_time.time)

        @staticmethod
        def monotonic():
            return clock.t

        @staticmethod
        def sleep(_seconds):
            clock.t += 6
            clock.iteration += 1
            if clock.iteration == 2:  # as Flower 1.42's SuperLink logs it
                with link_log.open("a") as fh:
                    fh.write("INFO :      [Fleet.ActivateNode] Activated node_id=11\n")
            if clock.iteration == 4:
                with link_log.open("a") as fh:
                    fh.write("INFO :      [Fleet.DeactivateNode] Deactivated node_id=11\n")
            if clock.iteration == 12:
                (tmp_path / "federation_status.json").write_text(
                    json.dumps({"status": "completed", "round": 1}))

    said = []
    monkeypatch.setattr(cli_mod, "time", Time)
    monkeypatch.setattr(cli_mod, "console", SimpleNamespace(
        print=lambda text, **_: said.append((clock.iteration, str(text)))))
    dep = Deployment.__new__(Deployment)
    dep.run_dir, dep.insecure, dep.site_nodes = tmp_path, True, {"site_a": "11"}
    dep.link = SimpleNamespace(child=SimpleNamespace(alive=lambda: True), cli=Cli(),
                               log=link_log)
    dep.superlink_log = LogFollower(link_log)
    assert dep.follow("42") == 0
    online = [(i, text) for i, text in said if text.startswith("sites online")]
    assert online[:2] == [(2, "sites online: site_a (1 of 1)"),
                          (4, "sites online: none (0 of 1; waiting for site_a)")]
    # listed at the start, then every 30 s (of 72 s), not 12 times
    assert calls["nodes"][0] == 0 and 2 not in calls["nodes"] and len(calls["nodes"]) <= 3
    # every 30 s (of 72), then at once after the final status (not 12 times)
    assert calls["run_info"][-1] == 12 and len(calls["run_info"]) <= 4


def test_the_coordinator_follows_the_runs_events_not_its_printed_text(tmp_path, monkeypatch):
    """safn-server shows the ServerApp's events (``events.jsonl``) in English (`render`), a
    round's per-site line from its ``entry``, and ends on the ``run_end`` event (asking Flower
    for the run's state at once), its outcome from that event."""
    import time as real_time
    from types import SimpleNamespace

    import safn.server.cli as cli_mod
    from safn_core.federation.events import EVENTS_FILE, Event, EventLog
    from safn_core.processes import LogFollower
    from safn.server.cli import Deployment, run_outcome

    (tmp_path / "superlink.log").write_text("")
    log = EventLog(tmp_path / EVENTS_FILE, echo=None)
    entry = {"round": 1, "sites_trained": ["site_a"], "sites": {"site_a": {"roc_auc": 0.75}}}
    steps = {1: lambda: log.emit(Event.STATISTICS, participants=10),
             2: lambda: log.emit(Event.ROUND, entry=entry, rounds=2),
             3: lambda: log.emit(Event.RUN_END, status="failed", code="SitesMissing",
                                 detail="only 1 of the 2 sites needed were connected", round=1)}
    clock = SimpleNamespace(t=0.0, iteration=0, info=[])

    class Time:
        time = staticmethod(real_time.time)

        @staticmethod
        def monotonic():
            return clock.t

        @staticmethod
        def sleep(_seconds):
            clock.t += 1
            clock.iteration += 1
            steps.get(clock.iteration, lambda: None)()

    class Cli:
        def nodes(self):
            return []

        def run_info(self, run_id):
            clock.info.append(clock.iteration)
            done = clock.iteration >= 3
            return {"status": "finished:failed" if done else "running", "run-id": run_id}

        @staticmethod
        def run_id_of(info):
            return str(info["run-id"])

    said, outcome = [], []
    monkeypatch.setattr(cli_mod, "time", Time)
    monkeypatch.setattr(cli_mod, "render", lambda e: f"<{e['event']}>")  # event_text's table
    monkeypatch.setattr(cli_mod, "console", SimpleNamespace(
        print=lambda text, **_: said.append(str(text))))
    dep = Deployment.__new__(Deployment)
    dep.run_dir, dep.insecure, dep.site_nodes = tmp_path, True, {}
    dep.link = SimpleNamespace(child=SimpleNamespace(alive=lambda: True), cli=Cli(),
                               log=tmp_path / "superlink.log")
    dep.superlink_log = LogFollower(tmp_path / "superlink.log")
    monkeypatch.setattr(dep, "_outcome", lambda info, end: outcome.append((info, end)) or 1)
    assert dep.follow("42") == 1
    assert said == ["<statistics>", "<round>", "  round 1 sites: site_a trained, site_a ROC-AUC "
                    "0.750"]  # not the run's end: the outcome says how the run ended
    assert clock.info[-1] == 3  # Flower asked at once after the run's end
    ((info, end),) = outcome
    assert end["event"] == Event.RUN_END
    assert run_outcome(end, {}) == {"status": "failed", "round": 1, "code": "SitesMissing",
                                    "reason": "only 1 of the 2 sites needed were connected"}
    # a ServerApp that emits no run end: federation_status.json as before
    assert run_outcome(None, {"status": "completed", "round": 2}) == {"status": "completed",
                                                                       "round": 2}


# -- certificates that do not name the host (issue #29) -------------------------------------

@pytest.mark.parametrize("names, host, ok", [
    (["coordinator.safn.test"], "coordinator.safn.test", True),
    (["Coordinator.SAFN.test"], "coordinator.safn.test.", True),
    (["*.safn.test"], "coordinator.safn.test", True),
    (["*.safn.test"], "a.coordinator.safn.test", False),
    (["*.test"], "safn.test", False),
    (["coordinator.safn.test"], "198.18.0.1", False),
    (["198.18.0.1"], "198.18.0.1", True),
    (["::1"], "[::1]", True),
    (["0:0:0:0:0:0:0:1"], "::1", True),
    (["198.18.0.1"], "coordinator.safn.test", False),
    ([], "localhost", False),
])
def test_a_certificate_names_a_host_as_tls_verification_would(names, host, ok):
    from safn.server.certificate_names import names_host

    assert names_host(names, host) is ok


def _coordinator_certs(folder: Path, *hosts: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                    str(folder), "--hosts", *hosts], check=True, capture_output=True)
    return folder / "superlink.pem"


def test_the_coordinator_refuses_a_certificate_that_does_not_name_server_host(tmp_path):
    from safn.server.certificate_names import certificate_names, tools_host

    other = _coordinator_certs(tmp_path / "other", "other.safn.test", "198.18.0.9")
    assert certificate_names(other) == ["other.safn.test", "198.18.0.9"]
    for host, called in (("coordinator.safn.test", "the host name coordinator.safn.test"),
                         ("198.18.0.1", "the IP address 198.18.0.1")):
        with pytest.raises(ConfigError) as caught:
            tools_host(host, other, "server.yaml")
        said = str(caught.value)
        assert "\n" not in said
        for part in (f"server.yaml: 'server.host' = {host}, but {other} is not issued for "
                     f"{called} (it is for: other.safn.test, 198.18.0.9)",
                     f"--hosts {host} other.safn.test 198.18.0.9"):
            assert part in said, said
        assert "0.0.0.0" not in said  # it names no loopback name: a wildcard would not do
    assert tools_host("other.safn.test", other, "server.yaml") == "other.safn.test"
    assert tools_host("198.18.0.9", other, "server.yaml") == "198.18.0.9"
    # a wildcard listens everywhere; the coordinator's own tools verify the loopback name
    with pytest.raises(ConfigError, match=r"'server.host' = 0.0.0.0 listens on every address.* "
                       r"127.0.0.1 or localhost, but .*superlink.pem names neither \(it is "
                       r"for: other.safn.test, 198.18.0.9\)"):
        tools_host("0.0.0.0", other, "server.yaml")
    local = _coordinator_certs(tmp_path / "local", "coordinator.safn.test", "localhost")
    assert tools_host("::", local, "server.yaml") == "localhost"
    both = _coordinator_certs(tmp_path / "both", "127.0.0.1", "localhost")
    assert tools_host("0.0.0.0", both, "server.yaml") == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"Set server.host to a name it is for \(or to "
                                          r"0.0.0.0\)"):
        tools_host("coordinator.safn.test", both, "server.yaml")


def test_the_coordinators_own_tools_connect_to_a_name_its_certificate_carries(tmp_path):
    from types import SimpleNamespace

    from safn.server.superlink import SuperLink

    pem = _coordinator_certs(tmp_path / "certs", "coordinator.safn.test", "localhost")
    link = SuperLink.__new__(SuperLink)
    link.home, link.origin, link.insecure = tmp_path / "flower", "server.yaml", False
    link.certs = {"ca.pem": pem.parent / "ca.pem", "superlink.pem": pem}
    for host, used in (("0.0.0.0", "localhost"), ("coordinator.safn.test",
                                                  "coordinator.safn.test")):
        link.server = SimpleNamespace(host=host, port=9092)
        link.write_connection()
        assert f'address = "{used}:9092"' in (link.home / "config.toml").read_text()
        assert link._health_host == used
    link.insecure = True  # no certificate to verify: the loopback address, as before
    link.server = SimpleNamespace(host="0.0.0.0", port=9092)
    link.write_connection()
    assert 'address = "127.0.0.1:9092"' in (link.home / "config.toml").read_text()


def test_a_site_names_the_address_or_name_it_used_and_the_certificates_names():
    from safn.client.reachability import Reach, explain

    said = explain(Reach("tls-name", "coordinator.safn.test, 198.18.0.9"), "198.18.0.1:9092",
                   "site.yaml", Path("ca.pem"))
    assert "\n" not in said
    for part in ("not issued for '198.18.0.1' (it is for: coordinator.safn.test, 198.18.0.9)",
                 "connects by the IP address 198.18.0.1",
                 "Write a name it is for in site.yaml, e.g. site.superlink = "
                 "coordinator.safn.test:9092", "add the IP address 198.18.0.1"):
        assert part in said, said
    said = explain(Reach("tls-name", "*.safn.test, ::1"), "other.example:9092", "site.yaml",
                   Path("ca.pem"))
    assert "connects by the host name other.example" in said
    assert "e.g. site.superlink = [::1]:9092" in said  # a wildcard name is no address to write
    said = explain(Reach("tls-name", "no names"), "other.example:9092", "site.yaml", None)
    assert "e.g." not in said and "Ask the coordinator to add the host name other.example" in said


def test_a_periodic_flwr_look_that_times_out_does_not_stop_the_run(capsys):
    """Under heavy load the ``flwr`` CLI can take over a minute to start: the coordinator's
    periodic looks (run status, sites online) then say so once and go on."""
    from types import SimpleNamespace

    from safn.server.cli import Deployment
    from safn.server.superlink import DeploymentError

    def slow(*args):
        raise DeploymentError("`flwr list safn` did not answer in 60 s")

    me = SimpleNamespace()
    assert Deployment._unless_busy(me, slow, None, "1") is None
    assert Deployment._unless_busy(me, slow, {"x"}, {"x"}) == {"x"}
    assert Deployment._unless_busy(me, lambda r: {"run-id": r}, None, "7") == {"run-id": "7"}
    said = capsys.readouterr().err
    assert said.count("did not answer in 60 s") == 1 and "the run goes on" in said


def test_a_supernode_that_gave_up_is_noted_and_a_closing_proxy_is_waited_out():
    """Flower gives up at once on a TLS error, which is what a proxy in front of a coordinator
    that is down answers (it accepts, then closes): the site's console notes it, and a
    reconnecting site waits such a proxy out instead of stopping."""
    from safn.client.reachability import CoordinatorUnreachable, Reach, wait_for_coordinator
    from safn.client.site_console import SiteConsole

    console = SiteConsole("coordinator.example.org:9092", "supernode.log", lambda line: None)
    assert not console.gave_up
    console.feed("\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 0.24 seconds and 2 "
                 "tries.\n")
    assert console.gave_up

    answers = iter([Reach("tls-plain", "EOF"), Reach("tls-plain", "EOF"), Reach("ok")])
    clock = iter(range(100))
    said = []
    waited = wait_for_coordinator("coordinator.example.org:9092", None, "site.yaml",
                                  float("inf"), said.append, clock=lambda: next(clock),
                                  sleep=lambda s: None, probe_fn=lambda *a: next(answers),
                                  also_transient={"tls-plain"})
    assert waited > 0 and len(said) == 2 and "answers at" in said[-1]
    with pytest.raises(CoordinatorUnreachable):  # a first connection: not TLS is an error
        wait_for_coordinator("coordinator.example.org:9092", None, "site.yaml", float("inf"),
                             said.append, probe_fn=lambda *a: Reach("tls-plain", "EOF"))
