"""``safn-client --site site.yaml``: a hospital joins a SAFN federation.

1. Checks, with no network: the site file, TLS material and key, app approval, privacy settings
   and the site's data against the data contract. Unfit data means the site does not join.
2. Starts a Flower SuperNode (`client.supernode`: stock SuperNode + the site's app approval)
   that serves the SAFN ClientApp on the site's own data; TLS and key authentication unless
   ``--insecure``. Its log is kept in ``<site.state_dir>/supernode.log`` and echoed.
3. When the SuperLink refuses to activate the site (an unregistered key, or the site's previous
   connection not yet timed out after a crash), retries for ``site.activation_wait`` seconds,
   then stops with a message saying which.

    safn-client --site site.yaml --check      only the checks
    safn-client --app-hash                    sha256 of this installation's SAFN app bundle
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from safn_core.cli.common import console, entry, err_console
from safn_core.config import dump_config, load_config
from safn_core.errors import ConfigError, SafnError
from safn_core.io import write_atomic
from safn_core.processes import end_with_parent, flower_env, signal_group

INSECURE_WARNING = ("WARNING: --insecure: this site talks to the coordinator WITHOUT TLS and "
                    "without authenticating. Use only for a local test, never with real data.")
REFUSED_MARK = "Exit Code: 305"


class SiteRefused(SafnError):
    """The SuperLink kept refusing to activate this site."""


def supernode_command(cfg, site_file: Path, insecure: bool) -> list[str]:
    site = cfg.site
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", site.superlink,
           "--host", "127.0.0.1", "--port", str(site.local_port),
           "--node-config", f"site-config={_toml_string(str(site_file))} "
                            f"audit-log={_toml_string(str(audit_log(cfg)))}",
           "--max-retries", "20"]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + ["--root-certificates", str(Path(site.root_certificates).resolve()),
                  "--auth-supernode-private-key", str(Path(site.private_key).resolve())]


def audit_log(cfg) -> Path:
    """Where the ClientApp records every reply that leaves the site (client/audit.py)."""
    return Path(cfg.site.state_dir).resolve() / "audit" / "outgoing.jsonl"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SiteNode:
    """The SuperNode process of one site, restarted while the SuperLink refuses activation."""

    def __init__(self, cfg, site_file: Path, insecure: bool):
        from client.superexec import SITE_ENV
        from client.supernode import APPROVED_ENV, NODE_ID_ENV, POLL_ENV, TRUSTED_ENV

        site = cfg.site
        self.cfg, self.log = cfg, Path(site.state_dir) / "supernode.log"
        extra = {APPROVED_ENV: ",".join(site.approved_apps), POLL_ENV: str(site.poll_interval),
                 SITE_ENV: str(site_file),
                 # a restarted SuperNode ends its own previous session (client/supernode.py)
                 NODE_ID_ENV: str(Path(site.state_dir).resolve() / "node_id")}
        if site.trusted_entities is not None:
            extra[TRUSTED_ENV] = str(Path(site.trusted_entities).resolve())
        self.env = flower_env(Path(site.state_dir) / "flower", site.poll_interval, extra)
        self.cmd = supernode_command(cfg, site_file, insecure)
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def run(self) -> int:
        start = time.monotonic()
        wait = self.cfg.site.activation_wait
        while True:
            code, refused = self._run_once()
            if self.stopping:
                return 0
            if not refused:
                return code
            waited = time.monotonic() - start
            if waited >= wait:
                raise SiteRefused(
                    f"site {self.cfg.site.name}: the coordinator ({self.cfg.site.superlink}) "
                    f"refused to activate this site for {waited:.0f} s. Either its key "
                    f"({self.cfg.site.private_key}) is not registered there - send the "
                    "coordinator your .pub file to list under server.sites - or the site's "
                    "previous connection has not timed out yet; try again in a minute. "
                    f"Log: {self.log}")
            err_console.print(f"the coordinator refused to activate site {self.cfg.site.name}; "
                              f"retrying (for up to {wait - waited:.0f} s more)")
            time.sleep(min(5.0, max(0.5, wait - waited)))

    def _run_once(self) -> tuple[int, bool]:
        """One SuperNode process, its output echoed and logged, until it exits.

        The SuperNode's own children (SuperExec, ClientApps) share its output pipe and may
        outlive it; they are ended with it, so a refused SuperNode can be restarted at once.
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        refused = threading.Event()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True,
                                     preexec_fn=end_with_parent)
        write_atomic(Path(self.cfg.site.state_dir) / "supernode.pid", f"{self.proc.pid}\n")

        def pump(stream, log_path=self.log):
            with log_path.open("a") as log:
                for line in stream:
                    log.write(line)
                    log.flush()
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    if REFUSED_MARK in line:
                        refused.set()

        reader = threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True)
        reader.start()
        code = self.proc.wait()
        signal_group(self.proc.pid)
        reader.join(5)
        return code, refused.is_set()

    def stop(self, *_args) -> None:
        """SIGTERM to the SuperNode's group: it tells the SuperLink it leaves, then exits."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            timer = threading.Timer(15, signal_group, args=(self.proc.pid,))
            timer.daemon = True
            timer.start()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safn-client", description="Join a SAFN federation as a site: check the site's "
        "data and settings, then serve the SAFN ClientApp through a Flower SuperNode.")
    parser.add_argument("--site", metavar="FILE", type=Path,
                        help="the site's own YAML: site, data, privacy (see deploy/)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides", help="override one key of the site file (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="run the checks only (data contract, keys, approval) and exit")
    parser.add_argument("--app-hash", action="store_true",
                        help="print the sha256 of this installation's SAFN app bundle and exit")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no authentication (local tests only)")
    args = parser.parse_args(argv)
    if args.app_hash:
        from safn_flower.fab import app_hash

        print(app_hash())
        return 0
    if args.site is None:
        raise ConfigError("safn-client needs --site site.yaml (see deploy/examples/site_a.yaml)")
    if not args.site.is_file():
        raise ConfigError(f"--site {args.site}: file not found; pass the site's own YAML "
                          "(see deploy/examples/site_a.yaml)")
    cfg = load_config(args.site, args.overrides)
    from client.preflight import preflight

    if args.insecure:
        err_console.print(f"[bold red]{INSECURE_WARNING}[/]")
    found = preflight(cfg, args.site, args.insecure)
    site = cfg.site
    console.print(f"site {site.name}: {found.participants} participants pass the data contract "
                  f"(class counts {found.label_counts[0]} / {found.label_counts[1]}); "
                  f"privacy: {found.privacy}")
    _note_app_approval(site)
    if args.check:
        return 0
    from safn_core.deploy_checks import check_can_listen

    check_can_listen("127.0.0.1", site.local_port, str(args.site), "site.local_port",
                     "site.local_port", "another site's SuperNode, or an earlier safn-client")
    # the ClientApp reads the site's settings from this resolved copy (absolute paths, --set
    # applied), so what the site checked is what it serves
    state = Path(site.state_dir).resolve()
    site_file = state / "site-config.yaml"
    write_atomic(site_file, dump_config(cfg))
    from safn_core.data.cohort_store import write_cohort  # (pandas: only when joining)

    write_cohort(state / "cohort", found.cohort)
    node = SiteNode(cfg, site_file, args.insecure)
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    console.print(f"site {site.name}: connecting to {site.superlink} "
                  f"({'INSECURE' if args.insecure else 'TLS, key authentication'})")
    code = node.run()
    return 0 if node.stopping else code


def _note_app_approval(site) -> None:
    from safn_flower.fab import app_hash

    own = app_hash()
    if site.approved_apps and own not in site.approved_apps:
        console.print(f"note: site.approved_apps does not list this installation's own SAFN "
                      f"app bundle ({own}); runs of it will be refused")


main = entry(run)
