"""A coordinator and sites on 127.0.0.1 for the deployment tests: real `safn-server` and
`safn-client` processes, certificates and keys from deploy/make_certs.py, per-site synthetic
downloads from safn-synth. Every process is started in its own process group and the whole group
is killed when the test ends, also when it fails."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from safn_core.processes import descendants, signal_group

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("site_a", "site_b", "site_c")
SMALL = {"model": {"d_model": 16, "n_heads": 2, "encoder_hidden": 16, "ffn_hidden": 16,
                   "head_hidden": 16}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
             COLUMNS="200")
    return e


def make_material(root: Path, sites=SITES, hosts=("127.0.0.1", "localhost")) -> dict:
    """Keys for ``sites`` and an intruder, a coordinator certificate for ``hosts``, and one
    synthetic download per site."""
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                    str(root / "certs"), "--sites", *sites, "intruder", "--hosts", *hosts],
                   check=True, capture_output=True, env=env())
    subprocess.run([str(BIN / "safn-synth"), "--out", str(root / "data"), "--per-site",
                    "--set", f"synth.n_sites={len(sites)}", "--set", "synth.min_site_size=60"],
                   check=True, capture_output=True, env=env())
    downloads = sorted(p for p in (root / "data").iterdir() if p.is_dir())
    app_hash = subprocess.run([str(BIN / "safn-server"), "--app-hash"], check=True,
                              capture_output=True, text=True, env=env()).stdout.strip()
    return {"root": root, "certs": root / "certs", "downloads": dict(zip(sites, downloads)),
            "app_hash": app_hash}


class Proc:
    """A process in its own group, its output in ``log``; ``environment`` replaces the test's
    environment entirely (a process that must inherit nothing), else ``extra_env`` adds to it."""

    def __init__(self, name: str, cmd: list[str], log: Path, extra_env: dict | None = None,
                 environment: dict | None = None):
        self.name, self.log = name, log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=environment if environment is not None
                                     else {**env(), **(extra_env or {})})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not finish within {timeout:.0f} s; "
                                 f"output:\n{self.output()[-4000:]}")

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match:
        """The first match of the regular expression ``pattern`` in this process's output, once
        it has printed it (an event, not a delay); fails when the process exits without it or
        ``timeout`` (a bound for a failure, never a synchronisation) passes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.output())
            if found:
                return found
            if self.proc.poll() is not None:
                found = regex.search(self.output())  # its last words
                if found:
                    return found
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without "
                                     f"printing {pattern!r}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not print {pattern!r} within "
                                     f"{timeout:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def signal_group(self, sig: int) -> None:
        signal_group(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


def _alive(pid: int) -> bool:
    """Still running (a zombie has stopped: it can no longer write anything)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_host(proc: Proc, pid_file: Path) -> None:
    """A host dies: every process of it stops at once, returning when none runs any more.

    That is ``proc``, the Flower process whose pid is in ``pid_file`` (each front door starts its
    SuperLink / SuperNode in a group of its own) and everything below them: Flower starts the
    SuperLink's SuperExec in a session of its own, so killing process groups alone would leave
    the ServerApp running (and writing checkpoints) after its host "died". The whole tree is
    frozen first (SIGSTOP, again until no new process appears), then killed."""
    leader = int(pid_file.read_text()) if pid_file.exists() else None
    roots = [proc.proc.pid] + ([leader] if leader else [])
    frozen: set[int] = set()
    while True:
        tree = {p for r in roots for p in (r, *descendants(r))} - frozen
        if not tree:
            break
        for pid in tree:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= tree
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    if leader:
        signal_group(leader, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in frozen):  # SIGKILL takes effect at once; a bound for failure
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of {proc.name}'s host survived SIGKILL: "
                                 f"{sorted(p for p in frozen if _alive(p))}")
        time.sleep(0.05)


def kill_site(fed: "Federation", proc: Proc) -> None:
    """A site host dies: safn-client and its SuperNode."""
    kill_host(proc, fed.folder / f"state_{proc.name}" / "supernode.pid")


def kill_coordinator(fed: "Federation", proc: Proc) -> None:
    """The coordinator host dies: safn-server and its SuperLink (with the ServerApp)."""
    kill_host(proc, fed.run_dir / "superlink.pid")


@contextmanager
def federations(material: dict, folder: Path):
    """A maker of `Federation`s under ``folder``; every process of each is ended on exit,
    also when the test failed."""
    made: list[Federation] = []

    def make(**kwargs) -> "Federation":
        fed = Federation(material, folder / f"f{len(made)}", **kwargs)
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.stop_all()


class Federation:
    """Config files for one coordinator and its sites under ``folder``, and their processes."""

    def __init__(self, material: dict, folder: Path, listed=SITES, net=None, **federation):
        """``net``: a `tests.netbed.NetBed`; the coordinator and each site then run on hosts of
        their own, the sites reaching the coordinator by name through their links."""
        self.m, self.folder, self.net = material, folder, net
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if net is None else net.port
        self.procs: list[Proc] = []
        self.run_dir = folder / "run"
        certs = material["certs"]
        fed = {"rounds": 2, "local_epochs": 1, "min_sites": 2, "wait_for_sites": 120,
               "round_timeout": 120, **federation}
        self.server_yaml = folder / "server.yaml"
        self.server_yaml.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1" if net is None else net.coordinator_name,
                       "port": self.port, "certificates": str(certs),
                       "sites": {s: str(certs / "sites" / f"{s}.pub") for s in listed},
                       "run_dir": str(self.run_dir)},
            "federation": fed, "data": {"min_cell": 3}, **SMALL}))

    def site_yaml(self, name: str, privacy: dict | None = None, **site) -> Path:
        path = self.folder / f"{name}.yaml"
        if path.exists() and not site and privacy is None:
            return path
        certs = self.m["certs"]
        download = self.m["downloads"].get(name, self.m["downloads"]["site_a"])
        path.write_text(yaml.safe_dump({
            "site": {"name": name, "superlink": f"127.0.0.1:{self.port}" if self.net is None
                     else f"{self.net.coordinator_name}:{self.port}",
                     "root_certificates": str(certs / "ca.pem"),
                     "private_key": str(certs / "sites" / f"{name}.key"),
                     "approved_apps": [self.m["app_hash"]],
                     "state_dir": str(self.folder / f"state_{name}"),
                     "local_port": free_port(), "activation_wait": 60, **site},
            "data": {"source": "ppmi", "path": str(download), "min_cell": 3},
            "privacy": privacy or {"mode": "off"}}))
        return path

    def on(self, host: str, cmd: list[str]) -> list[str]:
        """``cmd`` run on the coordinator's host or a site's (the same one without a test bed)."""
        if self.net is None:
            return cmd
        return (self.net.coordinator if host == "coordinator" else self.net.sites[host]
                ).command(cmd)

    def server(self, *args: str) -> Proc:
        p = Proc("safn-server", self.on("coordinator", [
            str(BIN / "safn-server"), "--config", str(self.server_yaml), *args]),
            self.folder / f"server{len(self.procs)}.log")
        self.procs.append(p)
        return p

    def site(self, name: str, *args: str, **site) -> Proc:
        p = Proc(name, self.on(name, [str(BIN / "safn-client"), "--site",
                                      str(self.site_yaml(name, **site)), *args]),
                 self.folder / f"{name}{len(self.procs)}.log")
        self.procs.append(p)
        return p

    def start(self, sites=SITES) -> tuple[Proc, list[Proc]]:
        """The coordinator, then (once it has registered the sites' keys) the sites."""
        server = self.server()
        server.wait_for_output(r"run \d+ submitted", 240)
        return server, [self.site(s) for s in sites]

    def audit(self, site: str) -> list[dict]:
        """The site's audit log of the replies it sent (none yet: empty)."""
        path = self.folder / f"state_{site}" / "audit" / "outgoing.jsonl"
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            return []

    def wait_for_reply(self, site: str, kind: str, round_: int, server: Proc,
                       timeout: float) -> dict:
        """The site's audit entry of its ``kind`` reply of round ``round_``, once its ClientApp
        has made it (before its SuperNode sends it); ``timeout`` bounds a failure (0: it must be
        there already)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.audit(site)
                     if e["type"] == kind and e.get("round") == round_]
            if found:
                return found[0]
            if server.proc.poll() is not None:
                raise AssertionError(f"safn-server exited before {site}'s {kind} reply of round "
                                     f"{round_}:\n{server.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{site} made no {kind} reply of round {round_} in "
                                     f"{timeout:.0f} s:\n{server.output()[-3000:]}")
            time.sleep(0.05)

    def history(self) -> list[dict]:
        try:
            return json.loads((self.run_dir / "history.json").read_text())
        except (OSError, json.JSONDecodeError):
            return []

    def wait_for_round(self, r: int, timeout: float, server: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["round"] >= r for e in self.history()):  # round 0: the floor, untrained
                return
            if server is not None and server.proc.poll() is not None:
                raise AssertionError(f"safn-server exited early:\n{server.output()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"round {r} not reached in {timeout:.0f} s; server output:\n"
                             + (server.output()[-3000:] if server else ""))

    def stop_all(self) -> None:
        for p in self.procs:
            p.signal_group(signal.SIGTERM)
            pid_file = self.folder / f"state_{p.name}" / "supernode.pid"
            if pid_file.exists():
                signal_group(int(pid_file.read_text()), signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            p.kill()
