"""The site's Flower SuperExec with warm ClientApps (``python -m safn.client.superexec``).

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message, so every train
and evaluate message pays for starting Python and importing Flower, PyTorch and safn (2-3 s of
CPU on a small machine; several times the compute of a round of the SAFN model). This SuperExec
imports them once and starts each ClientApp as a fork of itself: the same ``flwr-clientapp``
code with the same arguments, one process per message as before (a crash or leak in one
message's ClientApp cannot affect the next), without the start-up cost.

`safn.client.supernode` starts this module before Flower's SuperNode (which then runs with
``--isolation process``) and connects to the coordinator only once this process says, on the pipe
in `READY_FD_ENV`, that it has imported everything (a site is online when it can answer at once;
its start-up never counts against a round's timeout). It looks for a new task every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s (Flower's public setting; `safn-client` sets it to
``site.poll_interval``). Everything else (tokens, the FAB, the ClientApp protocol) is Flower's.
"""

from __future__ import annotations

import os
import sys
import traceback

from safn_flower.patches import superexec as superexec_patches

READY_FD_ENV = "SAFN_SUPEREXEC_READY_FD"
"""The file descriptor on which this SuperExec says it has imported what ClientApps need."""

SITE_ENV = "SAFN_SITE_CONFIG"
"""The site's resolved site.yaml (set by safn-client): its cohort is loaded before forking."""


def preload() -> None:
    """Import what every ClientApp imports, before any thread is started."""
    import torch

    torch.set_num_threads(1)
    import safn.client.app  # noqa: F401  (Flower, PyTorch, safn_core)
    import flwr.supernode.cli  # noqa: F401
    import safn_core.privacy  # noqa: F401  (Opacus, for DP rounds)
    # the first optimizer of a process imports torch._dynamo (about a second): pay it here
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    site_file = os.environ.get(SITE_ENV)
    if site_file:  # the site's prepared cohort, read once for every message
        from pathlib import Path

        from safn_core.config import load_config
        from safn_core.data.cohort_store import read_cohort

        own = load_config(site_file)
        if own.site is not None:
            meta = Path(own.site.state_dir).resolve() / "cohort" / "cohort.json"
            if meta.is_file():
                read_cohort(meta)


def reap() -> None:
    """Collect ClientApp children that have exited (no zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_clientapp(args: list[str]) -> int:
    """In the forked child: Flower's own ``flwr-clientapp`` entry point with ``args``."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = list(args)
    try:
        flwr_clientapp()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (the child must always end with a status)
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _ours(command: str) -> bool:
    """True when ``command`` on PATH is this environment's own (a site that put its own
    wrapper first on PATH keeps it, started as a subprocess)."""
    import shutil
    from pathlib import Path

    found = shutil.which(command)
    return found is not None and Path(found).parent == Path(sys.executable).parent


def fork_clientapp(args: list[str]) -> bool:
    """Start one ClientApp as a fork of this warm process; False (Flower starts a subprocess)
    when ``flwr-clientapp`` on PATH is not this environment's own."""
    if not _ours(args[0]):
        return False
    reap()
    pid = os.fork()
    if pid == 0:  # the ClientApp
        os._exit(run_clientapp(args))
    return True


RUNTIME_API_WAIT = 120.0
"""Seconds this SuperExec waits for its SuperNode's Runtime API to accept connections."""


def wait_for_runtime_api(argv: list[str], timeout: float = RUNTIME_API_WAIT) -> None:
    """Until the SuperNode's Runtime API (``--runtime-api-address``) accepts a connection, at
    most ``timeout`` s. Started before its SuperNode (`safn.client.supernode`), this SuperExec would
    otherwise meet a closed port, and Flower's retry would log "Connection attempt failed",
    which the site's terminal reads as lost contact with the coordinator."""
    import socket
    import time

    address = next((argv[i + 1] for i, a in enumerate(argv[:-1])
                    if a == "--runtime-api-address"), None)
    if address is None:
        return
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.05)


def main() -> None:
    preload()
    superexec_patches.prepare(fork_clientapp)
    ready_fd = os.environ.pop(READY_FD_ENV, None)
    if ready_fd is not None:  # the SuperNode connects to the SuperLink once this is written
        os.write(int(ready_fd), b"ready")
        os.close(int(ready_fd))
        wait_for_runtime_api(sys.argv[1:])  # the SuperNode starts serving it only now
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
