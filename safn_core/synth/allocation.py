"""Item scores given a total: weighted sampling of score units without replacement."""

from __future__ import annotations

import numpy as np


def allocate(rng: np.random.Generator, totals, caps, weights, decay: float = 1.0) -> np.ndarray:
    """Split each row's total into item scores: an (n, k) integer array whose rows sum to the
    totals (clipped to the sum of the row's caps).

    Every item ``i`` of row ``r`` offers ``caps[r, i]`` score units; unit ``j`` (0-based) of item
    ``i`` has weight ``weights[r, i] * decay**j``. ``total`` units are drawn without replacement
    with these weights (Gumbel top-k), so light items and high levels are rarely used.
    """
    totals = np.asarray(totals, dtype=np.int64)
    n = len(totals)
    weights = np.broadcast_to(np.asarray(weights, float), (n, np.shape(weights)[-1]))
    k = weights.shape[1]
    caps = np.broadcast_to(np.asarray(caps, np.int64), (n, k))
    maxcap = caps.max(axis=0) if n else np.zeros(k, np.int64)
    item = np.repeat(np.arange(k), maxcap)
    level = np.concatenate([np.arange(c) for c in maxcap]) if maxcap.sum() else np.zeros(0, int)
    if n == 0 or len(item) == 0:
        return np.zeros((n, k), np.int64)
    w = weights[:, item] * decay ** level[None, :]
    keys = np.log(np.maximum(w, 1e-300)) + rng.gumbel(size=w.shape)
    keys[level[None, :] >= caps[:, item]] = -np.inf
    order = np.argsort(-keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(len(item)), order.shape), axis=1)
    t = np.minimum(totals, caps.sum(axis=1))
    chosen = (ranks < t[:, None]).astype(np.int64)
    onehot = np.zeros((len(item), k), np.int64)
    onehot[np.arange(len(item)), item] = 1
    return chosen @ onehot
