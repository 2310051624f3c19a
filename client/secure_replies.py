"""A site's replies under secure aggregation: masked vectors, and the secure sums it is asked
to redo.

Training and evaluation replies carry one masked vector (`safn.client.secure_aggregation`) and,
beside it, only what is not a per-site statistic; a site that does not train sends masked zeros
so that every other site's masks still cancel. The statistics are masked in two secure sums
(`safn_core.federation.secure_records`); ``secagg-keys`` / ``secagg-mask`` queries redo a sum
after a dropout without repeating any training.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from safn.client import harmonisation_replies as harmonisation
from safn.client import logistic_replies as logistic
from safn.client import secure_aggregation as secure
from safn.client import site_context as sc
from safn.client.site_console import say
from safn_core.federation.sampling import site_seed
from safn_core.federation.protocol import (ARRAYS, CONFIG, MASKED, METRICS, REFUSAL, STATISTICS,
                                           WITHHELD, Aggregation, Config, Describe, Metric)
from safn_core.federation.secure_records import (evaluate_values, released_scaled,
                                                 released_values, scaled_values,
                                                 statistics_values, train_values)
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site import Site
from safn_core.federation.site_privacy import site_statistics
from safn_core.preprocess import FeatureStats


def secagg_keys(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    key = sc.session(site, context).public_key(secure.context_of(str(config[secure.CONTEXT])))
    return Message(RecordDict({secure.RECORD: ConfigRecord({Describe.PUBLIC_KEY: key})}),
                   reply_to=msg)


def secagg_mask(msg: Message, context: Context) -> Message:
    """Mask this site's values for one secure sum: the statistics are computed here (the first
    time; kept on the site's disk for a retry); training and evaluation values were kept when
    the site trained or evaluated, so a retry after a dropout repeats neither."""
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    sess, state = sc.session(site, context), sc.state_dir(site, context)
    ctx = secure.context_of(str(config[secure.CONTEXT]))
    content = {}
    try:
        vector = secure.remask(sess, state, config)
    except secure.TooFewShares as exc:
        say(str(exc))
        raise
    except ValueError:
        step = harmonisation.step_of(ctx.name)
        if step is not None:  # federated ComBat's sums (or zeros and the site's reason)
            values, reason = harmonisation.sums(site, config, step)
            if reason is not None:
                say(f"harmonisation: not taking part: {reason} (masked zeros sent)")
                content[REFUSAL] = ConfigRecord({Describe.REASON: reason})
                values = harmonisation.zeros(site, config, step)
            values["n"] = np.rint(values["n"]).astype(np.int64)  # a count field
        elif ctx.name == Aggregation.LOGISTIC:  # a Newton round of the logistic floor
            values, reason = logistic.values(site, config, secure=True)
            if reason is not None:
                say(f"logistic regression floor: not taking part: {reason} (masked zeros sent)")
                content[REFUSAL] = ConfigRecord({Describe.REASON: reason})
        elif ctx.name in (Aggregation.STATISTICS, Aggregation.STATISTICS_SCALED):
            values, mechanism = statistics_values_of(msg, context, site, config, ctx.name)
            content[STATISTICS] = ConfigRecord(mechanism)  # the site's own privacy report
        else:
            raise
        vector = secure.mask(sess, state, config, values)
    return Message(RecordDict({ARRAYS: ArrayRecord({MASKED: Array(vector)}),
                               secure.RECORD: secure.announce(sess, config), **content}),
                   reply_to=msg)


def statistics_values_of(msg: Message, context: Context, site: Site, config: ConfigRecord,
                       name: str) -> tuple[dict, dict]:
    """What the site puts into the statistics' two secure sums: its exact training-split
    statistics, or (``privacy.statistics: gaussian``) its one Gaussian release of them, charged
    to its ledger once per run (`site_privacy.site_statistics`); a site that cannot release
    them (a ledger problem, an exhausted budget) contributes zeros and says why."""
    out = site_statistics(
        site, request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=sc.state_dir(site, context),
        run_id=sc.run_id(msg, config),
        seed=site_seed(site.cfg.train.seed, 0, sc.partition(context)), check_cells=False)
    frame = site.cohort.table.loc[site.split.train, list(site.cohort.features)]
    scales = (np.asarray(config[Config.SECAGG_SCALES], dtype=np.float64)
              if name == Aggregation.STATISTICS_SCALED else None)
    if out.refusal is not None:
        n = len(site.cohort.features)
        zeros = FeatureStats(tuple(site.cohort.features), np.zeros(n), np.zeros(n), np.zeros(n))
        values = (released_values(zeros, [0] * site.cohort.n_classes) | {"sites": 0}
                  if scales is None
                  else released_scaled(zeros, scales))
        return values, {Describe.STATISTICS: Describe.REFUSED, Describe.REASON: out.refusal}
    if out.mechanism[Describe.STATISTICS] == Describe.EXACT:
        values = (statistics_values(out.stats, [int(c) for c in out.counts], frame)
                  if scales is None else scaled_values(frame, scales))
    else:
        values = (released_values(out.stats, out.counts) if scales is None
                  else released_scaled(out.stats, scales))
    return values, {k: v for k, v in out.mechanism.items()}


PLAIN_ONLY = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS)
"""Training metrics that would be per-site statistics: under secure aggregation they travel
inside the masked vector, never beside it."""


def secure_train_reply(msg: Message, context: Context, site: Site, config: ConfigRecord,
                        out) -> Message:
    """The update as ``n · w`` and ``n`` inside one masked vector. A site that does not train
    (a refusal, or an update it finds non-finite: it screens itself, since the coordinator
    cannot) sends masked zeros, so every other site's masks still cancel."""
    refusal, vector = out.refusal, None
    n = int(out.metrics.get(Metric.NUM_EXAMPLES, 0))
    loss = float(out.metrics.get(Metric.TRAIN_LOSS, WITHHELD))
    if refusal is None:
        vector = sc.layout(site, str(config[Config.MODEL_LAYOUT])).flatten(out.weights)
        if not np.all(np.isfinite(vector)):
            refusal, vector = "its update has non-finite values (NaN/Inf); not sent", None
            say(f"round {config[Config.SERVER_ROUND]}: {refusal} (masked zeros sent instead)")
    if vector is None:
        vector = np.zeros(sc.layout(site, str(config[Config.MODEL_LAYOUT])).size)
        n = 0
    fed = shared_config(str(config[Config.SAFN_CONFIG])).federation
    weight = None
    if fed.central_dp.enabled and n > 0:
        # central DP: the update clipped here (the coordinator never sees it), equal weights
        update = vector - sc.layout(site, str(config[Config.MODEL_LAYOUT])).flatten(
            sc.global_weights(site, msg.content[ARRAYS], config))
        norm = float(np.linalg.norm(update))
        vector = update * min(1.0, fed.central_dp.clipping_norm / max(norm, 1e-12))
        weight = 1
    sess = sc.session(site, context)
    masked = secure.mask(sess, sc.state_dir(site, context), config,
                         train_values(vector, n, loss, fed.secagg.weight_bound, weight))
    metrics = {k: v for k, v in out.metrics.items() if k not in PLAIN_ONLY}
    if refusal is not None:
        metrics[Metric.REFUSED] = 1
    content = {ARRAYS: ArrayRecord({MASKED: Array(masked)}),
               METRICS: MetricRecord(metrics), secure.RECORD: secure.announce(sess, config)}
    if refusal is not None:
        content[REFUSAL] = ConfigRecord({Describe.REASON: refusal})
    return Message(RecordDict(content), reply_to=msg)


def secure_evaluate_reply(msg: Message, context: Context, site: Site, config: ConfigRecord,
                           res: dict) -> Message:
    """Histograms and the validation loss sum inside one masked vector; beside it only this
    site's own ROC-AUC and test size, and only where its own counts pass ``min_cell``."""
    from safn_core.metrics import metrics_from_histogram
    from safn_core.multiclass import class_counts_from_histogram, roc_auc_from_class_histogram

    sess = sc.session(site, context)
    masked = secure.mask(sess, sc.state_dir(site, context), config, evaluate_values(res))
    own = {}
    if not res["test_withheld"] and res["test"].ndim == 3:  # K > 2: macro one-vs-rest
        auc = roc_auc_from_class_histogram(res["test"])
        own = {Metric.SITE_ROC_AUC: float("nan") if auc is None else auc,
               Metric.SITE_N: int(class_counts_from_histogram(res["test"]).sum())}
    elif not res["test_withheld"]:
        own = {Metric.SITE_ROC_AUC: float(metrics_from_histogram(res["test"], 0.5)["roc_auc"]),
               Metric.SITE_N: int(res["test"].sum())}
    return Message(RecordDict({ARRAYS: ArrayRecord({MASKED: Array(masked)}),
                               METRICS: MetricRecord({Metric.SITE_REPORTED: int(bool(own)),
                                                      **own}),
                               secure.RECORD: secure.announce(sess, config)}), reply_to=msg)
