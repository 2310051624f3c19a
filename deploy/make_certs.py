#!/usr/bin/env python3
"""Create the keys and certificates of a safn federation.

    python deploy/make_certs.py --out deploy/certs --sites site-a site-b site-c \
        --hosts 127.0.0.1 localhost coordinator.example.org

writes::

    ca.key, ca.pem                 the federation's certificate authority (keep ca.key offline)
    superlink.key, superlink.pem   the coordinator's TLS certificate, signed by the CA, with the
                                   given host names / IP addresses as subject alternative names
    sites/<site>.key, <site>.pub   one ECDSA P-384 key pair per site in OpenSSH format, the form
                                   Flower's SuperNode authentication expects; the coordinator
                                   registers the .pub files, each site keeps its .key

Give each site ``ca.pem`` and its own ``<site>.key`` only. Existing files are never overwritten:
the script stops and names them (re-run with a new --out, or add sites with --sites only new
names: the CA is reused when ca.key/ca.pem exist).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "safn federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(out: Path):
    key_path, cert_path = out / "ca.key", out / "ca.pem"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes()), False
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("safn federation CA"))
            .issuer_name(_name("safn federation CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS * 2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return key, cert, True


def make_server_cert(out: Path, ca_key, ca_cert, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "superlink.key", _pem_key(key), private=True)
    _write(out / "superlink.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_site_keys(out: Path, site: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(out / "sites" / f"{site}.key", private, private=True)
    _write(out / "sites" / f"{site}.pub", public + f" {site}\n".encode(), private=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for keys and certificates")
    ap.add_argument("--sites", nargs="*", default=[], help="site names: one key pair each")
    ap.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                    help="names/IPs the coordinator is reached at (certificate SANs)")
    args = ap.parse_args(argv)
    for site in args.sites:
        if not site.replace("-", "").replace("_", "").isalnum():
            print(f"error: site name '{site}': use letters, digits, '-' and '_' only",
                  file=sys.stderr)
            return 2
    try:
        ca_key, ca_cert, new_ca = make_ca(args.out)
        if new_ca or not (args.out / "superlink.pem").exists():
            make_server_cert(args.out, ca_key, ca_cert, args.hosts)
        for site in args.sites:
            make_site_keys(args.out, site)
    except FileExistsError as exc:
        print(f"error: {exc.args[0]} exists; nothing was overwritten. Choose another --out or "
              "other site names", file=sys.stderr)
        return 2
    print(f"CA and coordinator certificate in {args.out} (hosts: {', '.join(args.hosts)})")
    for site in args.sites:
        print(f"site {site}: private key {args.out / 'sites' / (site + '.key')} (give to the site), "
              f"public key {args.out / 'sites' / (site + '.pub')} (register at the coordinator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
