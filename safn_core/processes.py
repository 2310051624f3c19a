"""Child processes of the deployment front doors (`safn-server`, `safn-client`).

Flower's SuperLink and SuperNode start further processes by name (``flower-superexec``, then
``flwr-serverapp`` / ``flwr-clientapp``), so each child is started in a process group of its own
and stopped as a group: SIGTERM first (a SuperNode then tells the SuperLink it is leaving),
SIGKILL for what remains. The environment puts this interpreter's ``bin/`` first on ``PATH`` and
switches off Flower's network calls (telemetry, update checks, runtime ``uv sync``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FLOWER_QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(flwr_home: Path, poll_interval: float | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes and the ``flwr`` CLI."""
    env = dict(os.environ)
    env.update(FLOWER_QUIET)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    here = str(Path(sys.executable).parent)
    if here not in env.get("PATH", "").split(os.pathsep):  # Flower starts its tools by name
        env["PATH"] = here + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(0.01, poll_interval))
    env.update(extra or {})
    return env


class Child:
    """One long-running child process (and its descendants), output appended to a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path,
                 pid_file: Path | None = None):
        self.name, self.cmd, self.log = name, cmd, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=end_with_parent)
        if pid_file is not None:
            from safn_core.io import write_atomic

            write_atomic(pid_file, f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the group, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # descendants (superexec, app processes) may outlive the leader
        signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()
        return self.proc.returncode


def end_with_parent() -> None:
    """Run in a child before it starts (Linux): SIGTERM it when its parent dies, so no
    SuperLink or SuperNode outlives the front door that started it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def signal_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``pid`` (gone already: nothing to do)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LogFollower:
    """New complete lines of a growing text file, from where the last call stopped."""

    def __init__(self, path: Path, from_end: bool = False):
        self.path = Path(path)
        self.pos = self.path.stat().st_size if from_end and self.path.exists() else 0
        self._partial = b""  # a line still being written (never decoded half)

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.pos)
            data = fh.read()
        self.pos += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux: read from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
