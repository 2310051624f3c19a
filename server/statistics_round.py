"""The statistics round: before training, what every site describes of its training split.

Plain (`statistics_round`): each site sends its counts, sums and sums of squares (exact, or
noised by the Gaussian mechanism where the site chose ``privacy.statistics: gaussian``), the
count of each class of its target, and withholds them below ``min_cell``. Every reply names the
site's target; sites that predict different targets, or not the coordinator's, stop the run at
once (`safn.server.site_targets`). Under secure aggregation (`secure_statistics_round`) it sends
only its data structure and a public key, and the sums follow as secure sums.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from safn_core.config import SafnConfig
from safn_core.federation.events import Event, EventLog
from safn_core.federation.protocol import (CONFIG, METRICS, SITE, STATISTICS, STATS, Aggregation,
                                           Config, Describe, Metric, Task,
                                           class_counts_from_metrics)
from safn_core.federation.site import small_class_text
from safn_core.federation.secure_records import (scaled_packing, scales_from_sum,
                                                 statistics_from_sum, statistics_packing)
from safn_core.preprocess import FeatureStats
from safn_core.secagg import SecureAggregationRefused
from safn.server.secure_aggregation import NEXT, context_json
from safn.server.site_targets import reply_target, run_target
from safn.server.site_waits import SitesMissing, wait_for_nodes
from safn_core.targets import PD_VS_HC, Target


GAUSSIAN_KEYS = (Metric.NOISE_MULTIPLIER, Metric.EPSILON, Metric.DELTA)
"""What a site reports of its Gaussian release of the statistics."""

NOT_REPORTED = "not reported"
"""The data source of a site whose reply does not say it (a client older than the key)."""


def wait_for_sites(grid: Grid, expected: int, min_sites: int, timeout: float,
                   events: EventLog) -> list[int]:
    """Node ids once all ``expected`` sites are connected, or, when ``timeout`` passes first,
    the ``min_sites`` or more that are; Flower's own wait has no upper bound."""
    try:
        nodes = wait_for_nodes(grid, expected, timeout, lambda nid: True,
                               "at the start of the run")
    except SitesMissing:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < min_sites:
            raise
    events.emit(Event.SITES_CONNECTED, connected=len(nodes), expected=expected,
                timeout=timeout, min_sites=min_sites)
    return nodes


class Described:
    """What the statistics round returned: per-site sums, names, data structure, refusals."""

    def __init__(self):
        self.stats: list[FeatureStats] = []
        self.counts: list[list[int]] = []
        self.names: dict[int, str] = {}
        self.eligible: set[int] = set()
        self.refused: dict[str, str] = {}
        self.structure: ConfigRecord | None = None
        self.held_out: set[int] = set()  # nodes that only evaluate (external validation)
        # sites whose statistics came through the Gaussian mechanism (privacy.statistics:
        # gaussian): their σ and ε spent so far
        self.gaussian: dict[str, dict] = {}
        # site → the kind of data it said it has (its own `data.source`: synthetic, ppmi,
        # table), from every site that answered, held-out and refusing ones included
        self.sources: dict[str, str] = {}
        # under secure aggregation: each feature's federation-wide mean |value| (the second
        # sum's divisors; federated ComBat sums on data divided by them too)
        self.scales = None
        # site → the target its reply names; the run's one target (`site_targets.run_target`)
        self.targets: dict[str, Target] = {}
        self.target: Target = PD_VS_HC


def refuse_if_too_few_for_secure_sum(n: int, what: str) -> None:
    if n < 3:
        raise SecureAggregationRefused(
            f"secure aggregation needs at least 3 contributing sites, but only {n} {what}: "
            "with 2, a sum reveals each site's values to the other. Add sites, or set "
            "federation.secure_aggregation: false explicitly if you accept that exposure")


def statistics_round(grid: Grid, nodes: list[int], timeout: float, shared_text: str,
                     min_sites: int = 1, held_out_sites: tuple[str, ...] = (), secure=None,
                     next_ctx=None, run_id: str | None = None,
                     extra: dict | None = None, configured: Target | None = None) -> Described:
    """Ask every site for its training-split statistics (a QUERY message, before training);
    under secure aggregation (``secure``) only for its data structure and a public key for the
    statistics' secure sum (``next_ctx``), the sums following in `Coordinator`. The sites'
    targets must agree with each other and with ``configured`` (the coordinator's
    ``data.target``; None: not checked), else `TargetMismatch` stops the run."""
    config = {Config.TASK: Task.DESCRIBE, Config.SAFN_CONFIG: shared_text,
              Config.HELD_OUT_SITES: list(held_out_sites)}
    if run_id:  # a DP site charges a noised statistics round to this run (privacy.statistics)
        config[Config.RUN_ID] = run_id
    config.update(extra or {})  # e.g. the harmonisation fit: the sites describe harmonised data
    if secure is not None:
        config.update({Config.SECURE_AGGREGATION: True, NEXT: context_json(next_ctx)})
    messages = [Message(RecordDict({CONFIG: ConfigRecord(config)}),
                        dst_node_id=nid, message_type=MessageType.QUERY) for nid in nodes]
    out = Described()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            out.refused[f"node {nid}"] = reply.error.reason
            continue
        site = reply.content[SITE]
        out.names[nid] = name = str(site[Describe.NAME])
        out.sources[name] = str(site.get(Describe.DATA_SOURCE, NOT_REPORTED))
        out.targets[name] = reply_target(site)
        if not site[Describe.OK]:
            out.refused[name] = str(site[Describe.REASON])
            continue
        if out.structure is None:
            out.structure = site
        elif list(site["features"]) != list(out.structure["features"]):
            raise SitesMissing(f"site {name} describes other features than the first site; "
                               "sites must share one data contract to federate")
        if site.get(Describe.HELD_OUT, False):
            out.held_out.add(nid)
            continue
        if secure is not None:
            secure.note(nid, reply.content)
            continue
        arr = reply.content[STATS]
        out.stats.append(FeatureStats(tuple(site["features"]), arr["count"].numpy(),
                                      arr["total"].numpy(), arr["total_sq"].numpy()))
        m = reply.content[METRICS]
        # one per class of the target; noised (privacy.statistics: gaussian): not integers
        out.counts.append(class_counts_from_metrics(m))
        if site.get(Describe.STATISTICS) == Describe.GAUSSIAN:
            out.gaussian[name] = {k: float(site[Describe.STATISTICS_PREFIX + k])
                                  for k in GAUSSIAN_KEYS}
        out.eligible.add(nid)
    out.target = run_target(out.targets, configured)
    if len(out.stats) < min_sites:
        raise SitesMissing(f"{len(out.stats)} sites sent statistics, fewer than min_sites = "
                           f"{min_sites}" + refusals_in_brief(out.refused))
    return out


def refusals_in_brief(refused: dict[str, str], shown: int = 10) -> str:
    """The first ``shown`` sites' reasons, then how many more (each site's reason is in
    progress.log): a thousand tiny sites would otherwise make one line of ~100 kB."""
    items = list(refused.items())
    text = "".join(f"; {k}: {v}" for k, v in items[:shown])
    if len(items) > shown:
        text += f"; and {len(items) - shown} more sites (each site's reason: progress.log)"
    return text


def secure_statistics_round(secure, nodes: list[int], cfg: SafnConfig, shared_text: str,
                            first_round: int, events: EventLog, context_round: int = 0,
                            extra: dict | None = None, configured: Target | None = None
                            ) -> Described:
    """The statistics round under secure aggregation: each site describes its data structure
    and announces a key (QUERY ``describe``); then the training sites' counts, sums and sums of
    absolute values, and (scaled per feature) their sums and sums of squares, are summed
    securely (`safn_core.federation.secure_records`); ``min_cell`` applies to the sums. The
    last sum's replies announce the sites' keys for round ``first_round``'s training. The class
    counts are summed for each of the K classes of the sites' one target."""
    fed = cfg.federation
    held = tuple(cfg.server.held_out_sites)
    ctx = secure.context(context_round, Aggregation.STATISTICS)
    desc = statistics_round(secure.grid, nodes, fed.round_timeout, shared_text, 0, held,
                            secure=secure, next_ctx=ctx, extra=extra, configured=configured)
    training = sorted(set(desc.names) - desc.held_out - set(
        n for n, name in desc.names.items() if name in desc.refused))
    refuse_if_too_few_for_secure_sum(len(training), "sites described their data")
    features = tuple(desc.structure["features"])
    scaled_ctx = secure.context(context_round, Aggregation.STATISTICS_SCALED)
    packing = statistics_packing(len(features), fed, len(training), desc.target.n_classes)
    result = secure.sum_now(ctx, packing, training, {NEXT: context_json(scaled_ctx)})
    for nid, content in secure.last_contents.items():
        rec = content.config_records.get(STATISTICS)
        if rec is None:
            continue
        if rec.get(Describe.STATISTICS) == Describe.GAUSSIAN:
            desc.gaussian[desc.names[nid]] = {k: float(rec[k]) for k in
                                              GAUSSIAN_KEYS}
        elif rec.get(Describe.STATISTICS) == Describe.REFUSED:
            desc.refused[desc.names[nid]] = str(rec.get(Describe.REASON, "no reason given"))
    scales = scales_from_sum(result.values)
    second = secure.sum_now(
        scaled_ctx, scaled_packing(len(features), fed, len(result.contributors)),
        list(result.contributors), {NEXT: context_json(secure.context(first_round, "train")),
                                    Config.SECAGG_SCALES: scales.tolist()})
    clipped = {k: v for r in (result, second) for k, v in r.clipped.items() if v}
    if clipped:
        events.emit(Event.STATISTICS_CLIPPED, clipped=clipped)
    stats, counts, withheld = statistics_from_sum(features, result.values, second.values,
                                                  scales, cfg.data.min_cell)
    result = second
    small = small_class_text(counts, desc.target.classes, cfg.data.min_cell)
    if small is not None:
        raise SitesMissing(f"the federation's training splits have {small}: nothing can be "
                           "trained safely")
    if withheld:
        events.emit(Event.FEATURES_WITHHELD, features=len(withheld))
    desc.stats, desc.counts = [stats], [counts]
    desc.scales = scales
    desc.eligible = set(result.contributors)
    events.emit(Event.SECURE_STATISTICS, sites=len(result.contributors))
    return desc
