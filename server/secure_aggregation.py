"""The coordinator's half of secure aggregation, over Flower's Grid (`safn_core.secagg`).

Keys ride along: every message that starts an aggregation names the *next* one
(``secagg-next``), and each site's reply carries its public key for it, so in a run without
dropouts no message is added (except one per run for the statistics round). Messages that
start an aggregation carry every participant's public key; the sites reply with masked vectors;
their sum is all the coordinator learns. When a participant's reply is missing the masks do not
cancel: the aggregation is redone with the survivors under a fresh attempt (fresh keys), as
QUERY messages ``secagg-keys`` / ``secagg-mask``; the survivors mask the values they kept on
their own disk. No site is ever asked to reveal anything about another.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from safn_core.federation.events import Event, EventLog
from safn_core.federation.protocol import ARRAYS, CONFIG, MASKED, Config, Describe, SecAgg, Task
from safn_core.secagg import (AggregationContext, Packing, SecureSumResult, secure_sum,
                              unmask_sum)
from safn_core.secagg.keys import check_public_key
from safn_core.secagg.protocol import KEYS, MIN_SECURE_PARTIES

CONTEXT, PACKING, PEER_IDS, PEER_KEYS, NEXT = (
    SecAgg.CONTEXT, SecAgg.PACKING, SecAgg.PEER_IDS, SecAgg.PEER_KEYS, SecAgg.NEXT)  # short names
RECORD = SecAgg.RECORD


def context_json(ctx: AggregationContext) -> str:
    return json.dumps(ctx.to_dict(), sort_keys=True)


class SecureAggregation:
    """Secure sums for one run: the keys sites announced, and the Grid round trips."""

    def __init__(self, grid, run_id: str, timeout: float, base_config: dict, min_sites: int,
                 max_attempts: int = 3, events: EventLog | None = None):
        self.grid, self.run_id, self.timeout = grid, run_id, timeout
        self.base_config = dict(base_config)  # what every QUERY carries (safn-config, ...)
        self.min_parties = max(MIN_SECURE_PARTIES, int(min_sites))
        self.max_attempts = max_attempts
        self.events = events if events is not None else EventLog(None, None)
        self.keys: dict[bytes, dict[int, bytes]] = {}  # context → site → public key
        self.retries: list[dict] = []  # aggregations redone after a dropout

    def context(self, round_: int, name: str) -> AggregationContext:
        return AggregationContext(self.run_id, int(round_), name, 0)

    # -- keys ---------------------------------------------------------------------------------

    def note(self, nid: int, content: RecordDict) -> None:
        """Remember the public key a site announced in a reply for the next aggregation."""
        rec = content.config_records.get(RECORD)
        if rec is None or SecAgg.ANNOUNCED_CONTEXT not in rec or SecAgg.ANNOUNCED_KEY not in rec:
            return
        try:
            ctx = AggregationContext.from_dict(json.loads(str(rec[SecAgg.ANNOUNCED_CONTEXT])))
            key = check_public_key(bytes(rec[SecAgg.ANNOUNCED_KEY]))
        except (TypeError, ValueError):
            return
        self.keys.setdefault(ctx.info(), {})[int(nid)] = key

    def _keys_for(self, ctx: AggregationContext, nodes: list[int]) -> dict[int, bytes]:
        """Every node's key for ``ctx``: announced ones, the missing asked for now."""
        known = self.keys.setdefault(ctx.info(), {})
        missing = [n for n in nodes if n not in known]
        if missing:
            for nid, rec in self._query({n: {Config.TASK: Task.SECAGG_KEYS,
                                             CONTEXT: context_json(ctx)}
                                         for n in missing}).items():
                try:
                    known[nid] = check_public_key(bytes(rec[Describe.PUBLIC_KEY]))
                except (KeyError, TypeError, ValueError):
                    continue
        return {n: known[n] for n in nodes if n in known}

    def start(self, ctx: AggregationContext, packing: Packing, nodes: list[int],
              next_ctx: AggregationContext | None) -> tuple[dict, list[int]]:
        """Config entries for the messages that start aggregation ``ctx`` among ``nodes``, and
        the nodes that can take part (those whose key the coordinator has)."""
        keys = self._keys_for(ctx, sorted(nodes))
        ids = sorted(keys)
        entries = {CONTEXT: context_json(ctx), PACKING: json.dumps(packing.to_dict()),
                   PEER_IDS: ids, PEER_KEYS: [keys[i] for i in ids]}
        if next_ctx is not None:
            entries[NEXT] = context_json(next_ctx)
        return entries, ids

    # -- sums ---------------------------------------------------------------------------------

    def finish(self, ctx: AggregationContext, packing: Packing, participants: list[int],
               vectors: dict[int, np.ndarray], min_parties: int | None = None
               ) -> SecureSumResult:
        """The sum of the participants' masked vectors; when some are missing, the aggregation
        is redone with the survivors and fresh keys (bounded attempts), with at least
        ``min_parties`` of them (default: the run's minimum)."""
        ok = {n: v for n, v in vectors.items()
              if isinstance(v, np.ndarray) and v.dtype == np.uint64 and v.shape == (packing.size,)}
        if set(ok) == set(participants):
            total = unmask_sum([ok[n] for n in sorted(ok)])
            return SecureSumResult(packing.decode(total), tuple(sorted(ok)), 1, ctx,
                                   packing.decode_clipped(total), {})
        lost = sorted(set(participants) - set(ok))
        self.events.emit(Event.SECURE_RETRY, aggregation=ctx.name, round=ctx.round,
                         lost=len(lost), others=len(ok))
        floor = self.min_parties if min_parties is None else max(self.min_parties,
                                                                  int(min_parties))
        result = secure_sum(sorted(ok), self._request(packing), packing,
                            lambda attempt: ctx.with_attempt(attempt + 1), floor,
                            self.max_attempts)
        self.retries.append({"aggregation": ctx.name, "round": ctx.round, "lost": len(lost),
                             "attempts": result.attempts + 1})
        return result

    def sum_now(self, ctx: AggregationContext, packing: Packing, nodes: list[int],
                extra: dict | None = None,
                next_ctx: AggregationContext | None = None) -> SecureSumResult:
        """A secure sum run entirely by QUERY messages (the statistics round, ComBat's and the
        logistic floor's sums). ``next_ctx``: the sum that follows, whose keys the sites then
        announce in their replies (no key query before it)."""
        entries, ids = self.start(ctx, packing, nodes, next_ctx)
        if len(ids) < self.min_parties:
            from safn_core.secagg import SecureSumFailed

            raise SecureSumFailed(f"secure aggregation {ctx.name}: only {len(ids)} sites sent a "
                                  f"key, fewer than {self.min_parties}")
        replies = self._query({n: {Config.TASK: Task.SECAGG_MASK, **entries, **(extra or {})}
                               for n in ids}, keep_content=True)
        self.last_contents = replies  # what else the sites said (their privacy reports)
        vectors = {}
        for nid, content in replies.items():
            self.note(nid, content)
            arr = content.array_records.get(ARRAYS)
            if arr is not None and MASKED in arr:
                vectors[nid] = arr[MASKED].numpy()
        return self.finish(ctx, packing, ids, vectors)

    def _request(self, packing: Packing):
        """`secure_sum`'s transport: its two phases as QUERY messages."""
        spec = json.dumps(packing.to_dict())

        def request(phase: str, payloads: dict[int, dict]) -> dict[int, dict]:
            out = {}
            if phase == KEYS:
                sent = {n: {Config.TASK: Task.SECAGG_KEYS,
                            CONTEXT: json.dumps(p["context"], sort_keys=True)}
                        for n, p in payloads.items()}
                for nid, rec in self._query(sent).items():
                    if Describe.PUBLIC_KEY in rec:
                        out[nid] = {"public_key": bytes(rec[Describe.PUBLIC_KEY])}
                return out
            sent = {}
            for n, p in payloads.items():
                ids = sorted(int(i) for i in p["peers"])
                sent[n] = {Config.TASK: Task.SECAGG_MASK,
                           CONTEXT: json.dumps(p["context"], sort_keys=True),
                           PACKING: spec, PEER_IDS: ids,
                           PEER_KEYS: [bytes(p["peers"][i]) for i in ids]}
            for nid, content in self._query(sent, keep_content=True).items():
                arr = content.array_records.get(ARRAYS)
                if arr is not None and MASKED in arr:
                    out[nid] = {"masked": arr[MASKED].numpy()}
            return out

        return request

    def _query(self, payloads: dict[int, dict], keep_content: bool = False) -> dict:
        """One QUERY per node; the answers (config record ``secagg``, or the whole content) of
        the nodes that answered without an error."""
        messages = [Message(RecordDict({CONFIG: ConfigRecord({**self.base_config, **p})}),
                            dst_node_id=n, message_type=MessageType.QUERY)
                    for n, p in payloads.items()]
        out = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                continue
            nid = reply.metadata.src_node_id
            if keep_content:
                out[nid] = reply.content
            elif RECORD in reply.content.config_records:
                out[nid] = reply.content[RECORD]
        return out
