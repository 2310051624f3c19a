"""Distributed DP-SGD at the coordinator (``privacy.mode: distributed``; docs/privacy.md).

Before the first round, `plan_distributed` asks every training site for the smallest noise
multiplier its remaining budget allows for the run's rounds (``dp-plan`` queries: metadata, not
data) and takes the largest, so that every site that takes part can pay for every round; a site
that cannot (budget spent, its own noise cap, a site that insists on local DP-SGD) says why and
takes no part. Fewer than max(3, t + 2) remaining sites stop the run cleanly. The plan is kept in
``<run folder>/distributed_dp.json``: a resumed run reuses σ (its sites have already paid for
the earlier rounds).

`DistributedDP` is the SAFN strategy's part for the rounds: it puts each round's noise plan
(`safn_core.privacy.noise_shares.NoiseShares`, sized for the sites in that round's secure sum)
into the training message and turns the unmasked sum of noise shares into the input of the
coordinator's optimiser step: the noised clipped gradient sum divided by the expected batch size
``q · N`` (N: the training participants in the sum, a federation-wide count). The step itself is
Flower's FedAdam (adam) or FedAvgM (sgd with momentum), handed ``w − g`` as if it were the
sites' mean, so their update ``w + step(−g)`` is the optimiser's step on ``g``: post-processing
of the noised sum, no privacy cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from safn_core.federation.events import Event
from safn_core.federation.protocol import CONFIG, METRICS, REFUSAL, Config, Describe, Metric, Task
from safn_core.io import write_json
from safn_core.privacy.noise_shares import NoiseShares, min_sites
from safn.server.run_context import RunContext
from safn.server.run_sites import RunSites

FILE = "distributed_dp.json"
GUARANTEE = ("record-level (ε, δ)-DP for every participant, at each site's own δ, against the "
             "coordinator and anyone who receives the model, even together with up to {t} "
             "colluding or dropped-out sites (the honest sites' noise shares alone carry the "
             "noise); it assumes the sites run safn's ClientApp unmodified and that the "
             "coordinator does not invent sites (secure aggregation's threat model)")


class DistributedDPStopped(Exception):
    """Too few sites can take part in distributed DP (the reason, in words)."""


@dataclass(frozen=True)
class DistributedPlan:
    """The run's mechanism: σ (the largest any taking-part site needs), q, C, t, the rounds it
    was calibrated for, the sites that take part and those that do not (with their reasons)."""

    noise_multiplier: float
    sample_rate: float
    clipping_norm: float
    colluding: int
    rounds: int
    sites: tuple[str, ...]
    declined: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "sites": list(self.sites),
                "guarantee": GUARANTEE.format(t=self.colluding)}

    @classmethod
    def from_dict(cls, data: dict) -> "DistributedPlan":
        return cls(float(data["noise_multiplier"]), float(data["sample_rate"]),
                   float(data["clipping_norm"]), int(data["colluding"]), int(data["rounds"]),
                   tuple(data["sites"]), dict(data.get("declined", {})))


def load_plan(run_dir: Path) -> DistributedPlan | None:
    path = Path(run_dir) / FILE
    return DistributedPlan.from_dict(json.loads(path.read_text())) if path.is_file() else None


def plan_distributed(run: RunContext, sites: RunSites) -> tuple[DistributedPlan, RunSites]:
    """The run's plan (kept, or asked of the sites now) and the sites that train under it."""
    privacy, fed = run.cfg.privacy, run.cfg.federation
    t = privacy.distributed.colluding_sites
    plan = load_plan(run.run_dir)
    if plan is None:
        nodes = sorted(sites.eligible)
        config = {Config.TASK: Task.DP_PLAN, Config.SAFN_CONFIG: run.shared_text,
                  Config.RUN_ID: run.run_id,
                  Config.HELD_OUT_SITES: list(run.cfg.server.held_out_sites)}
        messages = [Message(RecordDict({CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in nodes]
        needed, declined = {}, {}
        for reply in run.grid.send_and_receive(messages, timeout=fed.round_timeout):
            name = sites.name(reply.metadata.src_node_id)
            if reply.has_error():
                declined[name] = f"its ClientApp failed ({' '.join(reply.error.reason.split())})"
            elif REFUSAL in reply.content.config_records:
                declined[name] = str(reply.content[REFUSAL][Describe.REASON])
            else:
                needed[name] = float(reply.content[METRICS][Metric.NEEDED_SIGMA])
        for n in nodes:
            if sites.name(n) not in needed and sites.name(n) not in declined:
                declined[sites.name(n)] = "did not answer the distributed DP plan"
        for name, why in sorted(declined.items()):
            run.events.emit(Event.DP_PLAN, code="declined", site=name, reason=why)
        if len(needed) < min_sites(t):
            reason = (f"distributed DP needs at least {min_sites(t)} sites that can take part "
                      f"(against {t} colluding sites); {len(needed)} can")
            run.events.emit(Event.DP_PLAN, code="stopped", reason=reason)
            raise DistributedDPStopped(reason)
        plan = DistributedPlan(max(needed.values()), privacy.distributed.sample_rate,
                               privacy.max_grad_norm, t, fed.rounds, tuple(sorted(needed)),
                               declined)
        write_json(Path(run.run_dir) / FILE, plan.to_dict())
        run.events.emit(Event.DP_PLAN, code="planned", noise_multiplier=plan.noise_multiplier,
                        sample_rate=plan.sample_rate, clipping_norm=plan.clipping_norm,
                        colluding=t, rounds=plan.rounds, sites=len(plan.sites))
    else:
        run.events.emit(Event.DP_PLAN, code="kept", noise_multiplier=plan.noise_multiplier,
                        sites=len(plan.sites))
    taking_part = frozenset(n for n in sites.eligible if sites.name(n) in plan.sites)
    return plan, RunSites(sites.names, taking_part, sites.held_out)


class DistributedDP:
    """The strategy's part in a distributed DP run (see the module docstring)."""

    def __init__(self, plan: DistributedPlan, dimension: int, max_site_examples: int):
        self.plan = plan
        self.dimension = int(dimension)
        self.max_site_examples = int(max_site_examples)

    @property
    def min_sites(self) -> int:
        return min_sites(self.plan.colluding)

    def shares(self, sites: int) -> NoiseShares:
        """The noise plan of a round whose secure sum has ``sites`` participants."""
        return NoiseShares.plan(noise_multiplier=self.plan.noise_multiplier,
                                clipping_norm=self.plan.clipping_norm, sites=sites,
                                colluding=self.plan.colluding, dimension=self.dimension,
                                max_site_examples=self.max_site_examples)

    def configure(self, config: ConfigRecord, sites: int) -> NoiseShares:
        """Put the round's noise plan into the training message's ``config``."""
        shares = self.shares(sites)
        config[Config.NOISE_SHARES] = json.dumps(shares.to_dict())
        return shares

    def gradient(self, shares: NoiseShares, values: dict) -> tuple[np.ndarray | None, dict]:
        """The noised mean gradient (None when no participant is in the sum) and the round's
        record: σ, q, C_eff, t, the shares in the sum, N and the expected batch size q·N."""
        n = int(values["examples"])
        contributed = int(values["noise_shares"])
        expected = self.plan.sample_rate * n
        record = {"mechanism": "distributed DP-SGD (noise shares under secure aggregation)",
                  "noise_multiplier": shares.noise_multiplier,
                  "sample_rate": self.plan.sample_rate,
                  "clipping_norm": shares.clipping_norm,
                  "effective_clipping_norm": shares.sensitivity,
                  "colluding": shares.colluding, "sites_asked": shares.sites,
                  "shares": contributed, "sites_with_data": int(values["sites"]),
                  "participants": n, "expected_batch": expected,
                  "noise_sd": shares.total_std(contributed) / max(expected, 1e-12)}
        if n <= 0 or contributed < shares.honest:
            return None, record
        return shares.decode(np.asarray(values["share"])) / expected, record
