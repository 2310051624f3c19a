"""Per-aggregation X25519 keys that a site re-derives from one long-lived secret.

In deployment every Flower message reaches a site in a fresh process, so a key pair made for the
"keys" message would be gone when the "mask" message arrives. Instead each site keeps one random
32-byte `SiteSecret` in its own state folder and derives the key pair for an aggregation with
HKDF-SHA256 over the `AggregationContext` (run, round, aggregation name, attempt). Keys are
therefore fresh for every aggregation and every retry, yet identical every time the same context
is asked for, with no state kept between messages.
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_SIZE = 32
PUBLIC_KEY_SIZE = 32
SECRET_FILE = "secagg_site_secret.bin"
_INFO_LABEL = b"safn-secagg/context/v1"
_KEYPAIR_SALT = b"safn-secagg/keypair/v1"


@dataclass(frozen=True)
class AggregationContext:
    """What one aggregation is: every key and mask is bound to it, so none is ever reused.

    ``name`` distinguishes aggregations within a round (``"statistics"``, ``"train"``,
    ``"evaluate"``); ``attempt`` is bumped when an aggregation is redone after a dropout, which
    gives every site fresh keys (re-masking under old keys with fewer peers would let the
    coordinator difference two masked vectors).
    """

    run_id: str
    round: int
    name: str
    attempt: int = 0

    def __post_init__(self) -> None:
        for key in ("run_id", "name"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"AggregationContext.{key} must be a non-empty string, "
                                 f"got {value!r}")
        for key in ("round", "attempt"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AggregationContext.{key} must be a non-negative int, "
                                 f"got {value!r}")

    def info(self) -> bytes:
        """Canonical, unambiguous bytes: a label, then length-prefixed strings and 8-byte ints."""
        run, name = self.run_id.encode(), self.name.encode()
        return b"".join([_INFO_LABEL,
                         struct.pack(">I", len(run)), run, struct.pack(">Q", self.round),
                         struct.pack(">I", len(name)), name, struct.pack(">Q", self.attempt)])

    def with_attempt(self, attempt: int) -> AggregationContext:
        """The same aggregation, retried: usable directly as `secure_sum`'s ``context_factory``."""
        return replace(self, attempt=attempt)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for a message; `from_dict` rebuilds (and re-validates) it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AggregationContext:
        if not isinstance(data, dict) or set(data) != {"run_id", "round", "name", "attempt"}:
            raise ValueError("aggregation context must be a dict with keys run_id, round, name, "
                             f"attempt; got {data!r}")
        return cls(**data)


class SiteSecret:
    """A site's 32 random bytes from which all its aggregation keys are derived.

    Kept in the site's own state folder, never sent anywhere. The bytes are not shown by ``repr``.
    """

    __slots__ = ("_value", "path")

    def __init__(self, value: bytes, path: Path | None = None) -> None:
        if not isinstance(value, bytes) or len(value) != SECRET_SIZE:
            raise ValueError(f"a site secret is exactly {SECRET_SIZE} bytes")
        self._value = value
        self.path = path

    def __repr__(self) -> str:
        return f"SiteSecret(<hidden>, path={str(self.path) if self.path else None!r})"

    @property
    def value(self) -> bytes:
        return self._value

    @classmethod
    def generate(cls) -> SiteSecret:
        """A fresh in-memory secret (tests, simulation)."""
        return cls(secrets.token_bytes(SECRET_SIZE))

    @classmethod
    def load_or_create(cls, folder: str | os.PathLike[str]) -> SiteSecret:
        """Load ``<folder>/secagg_site_secret.bin``, creating it (mode 0600) on first use.

        Creation is exclusive and atomic: the bytes are written and fsynced to a private temporary
        file that is then hard-linked into place, which fails if the file already exists. So an
        existing secret is never overwritten, two processes racing on first use end up with the
        same secret, and a crash never leaves a short file behind.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SECRET_FILE
        if not path.exists():
            _create_exclusive(path, secrets.token_bytes(SECRET_SIZE))
        return cls(_read_secret(path), path)


def _create_exclusive(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
        except AttributeError:  # pragma: no cover - Windows
            pass
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use theirs
    except OSError:  # pragma: no cover - file system without hard links
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_secret(path: Path) -> bytes:
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(f"{path}: the secure-aggregation secret is readable by other users "
                             f"(mode {mode:#o}); run `chmod 600 {path}`")
    data = path.read_bytes()
    if len(data) != SECRET_SIZE:
        raise ValueError(f"{path}: expected {SECRET_SIZE} bytes, found {len(data)}; the file is "
                         "damaged. Delete it only if no aggregation is in progress.")
    return data


def aggregation_keypair(secret: SiteSecret, context: AggregationContext) -> X25519PrivateKey:
    """The site's X25519 private key for ``context``: HKDF-SHA256(secret, info=context.info())."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=_KEYPAIR_SALT,
               info=context.info()).derive(secret.value)
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key's public half)."""
    if isinstance(key, X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_key(value: Any) -> bytes:
    """``value`` as 32 raw public-key bytes, or a `ValueError` saying why not."""
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_SIZE:
        raise ValueError(f"a public key is {PUBLIC_KEY_SIZE} raw bytes, got {type(value).__name__}"
                         f"{f' of length {len(value)}' if isinstance(value, bytes) else ''}")
    return value
