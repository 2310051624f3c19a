"""The end of a personalised run (``personalisation.method``): every training site compares its
personal model with the global one on its own test split.

After the bundle of the selected global model is written, the coordinator sends that model and
the federation's threshold to every training site in one ``personalise`` query
(`safn.client.personal_replies`). Each site answers with its own comparison where its test classes
pass ``min_cell``; the pooled comparison comes from the sites' confusion counts, summed by
secure aggregation when the run uses it (``personalise``, `secure_records.personalise_packing`;
``min_cell`` then applies to the pooled class totals) and otherwise from the sites that
reported. With K > 2 classes the counts are each model's K × K confusion matrix at the argmax
rule and the pooled comparison is balanced accuracy, accuracy (and QWK, MAE for an ordered
target). The result is ``<run folder>/personalisation.json``, in the run's reports. The
personal models stay at the sites; nothing here can read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from safn_core.federation.personal_comparison import (COMPARED, confusion_size,
                                                       pooled_from_confusion)
from safn_core.federation.personal_text import basis_text
from safn_core.federation.personal_wire import comparison_from_metrics
from safn_core.federation.protocol import (ARRAYS, CONFIG, MASKED, METRICS, MODEL, REFUSAL,
                                           Config, Describe, Layout, Task)
from safn_core.federation.secure_records import personalise_packing
from safn_core.io import write_json

if TYPE_CHECKING:
    from safn_core.federation.checkpoint import RunState
    from safn.server.run_context import RunContext
    from safn.server.run_setup import RunSetup

FILE = "personalisation.json"


def personalisation_done(run_dir: Path) -> bool:
    return (Path(run_dir) / FILE).is_file()


def personalise_sites(run: RunContext, setup: RunSetup, state: RunState, weights: dict,
                      threshold: float) -> dict:
    """Ask every training site of the run for its comparison of ``weights`` (the selected
    global model, at the federation's ``threshold``) with its personal model; the run's
    record of them."""
    cfg = run.cfg
    nodes = sorted(setup.sites.eligible)
    layout = Layout.of(weights)
    pre = state.preprocessing
    config = {Config.TASK: Task.PERSONALISE, Config.SAFN_CONFIG: run.shared_text,
              Config.RUN_ID: run.run_id, Config.PRE_MEAN: list(pre["mean"]),
              Config.PRE_SCALE: list(pre["scale"]),
              Config.CLASS_COUNTS: [int(c) for c in state.class_counts],
              Config.SEED: cfg.train.seed, Config.MODEL_LAYOUT: layout.fingerprint(),
              Config.THRESHOLD: float(threshold),
              Config.HELD_OUT_SITES: sorted(setup.held_out),
              **setup.extra}  # the harmonisation fit, if any
    secure = setup.secure
    ctx = packing = None
    if secure is not None:
        ctx = secure.context(state.round + 1, "personalise")
        packing = personalise_packing(len(nodes), setup.target.n_classes)
        entries, nodes = secure.start(ctx, packing, nodes, None)
        if len(nodes) < secure.min_parties:
            return _write(run.run_dir, _unavailable(
                cfg, threshold, {"code": "too_few_keys", "sites": len(nodes),
                                 "min_parties": secure.min_parties}))
        config.update(entries)
    vector = layout.flatten(weights)
    messages = [Message(RecordDict({CONFIG: ConfigRecord(dict(config)),
                                    ARRAYS: ArrayRecord({MODEL: Array(vector)})}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    names = setup.described.names
    ordered = setup.target.ordered and not setup.target.binary  # QWK of a K-class target
    sites, vectors, refused, failed = {}, {}, {}, []
    answered = set()
    for reply in run.grid.send_and_receive(messages, timeout=cfg.federation.round_timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            failed.append(names.get(nid, str(nid)))
            continue
        answered.add(nid)
        name = names.get(nid, str(nid))
        sites[name] = comparison_from_metrics(reply.content[METRICS])
        if REFUSAL in reply.content.config_records:
            refused[name] = str(reply.content[REFUSAL][Describe.REASON])
        if secure is not None:
            secure.note(nid, reply.content)
            arr = reply.content.array_records.get(ARRAYS)
            if arr is not None and MASKED in arr:
                vectors[nid] = arr[MASKED].numpy()
    missing = sorted(names.get(n, str(n)) for n in nodes if n not in answered)
    record = {"method": cfg.personalisation.method, "threshold": float(threshold),
              "personal_threshold": cfg.personalisation.threshold,
              "sites": dict(sorted(sites.items())), "refused": refused,
              "no_answer": sorted(set(missing) | set(failed))}
    if secure is not None:
        from safn_core.secagg import SecureSumFailed

        try:
            result = secure.finish(ctx, packing, list(nodes), vectors)
        except SecureSumFailed as exc:
            record.update(_unavailable(cfg, threshold, {"code": "secure_sum_failed",
                                                        "reason": str(exc)}, record))
            return _write(run.run_dir, record)
        total = {k: np.asarray(result.values[k]).tolist() for k in ("global", "personal")}
        record["pooled"] = pooled_from_confusion(total, cfg.data.min_cell, ordered)
        record["pooled_from"] = {"code": "secure_sum", "sites": int(result.values["sites"]),
                                 "min_cell": cfg.data.min_cell}
    else:
        reported = [s for s in sites.values() if s["reported"] and "confusion" in s]
        total = {k: np.sum([s["confusion"][k] for s in reported], axis=0).tolist()
                 if reported else [0] * confusion_size(setup.target.n_classes)
                 for k in ("global", "personal")}
        record["pooled"] = pooled_from_confusion(total, cfg.data.min_cell, ordered)
        record["pooled_from"] = {"code": "reported_sites", "sites": len(reported),
                                 "min_cell": cfg.data.min_cell}
        for s in sites.values():  # the counts served the pooled sum; the record keeps metrics
            s.pop("confusion", None)
    return _write(run.run_dir, record)


def _unavailable(cfg, threshold: float, why: dict, record: dict | None = None) -> dict:
    """A comparison without a pooled part (its secure sum could not be made): ``why`` is
    ``{"code": "too_few_keys", "sites", "min_parties"}`` or ``{"code": "secure_sum_failed",
    "reason"}``."""
    base = record or {"method": cfg.personalisation.method, "threshold": float(threshold),
                      "personal_threshold": cfg.personalisation.threshold, "sites": {},
                      "refused": {}, "no_answer": []}
    return {**base, "pooled": None, "pooled_from": why}


def _write(run_dir: Path, record: dict) -> dict:
    record["pooled_basis"] = basis_text(record["pooled_from"])
    record["summary"] = summary(record)
    write_json(Path(run_dir) / FILE, record)
    return record


def summary(record: dict) -> dict:
    """Mean per-site balanced accuracy of each model over the sites that reported, and at how
    many of them the personal model is at least as good."""
    rows = [s for s in record["sites"].values() if s["reported"] and s["global"]
            and s["personal"]]
    if not rows:
        return {"sites_reported": 0}
    g = [s["global"]["balanced_accuracy"] for s in rows]
    p = [s["personal"]["balanced_accuracy"] for s in rows]
    return {"sites_reported": len(rows), "mean_global": float(np.mean(g)),
            "mean_personal": float(np.mean(p)),
            "sites_personal_at_least_global": int(sum(b >= a for a, b in zip(g, p)))}


__all__ = ["personalise_sites", "personalisation_done", "summary", "FILE", "COMPARED"]
