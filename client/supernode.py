"""A Flower SuperNode that runs only app bundles its site approved (``python -m client.supernode``).

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
(`client.superexec`); 0 keeps Flower's fresh ``flwr-clientapp`` process per message.

``SAFN_POLL_INTERVAL`` (seconds, default 3 = Flower's own) sets how long an idle SuperNode waits
between two pulls from the SuperLink; Flower hard-codes 3 s, which dominates the time per round
of a small model.
"""

from __future__ import annotations

import hashlib
import os
import sys
from logging import ERROR, INFO

from server.latency import PollClock, fast_object_pulls

APPROVED_ENV = "SAFN_APPROVED_APPS"
TRUSTED_ENV = "SAFN_TRUSTED_ENTITIES"
POLL_ENV = "SAFN_POLL_INTERVAL"
WARM_ENV = "SAFN_WARM_CLIENTAPPS"


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


def install_app_approval(approved: set[str], trusted: dict[str, str]) -> None:
    """Make the SuperNode verify every FAB against this site's approval before storing it."""
    from flwr.common.logger import log
    from flwr.supernode import start_client_internal as sci

    flower_verify = sci._verify_fab
    flower_pull = sci._pull_and_store_message

    def verify(fab, _trusted_entities) -> bool:
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

    def pull(**kwargs):
        get_fab = kwargs["get_fab"]

        def get_fab_checked(fab_hash, run_id):
            fab = get_fab(fab_hash, run_id)
            # Flower only verifies FABs from a SuperLink that marks them verifiable; remember
            # whether it did, then let our `verify` decide for every FAB.
            if fab.verifications.get("valid_license"):
                fab.verifications["safn-superlink-license"] = "1"
            fab.verifications["valid_license"] = "safn-approval"
            return fab

        kwargs["get_fab"] = get_fab_checked
        kwargs["trusted_entities"] = {"safn-approval": ""}  # always enter Flower's check
        return flower_pull(**kwargs)

    sci._verify_fab = verify
    sci._pull_and_store_message = pull


def install_poll_interval(interval: float) -> None:
    from flwr.supernode import start_client_internal as sci

    sci.time = PollClock(interval)


HEARTBEAT_INTERVAL = 10
"""Seconds between the SuperNode's heartbeats as it announces them (Flower: 30; the SuperLink
accepts 10 to 1800). A site that crashed is then seen offline within 2 x 10 s instead of 60 s,
so a round stops waiting for it sooner and the site can reconnect sooner."""


def install_heartbeat(interval: int = HEARTBEAT_INTERVAL) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = interval


class _WarmSuperExec:
    """Stands in for ``subprocess`` inside Flower's SuperNode: the SuperExec it starts is
    `client.superexec` (warm ClientApps) instead of ``flower-superexec``."""

    def __init__(self):
        import subprocess

        self._subprocess = subprocess

    def Popen(self, command, *args, **kwargs):  # noqa: N802  (mirrors subprocess.Popen)
        if command and command[0] == "flower-superexec":
            command = [sys.executable, "-m", "client.superexec", *command[1:]]
        return self._subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._subprocess, name)


def install_warm_superexec() -> None:
    from flwr.supernode import start_client_internal as sci

    sci.subprocess = _WarmSuperExec()


def main() -> None:
    approved = approved_hashes()
    trusted = _trusted_entities()
    if not approved and not trusted:
        sys.exit("safn: no approved app (SAFN_APPROVED_APPS) and no trusted entities "
                 "(SAFN_TRUSTED_ENTITIES): refusing to start a SuperNode that would run any app")
    install_app_approval(approved, trusted)
    install_poll_interval(float(os.environ.get(POLL_ENV, "3")))
    install_heartbeat()
    fast_object_pulls()
    if os.environ.get(WARM_ENV, "1") != "0":
        install_warm_superexec()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
