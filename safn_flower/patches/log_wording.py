"""The lines of Flower's logs that safn reads, checked like patches when the process that reads
them starts. Two entry points: `check_superlink_log` (safn-server) and `check_supernode_log`
(safn-client).

Flower has no public API for these facts, or only an expensive one:

- a site connecting / leaving cleanly (`safn.server.cli`): ``flwr supernode list`` says it, but each
  call is a Python process of about two CPU seconds, which a small coordinator needs for the
  run itself; safn-server reads the SuperLink's log for it at once and lists the nodes with
  ``flwr supernode list`` only at the start and every 30 s while it waits for sites;
- a site refused at activation, and which key (`safn.server.superlink.refusal`): only the
  SuperLink's log names the key;
- what a SuperNode is doing (`safn.client.site_console`): a reply sent ("Sent successfully", which
  tells the site that the coordinator has its acknowledgement of the run's end), contact lost /
  back ("Connection attempt failed, retrying", "Connection successful after"), a refused
  activation ("Exit Code: 305", `safn.client.cli`): a SuperNode has no API of its own.

Each `Patch` below has no apply: its targets are the Flower functions that log those lines and
its checks (`core.source_says`) that they still say them with the wording safn matches. A Flower
upgrade that rewords one makes safn-server / safn-client refuse to start (`FlowerPatchError`)
and tests/test_flower_patches.py fail, instead of progress that silently stops being shown.
"""

from __future__ import annotations

from safn_flower.patches import core
from safn_flower.patches.core import Patch, target

_FLEET = "flwr.superlink.servicer.fleet.fleet_handlers"

NODE_EVENTS = Patch(
    "log_node_events",
    "safn-server says at once when a site connects or leaves (safn.server.cli.NODE_EVENT)",
    (target(_FLEET, "activate_node", core.source_says(
        '"[Fleet.ActivateNode] Activated node_id=%s"')),
     target(_FLEET, "deactivate_node", core.source_says(
         '"[Fleet.DeactivateNode] Deactivated node_id=%s"'))))

ACTIVATION_REFUSED = Patch(
    "log_activation_refused",
    "safn-server names the key of a site the SuperLink refused (safn.server.superlink.refusal)",
    (target(_FLEET, "activate_node", core.source_says(
        "No SuperNode found with the given public key", "could not be activated",
        "ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED",
        "Attempted to register SuperNode with public key: {request.public_key!r}")),
     target("flwr.supercore.error.http", "http_error_translator", core.source_says(
         'f"[{request.url.path}][ApiError:{err.code}] {err.message}"')),
     target("flwr.supercore.error", "ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED",
            lambda v: None if v == 2004 else f"is {v!r}, expected 2004")))

SUPERLINK_LOG = (NODE_EVENTS, ACTIVATION_REFUSED)

REPLY_SENT = Patch(
    "log_reply_sent",
    "safn-client leaves after a completed run once its acknowledgement has left "
    "(safn.client.site_console: 'Sent successfully')",
    (target("flwr.supernode.start_client_internal", "_push_messages",
            core.source_says('log(INFO, "Sent successfully")')),))

CONTACT = Patch(
    "log_contact",
    "a site's terminal says once that contact with the coordinator was lost and once that it is "
    "back, and safn-client starts a SuperNode again that gave up on it (safn.client.site_console)",
    (target("flwr.supercore.retry", "make_simple_http_retry_invoker", core.source_says(
        '"Connection attempt failed, retrying in %.2f seconds"',
        '"Connection successful after %.2f seconds and %s tries."',
        '"Giving up reconnection after %.2f seconds and %s tries."')),
     target("flwr.supernode.fleet_http_connection", "http_request_response",
            core.source_says("make_simple_http_retry_invoker()"))))

ACTIVATION_EXIT = Patch(
    "log_activation_exit",
    "safn-client retries a SuperNode the SuperLink refused to activate (safn.client.cli.REFUSED_MARK "
    "'Exit Code: 305')",
    (target("flwr.supercore.exit.exit", "flwr_exit",
            core.source_says('f"Exit Code: {code}\\n"')),
     target("flwr.supercore.exit.exit_code", "ExitCode.SUPERNODE_CONNECTION_ERROR",
            lambda v: None if v == 305 else f"is {v!r}, expected 305"),
     target("flwr.supernode.fleet_http_connection", "http_request_response",
            core.source_says("ExitCode.SUPERNODE_CONNECTION_ERROR"))))

SUPERNODE_LOG = (REPLY_SENT, CONTACT, ACTIVATION_EXIT)

PATCHES = SUPERLINK_LOG + SUPERNODE_LOG
"""Every wording check (`tests/test_flower_patches.py` runs them)."""


def check_superlink_log() -> None:
    """safn-server, at start: the SuperLink still logs what `safn.server.cli` / `safn.server.superlink`
    read, in those words (`FlowerPatchError` otherwise)."""
    core.require(SUPERLINK_LOG, "read the SuperLink's log")


def check_supernode_log() -> None:
    """safn-client, at start: the SuperNode still logs what `safn.client.site_console` / `safn.client.cli`
    read, in those words (`FlowerPatchError` otherwise)."""
    core.require(SUPERNODE_LOG, "read the SuperNode's log")
