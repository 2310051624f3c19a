"""Malformed deployment inputs through the real front doors (`safn-server --config server.yaml`,
`safn-client --site site.yaml`): one line naming the file and the key, exit status 2, no
traceback, no process started and nothing the user had touched (an interrupted run folder, a
site's state folder with its privacy ledger). Table-driven like tests/test_cli_errors.py.

Every case starts from a configuration that passes (`test_the_base_configurations_pass`) and
breaks one thing. The commands run as subprocesses, a few at a time."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from safn_core.processes import signal_group
from tests.deploy_harness import BIN, ROOT, env, free_port
from tests.ppmi_fixtures import Person, build_download

SITES = ("site_a", "site_b", "site_c")
HASH = "9" * 64  # stands for the app hash: approval is checked for its form only here


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    """Certificates and keys from deploy/make_certs.py (and a second, unrelated CA), a tiny
    PPMI-style download, and a real privacy ledger, made once for every case."""
    root = tmp_path_factory.mktemp("deploy-errors")
    for out, sites in (("certs", SITES), ("other", ("site_x",))):
        subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                        str(root / out), "--sites", *sites, "--hosts", "127.0.0.1", "localhost"],
                       check=True, capture_output=True, env=env())
    people = tuple(Person(1000 + i, "PD" if i % 2 else "HC") for i in range(12))
    download = build_download(root / "data", people=people).root
    from safn_core.privacy.ledger import PrivacyLedger

    PrivacyLedger.open(root / "ledger.json", fingerprint="sha256:" + "0" * 64,
                       accountant="rdp", delta=1e-5, site="site_a")
    return {"root": root, "certs": root / "certs", "other": root / "other", "data": download,
            "ledger": (root / "ledger.json").read_bytes()}


# ------------------------------------------------------------------------------ configurations


def base_server(m: dict) -> dict:
    certs = m["certs"]
    return {"server": {"host": "127.0.0.1", "port": free_port(), "certificates": str(certs),
                       "sites": {s: str(certs / "sites" / f"{s}.pub") for s in SITES},
                       "held_out_sites": [], "run_dir": "run"},
            "federation": {"rounds": 2, "min_sites": 2}, "data": {"min_cell": 3}}


def base_site(m: dict) -> dict:
    certs = m["certs"]
    return {"site": {"name": "site_a", "superlink": f"127.0.0.1:{free_port()}",
                     "root_certificates": str(certs / "ca.pem"),
                     "private_key": str(certs / "sites" / "site_a.key"),
                     "approved_apps": [HASH], "state_dir": "state", "local_port": free_port()},
            "data": {"source": "ppmi", "path": str(m["data"]), "min_cell": 3},
            "privacy": {"mode": "off"}}


def interrupted_run(folder: Path) -> None:
    """A run folder an earlier safn-server left behind (what `--resume` would continue)."""
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("server: {}\n")
    (run / "checkpoints" / "round_001.npz").write_bytes(b"weights of round 1")
    (run / "progress.log").write_text("round 1 of 2\n")
    (run / "superlink.db").write_bytes(b"registrations")


def site_state(folder: Path, m: dict) -> None:
    """A site's state folder from earlier runs: its privacy ledger, logs and audit."""
    state = folder / "state"
    (state / "audit").mkdir(parents=True)
    (state / "privacy_ledger.json").write_bytes(m["ledger"])
    (state / "supernode.log").write_text("earlier run\n")
    (state / "audit" / "outgoing.jsonl").write_text('{"round": 1}\n')


@dataclass
class Case:
    """How to break one input; ``fragments`` must all be in the one error line."""

    door: str  # "server" or "site"
    fragments: tuple[str, ...]
    edit: object = None  # edits the config dict in place: edit(cfg, folder, m)
    text: object = None  # replaces the YAML file's text: text(folder, m)
    args: tuple[str, ...] = ()
    prepare: object = None  # changes files around it: prepare(cfg, folder, m, held)
    file: str | None = None  # the file the line names (default: the config file)
    check: bool = True  # safn-client --check (False: without, so its last check runs too)
    resume: bool = True  # safn-server --resume on an interrupted run folder


def S(**values):
    return lambda cfg, folder, m: cfg["server"].update(values)


def T(**values):
    return lambda cfg, folder, m: cfg["site"].update(values)


def certs_copy(folder: Path, m: dict, change) -> Path:
    """A copy of the coordinator's certificate folder with ``change(copy)`` applied."""
    out = folder / "certs"
    shutil.copytree(m["certs"], out)
    change(out)
    return out


def with_certs(change):
    def edit(cfg, folder, m):
        cfg["server"]["certificates"] = str(certs_copy(folder, m, change))
    return edit


def key_copy(folder: Path, source: Path, mode: int, data: bytes | None = None) -> str:
    path = folder / "keys" / source.name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(source.read_bytes() if data is None else data)
    path.chmod(mode)
    return str(path)


def site_key(source, mode=0o600, data=None):
    return lambda cfg, folder, m: cfg["site"].update(
        private_key=key_copy(folder, source(m), mode, data))


def listed_key(site, source=None, data=None):
    def edit(cfg, folder, m):
        src = source(m) if source else m["certs"] / "sites" / f"{site}.pub"
        cfg["server"]["sites"][site] = key_copy(folder, src, 0o644, data)
    return edit


def listen(held: list) -> int:
    """Something else listens on the port the config names."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    held.append(s)
    return s.getsockname()[1]


def port_taken(cfg, folder, m, held):
    cfg["server"]["port"] = listen(held)


def local_port_taken(cfg, folder, m, held):
    cfg["site"]["local_port"] = listen(held)


def state_is_file(cfg, folder, m, held):
    shutil.rmtree(folder / "state")
    (folder / "state").write_text("not a folder\n")


def corrupt_ledger(cfg, folder, m, held):
    (folder / "state" / "privacy_ledger.json").write_bytes(m["ledger"][:40])


def run_dir_is_file(cfg, folder, m, held):
    (folder / "run").write_text("a file\n")


def bad_yaml(folder, m):
    return yaml.safe_dump(base_server(m)).replace("host: 127.0.0.1", "host: [127.0.0.1", 1)


def bad_site_yaml(folder, m):
    return yaml.safe_dump(base_site(m)).replace("name: site_a", "name: site_a: x", 1)


CASES = {
    # ---- server.yaml ----------------------------------------------------------------------
    "server: unknown key": Case("server", ("unknown key 'server.prot'",), S(prot=9092)),
    "server: unknown section": Case("server", ("unknown key 'sever'",),
                                    lambda c, f, m: c.update(sever={})),
    "server: certificates not set": Case("server", ("'server.certificates' is not set",),
                                         S(certificates=None)),
    "server: certificate folder missing": Case("server", ("'server.certificates'", "missing"),
                                               S(certificates="no-certs")),
    "server: superlink.pem missing": Case("server", ("'server.certificates'", "superlink.pem",
                                                     "make_certs.py"),
                                          with_certs(lambda d: (d / "superlink.pem").unlink())),
    "server: CA missing": Case("server", ("'server.certificates'", "ca.pem", "missing"),
                               with_certs(lambda d: (d / "ca.pem").unlink())),
    "server: certificate not PEM": Case(
        "server", ("'server.certificates/superlink.pem'", "not a PEM certificate"),
        with_certs(lambda d: (d / "superlink.pem").write_bytes(b"\x00garbage\xff"))),
    "server: CA is a key, not a certificate": Case(
        "server", ("'server.certificates/ca.pem'", "not a PEM certificate"),
        with_certs(lambda d: shutil.copy(d / "superlink.key", d / "ca.pem"))),
    "server: certificate from another CA": Case(
        "server", ("'server.certificates/superlink.pem'", "not signed by ca.pem"),
        lambda c, f, m: c["server"].update(certificates=str(certs_copy(
            f, m, lambda d: shutil.copy(m["other"] / "superlink.pem", d / "superlink.pem"))))),
    "server: private key unreadable": Case(
        "server", ("'server.certificates/superlink.key'", "not a PEM private key"),
        with_certs(lambda d: (d / "superlink.key").write_bytes(b"\xff\xfe\x00"))),
    "server: private key of another certificate": Case(
        "server", ("'server.certificates/superlink.key'", "does not belong to superlink.pem"),
        with_certs(lambda d: shutil.copy(d / "ca.key", d / "superlink.key"))),
    "server: sites empty": Case("server", ("'server.sites' is empty",), S(sites={})),
    "server: site key file missing": Case(
        "server", ("'server.sites.site_c'", "public key file not found"),
        lambda c, f, m: c["server"]["sites"].update(site_c="keys/site_c.pub")),
    "server: site key malformed": Case(
        "server", ("'server.sites.site_b'", "not an OpenSSH public key"),
        listed_key("site_b", data=b"ecdsa-sha2-nistp384 AAAAnot-base64 site_b\n")),
    "server: private key listed as a site key": Case(
        "server", ("'server.sites.site_b'", "this is a private key"),
        listed_key("site_b", source=lambda m: m["certs"] / "sites" / "site_b.key")),
    "server: one key for two sites": Case(
        "server", ("'server.sites.site_c'", "the same key as server.sites.site_b"),
        listed_key("site_c", source=lambda m: m["certs"] / "sites" / "site_b.pub")),
    "server: site name invalid": Case(
        "server", ("'server.sites.site b'", "not a usable site name"),
        lambda c, f, m: c["server"]["sites"].update(
            {"site b": c["server"]["sites"].pop("site_b")})),
    "server: held-out site not listed": Case(
        "server", ("'server.held_out_sites'", "site_d", "not listed under server.sites"),
        S(held_out_sites=["site_d"])),
    "server: secure aggregation with two training sites": Case(
        "server", ("federation.secure_aggregation", "at least 3 training sites",
                   "federation.secure_aggregation: false"),
        S(held_out_sites=["site_c"])),
    "server: min_sites above the listed sites": Case(
        "server", ("'federation.min_sites' = 4", "only 3 training sites"),
        lambda c, f, m: c["federation"].update(min_sites=4)),
    "server: port out of range": Case("server", ("'server.port'", "65535", "70000"),
                                      S(port=70000)),
    "server: port not a number": Case("server", ("'server.port'", "valid integer", "'abc'"),
                                      S(port="abc")),
    "server: port in use": Case("server", ("'server.port'", "already in use"),
                                prepare=port_taken),
    "server: host with a port": Case("server", ("'server.host'", "give the port separately"),
                                     S(host="localhost:9092")),
    "server: host malformed": Case("server", ("'server.host'", "not a host name or IP address"),
                                   S(host="coordinator example")),
    "server: host not on this machine": Case("server", ("'server.host'",
                                                        "not an address of this machine"),
                                             S(host="192.0.2.1")),
    "server: run_dir is a file": Case("server", ("'server.run_dir'", "a file of that name"),
                                      prepare=run_dir_is_file, resume=False),
    "server: run_dir holds a run (no --resume)": Case(
        "server", ("server.run_dir", "not empty", "--resume"), resume=False,
        prepare=lambda c, f, m, h: interrupted_run(f)),
    "server: --resume without a run": Case(
        "server", ("--resume", "'server.run_dir'", "holds no run"),
        prepare=lambda c, f, m, h: shutil.rmtree(f / "run")),
    "server: database is a folder": Case("server", ("'server.database'", "a folder"),
                                         S(database="run/checkpoints")),
    "server: YAML syntax error": Case("server", ("not valid YAML at line 10",), text=bad_yaml),
    "server: --set of an unknown key": Case("server", ("--set", "unknown key 'server.prto'"),
                                            args=("--set", "server.prto=1")),
    "server: --set without a value": Case("server", ("--set", "dotted.key=value"),
                                          args=("--set", "server.port"), file="--set"),
    # ---- site.yaml ------------------------------------------------------------------------
    "site: no site section": Case("site", ("no 'site:' section",),
                                  lambda c, f, m: c.pop("site")),
    "site: unknown key": Case("site", ("unknown key 'site.nmae'",), T(nmae="site_a")),
    "site: name empty": Case("site", ("'site.name'", "at least 1 character"), T(name="")),
    "site: name with invalid characters": Case("site", ("'site.name'", "not a usable site name"),
                                               T(name="site a/../b")),
    "site: superlink without port": Case("site", ("'site.superlink'", "the port is missing"),
                                         T(superlink="localhost")),
    "site: superlink port not a number": Case("site", ("'site.superlink'", "'abc'",
                                                       "not a number"),
                                              T(superlink="coordinator:abc")),
    "site: superlink with a scheme": Case("site", ("'site.superlink'", "without a scheme"),
                                          T(superlink="https://coordinator:9092")),
    "site: superlink IPv6 without brackets": Case("site", ("'site.superlink'", "brackets"),
                                                  T(superlink="::1:9092")),
    "site: key file missing": Case("site", ("'site.private_key'", "file not found"),
                                   T(private_key="keys/site_a.key")),
    "site: key readable by others": Case(
        "site", ("'site.private_key'", "mode 644", "chmod 600"),
        site_key(lambda m: m["certs"] / "sites" / "site_a.key", 0o644)),
    "site: public key given as the private key": Case(
        "site", ("'site.private_key'", "this is a public key"),
        site_key(lambda m: m["certs"] / "sites" / "site_a.pub")),
    "site: TLS key given as the private key": Case(
        "site", ("'site.private_key'", "not an OpenSSH private key"),
        site_key(lambda m: m["certs"] / "superlink.key")),
    "site: CA file missing": Case("site", ("'site.root_certificates'", "file not found"),
                                  T(root_certificates="certs/ca.pem")),
    "site: CA not a certificate": Case(
        "site", ("'site.root_certificates'", "not a PEM certificate"),
        lambda c, f, m: c["site"].update(root_certificates=c["site"]["private_key"])),
    "site: approved app not a sha256": Case("site", ("'site.approved_apps'", "'abc123'",
                                                     "not a sha256 hash"),
                                            T(approved_apps=["abc123"])),
    "site: approved apps a string": Case("site", ("'site.approved_apps'", "valid list"),
                                         T(approved_apps=HASH)),
    "site: nothing approved": Case("site", ("'site.approved_apps'", "safn-server --app-hash"),
                                   T(approved_apps=[])),
    "site: state_dir is a file": Case("site", ("'site.state_dir'", "a file of that name"),
                                      prepare=state_is_file),
    "site: privacy ledger corrupt": Case("site", ("'site.state_dir'", "privacy_ledger.json",
                                                  "restore it from backup"),
                                         prepare=corrupt_ledger),
    "site: data path missing": Case("site", ("data.path", "not found"),
                                    lambda c, f, m: c["data"].update(path="no-download")),
    "site: local_port out of range": Case("site", ("'site.local_port'", "(got 0)"),
                                          T(local_port=0)),
    "site: local_port in use": Case("site", ("'site.local_port'", "already in use"),
                                    prepare=local_port_taken, check=False),
    "site: dp-sgd without a budget": Case("site", ("privacy.epsilon is required",),
                                          lambda c, f, m: c["privacy"].update(mode="dp-sgd")),
    "site: YAML syntax error": Case("site", ("not valid YAML at line", "column"),
                                    text=bad_site_yaml),
    "site: --set of an unknown key": Case("site", ("--set", "unknown key 'site.nmae'"),
                                          args=("--set", "site.nmae=x")),
    "site: site file missing": Case("site", ("--site", "nowhere.yaml", "file not found"),
                                    args=("--site", "nowhere.yaml"), file="nowhere.yaml"),
}


# ------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    before: dict
    after: dict
    leftovers: list[str]


def snapshot(*roots: Path) -> dict:
    """Every file's bytes and mtime, and every folder, under ``roots``."""
    seen = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                seen[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            elif p.is_dir():
                seen[str(p)] = "dir"
    return seen


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that name ``text`` (a SuperLink or SuperNode of a
    case would: its database, run folder or state folder is in the case's folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{d.name}: {cmd.strip()}")
    return found


def prepare(case: Case, folder: Path, m: dict, held: list) -> list[str]:
    folder.mkdir(parents=True)
    if case.door == "server":
        cfg, file = base_server(m), folder / "server.yaml"
        if case.resume:
            interrupted_run(folder)
    else:
        cfg, file = base_site(m), folder / "site.yaml"
        site_state(folder, m)
    if case.edit is not None:
        case.edit(cfg, folder, m)
    if case.prepare is not None:
        case.prepare(cfg, folder, m, held)
    file.write_text(case.text(folder, m) if case.text is not None else yaml.safe_dump(cfg))
    if case.door == "server":
        return ["safn-server", "--config", str(file),
                *(["--resume"] if case.resume else []), *case.args]
    args = list(case.args) if "--site" in case.args else ["--site", str(file), *case.args]
    return ["safn-client", *args, *(["--check"] if case.check else [])]


def execute(cmd: list[str], folder: Path, watched: list[Path]) -> Outcome:
    before = snapshot(folder, *watched)
    proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=folder, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid)
        out, err = proc.communicate()
    leftovers = processes_mentioning(str(folder))
    for line in leftovers:  # never leave a case's SuperLink / SuperNode behind
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except OSError:
            pass
    return Outcome(proc.returncode, out, err, before, snapshot(folder, *watched), leftovers)


@pytest.fixture(scope="module")
def outcomes(material, tmp_path_factory) -> dict[str, Outcome]:
    """Every case prepared, then run a few at a time (each in its own folder)."""
    base = tmp_path_factory.mktemp("cases")
    held: list[socket.socket] = []
    jobs = {}
    for i, (name, case) in enumerate(CASES.items()):
        folder = base / f"case{i:02d}"
        jobs[name] = (prepare(case, folder, material, held), folder)
    watched = [material["certs"], material["other"]]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(execute, cmd, folder, watched)
                       for name, (cmd, folder) in jobs.items()}
            return {name: f.result() for name, f in futures.items()}
    finally:
        for s in held:
            s.close()


def test_there_are_enough_cases():
    doors = [c.door for c in CASES.values()]
    assert doors.count("server") >= 20 and doors.count("site") >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_exit_2_nothing_touched(name, outcomes):
    case, got = CASES[name], outcomes[name]
    shown = f"{name}: exit {got.code}\nstderr:\n{got.err}\nstdout:\n{got.out[-2000:]}"
    assert got.code == 2, shown
    assert "Traceback" not in got.err + got.out, shown
    lines = [line for line in got.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    line = lines[0]
    file = case.file or ("server.yaml" if case.door == "server" else "site.yaml")
    assert file in line, shown
    for fragment in case.fragments:
        assert fragment in line, f"{fragment!r} not in the line\n{shown}"
    assert not got.leftovers, f"{name}: processes left running: {got.leftovers}"
    changed = sorted(p for p in set(got.before) | set(got.after)
                     if got.before.get(p) != got.after.get(p))
    assert not changed, f"{name}: files or folders changed: {changed}"


def test_the_base_configurations_pass(material, tmp_path):
    """The configurations the cases break are fine as they are: the site passes its checks
    (without writing into its state folder) and the coordinator's checks pass."""
    from safn_core.config import load_config
    from safn.server.cli import validate_server

    folder = tmp_path / "base"
    site = prepare(Case("site", ()), folder / "site", material, [])
    got = execute(site, folder / "site", [material["certs"]])
    assert got.code == 0, got.err
    assert "12 participants pass the data contract" in got.out
    assert got.before == got.after and not got.leftovers
    server = prepare(Case("server", ()), folder / "server", material, [])
    validate_server(load_config(server[2]), server[2], insecure=False)
    insecure = base_server(material)
    insecure["server"]["certificates"] = None
    (folder / "insecure.yaml").write_text(yaml.safe_dump(insecure))
    validate_server(load_config(folder / "insecure.yaml"), "insecure.yaml", insecure=True)


def test_an_insecure_coordinator_skips_tls_but_not_the_other_checks(material, tmp_path):
    cfg = base_server(material)
    cfg["server"].update(certificates=None, host="localhost:9092")
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg))
    got = execute(["safn-server", "--config", str(tmp_path / "server.yaml"), "--insecure"],
                  tmp_path, [])
    assert got.code == 2 and "Traceback" not in got.err, got.err
    assert got.err.count("\n") == 1 and "'server.host'" in got.err
    assert got.before == got.after and not got.leftovers


def test_a_certificate_that_does_not_name_server_host_stops_the_coordinator_at_once(material,
                                                                                    tmp_path):
    """Its own health check and flwr CLI verify superlink.pem for server.host: a certificate
    for other names ended in "flower-superlink did not answer ... within 60 s"; now one line
    naming the file, server.host and the certificate's names, before anything starts."""
    cfg = base_server(material)
    cfg["server"]["host"] = "127.0.0.2"  # an address of this machine the certificate lacks
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg))
    got = execute(["safn-server", "--config", str(tmp_path / "server.yaml")], tmp_path,
                  [material["certs"]])
    assert got.code == 2 and "Traceback" not in got.err + got.out, got.err
    assert got.err.count("\n") == 1 and got.err.startswith("error: "), got.err
    pem = material["certs"] / "superlink.pem"
    assert (f"'server.host' = 127.0.0.2, but {pem} is not issued for the IP address 127.0.0.2 "
            "(it is for: localhost, 127.0.0.1)") in got.err, got.err
    assert "Set server.host to a name it is for (or to 0.0.0.0)" in got.err, got.err
    assert got.before == got.after and not got.leftovers
