"""Secure summation for cross-silo federation: the coordinator learns the sum and nothing else.

Pairwise masking after Bonawitz et al. (CCS 2017), without Shamir shares: a few to tens of
hospitals can afford to redo an aggregation when one drops out. Built on ``cryptography``
(X25519, HKDF-SHA256, ChaCha20) and NumPy; no Flower here, so the protocol runs over any
transport (`secure_sum`'s ``request`` callable) and is unit-tested without one.

- `keys`: `SiteSecret` (one random secret per site, on its disk) and `AggregationContext`;
  `aggregation_keypair` re-derives a fresh X25519 key pair for every run, round, aggregation and
  attempt, so no memory is needed between messages.
- `masks`: pairwise seeds, ChaCha20 mask expansion, `mask_vector`, `unmask_sum`.
- `fixed_point` / `packing`: `Packing` puts named count and real arrays in one uint64 vector,
  with a scale that rules out overflow and a stated error bound.
- `protocol`: `secure_sum` (coordinator), `SiteSession` (site), key piggy-backing.

Threat model, formulas and limits: docs/secure-aggregation.md.
"""

from safn_core.secagg.errors import SecureAggregationRefused, SecureSumFailed
from safn_core.secagg.fixed_point import scale_for
from safn_core.secagg.keys import (AggregationContext, SiteSecret, aggregation_keypair,
                                   public_key_bytes)
from safn_core.secagg.masks import expand_mask, mask_vector, pair_seed, unmask_sum
from safn_core.secagg.packing import Encoded, Field, Packing
from safn_core.secagg.protocol import (MIN_SECURE_PARTIES, SecureSumResult, SiteSession,
                                       announce_key, announced_keys, secure_sum)

__all__ = [
    "AggregationContext", "SiteSecret", "aggregation_keypair", "public_key_bytes",
    "pair_seed", "expand_mask", "mask_vector", "unmask_sum",
    "Field", "Packing", "Encoded", "scale_for",
    "secure_sum", "SecureSumResult", "SiteSession", "announce_key", "announced_keys",
    "MIN_SECURE_PARTIES", "SecureAggregationRefused", "SecureSumFailed",
]
