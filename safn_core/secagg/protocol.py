"""The secure-sum protocol over an abstract transport: no Flower here.

The coordinator calls `secure_sum` with a ``request(phase, {site: payload}) -> {site: reply}``
function; a Flower ServerApp implements it with Grid messages, a test with a dict of
`SiteSession` objects. A site that does not answer is simply absent from the returned dict.

Phases (payloads and replies are plain dicts)::

    "keys":  {"context": ctx}                              -> {"public_key": 32 bytes}
    "mask":  {"context": ctx, "packing": spec,
              "peers": {site: public key, ...}}            -> {"masked": uint64 vector}

Dropouts: a site missing in "keys" is left out before anyone has masked. A site missing in "mask"
leaves its pairwise masks uncancelled, so the whole aggregation is redone with the survivors under
a fresh attempt number, hence fresh keys and masks. No site is ever asked to reveal a seed: the
coordinator could otherwise unmask a site that did reply. With fewer than 3 contributing sites the
sum would reveal one site's values to the other, so `secure_sum` refuses to run.

Piggy-backed keys: `announce_key` lets a site put its public key for the *next* aggregation in any
reply; `announced_keys` collects them and `secure_sum(..., known_keys=...)` then skips the "keys"
round trip (asking only sites whose key is missing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safn_core.secagg.errors import SecureAggregationRefused, SecureSumFailed
from safn_core.secagg.keys import (AggregationContext, SiteSecret, aggregation_keypair,
                                   check_public_key, public_key_bytes)
from safn_core.secagg.masks import mask_vector, normalise_peers, unmask_sum
from safn_core.secagg.packing import Packing

log = logging.getLogger(__name__)

MIN_SECURE_PARTIES = 3
KEYS, MASK = "keys", "mask"
ANNOUNCE_KEY, ANNOUNCE_CONTEXT = "secagg_next_public_key", "secagg_next_context"

Request = Callable[[str, dict[int, dict[str, Any]]], Mapping[int, Mapping[str, Any]]]


def _refusal(what: str) -> SecureAggregationRefused:
    return SecureAggregationRefused(
        f"secure aggregation needs at least {MIN_SECURE_PARTIES} contributing sites, {what}: with "
        "2, the sum reveals each site's values to the other. Add sites, or set "
        "`federation.secure_aggregation: false` explicitly if you accept that exposure.")


# ---------------------------------------------------------------------------------------------
# Site side
# ---------------------------------------------------------------------------------------------
class SiteSession:
    """A site's half of the protocol; stateless apart from the secret, like a Flower ClientApp."""

    def __init__(self, secret: SiteSecret, own_id: int) -> None:
        if not isinstance(secret, SiteSecret):
            raise ValueError("SiteSession needs a SiteSecret")
        self.secret = secret
        self.own_id = int(own_id)

    def public_key(self, context: AggregationContext) -> bytes:
        """This site's 32-byte public key for ``context`` (the same every time it is asked)."""
        return public_key_bytes(aggregation_keypair(self.secret, context))

    def masked(self, values: Mapping[str, Any], packing: Packing, context: AggregationContext,
               peers: Mapping[int, bytes]) -> np.ndarray:
        """``values`` encoded with ``packing`` and masked against every peer in ``peers``.

        Refuses (`SecureAggregationRefused`) when fewer than 3 parties take part, so a site is
        protected even from a coordinator that skips its own check.
        """
        peers = normalise_peers(peers)
        parties = len(set(peers) | {self.own_id})
        if parties < MIN_SECURE_PARTIES:
            raise _refusal(f"but only {parties} take part")
        if parties > packing.max_parties:
            raise ValueError(f"{parties} participants exceed the packing's max_parties "
                             f"({packing.max_parties}); the sum could overflow")
        vector = packing.encode(values).vector
        return mask_vector(vector, self.own_id, aggregation_keypair(self.secret, context), peers,
                           context)

    def respond(self, phase: str, payload: Mapping[str, Any],
                values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The reply to one `secure_sum` request; ``values`` are needed for the "mask" phase."""
        context = AggregationContext.from_dict(dict(payload["context"]))
        if phase == KEYS:
            return {"public_key": self.public_key(context)}
        if phase == MASK:
            if values is None:
                raise ValueError("the 'mask' phase needs this site's values")
            packing = Packing.from_dict(payload["packing"])
            return {"masked": self.masked(values, packing, context, payload["peers"])}
        raise ValueError(f"unknown secure-sum phase {phase!r}; expected {KEYS!r} or {MASK!r}")


def announce_key(session: SiteSession, next_context: AggregationContext) -> dict[str, Any]:
    """Entries to add to any reply so the coordinator has this site's key for ``next_context``."""
    return {ANNOUNCE_KEY: session.public_key(next_context),
            ANNOUNCE_CONTEXT: next_context.to_dict()}


def announced_keys(replies: Mapping[int, Mapping[str, Any]],
                   next_context: AggregationContext) -> dict[int, bytes]:
    """The keys announced for ``next_context`` in ``replies``; others and malformed ones are
    skipped (that site is then asked in the "keys" phase)."""
    keys: dict[int, bytes] = {}
    for site, reply in replies.items():
        try:
            if AggregationContext.from_dict(dict(reply[ANNOUNCE_CONTEXT])) == next_context:
                keys[int(site)] = check_public_key(reply[ANNOUNCE_KEY])
        except (KeyError, TypeError, ValueError):
            continue
    return keys


# ---------------------------------------------------------------------------------------------
# Coordinator side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecureSumResult:
    """The decoded sum and who is in it.

    ``attempts`` counts the attempts made (1: nobody dropped after masking); ``context`` is the one
    that succeeded; ``dropped`` maps each excluded site to the reason; ``clipped`` is the
    federation-wide number of clipped values per real field.
    """

    values: dict[str, np.ndarray]
    contributors: tuple[int, ...]
    attempts: int
    context: AggregationContext
    clipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)


def secure_sum(participants: list[int], request: Request, packing: Packing,
               context_factory: Callable[[int], AggregationContext], min_parties: int,
               max_attempts: int = 3, known_keys: Mapping[int, bytes] | None = None
               ) -> SecureSumResult:
    """Sum every participant's values so that the coordinator learns only the sum.

    ``context_factory(attempt)`` gives the context of each attempt (e.g. ``base.with_attempt``);
    contexts must differ between attempts. ``known_keys`` are public keys for
    ``context_factory(0)`` that arrived earlier (see `announce_key`); sites listed there are not
    asked for a key in the first attempt.

    Raises `SecureAggregationRefused` when fewer than 3 participants (or ``min_parties < 3``)
    would make the sum revealing, and `SecureSumFailed` when fewer than ``min_parties`` sites
    remain or ``max_attempts`` attempts each lost a site.
    """
    if any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) for p in participants):
        raise ValueError(f"participant ids must be integers, got {participants!r}")
    active = sorted({int(p) for p in participants})
    if len(active) != len(participants):
        raise ValueError(f"participant ids must be unique integers, got {participants!r}")
    if len(active) < MIN_SECURE_PARTIES:
        raise _refusal(f"but only {len(active)} were asked")
    if isinstance(min_parties, bool) or not isinstance(min_parties, int) \
            or min_parties < MIN_SECURE_PARTIES:
        raise _refusal(f"so min_parties must be at least {MIN_SECURE_PARTIES}, got {min_parties!r}")
    if len(active) > packing.max_parties:
        raise ValueError(f"{len(active)} participants exceed the packing's max_parties "
                         f"({packing.max_parties}); the sum could overflow")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
    spec = packing.to_dict()
    dropped: dict[int, str] = {}
    seen_contexts: set[bytes] = set()

    def require(count: int, when: str) -> None:
        if count < min_parties:
            raise SecureSumFailed(f"secure sum failed {when}: {count} site(s) remain, fewer than "
                                  f"min_parties={min_parties} (dropped: {dropped})")

    require(len(active), "before starting")
    for attempt in range(max_attempts):
        context = context_factory(attempt)
        if not isinstance(context, AggregationContext) or context.info() in seen_contexts:
            raise ValueError("context_factory must return a new AggregationContext for every "
                             "attempt (fresh keys after a dropout)")
        seen_contexts.add(context.info())
        ctx = context.to_dict()

        keys = {int(s): check_public_key(k) for s, k in (known_keys or {}).items()
                if attempt == 0 and int(s) in active and _valid_key(k)}
        missing = [s for s in active if s not in keys]
        if missing:
            replies = request(KEYS, {s: {"context": ctx} for s in missing})
            for s in missing:
                key = _reply_field(replies, s, "public_key", _valid_key)
                if key is None:
                    dropped[s] = f"no valid public key (attempt {attempt})"
                else:
                    keys[s] = check_public_key(key)
        if len(set(keys.values())) != len(keys):  # a repeated key cannot come from honest sites
            for s in [s for s in keys if list(keys.values()).count(keys[s]) > 1]:
                dropped[s] = f"repeated public key (attempt {attempt})"
                del keys[s]
        active = sorted(keys)
        require(len(active), f"in attempt {attempt} after the key exchange")

        replies = request(MASK, {s: {"context": ctx, "packing": spec, "peers": dict(keys)}
                                 for s in active})
        vectors = {}
        for s in active:
            vector = _reply_field(replies, s, "masked",
                                  lambda v: _valid_vector(v, packing.size))
            if vector is None:
                dropped[s] = f"no valid masked vector (attempt {attempt})"
            else:
                vectors[s] = np.asarray(vector)
        if len(vectors) == len(active):
            total = unmask_sum([vectors[s] for s in active])
            return SecureSumResult(values=packing.decode(total), contributors=tuple(active),
                                   attempts=attempt + 1, context=context,
                                   clipped=packing.decode_clipped(total), dropped=dropped)
        active = sorted(vectors)
        log.warning("secure sum %s: %d site(s) dropped after the key exchange; retrying with %d",
                    context, len(keys) - len(active), len(active))
        require(len(active), f"in attempt {attempt} after masking")
    raise SecureSumFailed(f"secure sum failed: every one of {max_attempts} attempts lost a site; "
                          f"{len(active)} site(s) remain, min_parties={min_parties} "
                          f"(dropped: {dropped})")


def _reply_field(replies: Mapping[int, Mapping[str, Any]], site: int, key: str,
                 valid: Callable[[Any], bool]) -> Any:
    reply = replies.get(site) if isinstance(replies, Mapping) else None
    if not isinstance(reply, Mapping) or key not in reply or not valid(reply[key]):
        return None
    return reply[key]


def _valid_key(value: Any) -> bool:
    try:
        check_public_key(value)
    except ValueError:
        return False
    return True


def _valid_vector(value: Any, size: int) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint64 and value.shape == (size,)
