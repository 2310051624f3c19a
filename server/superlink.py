"""The coordinator's Flower SuperLink and the stock ``flwr`` CLI, driven from `safn-server`.

`SuperLink` starts ``flower-superlink`` (TLS and SuperNode authentication on unless the
coordinator explicitly runs ``--insecure``; no runtime ``uv sync``; a state database so node
registrations survive a restart) and writes the ``flwr`` CLI's connection file into the run
folder's Flower home, so ``FLWR_HOME=<run>/flower flwr list safn`` works against it too.
`FlwrCli` calls the stock CLI with ``--format json`` and reads its answers (Flower reports some
failures with exit status 0 and ``"success": false``).
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from safn_core.config import ServerConfig
from safn_core.errors import ConfigError, SafnError
from safn_core.io import write_atomic
from safn_core.processes import Child, flower_env, port_in_use
from safn.server.certificate_names import WILDCARD_HOSTS, tools_host

CONNECTION = "safn"
CERT_FILES = ("ca.pem", "superlink.pem", "superlink.key")

SERVERAPP_LAUNCH_POLL = 1.0
"""Seconds between the coordinator's SuperExec's looks for a ServerApp to start (Flower: 1). It
starts one ServerApp per run, yet keeps asking the SuperLink for the whole run: at
``server.poll_interval`` (0.2 s) that was a tenth of the SuperLink's requests during rounds."""


class DeploymentError(SafnError):
    """The SuperLink or the Flower CLI failed in a way the coordinator must fix."""


def certificate_paths(server: ServerConfig, origin: str) -> dict[str, Path]:
    if server.certificates is None:
        raise ConfigError(f"{origin}: 'server.certificates' is not set; it must name the folder "
                          "that deploy/make_certs.py wrote (ca.pem, superlink.pem, superlink.key)"
                          ", or run safn-server --insecure for a local experiment")
    paths = {name: (Path(server.certificates) / name).resolve() for name in CERT_FILES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"{origin}: 'server.certificates' = {server.certificates}: missing "
                          f"{', '.join(missing)}; create them with deploy/make_certs.py")
    return paths


class FlwrCli:
    """The stock ``flwr`` CLI against this coordinator's SuperLink."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str, timeout: float = 60) -> dict:
        cmd = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"`flwr {' '.join(args)}` did not answer in {timeout:.0f} s")
        text = done.stdout.strip()
        start = text.find("{")
        try:
            return json.loads(text[start:]) if start >= 0 else {
                "success": False, "error-message": (done.stderr or text).strip()[-500:]}
        except json.JSONDecodeError:
            return {"success": False, "error-message": text[-500:]}

    def register(self, public_key: Path, name: str) -> tuple[bool, str]:
        """(newly registered, node id or reason); an already registered key is fine."""
        out = self("supernode", "register", str(public_key), CONNECTION, "--name", name)
        if out.get("success"):
            return True, str(out.get("node-id"))
        reason = str(out.get("error-message", ""))
        if "already in use" in reason:
            return False, "already registered"
        raise DeploymentError(f"registering site {name} ({public_key}) failed: "
                              f"{reason.splitlines()[-1] if reason else 'no answer'}")

    def nodes(self) -> list[dict]:
        out = self("supernode", "list", CONNECTION)
        return list(out.get("nodes", [])) if out.get("success") else []

    def submit(self, app: Path, run_config: str) -> str:
        out = self("run", str(app), CONNECTION, "--run-config", run_config, timeout=120)
        if not out.get("success"):
            raise DeploymentError("submitting the SAFN run failed: "
                                  + str(out.get("error-message", "no answer")).strip()[-400:])
        return str(out["run-id"])

    @staticmethod
    def run_id_of(info: dict | None) -> str:
        """The Flower run id in a `run_info` answer ("?" when there was no answer)."""
        return str((info or {}).get("run-id", "?"))

    def run_info(self, run_id: str) -> dict | None:
        out = self("list", CONNECTION, "--run-id", str(run_id))
        runs = out.get("runs") or []
        return runs[0] if out.get("success") and runs else None


class SuperLink:
    """``flower-superlink`` for one run folder."""

    def __init__(self, server: ServerConfig, run_dir: Path, insecure: bool, origin: str):
        self.server, self.run_dir, self.insecure = server, Path(run_dir), insecure
        self.origin = origin
        self.home = self.run_dir / "flower"
        self.log = self.run_dir / "superlink.log"
        self.certs = None if insecure else certificate_paths(server, origin)
        self.env = flower_env(self.home, SERVERAPP_LAUNCH_POLL)
        self.cli = FlwrCli(self.env)
        self.child: Child | None = None

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def command(self) -> list[str]:
        db = self.server.database or self.run_dir / "superlink.db"
        cmd = [str(Path(sys.executable).parent / "flower-superlink"),
               "--host", self.server.host, "--port", str(self.server.port),
               "--database", str(Path(db).resolve()),
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--ssl-ca-certfile", str(self.certs["ca.pem"]),
                      "--ssl-certfile", str(self.certs["superlink.pem"]),
                      "--ssl-keyfile", str(self.certs["superlink.key"]),
                      "--enable-supernode-auth"]

    def write_connection(self) -> None:
        """``$FLWR_HOME/config.toml``: the ``safn`` connection for the stock ``flwr`` CLI."""
        wildcard = self.server.host in WILDCARD_HOSTS
        host = ("127.0.0.1" if wildcard else self.server.host) if self.insecure else \
            tools_host(self.server.host, self.certs["superlink.pem"], self.origin)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "",
                 f"[superlink.{CONNECTION}]", f'address = "{host}:{self.server.port}"']
        lines.append("insecure = true" if self.insecure else
                     f'root-certificates = "{self.certs["ca.pem"]}"')
        write_atomic(self.home / "config.toml", "\n".join(lines) + "\n")
        self._health_host = host

    def start(self, timeout: float = 60) -> None:
        if port_in_use(self.server.host, self.server.port):
            raise DeploymentError(f"port {self.address} is already in use (another SuperLink? "
                                  f"see {self.run_dir / 'superlink.pid'}); stop it or choose "
                                  "another server.port")
        self.home.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        self.child = Child("superlink", self.command(), self.env, self.log,
                           pid_file=self.run_dir / "superlink.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise DeploymentError(f"flower-superlink exited at start (status "
                                      f"{self.child.proc.returncode}); last lines of "
                                      f"{self.log}: {tail(self.log, 3)}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise DeploymentError(f"flower-superlink did not answer on {self.address} within "
                              f"{timeout:.0f} s; see {self.log}")

    def healthy(self) -> bool:
        scheme = "http" if self.insecure else "https"
        ctx = None if self.insecure else ssl.create_default_context(
            cafile=str(self.certs["ca.pem"]))
        try:
            with urllib.request.urlopen(f"{scheme}://{self._health_host}:{self.server.port}"
                                        "/health", timeout=2, context=ctx) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


REFUSED = re.compile(r"activate-node\]\[ApiError:2004\].*?(No SuperNode found with the given "
                     r"public key|could not be activated)")
"""The SuperLink's log line when it refuses to activate a SuperNode, with the key it was offered
(only the log names it); checked at start by `safn_flower.patches.log_wording.ACTIVATION_REFUSED`."""
PEM = re.compile(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----")


def key_fingerprint(pem_body: str) -> str | None:
    """The OpenSSH fingerprint (as ``ssh-keygen -lf <site>.pub`` prints it) of a key that
    the SuperLink logged in PEM form."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        der = base64.b64decode(re.sub(r"\\n|\s", "", pem_body))
        key = serialization.load_der_public_key(der)
        blob = key.public_bytes(serialization.Encoding.OpenSSH,
                                serialization.PublicFormat.OpenSSH).split()[1]
        digest = hashlib.sha256(base64.b64decode(blob)).digest()
    except (ValueError, TypeError, IndexError):
        return None
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def openssh_fingerprint(public_key: Path) -> str:
    """``ssh-keygen -lf``'s fingerprint of an OpenSSH public key file."""
    import base64
    import hashlib

    try:
        blob = base64.b64decode(Path(public_key).read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return "unreadable"
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def refusal(line: str) -> str | None:
    """A readable note when a SuperLink log line shows a site refused at activation."""
    m = REFUSED.search(line)
    if not m:
        return None
    pem = PEM.search(line)
    fingerprint = key_fingerprint(pem.group(1)) if pem else None
    who = f"key {fingerprint}" if fingerprint else "a key"
    if m.group(1).startswith("No SuperNode"):
        return (f"REFUSED a site: {who} is not registered (not listed under server.sites); "
                "its SuperNode was turned away")
    return (f"refused to re-activate a site ({who}): its previous connection has not timed out "
            "yet; it will be accepted once it has")


def tail(path: Path, n: int) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])
