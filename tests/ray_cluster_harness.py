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
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy_harness import BIN, Proc, free_port

STARTED = "block forever"  # what `ray start --block` prints once its node is up


class Node(Proc):
    """One `ray start --block` process (its node's raylet, agents and workers in its group)."""

    def wait_started(self, timeout: float = 300.0) -> None:
        """Wait for the node's own "started" line (an event), failing with its log."""
        self.wait_for_output(STARTED, timeout)

    def stop(self) -> None:
        """SIGTERM to the node's process group (ray start shuts its node down), then SIGKILL
        for stragglers of the group (raylet, workers)."""
        self.signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        self.kill()


@dataclass
class Cluster:
    address: str
    temp: Path
    nodes: list[Node] = field(default_factory=list)

    def env(self) -> dict:
        """The bare environment of a cluster node (or of a driver that inherits nothing)."""
        return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
                "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "TMPDIR": str(self.temp / "tmp")}


def _start(cluster: Cluster, name: str, args: list[str]) -> Node:
    node = Node(name, [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                cluster.temp / f"{name}.log", environment=cluster.env())
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
