"""Where the CPU of a deployment benchmark goes: CPU seconds per Flower / safn process role, per
phase of the run, sampled from /proc (Linux) while the federation runs.

Why: on a small host the deployed round is CPU-bound (three sites and a coordinator are nine
long-running Python processes plus one ClientApp per message), so a round's seconds follow from
who burns the CPU. Sampling /proc costs little and needs no change to Flower's logging.

A process's CPU is its own user + system time; a child that has exited and was reaped (a forked
ClientApp, a ``flwr`` CLI call) is counted in its parent's "children" time under the child's
role. The phases are what ``phase()`` says at each sample (`deploy_overhead.py` reads them from the
SuperLink's log and the run's ``progress.log``).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable

from common import Sampler

TICK = os.sysconf("SC_CLK_TCK")

ROLES = (  # (substring of the command line, role); the first match wins
    ("flower-superlink", "superlink"),
    ("flwr-serverapp", "serverapp"),
    ("flower-superexec", "superexec (server)"),
    ("safn-server", "safn-server"),
    ("safn.client.supernode", "supernode"),
    ("safn.client.superexec", "superexec (site)"),
    ("flower-supernode", "supernode"),
    ("flwr-clientapp", "clientapp"),
    ("safn-client", "safn-client"),
    ("bin/flwr ", "flwr CLI"),
)
REAPED = {"superexec (site)": "clientapp (forked)", "safn-server": "flwr CLI",
          "supernode": "superexec (site)", "superexec (server)": "serverapp"}
"""Whose CPU a reaped child's is counted as, by the parent's role (a forked ClientApp's parent
is the warm SuperExec, a ``flwr`` CLI call's safn-server)."""


def role_of(cmdline: str, parent_role: str | None) -> str | None:
    for needle, role in ROLES:
        if needle in cmdline:
            if role == "superexec (site)" and parent_role == "superexec (site)":
                return "clientapp (forked)"  # a fork of the warm SuperExec
            return role
    return None


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU s, reaped children's CPU s) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / TICK
    children = (int(fields[13]) + int(fields[14])) / TICK
    return ppid, own, children


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def host_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (every process on the host)."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / TICK


class ProcessCpu(Sampler):
    """Samples the CPU of this process's descendants by role, every ``interval`` seconds, and
    the phase of the run (``phase()``, a name)."""

    def __init__(self, phase: Callable[[], str], interval: float = 0.2):
        super().__init__(interval)
        self.phase = phase
        self.root = os.getpid()
        self.last: dict[int, tuple[str, float, float]] = {}  # pid -> role, own, children
        self.roles: dict[int, str] = {}
        self.samples: list[tuple[float, str, dict[str, float], float]] = []
        self.t0 = time.monotonic()

    # -- sampling ----------------------------------------------------------------------------

    def _sample(self) -> dict[str, float]:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                s = _stat(int(entry))
                if s is not None:
                    stats[int(entry)] = s
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _, _) in stats.items():
            children[ppid].append(pid)
        todo = list(children.get(self.root, []))
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            if pid not in self.roles:
                parent = self.roles.get(stats[pid][0])
                role = role_of(_cmdline(pid), parent)
                if role is None:
                    continue
                self.roles[pid] = role
            _, own, reaped = stats[pid]
            self.last[pid] = (self.roles[pid], own, reaped)
        for pid in [p for p in self.last if p not in stats]:
            # exited and reaped: from now on its CPU is in its parent's children time
            del self.last[pid]
        total: dict[str, float] = defaultdict(float)
        for role, own, reaped in self.last.values():
            total[role] += own
            if reaped:
                total[REAPED.get(role, role + " (reaped)")] += reaped
        return dict(total)

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self.t0, self.phase(), self._sample(),
                             host_busy_seconds()))

    # -- the account -------------------------------------------------------------------------

    def by_phase(self) -> list[dict]:
        """Per phase: wall seconds, CPU seconds per role, all roles, the whole host's."""
        out, start = [], None
        for i, (t, phase, cpu, host) in enumerate(self.samples):
            if start is None or phase != start[1]:
                if start is not None:
                    out.append(self._delta(start, self.samples[i - 1]))
                start = (t, phase, cpu, host)
        if start is not None:
            out.append(self._delta(start, self.samples[-1]))
        return out

    @staticmethod
    def _delta(a, b) -> dict:
        roles = sorted(set(a[2]) | set(b[2]))
        cpu = {r: b[2].get(r, 0.0) - a[2].get(r, 0.0) for r in roles}
        return {"phase": a[1], "wall_s": b[0] - a[0], "cpu_s": cpu,
                "ours_s": sum(cpu.values()), "host_s": b[3] - a[3]}


def table(phases: list[dict], cores: int | None = None) -> str:
    cores = cores or os.cpu_count()
    roles = sorted({r for p in phases for r in p["cpu_s"]})
    lines = []
    for p in phases:
        if p["wall_s"] <= 0:
            continue
        lines.append(f"{p['phase']}: {p['wall_s']:.1f} s wall; CPU of the federation's processes "
                     f"{p['ours_s']:.1f} s, the whole host {p['host_s']:.1f} s of "
                     f"{cores * p['wall_s']:.1f} available ({cores} cores)")
        for r in roles:
            v = p["cpu_s"].get(r, 0.0)
            if v >= 0.05:
                lines.append(f"    {r:<32} {v:6.1f} s  ({v / p['wall_s']:.2f} cores)")
    return "\n".join(lines)
