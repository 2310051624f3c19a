"""The SAFN ClientApp: a site's side of the federation, thin over `safn_core.federation`.

Three message types, each answered from the site's own data:

- ``query`` / describe: training-split statistics and class counts (the statistics round);
- ``train``: local epochs from the global weights with the global preprocessing;
- ``evaluate``: per-class score histograms of the validation and test splits.

Nothing participant-level is ever put in a reply.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from safn_core.federation.runfiles import load_run_config, load_sim_site, run_dir_from
from safn_core.federation.site import Site, SmallCell
from safn_core.preprocess import Preprocessor

app = ClientApp()


@lru_cache(maxsize=256)
def _site(run_dir, partition_id: int) -> Site:
    cfg = load_run_config(run_dir)
    name, cohort = load_sim_site(run_dir, partition_id)
    return Site(name, cohort, cfg)


def site_for(context: Context) -> Site:
    """This node's site: in simulation, the virtual site of its partition id."""
    import torch

    torch.set_num_threads(1)
    run_dir = run_dir_from(dict(context.run_config))
    return _site(run_dir, int(context.node_config["partition-id"]))


def _preprocessor(site: Site, config: ConfigRecord) -> Preprocessor:
    pre = Preprocessor(site.cohort.modalities)
    pre.mean_ = np.asarray(config["pre-mean"], dtype=np.float64)
    pre.scale_ = np.asarray(config["pre-scale"], dtype=np.float64)
    return _cached_pre(site, pre)


_PRE_CACHE: dict = {}


def _cached_pre(site: Site, pre: Preprocessor) -> Preprocessor:
    """Reuse one Preprocessor object per (site, parameters) so the site caches its arrays."""
    key = (site.name, pre.mean_.tobytes(), pre.scale_.tobytes())
    if key not in _PRE_CACHE:
        _PRE_CACHE.clear()
        _PRE_CACHE[key] = pre
    return _PRE_CACHE[key]


def _weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


@app.query()
def describe(msg: Message, context: Context) -> Message:
    site = site_for(context)
    try:
        stats, counts = site.describe()
    except SmallCell as exc:
        return Message(RecordDict({
            "site": ConfigRecord({"name": site.name, "ok": False, "reason": str(exc)})}),
            reply_to=msg)
    return Message(RecordDict({
        "site": ConfigRecord({"name": site.name, "ok": True, "features": list(stats.features)}),
        "stats": ArrayRecord({"count": Array(stats.count), "total": Array(stats.total),
                              "total_sq": Array(stats.total_sq)}),
        "metrics": MetricRecord({"n-train": int(sum(counts)), "class-0": int(counts[0]),
                                 "class-1": int(counts[1])}),
    }), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_for(context)
    cfg = site.cfg
    config = msg.content["config"]
    pre = _preprocessor(site, config)
    server_round = int(config["server-round"])
    seed = int(config["seed"]) + 1000 * server_round + int(context.node_config["partition-id"])
    weights, n, loss = site.train(
        _weights(msg.content["arrays"]), pre, list(config["class-counts"]),
        model_cfg=cfg.model, epochs=int(config["local-epochs"]), seed=seed,
        proximal_mu=float(config.get("proximal-mu", 0.0)))
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": int(n), "train-loss": float(loss)}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    config = msg.content["config"]
    pre = _preprocessor(site, config)
    bins = int(config["histogram-bins"])
    res = site.evaluate(_weights(msg.content["arrays"]), pre, site.cfg.model, bins)
    return Message(RecordDict({"metrics": MetricRecord({
        "num-examples": int(res["test"].sum()),
        "val-neg": res["val"][0].tolist(), "val-pos": res["val"][1].tolist(),
        "test-neg": res["test"][0].tolist(), "test-pos": res["test"][1].tolist(),
        "withheld": int(res["val_withheld"] or res["test_withheld"]),
    })}), reply_to=msg)
