"""A multi-host test bed on one machine: the coordinator and each site in a Linux network namespace
of its own, with its own address and its own hosts file, joined through a "wan" namespace.

    coordinator ns  eth0 198.18.0.1 ──┐
    site_a ns       eth0 198.18.0.11 ─┤ br0 in the wan ns, where the fault proxy listens on
    site_b ns       eth0 198.18.0.12 ─┤ 198.18.1.k:9092 for site k and forwards to
    ...                               ┘ 198.18.0.1:9092

Each site's hosts file (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over
``/etc/hosts``) maps the coordinator's name to its own proxy address, so a site reaches the
coordinator **by name** and through a link whose delay, bandwidth and stalls the test sets
(`tests.fault_proxy`); ``cut`` takes a site's cable out (its port on the bridge goes down:
packets are lost, nothing is reset). The coordinator's hosts file maps its name to its own
address. Only addresses of 198.18.0.0/15 (RFC 2544's benchmarking range) are used, and only
inside the namespaces made here: nothing is added to the machine's own network.

`netbed` creates all of it and removes all of it (every process in the namespaces, the
namespaces with their links, the hosts files, the proxy), also when the test fails. Where
namespaces cannot be made (not root, no ``ip``), the test is skipped, except where
``SAFN_NETBED_REQUIRED=1`` (CI): there it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fault_proxy import ProxyControl

COORDINATOR = "coordinator.safn.test"
PORT = 9092
NETWORK = "198.18.0.0/16"
COORDINATOR_IP = "198.18.0.1"
PREFIX = "safnbed"
REQUIRED_ENV = "SAFN_NETBED_REQUIRED"
ROOT = Path(__file__).resolve().parents[1]


class NetBedUnavailable(RuntimeError):
    """Network namespaces cannot be made here."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def sweep_stale() -> None:
    """Remove the namespaces (and hosts files) of test beds whose creating process is gone."""
    for ns in _ip("netns", "list", check=False).stdout.split():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() \
                and not Path(f"/proc/{parts[1]}").exists():
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _kill_namespace_processes(ns: str) -> None:
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@dataclass(frozen=True)
class Host:
    """One machine of the test bed: its namespace, address and (for a site) proxy address."""

    name: str
    ns: str
    address: str
    proxy: str | None = None

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` run on this host."""
        return ["ip", "netns", "exec", self.ns, *cmd]


class NetBed:
    """The namespaces of one test bed; use `netbed` to make one."""

    def __init__(self, folder: Path, sites: list[str], aliases: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.id = f"{PREFIX}-{os.getpid()}-{time.monotonic_ns() % 10**8}"
        self.wan = f"{self.id}-wan"
        self.coordinator = Host("coordinator", f"{self.id}-coord", COORDINATOR_IP)
        self.sites = {name: Host(name, f"{self.id}-s{k}", f"198.18.0.{11 + k}",
                                 f"198.18.1.{1 + k}") for k, name in enumerate(sites)}
        self.aliases = aliases or {}
        self.coordinator_name, self.port = COORDINATOR, PORT
        self._ports: list[str] = []
        self._proxy: subprocess.Popen | None = None
        self.control: ProxyControl | None = None

    # --- building ---------------------------------------------------------------------------
    def _namespaces(self) -> list[str]:
        return [self.wan, self.coordinator.ns, *(h.ns for h in self.sites.values())]

    def create(self) -> None:
        for ns in self._namespaces():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.wan, "link", "add", "br0", "type", "bridge")
        for k, host in enumerate([self.coordinator, *self.sites.values()]):
            port = f"p{k}"
            _ip("link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", port,
                "netns", self.wan)
            _ip("-n", self.wan, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/16", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            self._ports.append(port)
        for host in self.sites.values():
            _ip("-n", self.wan, "addr", "add", f"{host.proxy}/16", "dev", "br0")
        _ip("-n", self.wan, "link", "set", "br0", "up")
        self._hosts_file(self.coordinator.ns, COORDINATOR_IP)
        for host in self.sites.values():
            self._hosts_file(host.ns, host.proxy)

    def _hosts_file(self, ns: str, coordinator_ip: str) -> None:
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{coordinator_ip} {COORDINATOR}"]
        lines += [f"{coordinator_ip if target == COORDINATOR else target} {alias}"
                  for alias, target in self.aliases.items()]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def start_proxy(self, port: int = PORT) -> None:
        """The fault proxy in the wan namespace: one link per site, no fault yet."""
        sock = self.folder / "proxy.sock"
        links = [f"--link={name}={h.proxy}:{port}={COORDINATOR_IP}:{port}"
                 for name, h in self.sites.items()]
        log = (self.folder / "proxy.log").open("ab")
        self._proxy = subprocess.Popen(
            ["ip", "netns", "exec", self.wan, sys.executable, str(ROOT / "tests" /
                                                                  "fault_proxy.py"),
             "--control", str(sock), *links],
            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()  # the proxy has its own copy
        line = self._proxy.stdout.readline().decode()  # its first line: an event, not a delay
        if "fault proxy ready" not in line:
            raise RuntimeError(f"the fault proxy did not start: {line!r}; see "
                               f"{self.folder / 'proxy.log'}")
        self.control = ProxyControl(sock)

    # --- faults -----------------------------------------------------------------------------
    def cut(self, site: str) -> None:
        """The site's cable is out: its port on the bridge goes down, packets are lost."""
        _ip("-n", self.wan, "link", "set", self._port_of(site), "down")

    def mend(self, site: str) -> None:
        """The cable is back: the port comes up, and the neighbour (ARP) entries the cut left
        unresolved are forgotten on both ends, so that the next packet resolves afresh instead
        of failing with "no route to host" when the stale resolution gives up."""
        host = self.sites[site]
        _ip("-n", self.wan, "link", "set", self._port_of(site), "up")
        deadline = time.monotonic() + 10  # a failure bound: the carrier comes up at once
        while "LOWER_UP" not in _ip("-n", host.ns, "link", "show", "eth0").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{site}: eth0 has no carrier after mend")
            time.sleep(0.01)
        _ip("-n", host.ns, "neigh", "flush", "dev", "eth0", check=False)
        _ip("-n", self.wan, "neigh", "flush", "to", host.address, check=False)

    def _port_of(self, site: str) -> str:
        return self._ports[1 + list(self.sites).index(site)]

    def shape(self, site: str, **settings) -> None:
        """Delay (one way, ms), rates (bytes/s) or a stall on the site's link (`fault_proxy`)."""
        self.control.set(site, **settings)

    def shape_all(self, **settings) -> None:
        for site in self.sites:
            self.shape(site, **settings)

    # --- removing ---------------------------------------------------------------------------
    def remove(self) -> None:
        for ns in self._namespaces():
            _kill_namespace_processes(ns)
        if self._proxy is not None:
            try:
                self._proxy.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self._proxy.stdout.close()
        for ns in self._namespaces():
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@contextmanager
def netbed(folder: Path, sites, aliases: dict[str, str] | None = None, proxy: bool = True):
    """A test bed with ``sites``; ``aliases`` maps extra host names to an address (or to
    `COORDINATOR`: the coordinator as each host reaches it). Everything is removed on exit."""
    why = available()
    if why is not None:
        raise NetBedUnavailable(why)
    sweep_stale()
    bed = NetBed(folder, list(sites), aliases)
    try:
        bed.create()
        if proxy:
            bed.start_proxy()
        yield bed
    finally:
        bed.remove()


def skip_or_fail(pytest, why: str):
    """Outside CI a machine without namespaces skips; in CI (SAFN_NETBED_REQUIRED=1) it fails."""
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"the network test bed is required here ({REQUIRED_ENV}=1): {why}")
    pytest.skip(f"no network test bed: {why}")


@contextmanager
def bed_or_skip(pytest, folder: Path, sites, aliases: dict[str, str] | None = None,
                proxy: bool = True):
    """`netbed` for a test: skipped where namespaces cannot be made, failed in CI."""
    why = available()
    if why is not None:
        skip_or_fail(pytest, why)
    with netbed(folder, sites, aliases, proxy) as bed:
        yield bed
