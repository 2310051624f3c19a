"""The logistic regression floor at the coordinator: exact federated logistic regression between
the statistics round and the first training round, the start of SAFN's wide path.

Newton's method (`safn_core.logistic.newton.solve`) runs at the coordinator; each of its rounds
asks every training site for the sums of its training split at every candidate penalty's
coefficients (`safn_core.federation.site_logistic`): plain ``logistic`` queries, or under
secure aggregation one ``logistic`` secure sum per Newton round, so the coordinator sees only
federation-wide sums. The result equals the pooled fit on the union of the training splits (to
the fixed-point precision under secure aggregation, far below 1e-6), with the penalty chosen by
the pooled class-balanced validation loss.

The floor needs every training site: one that cannot send its sums (a DP-SGD site never sends
exact statistics; a plain site with a class below ``min_cell``; a site that drops out) means
the run goes without it, and so does a run under central DP (its released models are noised;
an exact regression inside them would bypass that). The run says so (`Event.LOGISTIC`, code
``skipped``) and SAFN's wide path starts at zero. The fit is kept in ``<run folder>/logistic.json`` (a resumed run reuses it, and
the bundle and report read it).

K classes: the floor is the regression of SAFN's head (`safn_core.logistic.family.kind_for`:
binary for K = 2, else ordinal for ``model.head: ordinal``, multinomial for ``softmax``). K is
the number of class counts of the statistics round. The
kind travels in every request (`site_logistic.KIND`), the sums have the same fields with K
classes, and under secure aggregation their layout is
`safn_core.logistic.packing.kclass_packing`. ``logistic.json`` records the kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from safn_core.federation.events import Event
from safn_core.federation.protocol import (ARRAYS, CONFIG, REFUSAL, Aggregation, Config,
                                           Describe, Task)
from safn_core.io import write_json
from safn_core.federation.site_logistic import KIND
from safn_core.logistic import PENALTIES, LogisticFit, family
from safn_core.logistic.newton import FIELDS
from safn_core.secagg import SecureSumFailed
from safn.server.run_context import RunContext

FILE = "logistic.json"
MAX_ROUNDS = 50


class FloorSkipped(Exception):
    """The floor cannot be fitted on every training site's data (the reason, in words)."""


def floor_record(run_dir: Path) -> dict | None:
    """``logistic.json`` as written (None: the run has no floor file)."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_floor(run_dir: Path) -> LogisticFit | None:
    """The run's fit from ``logistic.json`` (None: not fitted, or skipped): a `LogisticFit`,
    or for K > 2 a `MultinomialFit` / `OrdinalFit` (`family.fit_from_dict`)."""
    record = floor_record(run_dir)
    return family.fit_from_dict(record["fit"]) if record and record.get("fit") else None


def floor_kind(cfg, n_classes: int, ordered: bool | None = None) -> str:
    """The floor's kind for K = ``n_classes`` (`family.kind_for`); ``ordered`` None: from the
    run's built-in target (a table's label: unordered)."""
    if ordered is None:
        from safn_core.targets import TARGETS

        target = TARGETS.get(cfg.data.target)
        ordered = bool(target.ordered) if cfg.data.source != "table" and target else False
    return family.kind_for(n_classes, ordered, cfg.model.head)


def fit_floor(run: RunContext, setup, pre, class_counts, ordered: bool | None = None
              ) -> LogisticFit | None:
    """The run's floor: kept from the run folder, fitted now, or None (skipped, with why).
    K = len(class_counts); ``ordered``: whether the target's classes are (None: the setup's
    target's order, `floor_kind`)."""
    path = Path(run.run_dir) / FILE
    if path.is_file():
        fit = load_floor(run.run_dir)
        if fit is not None:
            run.events.emit(Event.LOGISTIC, code="kept", file=str(path), penalty=fit.penalty)
        return fit
    nodes = sorted(setup.sites.eligible)
    names = {n: setup.sites.name(n) for n in nodes}
    n_features = len(pre.features)
    try:
        if run.cfg.privacy.mode == "distributed":
            raise FloorSkipped("distributed DP (privacy.mode: distributed): the floor's exact "
                               "sums of the training splits are outside the guarantee")
        if run.cfg.federation.central_dp.enabled:
            raise FloorSkipped("central DP (federation.central_dp) releases only noised models, "
                               "and an exact logistic regression in the model would bypass it")
        if ordered is None and getattr(setup, "target", None) is not None:
            ordered = bool(setup.target.ordered)  # the sites' target (a table's label too)
        kind = floor_kind(run.cfg, len(class_counts), ordered)
        weights = family.class_weights(kind, class_counts)
        # (under harmonisation the sites must fit on their harmonised data: the plain queries
        # carry the fit, `setup.extra`; the secure driver's base config already does)
        sums = _SecureRounds(run, setup.secure, nodes, names, pre, weights, n_features, kind) \
            if setup.secure is not None else _PlainRounds(run, nodes, names, pre, weights,
                                                          dict(setup.extra), kind)
        fit = family.solve(kind, sums, n_features, weights, PENALTIES, max_rounds=MAX_ROUNDS,
                           gradient_floor=getattr(sums, "gradient_floor", 0.0))
        expected = [int(c) for c in class_counts]
        if list(fit.n_train) != expected:
            raise FloorSkipped(f"its sums cover {sum(fit.n_train)} training participants, the "
                               f"statistics round {sum(expected)}")
    except (FloorSkipped, SecureSumFailed, ValueError) as exc:
        reason = " ".join(str(exc).split())
        write_json(path, {"fit": None, "skipped": reason})
        run.events.emit(Event.LOGISTIC, code="skipped", reason=reason)
        return None
    write_json(path, {"fit": fit.to_dict(), "kind": kind, "sites": sorted(names.values()),
                      "secure_aggregation": setup.secure is not None,
                      "clipped": sums.clipped, "features": list(pre.features)})
    run.events.emit(Event.LOGISTIC, code="fitted", sites=len(nodes),
                    participants=int(sum(fit.n_train)), iterations=fit.iterations,
                    penalty=fit.penalty, converged=fit.converged, clipped=sums.clipped,
                    secure=setup.secure is not None)
    return fit


def _request(pre, betas: np.ndarray, weights, kind: str = "binary") -> dict:
    out = {Config.PRE_MEAN: pre.mean_.tolist(), Config.PRE_SCALE: pre.scale_.tolist(),
           Config.LOGISTIC_BETAS: np.asarray(betas, dtype=np.float64).ravel().tolist(),
           Config.LOGISTIC_WEIGHTS: [float(w) for w in weights]}
    if kind != "binary":  # a binary request is as it always was
        out[KIND] = kind
    return out


class _PlainRounds:
    """A Newton round as ``logistic`` queries: the sum of the sites' replies."""

    def __init__(self, run: RunContext, nodes, names, pre, weights, extra: dict,
                 kind: str = "binary"):
        self.run, self.nodes, self.names, self.pre, self.weights = run, nodes, names, pre, weights
        self.kind = kind
        self.extra = extra  # what every message of the run carries (the harmonisation fit)
        self.clipped = 0

    def __call__(self, betas: np.ndarray) -> dict:
        run = self.run
        config = {Config.TASK: Task.LOGISTIC, Config.SAFN_CONFIG: run.shared_text,
                  Config.RUN_ID: run.run_id,
                  Config.HELD_OUT_SITES: list(run.cfg.server.held_out_sites),
                  **self.extra, **_request(self.pre, betas, self.weights, self.kind)}
        messages = [Message(RecordDict({CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in self.nodes]
        parts, answered = [], set()
        for reply in run.grid.send_and_receive(messages, timeout=run.cfg.federation.round_timeout):
            nid = reply.metadata.src_node_id
            name = self.names.get(nid, str(nid))
            if reply.has_error():
                raise FloorSkipped(f"site {name}'s ClientApp failed ({reply.error.reason})")
            if REFUSAL in reply.content.config_records:
                raise FloorSkipped(f"site {name} cannot take part: "
                                   f"{reply.content[REFUSAL][Describe.REASON]}")
            arrays = reply.content[ARRAYS]
            parts.append({k: arrays[k].numpy() for k in arrays.keys()})
            answered.add(nid)
        silent = sorted(self.names[n] for n in self.nodes if n not in answered)
        if silent:
            raise FloorSkipped(f"site(s) {', '.join(silent)} did not answer")
        total = {k: np.sum([p[k] for p in parts], axis=0) for k in (*FIELDS, "clipped")}
        self.clipped = max(self.clipped, int(total["clipped"][0]))
        return total


class _SecureRounds:
    """A Newton round as one secure sum among the training sites."""

    def __init__(self, run: RunContext, secure, nodes, names, pre, weights, n_features: int,
                 kind: str = "binary"):
        self.run, self.secure, self.nodes, self.names = run, secure, nodes, names
        self.pre, self.weights, self.kind = pre, weights, kind
        self.packing = family.packing(kind, n_features, len(PENALTIES), weights,
                                      run.cfg.federation.secagg.max_site_examples, len(nodes))
        self.iteration = 0
        self.clipped = 0
        # below this the summed gradient is fixed-point noise (safn_core.logistic.packing)
        self.gradient_floor = 10 * self.packing.error_bound("grad")

    def __call__(self, betas: np.ndarray) -> dict:
        self.iteration += 1
        ctx = self.secure.context(self.iteration, Aggregation.LOGISTIC)
        result = self.secure.sum_now(ctx, self.packing, self.nodes,
                                     _request(self.pre, betas, self.weights, self.kind),
                                     next_ctx=self.secure.context(self.iteration + 1,
                                                                  Aggregation.LOGISTIC))
        refused = {self.names.get(nid, str(nid)): str(content[REFUSAL][Describe.REASON])
                   for nid, content in self.secure.last_contents.items()
                   if REFUSAL in content.config_records}
        if refused:
            raise FloorSkipped("; ".join(f"site {k} cannot take part: {v}"
                                         for k, v in sorted(refused.items())))
        if len(result.contributors) < len(self.nodes):
            raise FloorSkipped(f"{len(self.nodes) - len(result.contributors)} site(s) dropped "
                               "out of its secure sum")
        values = {k: np.asarray(v) for k, v in result.values.items()}
        if result.clipped and any(result.clipped.values()):
            raise FloorSkipped(f"its sums exceeded their fixed-point bounds ({result.clipped})")
        self.clipped = max(self.clipped, int(values["clipped"][0]))
        return values


def floor_wanted(cfg) -> bool:
    """The floor is fitted when SAFN has a wide path to start from it (``model.wide``)."""
    return cfg.model.wide != "off"
