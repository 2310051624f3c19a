"""A real multi-node Ray cluster on this machine, for tests: `ray start --head` and worker nodes
(`ray start --address=...`), each ``--block`` in its own process group, on free ports, with their
own temporary folder. Both are ended (the whole process group) when the context exits, also
after a failure.

The head declares no CPUs, so no ClientApp can be placed on it: every actor lands on the worker
nodes. Nodes are started with a bare environment (PATH and HOME only): like a real cluster's
nodes, they inherit nothing from the test or from safn-sim.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
STARTED = "block forever"  # what `ray start --block` prints once its node is up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> Path:
    import sys

    return BIN if (BIN / "ray").exists() else Path(sys.executable).parent


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def wait_started(self, timeout: float = 300.0) -> None:
        """Wait for the node's own "started" line (an event), failing with its log."""
        deadline = time.monotonic() + timeout
        while STARTED not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start in {timeout:.0f} s:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the node's process group (ray start shuts its node down), then SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group (raylet, workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


@dataclass
class Cluster:
    address: str
    temp: Path
    nodes: list[Node] = field(default_factory=list)

    def env(self) -> dict:
        """The bare environment of a cluster node (or of a driver that inherits nothing)."""
        return {"PATH": f"{bin_dir()}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "TMPDIR": str(self.temp / "tmp")}


def _start(cluster: Cluster, name: str, args: list[str]) -> Node:
    log = cluster.temp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(bin_dir() / "ray"), "start", "--block",
                                 "--disable-usage-stats", *args],
                                stdout=out, stderr=subprocess.STDOUT, env=cluster.env(),
                                start_new_session=True)
    node = Node(name, proc, log)
    cluster.nodes.append(node)
    return node


@contextlib.contextmanager
def ray_cluster(worker_cpus: tuple[int, ...] = (2,), object_store_mb: int = 100):
    """A head without CPUs and one worker node per entry of ``worker_cpus``; yields the
    `Cluster`."""
    # a short folder: Ray's socket paths must stay under the OS limit (~107 characters)
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    (temp / "tmp").mkdir()
    port = free_port()
    cluster = Cluster(f"127.0.0.1:{port}", temp)
    store = str(object_store_mb * 1024 * 1024)

    def agent_ports() -> list[str]:  # fixed defaults would collide with other Rays here
        return [f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    try:
        head = _start(cluster, "head", [
            "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
            "--include-dashboard=false", f"--temp-dir={temp / 'ray'}",
            f"--ray-client-server-port={free_port()}", f"--object-store-memory={store}",
            *agent_ports()])
        head.wait_started()
        for i, cpus in enumerate(worker_cpus):
            worker = _start(cluster, f"worker{i}", [
                f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={cpus}", f"--object-store-memory={store}", *agent_ports()])
            worker.wait_started()
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)
