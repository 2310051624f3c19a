"""``safn-server``: the coordinator's front door to a multi-site SAFN run.

    safn-server --config server.yaml            start the SuperLink, admit the listed sites,
                                                submit the run, follow it to the end
    safn-server --config server.yaml --resume   continue an interrupted run from its checkpoint
    safn-server --config server.yaml --status   what the run folder says (and the SuperLink, if up)
    safn-server --app-hash                      the app bundle's sha256, for sites to approve

The run itself is the same ServerApp as in simulation (`safn.server.app`), submitted with the stock
``flwr run``; the run folder (``server.run_dir``) receives config.yaml, events.jsonl,
checkpoints/, history.json, rounds.csv, the model bundle, and the SuperLink's log and database.
While it runs, ``FLWR_HOME=<run_dir>/flower flwr list|log|stop safn`` work as usual.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from rich.markup import escape

from safn_core.cli.common import (base_parser, config_from_args, console, entry, err_console,
                                  fresh_output_dir)
from safn_core.config import SafnConfig, dump_config
from safn_core.deploy_checks import (check_can_listen, check_host, check_server_tls,
                                     check_site_name, load_site_public_key)
from safn_core.errors import ConfigError, SafnError
from safn_core.federation.checkpoint import checkpoint_note, checkpointed_round
from safn_core.federation.event_text import render
from safn_core.federation.events import EVENTS_FILE, Event, EventFollower
from safn_core.federation.run_folder import RUN_ID_FILE, run_identity, write_config
from safn_core.io import write_json
from safn_core.processes import LogFollower
from safn_core.tracking import Tracker
from safn_flower.fab import app_dir, app_hash
from safn.server import tracking
from safn.server.certificate_names import tools_host
from safn.server.superlink import (DeploymentError, SuperLink, certificate_paths,
                              openssh_fingerprint, refusal)

INSECURE_WARNING = ("WARNING: --insecure: TLS and site authentication are OFF. Anyone who can "
                    "reach this port can join as a site or submit code. Use only on a private "
                    "test machine, never with real data.")


def validate_server(cfg: SafnConfig, origin: str, insecure: bool) -> None:
    """Every check of the coordinator's inputs that needs no process; it writes nothing, and
    `Deployment.run` touches the run folder only after it passed."""
    server, fed = cfg.server, cfg.federation
    check_host(server.host, "server.host", origin)
    certs = None if insecure else certificate_paths(server, origin)
    if not insecure and not server.sites:
        raise ConfigError(f"{origin}: 'server.sites' is empty; list every site that may join "
                          "as name: path/to/<site>.pub (deploy/make_certs.py writes the keys)")
    for name, key in server.sites.items():
        check_site_name(name, f"server.sites.{name}", origin)
        if not Path(key).is_file():
            raise ConfigError(f"{origin}: 'server.sites.{name}' = {key}: public key file not "
                              "found; it is the <site>.pub that deploy/make_certs.py wrote")
    unknown = [s for s in server.held_out_sites if server.sites and s not in server.sites]
    if unknown:
        raise ConfigError(f"{origin}: 'server.held_out_sites' names {', '.join(unknown)}, not "
                          "listed under server.sites")
    trainers = len(server.sites) - len(server.held_out_sites)
    if server.sites and fed.min_sites > trainers:
        raise ConfigError(f"{origin}: 'federation.min_sites' = {fed.min_sites} but only "
                          f"{trainers} training sites are listed under server.sites")
    if certs is not None:
        check_server_tls(certs["ca.pem"], certs["superlink.pem"], certs["superlink.key"], origin)
        owners: dict[bytes, str] = {}
        for name, key in server.sites.items():
            blob = load_site_public_key(Path(key), f"server.sites.{name}", origin)
            if blob in owners:
                raise ConfigError(f"{origin}: 'server.sites.{name}' = {key}: the same key as "
                                  f"server.sites.{owners[blob]}; Flower registers a key for one "
                                  "site only. Give each site its own key pair")
            owners[blob] = name
    if Path(server.run_dir).exists() and not Path(server.run_dir).is_dir():
        raise ConfigError(f"{origin}: 'server.run_dir' = {server.run_dir}: a file of that name "
                          "exists; the run folder must be a folder (choose another name)")
    if server.database is not None and Path(server.database).is_dir():
        raise ConfigError(f"{origin}: 'server.database' = {server.database}: a folder; it names "
                          "the SuperLink's database file (e.g. superlink.db), or leave it out")
    check_can_listen(server.host, server.port, origin)
    if certs is not None:  # the coordinator's own tools verify it for server.host
        tools_host(server.host, certs["superlink.pem"], origin)


class Deployment:
    """One coordinator session: SuperLink up, sites registered, run submitted and followed."""

    def __init__(self, cfg: SafnConfig, origin: str, insecure: bool, resume: bool):
        self.cfg, self.origin, self.insecure, self.resume = cfg, origin, insecure, resume
        self.run_dir = Path(cfg.server.run_dir).resolve()
        self.link: SuperLink | None = None
        self.site_nodes: dict[str, str] = {}  # site name -> Flower node id (registration)

    # -- the run folder -------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        has_run = (self.run_dir / "config.yaml").is_file()
        if self.resume:
            if not has_run:
                raise ConfigError(f"{self.origin}: --resume, but 'server.run_dir' = "
                                  f"{self.run_dir} holds no run (no config.yaml); start it "
                                  "without --resume")
            done = _read_json(self.run_dir / "federation_status.json")
            if done.get("status") == "completed":
                raise SafnError(f"{self.origin}: 'server.run_dir' = {self.run_dir}: this run "
                                f"already completed (round {done.get('round')}); nothing to "
                                "resume (choose a new run_dir for a new run)")
            return
        fresh_output_dir(self.run_dir, f"{self.origin}: server.run_dir",
                         "Pass --resume to continue the run in it, or choose a new run_dir")
        write_config(self.run_dir, dump_config(self.cfg))

    # -- the session ----------------------------------------------------------------------

    def run(self) -> int:
        from safn_flower.patches.log_wording import check_superlink_log

        check_superlink_log()  # what `follow` reads of the SuperLink's log is still said so
        if self.insecure:
            err_console.print(f"[bold red]{INSECURE_WARNING}[/]")
        self.prepare_run_dir()
        self.link = SuperLink(self.cfg.server, self.run_dir, self.insecure, self.origin)
        self.superlink_log = LogFollower(self.link.log, from_end=True)
        with Tracker(self.cfg.tracking, self.run_dir) as tracker:
            try:
                tracking.start(tracker, self.cfg, self.run_dir)
                self.link.start()
                mode = "INSECURE" if self.insecure else "TLS, site authentication on"
                console.print(f"SuperLink listening on {self.link.address} ({mode}); "
                              f"log: {self.link.log}")
                self.register_sites()
                run_id = self.submit()
                code = self.follow(run_id)
                tracking.finish(tracker, self.run_dir, code)
                return code
            finally:
                self.link.stop()

    def register_sites(self) -> None:
        """Register every listed key; the node id Flower gives each site is kept in
        ``site_nodes.json`` (also across a resume), so that progress can name the sites."""
        if self.insecure:
            return
        path = self.run_dir / SITE_NODES_FILE
        self.site_nodes = {k: str(v) for k, v in _read_json(path).items()}
        for name, key in self.cfg.server.sites.items():
            new, detail = self.link.cli.register(Path(key).resolve(), name)
            if new:
                self.site_nodes[name] = detail
            console.print(f"site {name}: {'registered, node ' + detail if new else detail} "
                          f"(key {openssh_fingerprint(Path(key))})")
        write_json(path, self.site_nodes)

    def submit(self) -> str:
        app = app_dir(self.run_dir)
        run_id = self.link.cli.submit(app, f"run-dir={json.dumps(str(self.run_dir))}")
        runs = _read_json(self.run_dir / "flower_runs.json").get("runs", [])
        runs.append({"run_id": run_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "resume": self.resume, "app_sha256": app_hash(app)})
        write_json(self.run_dir / "flower_runs.json", {"runs": runs})
        console.print(f"Flower run {run_id} submitted (run id {run_identity(self.run_dir)}, app "
                      f"sha256 {runs[-1]['app_sha256']}); waiting for at least "
                      f"{self.cfg.federation.min_sites} sites")
        return run_id

    def follow(self, run_id: str) -> int:
        """Print progress until the run finishes; the exit status says how it ended.

        Progress is the run's events (``events.jsonl``, written by the ServerApp: each shown
        with `render`, a round's per-site line from its ``entry``); sites connecting and leaving
        and refused keys come from the SuperLink's log (`safn_flower.patches.log_wording`
        checked at start that Flower still logs them so). The outcome is the ``run_end`` event,
        or ``federation_status.json`` from a ServerApp that emits none."""
        events = EventFollower(self.run_dir / EVENTS_FILE, from_end=True)
        online: set[str] = set()
        last_check, last_listed = time.monotonic(), None
        training, end, started = False, None, time.time()
        while True:
            for event in events.events():
                end = self._show(event) or end
                training = training or event.get("event") == Event.STATISTICS
            for line in self.superlink_log.lines():
                note = refusal(line)
                if note:
                    err_console.print(f"[bold yellow]{note}[/]", soft_wrap=True)
                online = _node_event(line, online, self.site_nodes)
            if not self.link.child.alive():
                raise DeploymentError(f"the SuperLink stopped unexpectedly; see "
                                      f"{self.link.log}. Resume with --resume")
            status = self.run_dir / "federation_status.json"
            finished = end is not None or (status.exists() and status.stat().st_mtime > started)
            # each `flwr` call is a Python process of about two CPU seconds, which a small
            # coordinator's federation needs itself: sites connecting and leaving are read
            # from the SuperLink's log; they are listed only at the start and, while waiting
            # for them, every 30 s (a site that stops heartbeating is not logged); the run's
            # state is asked for every 30 s (a ServerApp crash emits no run end), and at once
            # when the ServerApp said the run ended
            now = time.monotonic()
            if last_listed is None or (not training and now - last_listed > 30):
                online, last_listed = self._unless_busy(self._report_nodes, online, online), now
            if now - last_check > 30 or finished:
                last_check = now
                info = self._unless_busy(self.link.cli.run_info, None, run_id)
                if info and str(info.get("status", "")).startswith("finished"):
                    break
            time.sleep(0.3)
        for event in events.events():
            end = self._show(event) or end
        return self._outcome(info, end)

    def _unless_busy(self, ask, otherwise, *args):
        """A periodic look through the ``flwr`` CLI; one that does not answer in time (a
        coordinator so loaded that a Python process takes a minute to start) is said once and
        asked again at the next look, never a reason to stop the run."""
        try:
            return ask(*args)
        except DeploymentError as exc:
            if not getattr(self, "_told_busy", False):
                err_console.print(f"[yellow]{escape(str(exc))}; asking again in 30 s (the run "
                                  "goes on)[/]", soft_wrap=True)
                self._told_busy = True
            return otherwise

    @staticmethod
    def _show(event: dict) -> dict | None:
        """Print one run event; returns it when it is the run's end (said by the outcome)."""
        code = event.get("event")
        if code == Event.RUN_END:
            return event
        try:
            text = render(event)
        except (KeyError, TypeError, ValueError):  # an event this safn-server cannot phrase
            text = f"{code}: " + json.dumps({k: v for k, v in event.items()
                                              if k not in ("event", "time")})
        console.print(text, soft_wrap=True)
        if code == Event.ROUND and isinstance(event.get("entry"), dict):
            console.print(site_line(event["entry"]), soft_wrap=True)
        return None

    def _report_nodes(self, before: set[str]) -> set[str]:
        now = {n["node-id"] for n in self.link.cli.nodes() if n.get("status") == "online"}
        if now != before:
            console.print(online_line(now, self.site_nodes), soft_wrap=True)
        return now

    def write_report(self, info: dict | None) -> None:
        """report.html in the run folder (learning curves, final and held-out metrics, ε)."""
        from safn_core.federation.run_folder import load_run_config
        from safn_core.federation.run_report import write_server_report

        history = _read_json(self.run_dir / "history.json", [])
        if not history:
            return
        cfg = load_run_config(self.run_dir)
        seen = {s for h in history for s in (h.get("sites_trained") or [])}
        seen |= {s for h in history for s in (h.get("sites") or {})}
        seen |= {s for h in history for s in (h.get("held_out") or {})}
        path = write_server_report(self.run_dir, cfg, history,
                                   sorted(set(cfg.server.sites) | seen), info)
        console.print(f"report: {path}")

    def _outcome(self, info: dict, end: dict | None = None) -> int:
        # Flower's own account of the run: status, network traffic, compute seconds
        write_json(self.run_dir / "flower_run.json", info or {})
        self.write_report(info)
        status = run_outcome(end, _read_json(self.run_dir / "federation_status.json"))
        flower = str(info.get("status"))
        flower_id = self.link.cli.run_id_of(info)
        ids = f"run id {run_identity(self.run_dir)}, Flower run {flower_id}"
        if status.get("status") == "completed" and flower == "finished:completed":
            console.print(f"[green]run completed[/] after round {status.get('round')} ({ids}): "
                          f"model bundle in {self.run_dir / 'model'}")
            return 0
        if status.get("status") == "failed":
            what = f"run stopped ({ids}): {status.get('reason')}"
        else:  # the ServerApp ended without writing an outcome: it crashed
            details = info.get("status-details")
            what = (f"run ended without a result ({ids}): Flower reports {flower}"
                    f"{': ' + str(details) if details else ''}"
                    f" (the ServerApp's output: flwr log {flower_id} safn)")
        never = self.never_connected()
        if never:
            what += f". Sites that never connected: {', '.join(never)}"
        kept = checkpointed_round(self.run_dir) is not None
        err_console.print(f"[bold red]{what}[/]. {checkpoint_note(self.run_dir).capitalize()}; "
                          + ("continue with --resume" if kept else
                             "start it again with --resume (same run folder) once the sites "
                             "are ready"), soft_wrap=True)
        return 1

    def never_connected(self) -> list[str]:
        """The listed sites whose node was never activated (Flower's status ``registered``:
        its SuperNode never connected with that key since it was registered)."""
        if self.insecure or not self.site_nodes:
            return []
        status = {n["node-id"]: n.get("status") for n in self.link.cli.nodes()}
        return [name for name, nid in self.site_nodes.items()
                if status.get(nid) == "registered"]


SITE_NODES_FILE = "site_nodes.json"

NODE_EVENT = re.compile(r"\[Fleet\.(Activate|Deactivate)Node\] (?:Activated|Deactivated) "
                        r"node_id=(\d+)")
"""What the SuperLink logs when a site connects or leaves cleanly (Flower 1.42,
``superlink/servicer/fleet/fleet_handlers.py``, ``activate_node`` / ``deactivate_node``; checked
at start by `safn_flower.patches.log_wording.NODE_EVENTS`)."""


def _node_event(line: str, online: set[str], site_nodes: dict[str, str]) -> set[str]:
    """``online`` after a SuperLink log line (a site connecting or leaving is said at once)."""
    m = NODE_EVENT.search(line)
    if not m:
        return online
    now = online | {m.group(2)} if m.group(1) == "Activate" else online - {m.group(2)}
    if now != online:
        console.print(online_line(now, site_nodes), soft_wrap=True)
    return now


def run_outcome(end: dict | None, status: dict) -> dict:
    """How the run ended, as ``federation_status.json`` says it (``status``, ``round``,
    ``reason``): from the ServerApp's ``run_end`` event when it emitted one, else that file."""
    if end is None:
        return status
    out = {"status": end.get("status"), "round": end.get("round")}
    if end.get("status") != "completed":
        out["reason"] = end.get("detail") or str(end.get("code"))
        out["code"] = end.get("code")
    return out


def online_line(online: set[str], site_nodes: dict[str, str]) -> str:
    """``sites online: site_a, site_b (2 of 3; waiting for site_c)``, by registered node id;
    without registrations (``--insecure``) only the count."""
    if not site_nodes:
        return f"sites online: {len(online)}"
    here = sorted(n for n, nid in site_nodes.items() if nid in online)
    away = sorted(n for n, nid in site_nodes.items() if nid not in online)
    others = len(online - set(site_nodes.values()))
    names = ", ".join(here + ([f"{others} unnamed"] if others else [])) or "none"
    return (f"sites online: {names} ({len(here) + others} of {len(site_nodes)}"
            + (f"; waiting for {', '.join(away)})" if away else ")"))


def site_line(entry: dict) -> str:
    """Per-site participation of one round, from the run's history."""
    trained = entry.get("sites_trained") or []
    parts = [f"{s} trained" for s in trained]
    for site, m in (entry.get("sites") or {}).items():
        if m and "roc_auc" in m:
            parts.append(f"{site} ROC-AUC {m['roc_auc']:.3f}")
        else:
            parts.append(f"{site} below min_cell")
    return f"  round {entry.get('round')} sites: " + (", ".join(parts) or "none reported")


def show_status(cfg: SafnConfig) -> int:
    run_dir = Path(cfg.server.run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"server.run_dir {run_dir}: no run there yet")
    status = _read_json(run_dir / "federation_status.json")
    history = _read_json(run_dir / "history.json", [])
    runs = _read_json(run_dir / "flower_runs.json").get("runs", [])
    rounds = cfg.federation.rounds
    state = status.get("status") or ("running or interrupted" if runs else "not started")
    ids = (f"run id {(run_dir / RUN_ID_FILE).read_text().strip()}"
           if (run_dir / RUN_ID_FILE).is_file() else "")
    if runs:
        ids += f"{', ' if ids else ''}Flower run{'s' if len(runs) > 1 else ''} " + \
            ", ".join(r["run_id"] for r in runs)
    console.print(f"run folder {run_dir}: {state}; {len(history)} of {rounds} rounds recorded"
                  + (f" ({ids})" if ids else ""), soft_wrap=True)
    if history:
        from safn_core.federation.event_text import round_line

        console.print(round_line(history[-1], rounds), soft_wrap=True)
    if (run_dir / "model").is_dir():
        console.print(f"model bundle: {run_dir / 'model'}")
    return 0


def _read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {} if default is None else default


def run(argv: list[str] | None = None) -> int:
    parser = base_parser("safn-server", "Coordinate a multi-site SAFN run: a Flower SuperLink "
                                        "with TLS and site authentication, the SAFN ServerApp, "
                                        "progress per round and site.", out=False,
                         tracking=True)
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in server.run_dir from its checkpoint")
    parser.add_argument("--status", action="store_true", help="show the run's state and exit")
    parser.add_argument("--app-hash", action="store_true",
                        help="print the sha256 of the SAFN app bundle (sites approve it) and exit")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no site authentication (local experiments only)")
    args = parser.parse_args(argv)
    if args.app_hash:
        print(app_hash())
        return 0
    if args.config is None:
        raise ConfigError("safn-server needs --config server.yaml (see deploy/examples/server.yaml)")
    cfg = config_from_args(args)
    if args.status:
        return show_status(cfg)
    validate_server(cfg, args.config, args.insecure)
    Tracker.check(cfg.tracking)
    # SIGTERM (e.g. docker stop) ends like Ctrl-C: the SuperLink is stopped, checkpoints stay
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return Deployment(cfg, args.config, args.insecure, args.resume).run()


main = entry(run)
