"""A deployment's inputs, checked before anything starts: site names, addresses and ports, TLS
certificates and authentication keys.

`safn-server` and `safn-client` check what their configs name with these functions, so a wrong
value or file is one `ConfigError` line naming the config file, the key and what to do, instead of
a failure inside Flower's SuperLink or SuperNode once they run. Each function raises
``ConfigError(f"{origin}: '{key}' = {value}: ...")``; none writes anything.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import re
import socket
from pathlib import Path

from safn_core.errors import ConfigError

MAKE_CERTS = "deploy/make_certs.py"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?")


def check_site_name(name: str, key: str, origin: str) -> None:
    if not SITE_NAME.fullmatch(str(name)):
        raise ConfigError(f"{origin}: '{key}' = {name!r}: not a usable site name; use 1-64 "
                          "letters, digits, '_', '-' or '.', starting with a letter or digit, "
                          "exactly as the coordinator lists it under server.sites")


def ip_of(text: str):
    """The IP address ``text`` is (brackets allowed, as in ``[::1]``), or None: a host name."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOSTNAME.fullmatch(host))


def check_host(host: str, key: str, origin: str) -> None:
    """A host name or IP address, without port or scheme."""
    if not _host_ok(str(host)):
        hint = ("; give the port separately (server.port)" if ":" in str(host)
                and not str(host).startswith("[") else "")
        raise ConfigError(f"{origin}: '{key}' = {host!r}: not a host name or IP address{hint}; "
                          "e.g. 127.0.0.1, 0.0.0.0 or coordinator.example.org")


def check_address(address: str, key: str, origin: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6), as Flower's SuperNode takes ``--superlink``."""
    text = str(address).strip()
    example = "e.g. 127.0.0.1:9092 or coordinator.example.org:9092"
    if "://" in text:
        raise ConfigError(f"{origin}: '{key}' = {address!r}: write host:port without a scheme "
                          f"('https://'); {example}")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{origin}: '{key}' = {address!r}: the port is missing; write "
                          f"host:port, {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{origin}: '{key}' = {address!r}: the port {port!r} is not a number "
                          f"from 1 to 65535; {example}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare and not host.startswith("["):
        raise ConfigError(f"{origin}: '{key}' = {address!r}: an IPv6 address needs brackets, "
                          "e.g. [::1]:9092")
    if not _host_ok(bare):
        raise ConfigError(f"{origin}: '{key}' = {address!r}: {host!r} is not a host name or IP "
                          f"address; {example}")
    return bare, int(port)


def check_can_listen(host: str, port: int, origin: str, host_key: str = "server.host",
                     port_key: str = "server.port",
                     holder: str = "another SuperLink, or an earlier safn-server") -> None:
    """The port is free on ``host`` and ``host`` is an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"{origin}: '{host_key}' = {host!r}: cannot be resolved on this "
                          f"machine ({exc.strerror}); use one of its addresses, e.g. 0.0.0.0 "
                          "for every interface") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{origin}: '{port_key}' = {port}: already in use on {host} "
                                  f"({holder} still running?); stop it or choose another "
                                  f"{port_key}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"{origin}: '{host_key}' = {host!r}: not an address of this "
                                  "machine; use one of its own, or 0.0.0.0 for every "
                                  "interface") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"{origin}: '{port_key}' = {port}: this user may not listen "
                                  f"on it (ports below 1024 need privileges); choose a port "
                                  "above 1023") from None
            raise ConfigError(f"{origin}: '{host_key}'/'{port_key}' = {host}:{port}: cannot "
                              f"listen there ({exc.strerror})") from None


def _read(path: Path, key: str, origin: str) -> bytes:
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{origin}: '{key}' = {path}: not readable by this user; fix its "
                          "permissions or run as its owner")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{origin}: '{key}' = {path}: cannot be read ({exc.strerror})") from None


def _fail(origin: str, key: str, path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{origin}: '{key}' = {path}: {problem}")


def load_certificates(path: Path, key: str, origin: str) -> list:
    """The PEM certificate(s) in ``path``; each must be valid now."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(_read(path, key, origin))
    except ValueError:
        raise _fail(origin, key, path, "not a PEM certificate (no '-----BEGIN CERTIFICATE-----' "
                                       f"block that can be read); use the file {MAKE_CERTS} "
                                       "wrote") from None
    now = dt.datetime.now(dt.timezone.utc)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise _fail(origin, key, path, f"the certificate expired on "
                                           f"{cert.not_valid_after_utc:%Y-%m-%d}; make new "
                                           f"certificates with {MAKE_CERTS}")
        if cert.not_valid_before_utc > now:
            raise _fail(origin, key, path, f"the certificate is not valid before "
                                           f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                                           "check this machine's clock")
    return certs


def check_server_tls(ca: Path, cert: Path, key: Path, origin: str,
                     where: str = "server.certificates") -> None:
    """The SuperLink's CA, certificate and private key: readable, PEM, signed by the CA, and the
    key belongs to the certificate."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cas = load_certificates(ca, f"{where}/{ca.name}", origin)
    own = load_certificates(cert, f"{where}/{cert.name}", origin)[0]
    signed = False
    for authority in cas:
        try:
            own.verify_directly_issued_by(authority)
            signed = True
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not signed:
        raise _fail(origin, f"{where}/{cert.name}", cert,
                    f"not signed by {ca.name}, so sites would refuse the connection; make both "
                    f"with {MAKE_CERTS} (same --out)")
    try:
        private = serialization.load_pem_private_key(_read(key, f"{where}/{key.name}", origin),
                                                     None)
    except TypeError:
        raise _fail(origin, f"{where}/{key.name}", key,
                    "the private key is encrypted; the SuperLink needs it without a passphrase "
                    f"(as {MAKE_CERTS} writes it)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _fail(origin, f"{where}/{key.name}", key,
                    f"not a PEM private key; use the superlink.key that {MAKE_CERTS} wrote") \
            from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != own.public_key().public_bytes(*spki):
        raise _fail(origin, f"{where}/{key.name}", key,
                    f"this key does not belong to {cert.name}; use the pair {MAKE_CERTS} wrote "
                    "together")


def _nist(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    return isinstance(key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1))


def load_site_public_key(path: Path, key: str, origin: str) -> bytes:
    """A site's OpenSSH ECDSA public key (what Flower's SuperNode authentication registers);
    returns its canonical bytes (to find one key listed for two sites)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(path, key, origin)
    try:
        public = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        hint = (" (this is a private key: list the .pub file)"
                if b"PRIVATE KEY" in data else "")
        raise _fail(origin, key, path, f"not an OpenSSH public key{hint}; it is the <site>.pub "
                                       f"that {MAKE_CERTS} wrote (or `ssh-keygen -t ecdsa -b 384` "
                                       "at the site)") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not _nist(public):
        raise _fail(origin, key, path, "Flower's site authentication needs an ECDSA key on a "
                                       "NIST curve (P-256, P-384, P-521); make one with "
                                       "`ssh-keygen -t ecdsa -b 384`")
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH)


def check_site_private_key(path: Path, key: str, origin: str) -> None:
    """A site's OpenSSH ECDSA private key, unencrypted (Flower's SuperNode reads it as such)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(path, key, origin)
    try:
        private = serialization.load_ssh_private_key(data, None)
    except TypeError:
        raise _fail(origin, key, path, "the key has a passphrase, which Flower's SuperNode "
                                       "cannot use; make one without (`ssh-keygen -N ''`)") \
            from None
    except (ValueError, UnsupportedAlgorithm):
        public = data.lstrip().startswith((b"ecdsa-", b"ssh-", b"sk-"))
        hint = (" (this is a public key: name the private <site>.key, not the .pub)"
                if public else "")
        raise _fail(origin, key, path, f"not an OpenSSH private key{hint}; it is the "
                                       f"<site>.key that {MAKE_CERTS} wrote") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not _nist(private.public_key()):
        raise _fail(origin, key, path, "Flower's site authentication needs an ECDSA key on a "
                                       "NIST curve (P-256, P-384, P-521); make one with "
                                       "`ssh-keygen -t ecdsa -b 384 -N ''`")
    mode = Path(path).stat().st_mode
    if mode & 0o077:
        raise _fail(origin, key, path, f"readable by other users (mode {mode & 0o777:o}); run "
                                       f"`chmod 600 {path}` first")
