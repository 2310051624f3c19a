"""``safn-client --site site.yaml``: a hospital joins a SAFN federation.

1. Checks, with no network: the site file, TLS material and key, app approval, privacy settings
   and the site's data against the data contract. Unfit data means the site does not join.
2. Probes ``site.superlink`` (`safn.client.reachability`): nothing answering there (refused, name
   not resolving, no answer) is said at once and waited for up to ``site.connect_wait``
   seconds; a TLS mismatch (certificate not for that name, another CA, a coordinator without
   TLS) stops at once, saying which.
3. Starts a Flower SuperNode (`safn.client.supernode`: stock SuperNode + the site's app approval)
   that serves the SAFN ClientApp on the site's own data; TLS and key authentication unless
   ``--insecure``. Flower's output goes to ``<site.state_dir>/supernode.log``; the terminal
   shows one line per round and what needs the site's attention (`safn.client.site_console`).
4. When the SuperLink refuses to activate the site (its key is not registered, or the site's
   previous connection has not timed out after a crash), retries for ``site.activation_wait``
   seconds, then stops with a message naming the key and its fingerprint.
5. When the coordinator says the run completed (`safn.client.run_end`), stops the SuperNode and exits
   0; ``--stay`` keeps serving for the next run (a new coordinator that does not know the
   SuperNode's session ends it: the site waits for the coordinator and starts a new one). A
   stopped run (the coordinator may resume it) keeps the site connected. A SuperNode that stops
   for any other reason is said, with its exit status.

    safn-client --site site.yaml --check      only the checks
    safn-client --app-hash                    sha256 of this installation's SAFN app bundle
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from safn.client.run_end import read_run_end
from safn.client.site_console import SiteConsole
from safn_core.cli.common import console, entry, err_console
from safn_core.config import dump_config, load_config
from safn_core.errors import ConfigError, SafnError
from safn_core.federation.protocol import RunEnd
from safn_core.io import write_atomic
from safn_core.processes import end_with_parent, flower_env, signal_group, wait_until

INSECURE_WARNING = ("WARNING: --insecure: this site talks to the coordinator WITHOUT TLS and "
                    "without authenticating. Use only for a local test, never with real data.")
REFUSED_MARK = "Exit Code: 305"  # Flower's exit line; checked: log_wording.ACTIVATION_EXIT


class SiteRefused(SafnError):
    """The SuperLink kept refusing to activate this site."""


def supernode_command(cfg, site_file: Path, insecure: bool) -> list[str]:
    site = cfg.site
    cmd = [sys.executable, "-m", "safn.client.supernode", "--superlink", site.superlink,
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
    """The SuperNode process of one site: restarted while the SuperLink refuses activation,
    stopped once the coordinator says the run completed (unless the site stays up)."""

    def __init__(self, cfg, site_file: Path, insecure: bool, stay: bool = False,
                 verbose: bool = False):
        from safn.client.superexec import SITE_ENV
        from safn.client.supernode import APPROVED_ENV, NODE_ID_ENV, POLL_ENV, TRUSTED_ENV

        site = cfg.site
        self.cfg, self.log = cfg, Path(site.state_dir) / "supernode.log"
        self.stay, self.insecure, self.verbose = stay, insecure, verbose
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
        self.ended: dict | None = None  # the run end that made this site leave
        self.runs_ended = 0             # runs that ended while this site served (--stay)
        self.site_file = site_file
        self._last_end = read_run_end(site.state_dir)

    def run(self) -> int:
        from safn_flower.patches.log_wording import check_supernode_log

        check_supernode_log()  # what SiteConsole and REFUSED_MARK read is still said so
        start = time.monotonic()
        wait = self.cfg.site.activation_wait
        while True:
            code, refused = self._run_once()
            if self.stopping:
                return 0
            if not refused and self.stay and self.runs_ended:
                # the coordinator that ran the last run is gone and a new one (a new SuperLink
                # database) does not know this SuperNode's session: Flower ends it. A site that
                # stays starts a new one, activated by its key, once the coordinator answers
                self.rejoin()
                if self.stopping:
                    return 0
                start = time.monotonic()
                continue
            if not refused and self.terminal is not None and self.terminal.gave_up \
                    and self.ended is None:
                # Flower gives up at once on a TLS error, which is what a load balancer or proxy
                # in front of a coordinator that is down answers: wait for the coordinator, then
                # a new SuperNode takes this site's session over (client/supernode.py)
                self.reconnect()
                if self.stopping:
                    return 0
                start = time.monotonic()
                continue
            if not refused:
                err_console.print(f"site {self.cfg.site.name}: Flower's SuperNode stopped (exit "
                                  f"status {code}); see {self.log}", soft_wrap=True)
                return code or 1
            waited = time.monotonic() - start
            if waited >= wait:
                raise SiteRefused(self._refusal(f"for {waited:.0f} s") + f". Log: {self.log}")
            err_console.print(self._refusal("") + f"; retrying for up to {wait - waited:.0f} s "
                              "more (site.activation_wait)", soft_wrap=True)
            time.sleep(min(5.0, max(0.5, wait - waited)))

    def rejoin(self) -> None:
        """--stay, after a run ended: wait (without a limit) for the coordinator's next run."""
        console.print(f"site {self.cfg.site.name}: the coordinator's session ended; waiting for "
                      "its next run (--stay)", soft_wrap=True)
        self._await_coordinator()

    def reconnect(self) -> None:
        """The SuperNode gave up on the coordinator in the middle of a run: wait (without a
        limit; Ctrl-C ends it) until the coordinator answers with its TLS again. A proxy that
        accepts the connection and closes it (the coordinator behind it is down) counts as not
        answering yet: this site has spoken TLS with the coordinator at this address before."""
        site = self.cfg.site
        console.print(f"site {site.name}: Flower's SuperNode gave up on the coordinator at "
                      f"{site.superlink}; waiting for it to answer again, then starting a new "
                      "SuperNode (Ctrl-C to leave)", soft_wrap=True, markup=False)
        self._await_coordinator(also_transient={"tls-plain"})

    def _await_coordinator(self, also_transient: frozenset[str] | set[str] = frozenset()):
        """Until the coordinator answers with this site's TLS (no limit; Ctrl-C ends it)."""
        from safn.client.reachability import wait_for_coordinator

        site = self.cfg.site
        wait_for_coordinator(site.superlink, None if self.insecure else site.root_certificates,
                             str(self.site_file), math.inf,
                             lambda line: console.print(f"site {site.name}: {line}",
                                                        soft_wrap=True, markup=False),
                             stopped=lambda: self.stopping, also_transient=also_transient)

    def _refusal(self, how_long: str) -> str:
        """The coordinator answered with the expected TLS (`safn.client.reachability` checked) and
        refused to activate this site: the key is the cause."""
        site = self.cfg.site
        key = "" if self.insecure else f" (key {site.private_key}, {key_fingerprint(site)})"
        return (f"site {site.name}: the coordinator at {site.superlink} refused to activate "
                f"this site{key}{' ' + how_long if how_long else ''}. Its public key is not "
                "registered there: send the coordinator your .pub file to list under "
                "server.sites (compare fingerprints with ssh-keygen -lf). Or, after a crash of "
                "this site, its previous connection has not timed out yet")

    def _run_once(self) -> tuple[int, bool]:
        """One SuperNode process, its output logged and summarised, until it exits or the run
        it serves has completed.

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
        name = self.cfg.site.name
        terminal = self.terminal = SiteConsole(self.cfg.site.superlink, str(self.log),
                                               lambda line: show_site_line(name, line))

        def pump(stream, log_path=self.log):
            with log_path.open("a") as log:
                for line in stream:
                    log.write(line)
                    log.flush()
                    if self.verbose:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        _summarise(terminal, line)
                    if REFUSED_MARK in line:
                        refused.set()

        reader = threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True)
        reader.start()
        while True:
            try:
                code = self.proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                self._check_run_end()
        signal_group(self.proc.pid)
        reader.join(5)
        return code, refused.is_set()

    def _check_run_end(self) -> None:
        """Leave once the coordinator said the run completed (`safn.client.run_end`); a stopped run
        may be resumed, so the site stays for it."""
        end = read_run_end(self.cfg.site.state_dir)
        if end is None or end == self._last_end:
            return
        self._last_end = end
        self.runs_ended += 1
        if end["status"] == RunEnd.COMPLETED and not self.stay:
            self.ended = end
            # leave once the acknowledgement is out (the coordinator waits for it); a bound
            # only for a Flower that no longer logs its sent replies the same way
            wait_until(lambda: self.terminal.run_end_acknowledged, 20)
            self.stop()
        elif end["status"] == RunEnd.COMPLETED:
            console.print(f"site {self.cfg.site.name}: staying connected for the coordinator's "
                          "next run (--stay; Ctrl-C to leave)")
        else:
            console.print(f"site {self.cfg.site.name}: staying connected in case the coordinator "
                          "resumes the run (Ctrl-C to leave)")

    def stop(self, *_args) -> None:
        """SIGTERM to the SuperNode's group: it tells the SuperLink it leaves, then exits."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            timer = threading.Timer(15, signal_group, args=(self.proc.pid,))
            timer.daemon = True
            timer.start()


def show_site_line(name: str, line: str) -> None:
    """A line of the site's terminal summary, as written: a bracket in Flower's words (an error
    naming its route, "[/v1/runtime/send-task-heartbeat]") is not Rich markup."""
    console.print(f"site {name}: {line}", soft_wrap=True, highlight=False, markup=False)


def _summarise(terminal: SiteConsole, line: str) -> None:
    """One SuperNode line to the site's terminal summary. The summary must never stop the
    reader: it drains the SuperNode's output pipe, and a SuperNode whose pipe is full blocks."""
    try:
        terminal.feed(line)
    except Exception as exc:  # noqa: BLE001 (any failure to show a line)
        try:
            sys.stderr.write(f"(could not show a line of Flower's output: {exc!r}; it is in "
                             f"{terminal.log})\n")
        except OSError:
            pass


def key_fingerprint(site) -> str:
    """``ssh-keygen -lf``'s fingerprint of the site's public key, from its private key."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(site.private_key).read_bytes()
        key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data
               else serialization.load_pem_private_key(data, None))
    except (OSError, ValueError, TypeError):
        return "fingerprint unreadable"
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


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
    parser.add_argument("--stay", action="store_true",
                        help="keep serving after a run completed, for the coordinator's next "
                             "run (default: exit 0 once the run completed)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Flower's own output on the terminal too (it is always in "
                             "<site.state_dir>/supernode.log)")
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
    from safn.client.preflight import counts_text, preflight

    if args.insecure:
        err_console.print(f"[bold red]{INSECURE_WARNING}[/]")
    found = preflight(cfg, args.site, args.insecure)
    site = cfg.site
    console.print(f"site {site.name}: {found.participants} participants pass the data contract "
                  f"(class counts {counts_text(found)}); "
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
    console.print(f"site {site.name}: connecting to {site.superlink} "
                  f"({'INSECURE' if args.insecure else 'TLS, key authentication'})")
    from safn.client.reachability import wait_for_coordinator

    wait_for_coordinator(site.superlink, None if args.insecure else site.root_certificates,
                         str(args.site), site.connect_wait,
                         lambda line: err_console.print(f"site {site.name}: {line}",
                                                        soft_wrap=True, markup=False))
    node = SiteNode(cfg, site_file, args.insecure, stay=args.stay, verbose=args.verbose)
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    console.print(f"site {site.name}: the coordinator answers; Flower's log: {node.log}")
    code = node.run()
    if node.ended is not None:
        console.print(f"site {site.name}: done, the run completed; this site stops (Flower's "
                      f"log: {node.log})")
        return 0
    return 0 if node.stopping else code


def _note_app_approval(site) -> None:
    from safn_flower.fab import app_hash

    own = app_hash()
    if site.approved_apps and own not in site.approved_apps:
        console.print(f"note: site.approved_apps does not list this installation's own SAFN "
                      f"app bundle ({own}); runs of it will be refused")


main = entry(run)
