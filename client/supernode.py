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

``SAFN_NODE_ID_FILE`` (set by `safn-client`: ``<site.state_dir>/node_id``) keeps the node id of
the site's last activation, so that a SuperNode restarted after a crash ends its own previous
session and is active again within seconds, instead of being refused until that session has
missed its heartbeats (`safn_flower.patches`, ``supernode_session_takeover``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from logging import ERROR, INFO

from safn_flower import patches

APPROVED_ENV = "SAFN_APPROVED_APPS"
TRUSTED_ENV = "SAFN_TRUSTED_ENTITIES"
POLL_ENV = "SAFN_POLL_INTERVAL"
WARM_ENV = "SAFN_WARM_CLIENTAPPS"
NODE_ID_ENV = "SAFN_NODE_ID_FILE"


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


def supernode_patches(approved: set[str], trusted: dict[str, str], poll_interval: float,
                      warm: bool, node_id_file: str | None = None) -> dict[str, dict]:
    """The Flower patches this SuperNode runs with (`safn_flower.patches`), with settings."""
    out = {"supernode_app_approval": {"verify": app_approval(approved, trusted)},
           "supernode_poll_interval": {"interval": poll_interval},
           "supernode_heartbeat": {}, "object_pull_backoff": {}}
    if node_id_file:
        out["supernode_session_takeover"] = {"node_id_file": node_id_file}
    if warm:
        out["supernode_warm_superexec"] = {"command": [sys.executable, "-m", "client.superexec"]}
    return out


def main() -> None:
    approved = approved_hashes()
    trusted = _trusted_entities()
    if not approved and not trusted:
        sys.exit("safn: no approved app (SAFN_APPROVED_APPS) and no trusted entities "
                 "(SAFN_TRUSTED_ENTITIES): refusing to start a SuperNode that would run any app")
    patches.apply(supernode_patches(approved, trusted, float(os.environ.get(POLL_ENV, "3")),
                                    os.environ.get(WARM_ENV, "1") != "0",
                                    os.environ.get(NODE_ID_ENV)))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
