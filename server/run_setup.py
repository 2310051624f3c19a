"""The start of a run: sites, the statistics round, harmonisation, as one frozen `RunSetup`.

`prepare_run` waits (bounded) for the sites, runs the statistics round (plain, or as secure sums
under ``federation.secure_aggregation``), fits federated ComBat when harmonisation is on (and
then runs the statistics round again on the harmonised training splits, so the preprocessing is
fitted on harmonised data) and reports what the sites said. The sites' one target
(`safn.server.site_targets`: checked against each other and the coordinator's ``data.target``)
sets the model's K outputs and head on both ends. Everything later in the run reads
the returned `RunSetup`; nothing writes to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from safn_core.federation.checkpoint import load_checkpoint
from safn_core.federation.events import Event
from safn_core.federation.protocol import Config, Describe, Metric, modalities_from_record
from safn_core.federation.run_folder import expected_sites
from safn.server.run_context import RunContext
from safn.server.secure_aggregation import SecureAggregation
from safn.server.site_targets import configured_target
from safn.server.statistics_round import (Described, secure_statistics_round, statistics_round,
                                     wait_for_sites)
from safn.server.run_sites import RunSites
from safn_core.targets import Target


@dataclass(frozen=True)
class RunSetup:
    """What the statistics phase established for the rest of the run."""

    described: Described  # the sites' sums, names, structure, refusals (read only from here)
    sites: RunSites
    modalities: tuple
    label_names: tuple[str, ...]
    target: Target  # what the sites predict (K classes, order): `make_model`'s target
    secure: SecureAggregation | None  # the run's secure-sum driver (keys across phases)
    harmonisation: object | None  # the run's ComBat fit (`CombatFit`), if harmonised
    extra: Mapping[str, str]  # what every later message carries (the harmonisation fit)
    timing: Mapping[str, float]

    @property
    def held_out(self) -> frozenset[str]:
        return self.sites.held_out_names


def prepare_run(run: RunContext) -> RunSetup:
    """Sites, statistics and harmonisation: the run's `RunSetup`."""
    cfg, fed = run.cfg, run.cfg.federation
    t0 = time.perf_counter()
    # a simulation waits for every virtual site (they register one by one), a deployment for
    # every listed site, or min_sites once federation.wait_for_sites has passed
    expected = max(fed.min_sites, len(expected_sites(run.run_dir) or cfg.server.sites))
    nodes = wait_for_sites(run.grid, expected, fed.min_sites, fed.wait_for_sites, run.events)
    t_connected = time.perf_counter()
    secure = None
    if fed.secure_aggregation:
        secure = SecureAggregation(
            run.grid, run.run_id, fed.round_timeout,
            {Config.SAFN_CONFIG: run.shared_text,
             Config.HELD_OUT_SITES: list(cfg.server.held_out_sites), Config.RUN_ID: run.run_id},
            fed.min_sites, fed.secagg.max_attempts, run.events)
    desc = _statistics(run, nodes, secure, {})
    held_out = frozenset(desc.names[n] for n in desc.held_out)
    fit, extra = None, {}
    if cfg.harmonisation.enabled:
        from safn.server.harmonisation import fit_harmonisation

        fit = fit_harmonisation(run, desc, secure, held_out)
        extra = {Config.HARMONISATION_FIT: json.dumps(fit.to_dict())}
        if secure is not None:
            secure.base_config.update(extra)
        desc = _statistics(run, nodes, secure, extra)
    if held_out:
        run.events.emit(Event.HELD_OUT, sites=sorted(held_out))
    # the first figure includes the wait for the sites to connect, the second says how long
    timing = {"statistics_round_s": time.perf_counter() - t0,
              "waiting_for_sites_s": t_connected - t0}
    for name, why in desc.refused.items():
        run.events.emit(Event.STATISTICS_WITHHELD, site=name, reason=why)
    for name, g in sorted(desc.gaussian.items()):
        run.events.emit(Event.STATISTICS_NOISED, site=name,
                        noise_multiplier=g[Metric.NOISE_MULTIPLIER], epsilon=g[Metric.EPSILON],
                        delta=g[Metric.DELTA])
    return RunSetup(
        described=desc,
        sites=RunSites(dict(desc.names), frozenset(desc.eligible), frozenset(desc.held_out)),
        modalities=modalities_from_record(desc.structure),
        label_names=tuple(desc.structure[Describe.LABEL_NAMES]), target=desc.target,
        secure=secure,
        harmonisation=fit, extra=dict(extra), timing=timing)


def _statistics(run: RunContext, nodes: list[int], secure: SecureAggregation | None,
                extra: dict) -> Described:
    """One statistics round (again after harmonisation: ``extra`` carries the fit)."""
    fed, configured = run.cfg.federation, configured_target(run.cfg)
    if secure is None:
        return statistics_round(run.grid, nodes, fed.round_timeout, run.shared_text,
                                fed.min_sites, tuple(run.cfg.server.held_out_sites),
                                run_id=run.run_id, extra=extra or None, configured=configured)
    saved = load_checkpoint(run.run_dir)
    first_round = (saved.round if saved is not None else 0) + 1
    # the second statistics round (after harmonisation) sums under contexts of its own
    return secure_statistics_round(secure, nodes, run.cfg, run.shared_text, first_round,
                                   run.events, context_round=1 if extra else 0,
                                   extra=extra or None, configured=configured)
