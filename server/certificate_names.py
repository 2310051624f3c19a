"""Does the coordinator's certificate name the host its own tools connect to?

`safn-server`'s health check and the stock ``flwr`` CLI (whose ``config.toml`` has an address and
``root-certificates``, nothing to verify the certificate against another name) reach the
SuperLink at ``server.host`` and verify ``superlink.pem`` for that host, as a site does for the
host in ``site.superlink``. A certificate that does not name it failed only as "flower-superlink
did not answer ... within 60 s"; `tools_host` refuses it before anything starts, naming the file,
``server.host`` and the names the certificate is for.

A wildcard ``server.host`` (0.0.0.0, ::) listens on every address; the coordinator's tools then
connect to the loopback interface, by ``127.0.0.1`` when the certificate names that address, else
by ``localhost`` when it names that (deploy/make_certs.py's default ``--hosts`` names both).
"""

from __future__ import annotations

from pathlib import Path

from safn_core.deploy_checks import ip_of
from safn_core.errors import ConfigError

WILDCARD_HOSTS = ("0.0.0.0", "::")
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def certificate_names(pem: Path) -> list[str]:
    """The DNS names and IP addresses (subject alternative names) ``pem`` is issued for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(pem).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
        [str(n) for n in san.get_values_for_type(x509.IPAddress)]


def names_host(names: list[str], host: str) -> bool:
    """Whether a certificate for ``names`` passes TLS verification for ``host``, as Python's ssl
    (and gRPC) verify it: an address only against the IP addresses, a host name against the DNS
    names, case-insensitively, ``*`` standing for one whole leftmost label."""
    address = ip_of(host)
    if address is not None:
        return any(ip_of(n) == address for n in names)
    wanted = host.rstrip(".").lower().split(".")
    for name in names:
        if ip_of(name) is not None:
            continue
        labels = name.rstrip(".").lower().split(".")
        if len(labels) != len(wanted):
            continue
        if labels == wanted or (labels[0] == "*" and len(labels) > 2
                                and labels[1:] == wanted[1:]):
            return True
    return False


def what(host: str) -> str:
    """``host`` as a reader should call it: an IP address or a host name."""
    return f"the IP address {host}" if ip_of(host) is not None else f"the host name {host}"


def remake(pem: Path, hosts: list[str]) -> str:
    """How to reissue the coordinator's certificate for ``hosts`` under the same CA."""
    folder = Path(pem).parent
    return (f"move {folder / 'superlink.pem'} and {folder / 'superlink.key'} aside and run "
            f"deploy/make_certs.py --out {folder} --hosts {' '.join(dict.fromkeys(hosts))} "
            "(the CA stays: sites keep their ca.pem)")


def tools_host(host: str, pem: Path, origin: str) -> str:
    """The host the coordinator's own tools connect to and verify ``pem`` for: ``host`` itself,
    or for a wildcard ``host`` the loopback name the certificate carries; a `ConfigError` (one
    line naming the file, ``server.host`` and the certificate's names) when it carries none."""
    names = certificate_names(pem)
    listed = ", ".join(names) or "no names at all"
    if host in WILDCARD_HOSTS:
        for loopback in LOOPBACK_NAMES:
            if names_host(names, loopback):
                return loopback
        raise ConfigError(
            f"{origin}: 'server.host' = {host} listens on every address, so the coordinator's "
            "own health check and flwr CLI reach the SuperLink at 127.0.0.1 or localhost, but "
            f"{pem} names neither (it is for: {listed}). Set server.host to a name it is for, "
            f"or {remake(pem, [*names, *LOOPBACK_NAMES])}")
    if not names_host(names, host):
        wildcard = " (or to 0.0.0.0)" if any(names_host(names, n) for n in LOOPBACK_NAMES) \
            else ""
        raise ConfigError(
            f"{origin}: 'server.host' = {host}, but {pem} is not issued for {what(host)} (it is "
            f"for: {listed}): the coordinator's own health check and flwr CLI, which connect to "
            f"server.host, would refuse it. Set server.host to a name it is for{wildcard}, or "
            f"{remake(pem, [host, *names])}")
    return host
