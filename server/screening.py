"""Screening of training replies: what the coordinator keeps, refuses to use, and records.

A reply is used only if it carries finite model arrays of the run's names and shapes and a
positive example count; a site's refusal to train (its privacy budget, a ledger problem) and a
failed site are recorded with the site's name and left out, never averaged. Rejections are
records with a code (`Rejection`) and the facts behind it; `safn_core.federation.event_text`
makes the English.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from safn_core.federation.protocol import (ARRAYS, METRICS, REFUSAL, WITHHELD, Describe, Metric,
                                           is_withheld)


class Rejection:
    """Codes of a rejected training reply (``rejected`` entries of a round's history)."""

    SITE_FAILED = "site_failed"  # the ClientApp failed or the node went away (detail: Flower's)
    NO_ARRAYS = "no_arrays"
    WRONG_NAMES = "wrong_names"  # arrays: up to 3 odd names
    WRONG_SHAPE = "wrong_shape"  # array, shape, expected
    NON_FINITE = "non_finite"  # array
    NO_EXAMPLES = "no_examples"
    TOO_FEW = "too_few"  # kept, min_sites: the model is unchanged this round (site "-")
    NO_REPLY = "no_reply"  # no reply by the round's deadline (reason: in English, with it)


PRIVACY_KEYS = {Metric.DP: "dp", Metric.EPSILON: "epsilon", Metric.DELTA: "delta",
                Metric.EPSILON_BUDGET: "epsilon_budget",
                Metric.NOISE_MULTIPLIER: "noise_multiplier", Metric.DP_STEPS: "dp_steps",
                Metric.REFUSED: "refused"}


def privacy_of(metrics) -> dict | None:
    """A site's privacy report from its training metrics (None for a reply without one)."""
    if metrics is None or Metric.DP not in metrics:
        return None
    out = {name: metrics[key] for key, name in PRIVACY_KEYS.items() if key in metrics}
    out["dp"] = bool(int(out.get("dp", 0)))
    out["refused"] = bool(int(out.get("refused", 0)))
    for key in ("epsilon", "epsilon_budget"):
        if key in out and is_withheld(out[key]):
            out[key] = None  # no guarantee (a site without DP)
    return out


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def problem(msg: Message, expected: dict[str, tuple] | None) -> dict | None:
    """What makes a training reply unusable (a rejection record without round and site), or
    None."""
    if ARRAYS not in msg.content.array_records:
        return {"code": Rejection.NO_ARRAYS}
    arrays = msg.content[ARRAYS]
    if expected is not None:
        if set(arrays.keys()) != set(expected):
            return {"code": Rejection.WRONG_NAMES,
                    "arrays": sorted(set(arrays.keys()) ^ set(expected))[:3]}
        for k, a in arrays.items():
            if tuple(a.shape) != tuple(expected[k]):
                return {"code": Rejection.WRONG_SHAPE, "array": k, "shape": list(a.shape),
                        "expected": list(expected[k])}
    for k, a in arrays.items():
        if not np.all(np.isfinite(a.numpy())):
            return {"code": Rejection.NON_FINITE, "array": k}
    metrics = msg.content.metric_records.get(METRICS)
    if metrics is None or int(metrics.get(Metric.NUM_EXAMPLES, 0)) <= 0:
        return {"code": Rejection.NO_EXAMPLES}
    return None


@dataclass
class TrainingReplies:
    """One round's training replies, sorted out (built by `screen`)."""

    kept: list[Message] = field(default_factory=list)  # usable, sorted by site
    privacy: dict[str, dict] = field(default_factory=dict)  # site -> report (refusals too)
    refused: list[dict] = field(default_factory=list)  # {"site", "reason"}: the site's words
    rejected: list[dict] = field(default_factory=list)  # {"site", "code", ...}
    answered: list[str] = field(default_factory=list)  # sites whose reply carries an update


def note_reply(m: Message, site: str, out: TrainingReplies) -> bool:
    """Record a training reply's failure, privacy report or refusal in ``out``; True when it
    carries an update to use."""
    if m.has_error():
        out.rejected.append({"site": site, "code": Rejection.SITE_FAILED,
                             "detail": one_line(m.error.reason)})
        return False
    metrics = m.content.metric_records.get(METRICS)
    report = privacy_of(metrics)
    if report is not None:
        out.privacy[site] = report
    if metrics is not None and int(metrics.get(Metric.REFUSED, 0)) == 1:
        why = m.content.config_records.get(REFUSAL)
        out.refused.append({"site": site, "reason": one_line(
            why[Describe.REASON] if why is not None and Describe.REASON in why
            else "no reason given")})
        return False
    out.answered.append(site)
    return True


def screen(replies, site_of, expected: dict[str, tuple] | None) -> TrainingReplies:
    """The round's training replies sorted out; the kept ones sorted by site, their arrays in
    the global order (Flower's DP clipping pairs them with the global arrays by position)."""
    out = TrainingReplies()
    for m in replies:
        site = site_of(m)
        if not note_reply(m, site, out):
            continue
        reason = problem(m, expected)
        if reason is not None:
            out.rejected.append({"site": site, **reason})
        else:
            out.kept.append(m)
    out.kept.sort(key=site_of)
    for m in out.kept:
        arrays = m.content[ARRAYS]
        if expected is not None and list(arrays.keys()) != list(expected):
            m.content[ARRAYS] = ArrayRecord({k: arrays[k] for k in expected})
    return out


def no_reply(sent, replies, site_of_node, timeout: float | None) -> list[dict]:
    """The sites an instruction was ``sent`` to whose reply is not among ``replies`` (none came
    by the round's deadline): the round went on without them. A reply that comes later is never
    pulled (the Grid asks for the replies to the messages of the exchange it is collecting)."""
    answered = {m.metadata.reply_to_message_id for m in replies}
    limit = "" if timeout is None else f", {timeout:.0f} s"
    return [{"site": site_of_node(m.metadata.dst_node_id), "code": Rejection.NO_REPLY,
             "reason": f"no reply by the round's deadline (federation.round_timeout{limit}); "
                       "the round went on without it"}
            for m in sent if m.metadata.message_id not in answered]


def too_few(kept: int, min_sites: int) -> dict:
    """The rejection that leaves the model unchanged: fewer usable updates than min_sites."""
    return {"site": "-", "code": Rejection.TOO_FEW, "kept": int(kept), "min_sites": int(min_sites)}


def train_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Flower's train metrics aggregation: examples summed, loss weighted by examples over the
    sites that report one (a DP site withholds its loss as −1); ε and every other privacy key
    are never averaged."""
    n = [float(r[METRICS][Metric.NUM_EXAMPLES]) for r in replies]
    loss = [float(r[METRICS][Metric.TRAIN_LOSS]) for r in replies]
    reported = [(w, lo) for w, lo in zip(n, loss) if not is_withheld(lo)]
    weight = sum(w for w, _ in reported)
    return MetricRecord({Metric.NUM_EXAMPLES: int(sum(n)),
                         Metric.TRAIN_LOSS: (float(sum(w * lo for w, lo in reported) / weight)
                                             if weight else WITHHELD)})


def evaluate_metrics(replies, weighted_by_key: str) -> MetricRecord:
    """Flower's evaluate metrics aggregation: only the example count (the coordinator builds
    the metrics from score histograms; averaging counts would be wrong)."""
    return MetricRecord({Metric.NUM_EXAMPLES: int(sum(int(r[METRICS][Metric.NUM_EXAMPLES])
                                                      for r in replies))})
