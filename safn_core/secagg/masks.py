"""Pairwise masks that cancel in the sum (Bonawitz et al. 2017, without secret sharing).

Sites *i* and *j* agree on a seed without talking to each other: X25519 gives both the same shared
secret, and HKDF-SHA256 binds it to the aggregation context and to both public keys in sorted
order, so the seed is the same from either side and different for every pair, aggregation and
retry. The seed keys a ChaCha20 keystream (zero nonce, which is safe because no key is ever used
twice), read as little-endian uint64 values: a mask as unpredictable as the cipher is strong, not
a 32-bit ``RandomState`` seed.

Site *i* sends ``x_i + Σ_{j>i} m_ij − Σ_{j<i} m_ij (mod 2^64)``; every ``m_ij`` appears once with
each sign across the two sites, so the masks cancel when — and only when — every participant's
vector is in the sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from safn_core.secagg.keys import AggregationContext, check_public_key, public_key_bytes

_SEED_SALT = b"safn-secagg/pair-seed/v1"
_ZERO_NONCE = bytes(16)


def pair_seed(private_key: X25519PrivateKey, peer_public_key: bytes,
              context: AggregationContext) -> bytes:
    """The 32-byte seed that this site and the peer both derive for ``context``."""
    own = public_key_bytes(private_key)
    peer = check_public_key(peer_public_key)
    if peer == own:
        raise ValueError("a peer presented this site's own public key")
    # exchange() raises ValueError for low-order points (an all-zero shared secret).
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer))
    low, high = sorted((own, peer))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SEED_SALT,
                info=context.info() + low + high).derive(shared)


def expand_mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uint64 values of ChaCha20 keystream under ``seed`` (zero nonce, counter 0)."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    if size < 0:
        raise ValueError(f"mask size must be non-negative, got {size}")
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype="<u8").astype(np.uint64)


def normalise_peers(peers: Mapping[int, bytes]) -> dict[int, bytes]:
    """``{site id: 32-byte public key}`` with int ids (message keys may arrive as strings)."""
    out: dict[int, bytes] = {}
    for key, value in peers.items():
        try:
            site = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"peer ids must be integers, got {key!r}") from None
        if site in out:
            raise ValueError(f"peer id {site} appears twice")
        out[site] = check_public_key(value)
    if len(set(out.values())) != len(out):
        raise ValueError("two peers presented the same public key")
    return out


def mask_vector(x: np.ndarray, own_id: int, private_key: X25519PrivateKey,
                peers: Mapping[int, bytes], context: AggregationContext) -> np.ndarray:
    """``x + Σ_{j>own} m_ij − Σ_{j<own} m_ij  (mod 2^64)`` over every peer ``j`` in ``peers``.

    ``peers`` maps every participant's id to its public key for ``context``; this site's own entry
    may be present (it is then checked against ``private_key``) or absent.
    """
    x = np.asarray(x)
    if x.dtype != np.uint64 or x.ndim != 1:
        raise ValueError(f"mask_vector needs a 1-D uint64 vector, got {x.dtype} of shape {x.shape}")
    peers = normalise_peers(peers)
    own_key = public_key_bytes(private_key)
    if own_id in peers and peers[own_id] != own_key:
        raise ValueError(f"the key listed for this site (id {own_id}) is not its key for this "
                         "aggregation")
    out = x.copy()
    for site in sorted(peers):
        if site == own_id:
            continue
        mask = expand_mask(pair_seed(private_key, peers[site], context), out.size)
        if site > own_id:
            np.add(out, mask, out=out)        # uint64 arrays wrap modulo 2^64, silently
        else:
            np.subtract(out, mask, out=out)
    return out


def unmask_sum(masked: Sequence[np.ndarray]) -> np.ndarray:
    """The modular sum of every participant's masked vector: the masks cancel, the sum remains."""
    if not masked:
        raise ValueError("unmask_sum needs at least one vector")
    first = np.asarray(masked[0])
    total = np.zeros(first.shape, dtype=np.uint64)
    for vector in masked:
        vector = np.asarray(vector)
        if vector.dtype != np.uint64 or vector.shape != first.shape or vector.ndim != 1:
            raise ValueError("masked vectors must be 1-D uint64 of equal length; got "
                             f"{vector.dtype} {vector.shape} next to {first.shape}")
        np.add(total, vector, out=total)
    return total
