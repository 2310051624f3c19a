"""Does the coordinator answer at ``site.superlink``, and does it speak the site's TLS?

Flower's SuperNode retries a failed connection for minutes and then reports every failure alike
(a wrong port ended in "refused to activate this site" after 208 s). `safn-client` therefore
probes the address itself before it starts the SuperNode, with the same TLS settings the
SuperNode will use, and tells the causes apart within seconds:

- nothing answers (connection refused, no route, the name does not resolve, no answer in time):
  the coordinator may not be up yet, so the site waits ``site.connect_wait`` seconds, saying so
  at once, then stops with what to check;
- something answers but the TLS handshake fails (certificate not signed by the site's CA, or not
  issued for the name in ``site.superlink``, or the coordinator runs without TLS, or it runs with
  TLS and the site runs ``--insecure``): stops at once, naming the certificate's own names;
- the handshake passes: whatever goes wrong next is Flower's activation, i.e. the site's key
  (`safn.client.cli`).
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safn_core.deploy_checks import ip_of
from safn_core.errors import SafnError

# OpenSSL's verification codes for a certificate issued for another name or address
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_EXPIRED = {9, 10}          # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


class CoordinatorUnreachable(SafnError):
    """``site.superlink`` does not lead to a coordinator this site can talk to."""

    exit_code = 1


@dataclass(frozen=True)
class Reach:
    """The outcome of one probe: ``kind`` is ``ok`` or the cause; ``transient`` causes (nothing
    answers yet) may go away once the coordinator is up, TLS mismatches never do."""

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def transient(self) -> bool:
        return self.kind in ("refused", "dns", "timeout", "unreachable")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, root_certificates: Path | None, timeout: float = 5.0) -> Reach:
    """One TCP connection to ``address`` and, as the SuperNode would, a TLS handshake verified
    against ``root_certificates`` for the address's host name (``None``: the site runs
    ``--insecure``, so the coordinator must *not* speak TLS)."""
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        return Reach("dns", exc.strerror or str(exc))
    except ConnectionRefusedError:
        return Reach("refused", "connection refused")
    except (TimeoutError, socket.timeout):
        return Reach("timeout", f"no answer within {timeout:g} s")
    except OSError as exc:
        return Reach("unreachable", exc.strerror or str(exc))
    with sock:
        if root_certificates is None:
            return _expect_plain(sock, host)
        return _handshake(sock, host, port, Path(root_certificates), timeout)


def _handshake(sock: socket.socket, host: str, port: int, ca: Path, timeout: float) -> Reach:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return Reach("ok")
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NAME_MISMATCH:
            return Reach("tls-name", ", ".join(certificate_names(host, port, timeout))
                         or "no names")
        if exc.verify_code in _EXPIRED:
            return Reach("tls-expired", exc.verify_message)
        return Reach("tls-ca", exc.verify_message)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return Reach("tls-plain", str(exc))
    except (TimeoutError, socket.timeout):
        return Reach("timeout", f"no TLS answer within {timeout:g} s")


def _expect_plain(sock: socket.socket, host: str) -> Reach:
    """An ``--insecure`` site: a coordinator that completes a TLS handshake would refuse it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock.settimeout(3)
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return Reach("tls-expected", "the coordinator completed a TLS handshake")
    except (OSError, ssl.SSLError):
        return Reach("ok")


def certificate_names(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """The DNS names and IP addresses the coordinator's certificate is issued for (read with
    verification off, only to say which names would work)."""
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
        [str(n) for n in san.get_values_for_type(x509.IPAddress)]


def explain(reach: Reach, address: str, origin: str, root_certificates: Path | None) -> str:
    """One message: what was found at ``address`` and what the site should check."""
    host, port = split_address(address)
    where = f"site.superlink = {address} (in {origin})"
    return {
        "refused": f"nothing answers at {address} (connection refused): is the coordinator's "
                   f"safn-server running, and is the port in {where} the one it listens on "
                   "(server.port)?",
        "dns": f"the host name {host!r} in {where} does not resolve ({reach.detail}): check "
               "the coordinator's name, or use its IP address",
        "timeout": f"nothing answers at {address} ({reach.detail}): a firewall may drop the "
                   f"connection, or {where} names the wrong host; check both",
        "unreachable": f"cannot reach {address} ({reach.detail}): check the network and "
                       f"{where}",
        "tls-name": _name_mismatch(reach.detail, address, origin),
        "tls-ca": f"the coordinator at {address} answers, but its TLS certificate is not signed "
                  f"by site.root_certificates = {root_certificates} ({reach.detail}): ask the "
                  "coordinator for the federation's ca.pem",
        "tls-expired": f"the coordinator at {address} answers, but its TLS certificate is not "
                       f"valid now ({reach.detail}): the coordinator must renew it "
                       "(deploy/make_certs.py)",
        "tls-plain": f"something answers at {address}, but not with TLS ({reach.detail}): the "
                     "coordinator may be running --insecure (then so must this site, for a "
                     f"local test only), or {where} names another service",
        "tls-expected": f"the coordinator at {address} speaks TLS, but this site runs "
                        "--insecure: drop --insecure and set site.root_certificates and "
                        "site.private_key",
    }[reach.kind]


def _name_mismatch(names: str, address: str, origin: str) -> str:
    """The certificate does not name the host this site connects to: both, and what to write."""
    host, port = split_address(address)
    kind = "host name" if ip_of(host) is None else "IP address"
    listed = [n for n in names.split(", ") if n and n != "no names" and "*" not in n]
    usable = sorted(listed, key=lambda n: ip_of(n) is not None)  # DNS names first
    shown = f"[{usable[0]}]" if usable and ":" in usable[0] else (usable[0] if usable else "")
    instead = (f"Write a name it is for in {origin}, e.g. site.superlink = {shown}:{port}, or "
               "ask the " if usable else "Ask the ")
    return (f"the coordinator at {address} answers, but its TLS certificate is not issued for "
            f"{host!r} (it is for: {names}): this site connects by the {kind} {host} "
            f"(site.superlink), which the certificate does not name. {instead}coordinator to "
            f"add the {kind} {host} to its certificate (deploy/make_certs.py --hosts)")


def wait_for_coordinator(address: str, root_certificates: Path | None, origin: str,
                         wait: float, report: Callable[[str], None] = print,
                         clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep,
                         probe_fn: Callable[..., Reach] = probe,
                         stopped: Callable[[], bool] = lambda: False,
                         also_transient: frozenset[str] | set[str] = frozenset()) -> float:
    """Return once the coordinator answers with the expected TLS (the seconds it took).

    A TLS mismatch raises `CoordinatorUnreachable` at once. When nothing answers, the cause is
    reported at once and the probe repeated every second for up to ``wait`` seconds (the
    coordinator may be starting; ``math.inf``: without a limit), then it raises with the same
    cause. ``stopped`` ends the wait early (the site is being stopped); ``also_transient``
    names further causes to wait out (a reconnecting site: ``tls-plain``, a proxy whose
    coordinator is down).
    """
    start = clock()
    reach = probe_fn(address, root_certificates)
    told = False
    while not reach.ok and not stopped():
        message = explain(reach, address, origin, root_certificates)
        waited = clock() - start
        transient = reach.transient or reach.kind in also_transient
        if not transient or waited >= wait:
            extra = f" (waited {waited:.0f} s: site.connect_wait)" if transient else ""
            raise CoordinatorUnreachable(message + extra)
        if not told:
            report(f"{message} (waiting up to {wait:.0f} s: site.connect_wait)"
                   if math.isfinite(wait) else f"{message} (waiting for it)")
            told = True
        sleep(min(1.0, max(0.0, wait - waited)))
        reach = probe_fn(address, root_certificates)
    waited = clock() - start
    if told and reach.ok:
        report(f"the coordinator answers at {address} after {waited:.0f} s")
    return waited
