"""A site's half of secure aggregation inside the ClientApp (`safn_core.secagg`).

The site keeps no memory between messages (each may run in a fresh process): its key pair for
an aggregation is re-derived from its own secret (``<state dir>/secagg_site_secret.bin``, 0600)
and the aggregation's context; what it will sum is kept on its own disk
(``<state dir>/secagg/<aggregation>.npz``) until the next aggregation of that kind, so that if
another site drops out the coordinator can ask the survivors to mask the same values again
under fresh keys, without training or evaluating again.

Message fields (config records, set by `safn.server.secure_aggregation`): ``secagg-context`` (the
aggregation's context, JSON), ``secagg-packing`` (its `Packing`, JSON), ``secagg-peer-ids`` /
``secagg-peer-keys`` (every participant's public key for the context) and ``secagg-next`` (the
context of the next aggregation: the site announces its public key for it in the reply).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord

from safn_core.federation.protocol import SecAgg
from safn_core.io import write_atomic
from safn_core.secagg import AggregationContext, Packing, SiteSecret, SiteSession

CONTEXT, PACKING, PEER_IDS, PEER_KEYS, NEXT = (
    SecAgg.CONTEXT, SecAgg.PACKING, SecAgg.PEER_IDS, SecAgg.PEER_KEYS, SecAgg.NEXT)  # short names
ANNOUNCED_KEY, ANNOUNCED_CONTEXT = SecAgg.ANNOUNCED_KEY, SecAgg.ANNOUNCED_CONTEXT
RECORD = SecAgg.RECORD


def is_secure(config: ConfigRecord) -> bool:
    return CONTEXT in config


def session(state_dir: Path, node_id: int) -> SiteSession:
    return SiteSession(SiteSecret.load_or_create(Path(state_dir)), int(node_id))


def context_of(text: str) -> AggregationContext:
    return AggregationContext.from_dict(json.loads(text))


def peers_of(config: ConfigRecord) -> dict[int, bytes]:
    ids, keys = list(config[PEER_IDS]), list(config[PEER_KEYS])
    if len(ids) != len(keys):
        raise ValueError("secure aggregation: peer ids and keys differ in number")
    return {int(i): bytes(k) for i, k in zip(ids, keys)}


def announce(sess: SiteSession, config: ConfigRecord) -> ConfigRecord:
    """This site's public key for the next aggregation (``secagg-next``), for the reply."""
    if NEXT not in config:
        return ConfigRecord({})
    ctx = context_of(str(config[NEXT]))
    return ConfigRecord({ANNOUNCED_KEY: sess.public_key(ctx),
                         ANNOUNCED_CONTEXT: json.dumps(ctx.to_dict(), sort_keys=True)})


def _cache(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "secagg" / f"{name}.npz"


MIN_PEERS = "__min_peers__"
"""Kept beside a noise share: the fewest participants a retry may have (n − t: with fewer, the
honest shares in the sum would carry less noise than the guarantee needs)."""


PLAN = "__noise_plan__"
"""Kept beside a noise share: the round's noise plan it was drawn for (JSON, as bytes)."""


class TooFewShares(Exception):
    """A retried sum would hold fewer honest noise shares than distributed DP needs."""


def keep(state_dir: Path, ctx: AggregationContext, values: dict,
         min_peers: int | None = None, plan: str | None = None) -> None:
    """Keep what this site sums under ``ctx`` (its own disk; replaced by the next one)."""
    import io

    buf = io.BytesIO()
    extra = {} if min_peers is None else {MIN_PEERS: np.asarray(int(min_peers))}
    if plan is not None:
        extra[PLAN] = np.frombuffer(plan.encode(), dtype=np.uint8)
    np.savez(buf, __context__=np.frombuffer(_which(ctx), dtype=np.uint8), **extra,
             **{k: np.asarray(v) for k, v in values.items()})
    path = _cache(state_dir, ctx.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def kept(state_dir: Path, ctx: AggregationContext) -> dict:
    """What `keep` stored for the same run, round and aggregation (any attempt)."""
    path = _cache(state_dir, ctx.name)
    if not path.is_file():
        raise ValueError(f"secure aggregation: nothing kept for {ctx.name} round {ctx.round}")
    with np.load(path) as data:
        if bytes(data["__context__"].tobytes()) != _which(ctx):
            raise ValueError(f"secure aggregation: the kept values are for another "
                             f"{ctx.name} aggregation than round {ctx.round}")
        return {k: data[k] for k in data.files if k != "__context__"}


def _which(ctx: AggregationContext) -> bytes:
    """The aggregation a context belongs to, whatever its attempt."""
    return ctx.with_attempt(0).info()


def mask(sess: SiteSession, state_dir: Path, config: ConfigRecord, values: dict,
         min_peers: int | None = None, plan: str | None = None) -> np.ndarray:
    """``values`` kept on disk, then encoded and masked for the message's context and peers.
    ``min_peers``: a retry of this sum needs at least that many participants (noise shares);
    ``plan``: the noise plan a share was drawn for (kept beside it)."""
    ctx = context_of(str(config[CONTEXT]))
    keep(state_dir, ctx, values, min_peers, plan)
    return sess.masked(values, Packing.from_dict(json.loads(str(config[PACKING]))), ctx,
                       peers_of(config))


def remask(sess: SiteSession, state_dir: Path, config: ConfigRecord) -> np.ndarray:
    """The kept values of the same aggregation, masked again under a fresh attempt's keys (the
    coordinator redoes an aggregation another site dropped out of)."""
    ctx = context_of(str(config[CONTEXT]))
    values = kept(state_dir, ctx)
    floor = values.pop(MIN_PEERS, None)
    values.pop(PLAN, None)
    parties = len(set(peers_of(config)) | {sess.own_id})
    if floor is not None and parties < int(floor):
        raise TooFewShares(f"secure sum {ctx.name} of round {ctx.round}: a retry with {parties} "
                           f"sites would hold fewer than the {int(floor)} noise shares "
                           f"distributed DP needs; this site's share is not sent again")
    return sess.masked(values, Packing.from_dict(json.loads(str(config[PACKING]))), ctx,
                       peers_of(config))
