"""The SAFN ClientApp: a site's side of the federation, thin over `safn_core.federation`.

Three message types, each answered from the site's own data:

- ``query`` (describe): training-split statistics, class counts (one per class of the site's
  target, which the reply names) and the data structure (the statistics round); refused with a reason when a class has fewer than ``min_cell`` people;
- ``train``: local epochs from the global weights with the global preprocessing (sent by the
  server in the train config), FedProx's proximal term when the strategy asks for it;
- ``evaluate``: per-class score histograms of the validation and test splits (zeros and a flag
  when a class has fewer than ``min_cell`` people there);
- ``dp-plan`` (a query, distributed DP runs): the noise multiplier the site's budget needs
  (`safn.client.distributed_replies`, which also answers such a run's ``train`` messages with a
  noise share);
- ``logistic`` (a query, plain runs): a Newton round's sums of the logistic regression floor
  (`safn.client.logistic_replies`; under secure aggregation inside a secure sum);
- ``personalise`` (a query, personalised runs only): the site's personal model against the
  global one on its test split (`safn.client.personal_replies`; Ditto's personal training happens
  inside ``train``).

Nothing participant-level is ever put in a reply. Which site a message is for and how to read
its model: `safn.client.site_context`; the replies under secure aggregation: `safn.client.secure_replies`;
every key on the wire: `safn_core.federation.protocol`.

`make_client_app` builds the ClientApp over a `SiteSource`, the one part that differs between
modes: ``app`` below is a deployed site's (the app bundle's component ``safn.client.app:app``), the
simulation's is built in `safn.simulations.client_app` (virtual sites, their files on a Ray cluster).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from safn.client import distributed_replies as distributed
from safn.client import harmonisation_replies as harmonisation
from safn.client import logistic_replies as logistic
from safn.client import personal_replies as personal
from safn.client import secure_aggregation as secure
from safn.client import secure_replies as replies
from safn.client import site_context as sc
from safn.client.audit import audit_mod
from safn.client.run_end import record_run_end
from safn.client.site_console import say
from safn_core.federation.sampling import site_seed
from safn_core.federation.protocol import (ARRAYS, CONFIG, METRICS, REFUSAL, SITE, STATS, Config,
                                           Describe, Metric, Task, class_counts_to_metrics,
                                           evaluation_to_metrics, modalities_to_record)
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site_privacy import site_statistics, train_round


def make_client_app(sites: sc.SiteSource, mods: Sequence[Mod] = ()) -> ClientApp:
    """The SAFN ClientApp: the handlers below, answering for the sites ``sites`` finds.

    ``mods`` run first, around everything else (e.g. a simulation's virtual-site files on a Ray
    cluster); then the site lookup (`site_context.SiteSourceMod`) and the site's audit trail of
    what leaves it (`safn.client.audit`; only where the node config names an audit log)."""
    app = ClientApp(mods=[*mods, sc.SiteSourceMod(sites), audit_mod])
    app.query()(query)
    app.train()(train)
    app.evaluate()(evaluate)
    return app


def query(msg: Message, context: Context) -> Message:
    """QUERY messages: the statistics round's ``describe``, and the two phases of a secure sum
    the coordinator redoes or runs on its own (``secagg-keys``, ``secagg-mask``)."""
    task = str(msg.content[CONFIG].get(Config.TASK, Task.DESCRIBE))
    if task == Task.SECAGG_KEYS:
        return replies.secagg_keys(msg, context)
    if task == Task.SECAGG_MASK:
        return replies.secagg_mask(msg, context)
    if task == Task.RUN_END:
        return record_run_end(msg, context)
    if task == Task.PERSONALISE:
        return personal.personalise_reply(msg, context)
    if task == Task.HARMONISE:
        return harmonisation.harmonise_reply(msg, context)
    if task == Task.LOGISTIC:
        return logistic.logistic_reply(msg, context)
    if task == Task.DP_PLAN:
        return distributed.dp_plan_reply(msg, context)
    reply = describe(msg, context)
    said = reply.content[SITE]
    say("statistics round: " + ("described this site's data" if said[Describe.OK] else
                                f"withheld its statistics: {said[Describe.REASON]}"))
    return reply


def describe(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    # what kind of data it is (synthetic, ppmi, table) travels in every branch: the model card
    # names each site's, never a default of the coordinator's own configuration
    source = {Describe.DATA_SOURCE: sc.data_source(site, context),
              # what its labels mean (classes, order): the coordinator stops a run whose sites
              # predict different targets
              Describe.TARGET: json.dumps(site.cohort.target.to_dict())}
    if bool(config.get(Config.SECURE_AGGREGATION, False)) \
            and site.name not in list(config.get(Config.HELD_OUT_SITES, [])):
        # under secure aggregation the statistics travel only masked (`secagg_mask`): here the
        # site sends its name, data structure and public key for the statistics' secure sum
        return Message(RecordDict({
            SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: True,
                                Describe.LABEL_NAMES: list(site.cohort.label_names),
                                **modalities_to_record(site.cohort.modalities), **source}),
            secure.RECORD: secure.announce(sc.session(site, context), config)}), reply_to=msg)
    if site.name in list(config.get(Config.HELD_OUT_SITES, [])):
        # external validation only: the site's data shapes neither preprocessing nor training,
        # so it sends its name and data structure and no statistics
        return Message(RecordDict({SITE: ConfigRecord({
            Describe.NAME: site.name, Describe.OK: True, Describe.HELD_OUT: True,
            Describe.LABEL_NAMES: list(site.cohort.label_names),
            **modalities_to_record(site.cohort.modalities), **source})}), reply_to=msg)
    # exact statistics, or (privacy.statistics: gaussian) the same fields through the Gaussian
    # mechanism, charged to the site's ledger (`site_privacy.site_statistics`)
    out = site_statistics(
        site, request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=sc.state_dir(site, context),
        run_id=sc.run_id(msg, config),
        seed=site_seed(site.cfg.train.seed, 0, sc.partition(context)))
    if out.refusal is not None:
        return Message(RecordDict({
            SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: False,
                                Describe.REASON: out.refusal, **source})}),
            reply_to=msg)
    stats, counts = out.stats, out.counts
    exact = out.mechanism[Describe.STATISTICS] == Describe.EXACT
    count = int if exact else float  # noised class counts are not integers
    return Message(RecordDict({
        SITE: ConfigRecord({Describe.NAME: site.name, Describe.OK: True,
                            Describe.LABEL_NAMES: list(site.cohort.label_names),
                            **modalities_to_record(site.cohort.modalities), **source,
                            **{k if k == Describe.STATISTICS else Describe.STATISTICS_PREFIX + k: v
                               for k, v in out.mechanism.items()}}),
        STATS: ArrayRecord({"count": Array(stats.count), "total": Array(stats.total),
                              "total_sq": Array(stats.total_sq)}),
        METRICS: MetricRecord({Metric.N_TRAIN: count(sum(counts)),
                               **class_counts_to_metrics(counts, count)}),
    }), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """A training round under the site's privacy settings (`site_privacy.train_round`): the same
    metric keys from every site; a refusal (budget exhausted, ledger problem) carries no arrays,
    only its metrics (ε so far) and its one-line reason."""
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    if Config.NOISE_SHARES in config:  # distributed DP: one noise share, no local epochs
        return distributed.train_reply(msg, context, site, config)
    server_round = int(config[Config.SERVER_ROUND])
    global_weights = sc.global_weights(site, msg.content[ARRAYS], config)
    out = train_round(
        site, global_weights, sc.preprocessor(site, config),
        list(config[Config.CLASS_COUNTS]),
        request=shared_config(str(config[Config.SAFN_CONFIG])).privacy,
        state_dir=sc.state_dir(site, context),
        run_id=sc.run_id(msg, config),
        rounds=site.cfg.federation.rounds, epochs=int(config[Config.LOCAL_EPOCHS]),
        server_round=server_round,
        seed=site_seed(int(config[Config.SEED]), server_round, sc.partition(context)),
        proximal_mu=float(config.get(Config.PROXIMAL_MU, 0.0)))
    say(train_line(server_round, out))
    if out.refusal is None and site.cfg.personalisation.method == "ditto":
        # the site's own model, after the global update is computed (which it does not change)
        personal.ditto_step(msg, context, site, config, global_weights, server_round)
    if secure.is_secure(config):
        return replies.secure_train_reply(msg, context, site, config, out)
    if out.refusal is not None:
        return Message(RecordDict({METRICS: MetricRecord(out.metrics),
                                   REFUSAL: ConfigRecord({Describe.REASON: out.refusal})}),
                       reply_to=msg)
    return Message(RecordDict({
        ARRAYS: sc.model_record(site, out.weights, config),
        METRICS: MetricRecord(out.metrics),
    }), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    held_out = site.name in list(config.get(Config.HELD_OUT_SITES, []))
    safe = secure.is_secure(config) and not held_out
    res = site.evaluate(sc.global_weights(site, msg.content[ARRAYS], config),
                        sc.preprocessor(site, config), site.cfg.model,
                        int(config[Config.HISTOGRAM_BINS]), held_out=held_out,
                        withhold=not safe)
    if held_out:
        say(f"round {int(config[Config.SERVER_ROUND])}: evaluated as a held-out site")
    if safe:
        return replies.secure_evaluate_reply(msg, context, site, config, res)
    return Message(RecordDict({METRICS: MetricRecord(evaluation_to_metrics(res))}),
                   reply_to=msg)


def train_line(server_round: int, out) -> str:
    """The site's terminal line for one training round (its own loss never leaves a DP site,
    but the site itself may see it)."""
    if out.refusal is not None:
        return f"round {server_round}: not training: {out.refusal}"
    line = (f"round {server_round}: trained on {int(out.metrics[Metric.NUM_EXAMPLES])} "
            f"participants, loss {out.loss:.4f}")
    if out.metrics.get(Metric.DP):
        line += f", ε spent so far {out.metrics[Metric.EPSILON]:.3f}"
    return line


# a deployed site: its SuperNode's own site (`site_context.DeployedSite`)
app = make_client_app(sc.DeployedSite())
