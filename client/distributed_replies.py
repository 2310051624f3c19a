"""A site's replies in a distributed DP run (``privacy.mode: distributed``): its needed noise
multiplier (``dp-plan``) and, every round, its noise share inside the masked training sum.

The share is computed once per round and kept on the site's own disk with the secure sum's
values (`safn.client.secure_aggregation.keep`): a retry after a dropout re-masks the *same*
noised vector, and a training message for a round already answered (a coordinator that
restarted and resumed) gets the kept share again — a site never draws fresh noise for the same
step. The retry itself is refused when fewer than n − t sites would remain in it.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from safn.client import secure_aggregation as secure
from safn.client import site_context as sc
from safn.client.site_console import say
from safn_core.federation.protocol import (ARRAYS, CONFIG, MASKED, METRICS, REFUSAL, Config,
                                           Describe, Metric)
from safn_core.federation.sampling import site_seed
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site_distributed import (needed_sigma, noise_only, noise_share,
                                                   privacy_report)
from safn_core.privacy.noise_shares import NoiseShares

PLAIN_ONLY = (Metric.NUM_EXAMPLES, Metric.TRAIN_LOSS)
"""Per-site statistics that travel only inside the masked vector."""


def dp_plan_reply(msg: Message, context: Context) -> Message:
    """The smallest σ with which the run's rounds fit this site's remaining budget, or why it
    takes no part (a one-line reason)."""
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    shared = shared_config(str(config[Config.SAFN_CONFIG]))
    sigma, reason = needed_sigma(site, request=shared.privacy,
                                 state_dir=sc.state_dir(site, context),
                                 sample_rate=shared.privacy.distributed.sample_rate,
                                 rounds=shared.federation.rounds)
    if reason is not None:
        say(f"distributed DP: not taking part in this run: {reason}")
        return Message(RecordDict({REFUSAL: ConfigRecord({Describe.REASON: reason})}),
                       reply_to=msg)
    say(f"distributed DP: this site's budget allows the run's {shared.federation.rounds} "
        f"rounds at noise multiplier {sigma:.3f} or more")
    return Message(RecordDict({METRICS: MetricRecord({Metric.NEEDED_SIGMA: float(sigma)})}),
                   reply_to=msg)


def reusable(kept: dict, plan_text: str, server_round: int) -> tuple[dict | None, str | None]:
    """A kept share (`secure_aggregation.kept`) as it may be sent again for the round's plan
    ``plan_text``: the values, or None and why not. A share drawn for another plan (another
    grid, another number of shares: a resumed round with other sites) is never sent for this
    one, and never re-drawn: the site then sends its share of the noise only."""
    values = dict(kept)
    values.pop(secure.MIN_PEERS, None)
    drawn_for = values.pop(secure.PLAN, None)
    if drawn_for is not None and bytes(drawn_for.tobytes()).decode() == plan_text:
        return values, None
    return None, (f"round {server_round}'s share was drawn for another noise plan than this "
                  f"one; its data are not sent again")


def train_reply(msg: Message, context: Context, site, config: ConfigRecord) -> Message:
    """This round's noise share, masked; when the site does not train, its share of the noise
    only (no data, nothing charged) and the reason."""
    shares = NoiseShares.from_dict(json.loads(str(config[Config.NOISE_SHARES])))
    shared = shared_config(str(config[Config.SAFN_CONFIG]))
    state = sc.state_dir(site, context)
    sess = sc.session(site, context)
    r = int(config[Config.SERVER_ROUND])
    seed = site_seed(int(config[Config.SEED]), r, sc.partition(context))
    parties = len(set(secure.peers_of(config)) | {sess.own_id})
    plan_text = json.dumps(shares.to_dict(), sort_keys=True)
    ctx = secure.context_of(str(config[secure.CONTEXT]))
    try:  # this round was answered before: the same share, if drawn for this plan
        values, refusal = reusable(secure.kept(state, ctx), plan_text, r)
        metrics = privacy_report(site, request=shared.privacy, state_dir=state,
                                 sigma=shares.noise_multiplier)
        kept = values is not None
    except ValueError:  # nothing kept: a new share
        values, refusal, metrics, kept = None, None, {}, False
        if parties != shares.sites:
            refusal = (f"the round's noise plan is for {shares.sites} sites but {parties} take "
                       f"part in its secure sum; its data are not sent")
        else:
            out = noise_share(
                site, sc.global_weights(site, msg.content[ARRAYS], config),
                sc.preprocessor(site, config), list(config[Config.CLASS_COUNTS]),
                sc.layout(site, str(config[Config.MODEL_LAYOUT])), shares,
                sample_rate=shared.privacy.distributed.sample_rate, request=shared.privacy,
                state_dir=state, run_id=sc.run_id(msg, config), server_round=r, seed=seed)
            values, refusal, metrics = out.values, out.refusal, out.metrics
    if kept:
        say(f"round {r}: sending this round's kept noise share again (no new noise)")
    elif values is None:  # no data from this site, but its share of the noise
        values = noise_only(shares, seed if site.cfg.site is None else None)
        say(f"round {r}: not training: {refusal} (its share of the noise only sent)")
    else:
        say(f"round {r}: sent a noise share (σ = {shares.noise_multiplier:.3f}, ε spent so "
            f"far {metrics[Metric.EPSILON]:.3f})")
    masked = secure.mask(sess, state, config, values, min_peers=shares.honest, plan=plan_text)
    content = {ARRAYS: ArrayRecord({MASKED: Array(masked)}),
               METRICS: MetricRecord({k: v for k, v in metrics.items() if k not in PLAIN_ONLY}
                                     | ({Metric.REFUSED: 1} if refusal else {})),
               secure.RECORD: secure.announce(sess, config)}
    if refusal is not None:
        content[REFUSAL] = ConfigRecord({Describe.REASON: refusal})
    return Message(RecordDict(content), reply_to=msg)
