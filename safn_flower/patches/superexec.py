"""A site's warm SuperExec process (`safn.client.superexec`). One entry point: `prepare`.

- `FORKING_EXECUTOR` (a patch): Flower's SuperExec starts every ClientApp as a fresh
  ``flwr-clientapp`` process (2-3 s of imports each); this one forks it from the warm process,
  with the same arguments. Flower's only other executor is Kubernetes'; ``get_executor`` takes
  no executor of one's own.
- `core.OBJECT_PULL_BACKOFF` (a patch): the forked ClientApps retry a message's objects after
  20 ms, not 1 s.

How soon the SuperExec looks for a new task is Flower's public setting
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (`safn_core.processes.flower_env`), no patch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from safn_flower.patches import core
from safn_flower.patches.core import Patch, replace, target


def _install_forking_executor(launch_clientapp: Callable[[list[str]], bool]) -> None:
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

    replace(FORKING_EXECUTOR, factory, "SubprocessExecutor", ForkingExecutor)


def _is_executor_class(value) -> str | None:
    return None if inspect.isclass(value) and hasattr(value, "launch") else \
        f"is {value!r}, expected the class SubprocessExecutor with a launch method"


FORKING_EXECUTOR = Patch(
    "superexec_forking_executor",
    "the SuperExec starts every ClientApp as a fresh process (2-3 s of imports each)",
    (target("flwr.supercore.superexec.executor.factory", "SubprocessExecutor",
            _is_executor_class),
     target("flwr.supercore.superexec.executor.factory", "get_executor",
            core.calls("SubprocessExecutor")),
     target("flwr.supercore.superexec.executor.subprocess_executor",
            "SubprocessExecutor.launch", core.params("self", "spec")),
     target("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND", lambda v: None
            if isinstance(v, dict) else f"is {v!r}, expected a dict")),
    _install_forking_executor)

PATCHES = (FORKING_EXECUTOR, core.OBJECT_PULL_BACKOFF)
"""Every patch of this process (`tests/test_flower_patches.py` checks them)."""


def prepare(launch_clientapp: Callable[[list[str]], bool]) -> tuple[str, ...]:
    """Patch this SuperExec process: ClientApps started by ``launch_clientapp(args)`` (a fork
    of this process; False lets Flower start a subprocess), quick object pulls. Checked first
    (`FlowerPatchError`), announced in one line; returns the names applied."""
    return core.apply([(FORKING_EXECUTOR, {"launch_clientapp": launch_clientapp}),
                       (core.OBJECT_PULL_BACKOFF, {})])
