"""The SAFN ClientApp: a site's side of the federation, thin over `safn_core.federation`.

Three message types, each answered from the site's own data:

- ``query`` (describe): training-split statistics, class counts and the data structure (the
  statistics round); refused with a reason when a class has fewer than ``min_cell`` people;
- ``train``: local epochs from the global weights with the global preprocessing (sent by the
  server in the train config), FedProx's proximal term when the strategy asks for it;
- ``evaluate``: per-class score histograms of the validation and test splits (zeros and a flag
  when a class has fewer than ``min_cell`` people there).

Nothing participant-level is ever put in a reply. A site is found from the node config: in
simulation ``partition-id`` (a virtual site written by safn-sim into the run folder); in
deployment ``site-config`` (the site's own site.yaml: data, split seed, privacy, min_cell). The
run's shared settings (model, local training, federation) arrive in every message as
``safn-config``, so a site never reads the coordinator's files. Sites are cached per process: a
Ray actor builds each site's split and arrays once per run.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_aggregation as secure
from client.audit import audit_mod
from safn_core.data.cohort_store import read_cohort
from safn_core.federation.loop import site_seed
from safn_core.federation.protocol import (ARRAYS, CONFIG, MASKED, METRICS, MODEL, REFUSAL, SITE,
                                           STATISTICS, STATS, WITHHELD, Aggregation, Config,
                                           Describe, Layout, Metric, NodeConfig, Task,
                                           evaluation_to_metrics, modalities_to_record)
from safn_core.federation.run_folder import run_dir_from
from safn_core.federation.secure_records import (evaluate_values, released_scaled,
                                                 released_values, scaled_values,
                                                 statistics_values, train_values)
from safn_core.federation.shared_config import shared_config, site_run_config
from safn_core.federation.site import Site, state_to_numpy
from safn_core.federation.site_privacy import site_statistics, train_round
from safn_core.training.local import make_model
from safn_core.preprocess import FeatureStats, Preprocessor

app = ClientApp(mods=[audit_mod])  # the site's audit trail of what leaves it


@lru_cache(maxsize=256)
def _sim_site(run_dir: Path, partition_id: int, shared_text: str) -> Site:
    """A virtual site: its table from the simulation's run folder (standing in for its disk)."""
    from simulations.virtual_sites import load_virtual_site

    name, cohort = load_virtual_site(run_dir, partition_id)
    return Site(name, cohort, shared_config(shared_text))


@lru_cache(maxsize=4)
def _deployed_site(site_file: str, shared_text: str) -> Site:
    """A real site: its own file (split seed, privacy, min_cell) + the run's settings, and the
    cohort that safn-client checked against the data contract and prepared at start."""
    from safn_core.config import load_config

    own = load_config(site_file)
    if own.site is None:
        raise ValueError(f"{site_file}: no 'site:' section; a SuperNode's site-config must be "
                         "the site's own site.yaml")
    cfg = site_run_config(shared_config(shared_text), own)
    cohort = read_cohort(Path(own.site.state_dir).resolve() / "cohort" / "cohort.json")
    return Site(own.site.name, cohort, cfg)


def site_for(context: Context, config: ConfigRecord) -> Site:
    """This node's site, from the node config, with the run's settings from the message.

    Deployment: ``site-config`` (the site's own site.yaml, set by safn-client). Simulation:
    ``partition-id`` (a virtual site written by safn-sim into the run folder).
    """
    import torch

    torch.set_num_threads(1)
    shared_text = str(config[Config.SAFN_CONFIG])
    node = context.node_config
    if NodeConfig.SITE_CONFIG in node:
        return _deployed_site(str(node[NodeConfig.SITE_CONFIG]), shared_text)
    run_dir = run_dir_from(dict(context.run_config))
    return _sim_site(run_dir, int(node[NodeConfig.PARTITION_ID]), shared_text)


def _partition(context: Context) -> int:
    return int(context.node_config.get(NodeConfig.PARTITION_ID, 0))


_PRE_CACHE: dict = {}


def _preprocessor(site: Site, config: ConfigRecord) -> Preprocessor:
    """The global preprocessing sent with the model; one object per parameters, so the site's
    preprocessed arrays are computed once per run, not once per round."""
    mean = np.asarray(config[Config.PRE_MEAN], dtype=np.float64)
    scale = np.asarray(config[Config.PRE_SCALE], dtype=np.float64)
    if len(mean) != len(site.cohort.features):
        raise ValueError(f"site {site.name}: the server's preprocessing has {len(mean)} features, "
                         f"this site {len(site.cohort.features)}")
    key = (site.name, mean.tobytes(), scale.tobytes())
    if key not in _PRE_CACHE:
        if len(_PRE_CACHE) > 64:
            _PRE_CACHE.clear()
        pre = Preprocessor(site.cohort.modalities)
        pre.mean_, pre.scale_ = mean, scale
        _PRE_CACHE[key] = pre
    return _PRE_CACHE[key]


@lru_cache(maxsize=8)
def _layout(site: Site, fingerprint: str) -> Layout:
    """This site's model layout (built from its own model), checked against the coordinator's."""
    layout = Layout.of(state_to_numpy(make_model(site.cohort.modalities, site.cfg.model, 0)))
    layout.check(fingerprint)
    return layout


def _weights(site: Site, record: ArrayRecord, config: ConfigRecord) -> dict[str, np.ndarray]:
    """The global model from the message's one vector (`safn_core.federation.wire`)."""
    return _layout(site, str(config[Config.MODEL_LAYOUT])).unflatten(record[MODEL].numpy())


def _wire(site: Site, weights: dict[str, np.ndarray], config: ConfigRecord) -> ArrayRecord:
    return ArrayRecord({MODEL: Array(_layout(site, str(config[Config.MODEL_LAYOUT]))
                                     .flatten(weights))})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """QUERY messages: the statistics round's ``describe``, and the two phases of a secure sum
    the coordinator redoes or runs on its own (``secagg-keys``, ``secagg-mask``)."""
    task = str(msg.content[CONFIG].get(Config.TASK, Task.DESCRIBE))
    if task == Task.SECAGG_KEYS:
        return _secagg_keys(msg, context)
    if task == Task.SECAGG_MASK:
        return _secagg_mask(msg, context)
    return describe(msg, context)


def _session(site: Site, context: Context):
    return secure.session(_state_dir(site, context), context.node_id)


def _secagg_keys(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = site_for(context, config)
    key = _session(site, context).public_key(secure.context_of(str(config[secure.CONTEXT])))
    return Message(RecordDict({secure.RECORD: ConfigRecord({Describe.PUBLIC_KEY: key})}),
                   reply_to=msg)


def _secagg_mask(msg: Message, context: Context) -> Message:
    """Mask this site's values for one secure sum: the statistics are computed here (the first
    time; kept on the site's disk for a retry); training and evaluation values were kept when
    the site trained or evaluated, so a retry after a dropout repeats neither."""
    config = msg.content[CONFIG]
    site = site_for(context, config)
    sess, state = _session(site, context), _state_dir(site, context)
    ctx = secure.context_of(str(config[secure.CONTEXT]))
    content = {}
    try:
        vector = secure.remask(sess, state, config)
    except ValueError:
        if ctx.name not in (Aggregation.STATISTICS, Aggregation.STATISTICS_SCALED):
            raise
        values, mechanism = _statistics_values(msg, context, site, config, ctx.name)
        content[STATISTICS] = ConfigRecord(mechanism)  # the site's own privacy report
        vector = secure.mask(sess, state, config, values)
    return Message(RecordDict({ARRAYS: ArrayRecord({MASKED: Array(vector)}),
                               secure.RECORD: secure.announce(sess, config), **content}),
                   reply_to=msg)


def _statistics_values(msg: Message, context: Context, site: Site, config: ConfigRecord,
                       name: str) -> tuple[dict, dict]:
    """What the site puts into the statistics' two secure sums: its exact training-split
    statistics, or (``privacy.statistics: gaussian``) its one Gaussian release of them, charged
    to its ledger once per run (`site_privacy.site_statistics`); a site that cannot release
    them (a ledger problem, an exhausted budget) contributes zeros and says why."""
    out = site_statistics(
        site, request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=_state_dir(site, context),
        run_id=str(config.get(Config.RUN_ID, f"flower-run-{msg.metadata.run_id}")),
        seed=site_seed(site.cfg.train.seed, 0, _partition(context)), check_cells=False)
    frame = site.cohort.table.loc[site.split.train, list(site.cohort.features)]
    scales = (np.asarray(config[Config.SECAGG_SCALES], dtype=np.float64)
              if name == Aggregation.STATISTICS_SCALED else None)
    if out.refusal is not None:
        n = len(site.cohort.features)
        zeros = FeatureStats(tuple(site.cohort.features), np.zeros(n), np.zeros(n), np.zeros(n))
        values = (released_values(zeros, [0, 0]) | {"sites": 0} if scales is None
                  else released_scaled(zeros, scales))
        return values, {Describe.STATISTICS: Describe.REFUSED, Describe.REASON: out.refusal}
    if out.mechanism[Describe.STATISTICS] == Describe.EXACT:
        values = (statistics_values(out.stats, [int(c) for c in out.counts], frame)
                  if scales is None else scaled_values(frame, scales))
    else:
        values = (released_values(out.stats, out.counts) if scales is None
                  else released_scaled(out.stats, scales))
    return values, {k: v for k, v in out.mechanism.items()}


def describe(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = site_for(context, config)
    if bool(config.get(Config.SECURE_AGGREGATION, False)) \
            and site.name not in list(config.get(Config.HELD_OUT_SITES, [])):
        # under secure aggregation the statistics travel only masked (`_secagg_mask`): here the
        # site sends its name, data structure and public key for the statistics' secure sum
        return Message(RecordDict({
            SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: True,
                                Describe.LABEL_NAMES: list(site.cohort.label_names),
                                **modalities_to_record(site.cohort.modalities)}),
            secure.RECORD: secure.announce(_session(site, context), config)}), reply_to=msg)
    if site.name in list(config.get(Config.HELD_OUT_SITES, [])):
        # external validation only: the site's data shapes neither preprocessing nor training,
        # so it sends its name and data structure and no statistics
        return Message(RecordDict({SITE: ConfigRecord({
            Describe.NAME: site.name, Describe.OK: True, Describe.HELD_OUT: True,
            Describe.LABEL_NAMES: list(site.cohort.label_names),
            **modalities_to_record(site.cohort.modalities)})}), reply_to=msg)
    # exact statistics, or (privacy.statistics: gaussian) the same fields through the Gaussian
    # mechanism, charged to the site's ledger (`site_privacy.site_statistics`)
    out = site_statistics(
        site, request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=_state_dir(site, context),
        run_id=str(config.get(Config.RUN_ID, f"flower-run-{msg.metadata.run_id}")),
        seed=site_seed(site.cfg.train.seed, 0, _partition(context)))
    if out.refusal is not None:
        return Message(RecordDict({
            SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: False,
                                Describe.REASON: out.refusal})}),
            reply_to=msg)
    stats, counts = out.stats, out.counts
    exact = out.mechanism[Describe.STATISTICS] == Describe.EXACT
    count = int if exact else float  # noised class counts are not integers
    return Message(RecordDict({
        SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: True,
                            Describe.LABEL_NAMES: list(site.cohort.label_names),
                            **modalities_to_record(site.cohort.modalities),
                            **{k if k == Describe.STATISTICS else Describe.STATISTICS_PREFIX + k: v
                               for k, v in out.mechanism.items()}}),
        STATS: ArrayRecord({"count": Array(stats.count), "total": Array(stats.total),
                              "total_sq": Array(stats.total_sq)}),
        METRICS: MetricRecord({Metric.N_TRAIN: count(sum(counts)),
                               Metric.CLASS_0: count(counts[0]),
                               Metric.CLASS_1: count(counts[1])}),
    }), reply_to=msg)


def _state_dir(site: Site, context: Context) -> Path:
    """Where the site keeps its own state (privacy ledger): a deployed site's
    ``site.state_dir``; a virtual site's folder outside the run folder (`simulations.virtual_sites`)."""
    if site.cfg.site is not None:
        return Path(site.cfg.site.state_dir)
    from simulations.virtual_sites import virtual_site_state_dir

    return virtual_site_state_dir(run_dir_from(dict(context.run_config)), site.name)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training round under the site's privacy settings (`site_privacy.train_round`): the same
    metric keys from every site; a refusal (budget exhausted, ledger problem) carries no arrays,
    only its metrics (ε so far) and its one-line reason."""
    config = msg.content[CONFIG]
    site = site_for(context, config)
    server_round = int(config[Config.SERVER_ROUND])
    out = train_round(
        site, _weights(site, msg.content[ARRAYS], config), _preprocessor(site, config),
        list(config[Config.CLASS_COUNTS]),
        request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=_state_dir(site, context),
        run_id=str(config.get(Config.RUN_ID, f"flower-run-{msg.metadata.run_id}")),
        rounds=site.cfg.federation.rounds, epochs=int(config[Config.LOCAL_EPOCHS]),
        server_round=server_round,
        seed=site_seed(int(config[Config.SEED]), server_round, _partition(context)),
        proximal_mu=float(config.get(Config.PROXIMAL_MU, 0.0)))
    if secure.is_secure(config):
        return _secure_train_reply(msg, context, site, config, out)
    if out.refusal is not None:
        print(f"site {site.name}, round {server_round}: not training: {out.refusal}", flush=True)
        return Message(RecordDict({METRICS: MetricRecord(out.metrics),
                                   REFUSAL: ConfigRecord({Describe.REASON: out.refusal})}),
                       reply_to=msg)
    return Message(RecordDict({
        ARRAYS: _wire(site, out.weights, config),
        METRICS: MetricRecord(out.metrics),
    }), reply_to=msg)


PLAIN_ONLY = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS)
"""Training metrics that would be per-site statistics: under secure aggregation they travel
inside the masked vector, never beside it."""


def _secure_train_reply(msg: Message, context: Context, site: Site, config: ConfigRecord,
                        out) -> Message:
    """The update as ``n · w`` and ``n`` inside one masked vector. A site that does not train
    (a refusal, or an update it finds non-finite: it screens itself, since the coordinator
    cannot) sends masked zeros, so every other site's masks still cancel."""
    refusal, vector = out.refusal, None
    n = int(out.metrics.get(Metric.NUM_EXAMPLES, 0))
    loss = float(out.metrics.get(Metric.TRAIN_LOSS, WITHHELD))
    if refusal is None:
        vector = _layout(site, str(config[Config.MODEL_LAYOUT])).flatten(out.weights)
        if not np.all(np.isfinite(vector)):
            refusal, vector = "its update has non-finite values (NaN/Inf); not sent", None
    if vector is None:
        print(f"site {site.name}, round {config[Config.SERVER_ROUND]}: not training: {refusal}",
              flush=True)
        vector = np.zeros(_layout(site, str(config[Config.MODEL_LAYOUT])).size)
        n = 0
    fed = shared_config(str(config[Config.SAFN_CONFIG])).federation
    weight = None
    if fed.central_dp.enabled and n > 0:
        # central DP: the update clipped here (the coordinator never sees it), equal weights
        update = vector - _layout(site, str(config[Config.MODEL_LAYOUT])).flatten(
            _weights(site, msg.content[ARRAYS], config))
        norm = float(np.linalg.norm(update))
        vector = update * min(1.0, fed.central_dp.clipping_norm / max(norm, 1e-12))
        weight = 1
    sess = _session(site, context)
    masked = secure.mask(sess, _state_dir(site, context), config,
                         train_values(vector, n, loss, fed.secagg.weight_bound, weight))
    metrics = {k: v for k, v in out.metrics.items() if k not in PLAIN_ONLY}
    if refusal is not None:
        metrics[Metric.REFUSED] = 1
    content = {ARRAYS: ArrayRecord({MASKED: Array(masked)}),
               METRICS: MetricRecord(metrics), secure.RECORD: secure.announce(sess, config)}
    if refusal is not None:
        content[REFUSAL] = ConfigRecord({Describe.REASON: refusal})
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = site_for(context, config)
    held_out = site.name in list(config.get(Config.HELD_OUT_SITES, []))
    safe = secure.is_secure(config) and not held_out
    res = site.evaluate(_weights(site, msg.content[ARRAYS], config),
                        _preprocessor(site, config), site.cfg.model,
                        int(config[Config.HISTOGRAM_BINS]), held_out=held_out,
                        withhold=not safe)
    if safe:
        return _secure_evaluate_reply(msg, context, site, config, res)
    return Message(RecordDict({METRICS: MetricRecord(evaluation_to_metrics(res))}),
                   reply_to=msg)


def _secure_evaluate_reply(msg: Message, context: Context, site: Site, config: ConfigRecord,
                           res: dict) -> Message:
    """Histograms and the validation loss sum inside one masked vector; beside it only this
    site's own ROC-AUC and test size, and only where its own counts pass ``min_cell``."""
    from safn_core.metrics import metrics_from_histogram

    sess = _session(site, context)
    masked = secure.mask(sess, _state_dir(site, context), config, evaluate_values(res))
    own = {}
    if not res["test_withheld"]:
        own = {Metric.SITE_ROC_AUC: float(metrics_from_histogram(res["test"], 0.5)["roc_auc"]),
               Metric.SITE_N: int(res["test"].sum())}
    return Message(RecordDict({ARRAYS: ArrayRecord({MASKED: Array(masked)}),
                               METRICS: MetricRecord({Metric.SITE_REPORTED: int(bool(own)),
                                                      **own}),
                               secure.RECORD: secure.announce(sess, config)}), reply_to=msg)
