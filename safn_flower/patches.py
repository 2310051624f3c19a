"""Every patch safn makes to private Flower 1.42 internals, in one place, checked before use.

Flower 1.42 hard-codes waits tuned for large deployments (a SuperNode sleeps 3 s between pulls,
the ServerApp's Grid 3 s between polls, object pulls back off 1 s, 2 s, 4 s … up to 10 s, the
simulation's in-memory Grid and dispatcher poll every 0.1 s) and has no hook for a site's own
app approval or for warm ClientApps. For a SAFN round (half a megabyte each way, well under a
second of compute) the waits are nearly all of the time. Each `Patch` below changes one private
attribute, and nothing else Flower does.

Rules, because these are someone else's private internals:

- `check` looks at every target *before* anything is patched: the module imports, the attribute
  exists, and its signature / defaults are the ones these patches were written against. A
  mismatch (a Flower upgrade moved or changed it) raises `FlowerPatchError` naming the patch and
  what changed; nothing is half-applied. `tests/test_flower_patches.py` runs the checks, so an
  upgrade fails the suite rather than a run.
- `apply` says in one line, on stderr, which patches it applied.
- `restore` undoes a patch in this process (benchmarks compare against stock Flower).

Patches by process: the simulation driver (`SIM`), a deployed ServerApp (`SERVERAPP`), a site's
SuperNode (`SUPERNODE`) and its warm SuperExec (`SUPEREXEC`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

FLOWER_SERIES = "1.42."
"""The Flower release series every target below was checked against."""

OBJECT_PULL_BACKOFF = (0.02, 0.25)
"""First retry of a message object after 20 ms, doubling up to 250 ms (Flower: 1 s up to 10 s)."""

HEARTBEAT_INTERVAL = 10
"""Seconds between a SuperNode's heartbeats (Flower: 30; the SuperLink accepts 10 to 1800). A
site that crashed is then seen offline within 2 x 10 s instead of 60 s, so a round stops waiting
for it sooner and the site can reconnect sooner."""


class FlowerPatchError(RuntimeError):
    """A patch target is missing or not what the patch was written against."""


class PollClock:
    """The ``time`` module with ``sleep`` capped at ``interval`` seconds (stands in for the
    module-level ``time`` of a Flower module whose polling loop sleeps a fixed time)."""

    def __init__(self, interval: float):
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name):
        return getattr(time, name)


@dataclass(frozen=True)
class Target:
    """One private attribute: ``module.attr`` (``attr`` may be dotted, e.g. a method)."""

    module: str
    attr: str

    def owner_and_name(self):
        obj = importlib.import_module(self.module)
        *path, name = self.attr.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    def get(self):
        owner, name = self.owner_and_name()
        return getattr(owner, name)

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}"


def _params(*names: str) -> Callable[[object], str | None]:
    """Expect a callable whose parameters are exactly ``names`` (in order)."""
    def check(value) -> str | None:
        found = tuple(inspect.signature(value).parameters)
        return None if found == names else f"parameters {found}, expected {names}"
    return check


def _kwdefaults(*keys: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        found = set((value.__kwdefaults__ or {}))
        missing = set(keys) - found
        return None if not missing else f"keyword defaults lack {sorted(missing)}"
    return check


def _is_time_module(value) -> str | None:
    return None if value is time or isinstance(value, PollClock) else \
        f"is {value!r}, expected the time module"


def _is_int(value) -> str | None:
    return None if isinstance(value, int) else f"is {value!r}, expected an int"


def _is_subprocess(value) -> str | None:
    import subprocess

    return None if value is subprocess or hasattr(value, "Popen") else \
        f"is {value!r}, expected the subprocess module"


def _is_class(name: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        return None if inspect.isclass(value) and hasattr(value, "launch") else \
            f"is {value!r}, expected the class {name} with a launch method"
    return check


@dataclass(frozen=True)
class Patch:
    """One patch: what it changes, why, how its targets are checked."""

    name: str
    why: str
    targets: tuple[tuple[Target, Callable[[object], str | None]], ...]

    def problems(self) -> list[str]:
        out = []
        for target, check in self.targets:
            try:
                value = target.get()
            except (ImportError, AttributeError) as exc:
                out.append(f"{self.name}: {target} not found ({exc})")
                continue
            problem = check(value)
            if problem:
                out.append(f"{self.name}: {target} {problem}")
        return out


def _t(module: str, attr: str, check) -> tuple[Target, Callable]:
    return Target(module, attr), check


_SCI = "flwr.supernode.start_client_internal"

PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("sim_grid_pull_interval",
          "the simulation's in-memory Grid waits 0.1 s between pulls for replies",
          (_t("flwr.superlink.grid.inmemory_grid", "InMemoryGrid.__init__",
              _params("self", "state_factory", "pull_interval")),)),
    Patch("sim_dispatch_interval",
          "the simulation's dispatcher waits 0.1 s before handing a message to a Ray actor",
          (_t("flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue",
              _params("state", "queue", "nodes_mapping", "f_stop")),)),
    Patch("object_pull_backoff",
          "fetching a message's objects backs off 1 s, 2 s, 4 s … while they are in transit",
          (_t("flwr.supercore.inflatable.inflatable_utils", "pull_objects",
              _kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object")),
           _t("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree",
              _kwdefaults("initial_backoff", "backoff_cap", "max_tries_per_object")))),
    Patch("serverapp_grid_polling",
          "a deployed ServerApp's Grid sleeps 3 s between polls for replies",
          (_t("flwr.superlink.grid.http_grid", "time", _is_time_module),)),
    Patch("supernode_app_approval",
          "a site runs only app bundles it approved by sha256 (Flower refuses every bundle from "
          "an open-source SuperLink, or runs any when no trusted entities are set)",
          (_t(_SCI, "_verify_fab", _params("fab", "trusted_entities")),
           _t(_SCI, "_pull_and_store_message",
              _params("state", "object_store", "node_config", "receive", "get_run", "get_fab",
                      "pull_object", "confirm_message_received", "trusted_entities")))),
    Patch("supernode_poll_interval", "an idle SuperNode sleeps 3 s between pulls",
          (_t(_SCI, "time", _is_time_module),)),
    Patch("supernode_heartbeat", "a SuperNode announces a heartbeat every 30 s",
          (_t("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", _is_int),
           _t("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL", _is_int))),
    Patch("supernode_warm_superexec",
          "the SuperNode starts stock flower-superexec, which starts a fresh Python per message",
          (_t(_SCI, "subprocess", _is_subprocess),)),
    Patch("superexec_forking_executor",
          "the SuperExec starts every ClientApp as a fresh process (2-3 s of imports each)",
          (_t("flwr.supercore.superexec.executor.factory", "SubprocessExecutor",
              _is_class("SubprocessExecutor")),
           _t("flwr.supercore.superexec.executor.subprocess_executor",
              "SubprocessExecutor.launch", _params("self", "spec")),
           _t("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND", lambda v: None
              if isinstance(v, dict) else f"is {v!r}, expected a dict"))),
)}

SIM = ("sim_grid_pull_interval", "sim_dispatch_interval")
SERVERAPP = ("serverapp_grid_polling", "object_pull_backoff")
SUPERNODE = ("supernode_app_approval", "supernode_poll_interval", "supernode_heartbeat",
             "object_pull_backoff", "supernode_warm_superexec")
SUPEREXEC = ("object_pull_backoff", "superexec_forking_executor")

_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}


def flower_version() -> str:
    import flwr

    return flwr.__version__


def check(names=tuple(PATCHES)) -> list[str]:
    """Every problem with the targets of ``names`` (empty: all present and as expected)."""
    version = flower_version()
    out = [] if version.startswith(FLOWER_SERIES) else [
        f"Flower {version} is installed; these patches were checked on {FLOWER_SERIES}x"]
    for name in names:
        out += PATCHES[name].problems()
    return out


def _set(patch: str, owner, attr: str, value) -> None:
    """Replace ``owner.attr``, remembering the stock value once (for `restore`)."""
    _ORIGINALS.setdefault(patch, []).append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)


def restore(names=None) -> None:
    """Undo patches applied in this process (all of them by default)."""
    for name in list(names or _ORIGINALS):
        for owner, attr, value in reversed(_ORIGINALS.pop(name, [])):
            setattr(owner, attr, value)


def applied() -> tuple[str, ...]:
    return tuple(_ORIGINALS)


def apply(settings: dict[str, dict] | None = None, *, names=None, announce=True) -> tuple[str, ...]:
    """Check, then apply the patches ``names`` (default: those in ``settings``), each with its
    keyword settings; already applied ones are left alone. Raises `FlowerPatchError` before
    changing anything when a target is not as expected."""
    settings = dict(settings or {})
    names = tuple(names or settings)
    todo = [n for n in dict.fromkeys(names) if n not in _ORIGINALS]
    unknown = [n for n in todo if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown Flower patches {unknown}; known: {sorted(PATCHES)}")
    problems = check(todo)
    if problems:
        raise FlowerPatchError("cannot patch Flower safely: " + "; ".join(problems))
    for name in todo:
        _APPLY[name](**settings.get(name, {}))
    if todo and announce:
        print(f"safn: patched Flower {flower_version()} internals: {', '.join(todo)}",
              file=sys.stderr, flush=True)
    return tuple(todo)


# -- the patches themselves ---------------------------------------------------------------------

def _sim_grid_pull_interval(interval: float = 0.01) -> None:
    import flwr.superlink.grid.inmemory_grid as grid

    _set("sim_grid_pull_interval", grid.InMemoryGrid.__init__, "__defaults__", (interval,))


def _sim_dispatch_interval(interval: float = 0.01) -> None:
    """Flower's own dispatcher loop with a shorter wait (longer with many nodes, so that polling
    stays cheap)."""
    import flwr.server.superlink.fleet.vce.vce_api as vce

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        wait = max(interval, 2e-4 * len(nodes_mapping))
        while not f_stop.is_set():
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(wait)

    _set("sim_dispatch_interval", vce, "add_messages_to_queue", add_messages_to_queue)


def _object_pull_backoff(initial: float = OBJECT_PULL_BACKOFF[0],
                         cap: float = OBJECT_PULL_BACKOFF[1]) -> None:
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = dict(fn.__kwdefaults__)
        defaults.update(initial_backoff=initial, backoff_cap=cap,
                        max_tries_per_object=max(defaults.get("max_tries_per_object") or 0, 5000))
        _set("object_pull_backoff", fn, "__kwdefaults__", defaults)


def _serverapp_grid_polling(interval: float = 0.2) -> None:
    import flwr.superlink.grid.http_grid as http_grid

    _set("serverapp_grid_polling", http_grid, "time", PollClock(interval))


def _supernode_app_approval(verify: Callable[[object, Callable], bool]) -> None:
    """Every app bundle (FAB) the SuperLink announces goes through ``verify(fab, flower_verify)``
    in the SuperNode process, before it is stored and before any ClientApp starts. Flower only
    enters its own check when trusted entities are set, and only for FABs from a SuperLink that
    marks them verifiable: remember whether it did, then always enter the check with ours."""
    from flwr.supernode import start_client_internal as sci

    flower_verify = sci._verify_fab
    flower_pull = sci._pull_and_store_message

    def verify_fab(fab, _trusted_entities) -> bool:
        return verify(fab, flower_verify)

    def pull(**kwargs):
        get_fab = kwargs["get_fab"]

        def get_fab_checked(fab_hash, run_id):
            fab = get_fab(fab_hash, run_id)
            if fab.verifications.get("valid_license"):
                fab.verifications["safn-superlink-license"] = "1"
            fab.verifications["valid_license"] = "safn-approval"
            return fab

        kwargs["get_fab"] = get_fab_checked
        kwargs["trusted_entities"] = {"safn-approval": ""}  # always enter Flower's check
        return flower_pull(**kwargs)

    _set("supernode_app_approval", sci, "_verify_fab", verify_fab)
    _set("supernode_app_approval", sci, "_pull_and_store_message", pull)


def _supernode_poll_interval(interval: float = 3.0) -> None:
    from flwr.supernode import start_client_internal as sci

    _set("supernode_poll_interval", sci, "time", PollClock(interval))


def _supernode_heartbeat(interval: int = HEARTBEAT_INTERVAL) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    _set("supernode_heartbeat", heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", interval)
    _set("supernode_heartbeat", fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", interval)


class _SuperExecSwap:
    """Stands in for ``subprocess`` inside Flower's SuperNode: the SuperExec it starts is
    ``command`` instead of ``flower-superexec``."""

    def __init__(self, command: list[str]):
        import subprocess

        self._subprocess, self._command = subprocess, list(command)

    def Popen(self, command, *args, **kwargs):  # noqa: N802  (mirrors subprocess.Popen)
        if command and command[0] == "flower-superexec":
            command = [*self._command, *command[1:]]
        return self._subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._subprocess, name)


def _supernode_warm_superexec(command: list[str]) -> None:
    from flwr.supernode import start_client_internal as sci

    _set("supernode_warm_superexec", sci, "subprocess", _SuperExecSwap(command))


def _superexec_forking_executor(launch_clientapp: Callable[[list[str]], bool]) -> None:
    """ClientApps started by ``launch_clientapp(args)`` (a fork of the warm process) with the
    same ``flwr-clientapp`` arguments Flower would use; it returns False to let Flower start a
    subprocess instead."""
    from flwr.supercore.constant import (TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
                                         TASK_TYPE_TO_COMMAND, TaskType)
    from flwr.supercore.superexec.executor import factory
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class ForkingExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with ClientApps forked from this warm process."""

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
                return super().launch(spec)
            command = TASK_TYPE_TO_COMMAND[spec.task_type]
            args = [command, TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                    spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            if not launch_clientapp(args):
                return super().launch(spec)
            return LaunchResult.accepted()

    _set("superexec_forking_executor", factory, "SubprocessExecutor", ForkingExecutor)


_APPLY: dict[str, Callable[..., None]] = {
    "sim_grid_pull_interval": _sim_grid_pull_interval,
    "sim_dispatch_interval": _sim_dispatch_interval,
    "object_pull_backoff": _object_pull_backoff,
    "serverapp_grid_polling": _serverapp_grid_polling,
    "supernode_app_approval": _supernode_app_approval,
    "supernode_poll_interval": _supernode_poll_interval,
    "supernode_heartbeat": _supernode_heartbeat,
    "supernode_warm_superexec": _supernode_warm_superexec,
    "superexec_forking_executor": _superexec_forking_executor,
}
assert set(_APPLY) == set(PATCHES)
