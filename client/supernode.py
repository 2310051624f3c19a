"""A Flower SuperNode that runs only app bundles its site approved (``python -m safn.client.supernode``).

`safn-client` starts this module instead of the bare ``flower-supernode`` console script. It is
the same SuperNode (same arguments, same Fleet protocol), with one addition made before any
message is handled: every app bundle (FAB) the coordinator announces is checked against the
site's approval *in the SuperNode process*, before the FAB is stored and before any ClientApp
process starts. A bundle is approved when its sha256 is in ``site.approved_apps``, or when it
carries a signature by one of the site's Flower trusted entities. Anything else gets Flower's own
"FAB could not be verified" error reply (the coordinator sees it per site) and never executes.

Why a hook rather than ``--trusted-entities`` alone: the open-source SuperLink never marks a FAB
as verifiable (``valid_license``), so Flower's own check refuses every bundle from it; a hash
allowlist is the approval a hospital can actually give (the coordinator publishes the hash,
``safn-server --app-hash``, and the site pastes it into site.yaml).

The approval list comes from the environment (``SAFN_APPROVED_APPS``: comma-separated hashes,
``SAFN_TRUSTED_ENTITIES``: a YAML file), set by `safn-client` from site.yaml.

``SAFN_WARM_CLIENTAPPS`` (default 1) starts ClientApps from a warm SuperExec
(`safn.client.superexec`): this module starts it, waits until it has imported what ClientApps need
(a site is online only when it can answer at once; its start-up never counts against a round's
timeout), then runs Flower's SuperNode with ``--isolation process`` (Flower's public option for
a SuperExec started outside the SuperNode). 0 keeps Flower's fresh ``flwr-clientapp`` process
per message.

``SAFN_POLL_INTERVAL`` (seconds, default 3 = Flower's own) sets how long an idle SuperNode waits
between two pulls from the SuperLink; Flower hard-codes 3 s, which dominates the time per round
of a small model.

``SAFN_OBJECT_WORKERS`` (default 8) objects of a message pulled or pushed at once (0: Flower's
own, 2 or the site's core count if fewer); ``SAFN_CONFIRM_IN_BACKGROUND`` (default 1) confirms a
message's receipt while its ClientApp runs (0: before, as Flower does). Both cut round trips on a
slow link (`safn_flower.patches.supernode`); the defaults are what a site should run, the other
values are for comparisons (benchmarks/net_overhead.py).

``SAFN_FLEET_REQUEST_LOG`` (optional, a file path): one JSON line per request to the SuperLink
(`safn_flower.patches.supernode.REQUEST_LOG`), for measuring what a round costs on a slow link
(benchmarks/net_overhead.py).

``SAFN_NODE_ID_FILE`` (set by `safn-client`: ``<site.state_dir>/node_id``) keeps the node id of
the site's last activation, so that a SuperNode restarted after a crash ends its own previous
session and is active again within seconds, instead of being refused until that session has
missed its heartbeats (`safn_flower.patches.supernode`, ``supernode_session_takeover``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from logging import ERROR, INFO

from safn_flower.patches import supernode as supernode_patches

APPROVED_ENV = "SAFN_APPROVED_APPS"
TRUSTED_ENV = "SAFN_TRUSTED_ENTITIES"
POLL_ENV = "SAFN_POLL_INTERVAL"
WARM_ENV = "SAFN_WARM_CLIENTAPPS"
NODE_ID_ENV = "SAFN_NODE_ID_FILE"
OBJECT_WORKERS_ENV = "SAFN_OBJECT_WORKERS"
CONFIRM_ENV = "SAFN_CONFIRM_IN_BACKGROUND"


def approved_hashes() -> set[str]:
    raw = os.environ.get(APPROVED_ENV, "")
    return {h.strip().lower() for h in raw.split(",") if h.strip()}


def _trusted_entities() -> dict[str, str]:
    path = os.environ.get(TRUSTED_ENV)
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as fh:
        return {str(k): str(v) for k, v in (yaml.safe_load(fh) or {}).items()}


def app_approval(approved: set[str], trusted: dict[str, str]):
    """The site's decision on one app bundle: approved by sha256, or signed by a trusted entity
    (through Flower's own check); anything else is refused and never runs."""
    from flwr.common.logger import log

    def verify(fab, flower_verify) -> bool:
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest in approved:
            log(INFO, "safn: app bundle sha256 %s is approved by this site (site.approved_apps)",
                digest)
            return True
        if trusted and fab.verifications.get("safn-superlink-license") \
                and flower_verify(fab, trusted):
            log(INFO, "safn: app bundle sha256 %s is signed by a trusted entity", digest)
            return True
        log(ERROR, "safn: REFUSED app bundle sha256 %s: not in site.approved_apps%s; it was "
                   "not run. If the coordinator's new app is expected, add this hash to "
                   "site.approved_apps and restart safn-client", digest,
            " and not signed by a trusted entity" if trusted else "")
        return False

    return verify


SUPEREXEC_READY_WAIT = 600.0
"""Seconds this SuperNode waits for its warm SuperExec to be ready before it connects anyway."""


def _option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def superexec_command(argv: list[str]) -> list[str]:
    """The warm SuperExec for the SuperNode started with ``argv``: Flower's own SuperExec
    arguments (those its SuperNode passes in ``subprocess`` isolation), for the SuperNode's
    Runtime API (``--host`` / ``--port``; without TLS, as Flower's own), ended with this
    process (``--parent-pid``)."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    host = _option(argv, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    port = _option(argv, "--port", str(SUPERNODE_UVICORN_DEFAULT_PORT))
    return [sys.executable, "-m", "safn.client.superexec", "--insecure",
            "--runtime-api-address", f"{host}:{port}", "--parent-pid", str(os.getpid())]


def start_warm_superexec(command: list[str], ready_wait: float = SUPEREXEC_READY_WAIT):
    """Start ``command`` (`safn.client.superexec`) with the write end of a pipe in
    `safn.client.superexec.READY_FD_ENV`, and return once it wrote to it (it has imported
    everything), exited, or ``ready_wait`` s passed."""
    import select
    import subprocess

    from safn.client.superexec import READY_FD_ENV

    ready_read, ready_write = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(ready_write)})
    try:
        proc = subprocess.Popen(command, env=env, pass_fds=(ready_write,))
    finally:
        os.close(ready_write)
    try:
        select.select([ready_read], [], [], ready_wait)
    finally:
        os.close(ready_read)
    return proc


def main() -> None:
    approved = approved_hashes()
    trusted = _trusted_entities()
    if not approved and not trusted:
        sys.exit("safn: no approved app (SAFN_APPROVED_APPS) and no trusted entities "
                 "(SAFN_TRUSTED_ENTITIES): refusing to start a SuperNode that would run any app")
    supernode_patches.prepare(app_approval(approved, trusted),
                              float(os.environ.get(POLL_ENV, "3")), os.environ.get(NODE_ID_ENV),
                              os.environ.get(supernode_patches.REQUEST_LOG_ENV),
                              int(os.environ.get(OBJECT_WORKERS_ENV,
                                                 supernode_patches.OBJECT_WORKERS)),
                              os.environ.get(CONFIRM_ENV, "1") != "0")
    argv = sys.argv[1:]
    if os.environ.get(WARM_ENV, "1") != "0" and "--isolation" not in argv:
        start_warm_superexec(superexec_command(argv))
        argv += ["--isolation", "process"]
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
