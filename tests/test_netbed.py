"""The multi-host test bed (`tests/netbed.py`): names, the proxy path, cut and mend, cleanup (also
after an exception), stale beds and the address range. Every wait is for an event (a ready line,
an answer, a process end); timeouts are failure bounds only."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netbed as nb

BOUND = 20  # seconds: a failure bound, never a delay

SERVER = r"""
import socket, sys, threading
sock = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=16)
print("ready", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = sock.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys
name, port, timeout, n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
resolved = socket.gethostbyname(name)
try:
    sock = socket.create_connection((name, port), timeout=timeout)
except OSError as exc:
    print(json.dumps({"resolved": resolved, "error": repr(exc)}))
    sys.exit(1)
payload = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
sock.sendall(payload)
got = b""
while len(got) < n:
    chunk = sock.recv(65536)
    if not chunk:
        break
    got += chunk
print(json.dumps({"resolved": resolved, "peer": sock.getpeername()[0], "echo": got == payload}))
"""


@pytest.fixture
def echo_on_coordinator():
    """``start(bed)``: an echo server on the coordinator (port `nb.PORT`), ready when it says so."""
    procs = []

    def start(bed):
        proc = subprocess.Popen(bed.coordinator.command([sys.executable, "-c", SERVER,
                                                         str(nb.PORT)]),
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def connect(host: nb.Host, name=nb.COORDINATOR, timeout=BOUND, n=1000) -> tuple[int, dict]:
    done = subprocess.run(host.command([sys.executable, "-c", CLIENT, name, str(nb.PORT),
                                        str(timeout), str(n)]),
                          capture_output=True, text=True, timeout=timeout + BOUND)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def namespaces() -> set[str]:
    return {line.split()[0] for line in nb._ip("netns", "list").stdout.splitlines() if line}


def need_namespaces():
    why = nb.available()
    if why is not None:
        nb.skip_or_fail(pytest, why)


def test_a_site_reaches_the_coordinator_by_name_through_its_own_proxy_link(
        make_bed, echo_on_coordinator):
    bed = make_bed(["a", "b"], aliases={"flower.safn.test": nb.COORDINATOR,
                                        "elsewhere.safn.test": "198.18.0.99"})
    echo_on_coordinator(bed)
    code, out = connect(bed.sites["a"], n=5000)
    assert code == 0, out
    assert out == {"resolved": "198.18.1.1", "peer": "198.18.1.1", "echo": True}
    stats = bed.control.stats()
    assert (stats["a"]["up"], stats["a"]["down"], stats["a"]["connections"]) == (5000, 5000, 1)
    assert (stats["b"]["up"], stats["b"]["down"], stats["b"]["connections"]) == (0, 0, 0)
    # site b has its own proxy address; an alias of the coordinator resolves like its name
    code, out = connect(bed.sites["b"], name="flower.safn.test", n=300)
    assert code == 0 and out["resolved"] == out["peer"] == "198.18.1.2" and out["echo"], out
    assert bed.control.stats()["b"]["up"] == 300
    # the coordinator reaches itself by name, directly
    code, out = connect(bed.coordinator, n=10)
    assert code == 0 and out["peer"] == nb.COORDINATOR_IP, out
    # the hosts files
    for host, coordinator_ip in [(bed.coordinator, nb.COORDINATOR_IP),
                                 (bed.sites["a"], "198.18.1.1"), (bed.sites["b"], "198.18.1.2")]:
        lines = (Path("/etc/netns") / host.ns / "hosts").read_text().splitlines()
        assert f"{coordinator_ip} {nb.COORDINATOR}" in lines
        assert f"{coordinator_ip} flower.safn.test" in lines
        assert "198.18.0.99 elsewhere.safn.test" in lines
    done = subprocess.run(bed.sites["a"].command(["getent", "hosts", "elsewhere.safn.test"]),
                          capture_output=True, text=True, timeout=BOUND)
    assert done.stdout.split()[:2] == ["198.18.0.99", "elsewhere.safn.test"], done


def test_a_cut_site_cannot_reach_the_coordinator_the_other_can_and_mend_restores_it(
        make_bed, echo_on_coordinator):
    bed = make_bed(["a", "b"])
    echo_on_coordinator(bed)
    assert connect(bed.sites["a"])[0] == 0  # reachable (and its neighbours known) before
    bed.cut("a")
    code, out = connect(bed.sites["a"], timeout=3)
    assert code == 1 and "error" in out, out
    code, out = connect(bed.sites["b"])
    assert code == 0 and out["echo"], out
    assert bed.control.stats()["a"]["connections"] == 1  # the cut attempt never got there
    bed.mend("a")
    code, out = connect(bed.sites["a"])
    assert code == 0 and out["echo"], out
    assert bed.control.stats()["a"]["connections"] == 2


def _bed_traces(bed, extra_pid_file: Path):
    return {"namespaces": bed._namespaces(), "proxy": bed._proxy,
            "extra_pid": int(extra_pid_file.read_text())}


def _start_daemon(host: nb.Host, pid_file: Path) -> None:
    """A process left running in the host's namespace, detached from the test (not its child)."""
    subprocess.run(host.command(["sh", "-c", f"sleep 1000 >/dev/null 2>&1 & echo $! > {pid_file}"]),
                   check=True, timeout=BOUND)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _assert_gone(traces) -> None:
    left = namespaces() & set(traces["namespaces"])
    assert not left, f"namespaces left: {left}"
    for ns in traces["namespaces"]:
        assert not (Path("/etc/netns") / ns).exists()
    assert traces["proxy"].poll() is not None, "the proxy still runs"
    assert not _alive(traces["extra_pid"]), "a process of the bed still runs"


@pytest.mark.parametrize("raises", [False, True])
def test_everything_is_removed_when_the_bed_ends(tmp_path, raises):
    need_namespaces()
    pid_file = tmp_path / "daemon.pid"
    traces = {}

    def use_bed():
        with nb.netbed(tmp_path, ["a", "b"]) as bed:
            assert set(bed._namespaces()) <= namespaces()
            _start_daemon(bed.sites["b"], pid_file)
            traces.update(_bed_traces(bed, pid_file))
            assert _alive(traces["extra_pid"]) and traces["proxy"].poll() is None
            if raises:
                raise RuntimeError("the test failed")

    if raises:
        with pytest.raises(RuntimeError, match="the test failed"):
            use_bed()
    else:
        use_bed()
    _assert_gone(traces)


def test_sweep_stale_removes_beds_of_dead_processes_only(tmp_path):
    need_namespaces()
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not Path(f"/proc/{dead.pid}").exists()
    stale, live = f"{nb.PREFIX}-{dead.pid}-x-wan", f"{nb.PREFIX}-{os.getpid()}-x-wan"
    try:
        for ns in (stale, live):
            nb._ip("netns", "add", ns)
            (Path("/etc/netns") / ns).mkdir(parents=True)
            (Path("/etc/netns") / ns / "hosts").write_text("127.0.0.1 localhost\n")
        nb.sweep_stale()
        present = namespaces()
        assert stale not in present and not (Path("/etc/netns") / stale).exists()
        assert live in present and (Path("/etc/netns") / live / "hosts").exists()
    finally:
        for ns in (stale, live):
            nb._ip("netns", "del", ns, check=False)
            subprocess.run(["rm", "-rf", str(Path("/etc/netns") / ns)], check=False)


def _links(ns: str | None = None) -> list[dict]:
    args = ["-n", ns] if ns else []
    return json.loads(nb._ip(*args, "-j", "link").stdout)


def test_only_benchmark_addresses_inside_the_bed_and_no_interface_outside(make_bed):
    need_namespaces()
    before = {(link["ifindex"], link["ifname"]) for link in _links()}
    bed = make_bed(["a", "b"])
    after = {(link["ifindex"], link["ifname"]) for link in _links()}
    assert after <= before, f"the machine's own namespace gained {after - before}"
    bench = ipaddress.ip_network("198.18.0.0/15")
    seen = []
    for ns in bed._namespaces():
        for link in json.loads(nb._ip("-n", ns, "-j", "addr").stdout):
            for info in link.get("addr_info", []):
                addr = ipaddress.ip_address(info["local"])
                seen.append((ns, link["ifname"], str(addr)))
                if link["ifname"] == "lo":
                    assert addr.is_loopback, (ns, info)
                elif addr.version == 6:
                    assert addr.is_link_local, (ns, link["ifname"], info)  # automatic fe80::
                else:
                    assert addr in bench, (ns, link["ifname"], info)
    v4 = {(ns, a) for ns, name, a in seen if name != "lo" and ":" not in a}
    assert v4 == {(bed.coordinator.ns, "198.18.0.1"), (bed.sites["a"].ns, "198.18.0.11"),
                  (bed.sites["b"].ns, "198.18.0.12"), (bed.wan, "198.18.1.1"),
                  (bed.wan, "198.18.1.2")}
