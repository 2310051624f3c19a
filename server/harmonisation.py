"""Federated ComBat at the coordinator (``harmonisation.method: combat``): two rounds of sums
between the statistics round and the preprocessing.

1. Every training site sends round-1 sums of its training split (`MeanSums`); the coordinator
   solves the mean model from their total (`solve_means`).
2. It sends the mean model back; every site sends its residual sums (`ResidualSums`); the
   coordinator pools the variance (`solve_variance`).

Under secure aggregation both are secure sums (``harmonise-means``, ``harmonise-residuals``),
on data each site divides by the statistics round's per-feature scales; the coordinator
returns the fit to the data's units (`site_harmonisation.unscale_fit`). Without it they are
plain replies. Either way the coordinator learns only what docs/harmonisation.md lists. The fit
then rides in every later message (``harmonisation-fit``): each site estimates its own
location and scale and harmonises its data, and the statistics round is repeated on the
harmonised training splits, so that the preprocessing is fitted on harmonised data. The fit is
kept in ``<run folder>/harmonisation.json`` (a resumed run reuses it) and in the bundle.

Harmonisation needs every training site: one that cannot take part (too few participants, a
constant feature, a missing covariate, exact sums refused) stops the run with its reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from safn_core.errors import SafnError
from safn_core.federation.events import Event
from safn_core.federation.protocol import (ARRAYS, CONFIG, REFUSAL, SITE, Aggregation, Config,
                                           Describe, Task, modalities_from_record)
from safn_core.federation.site_harmonisation import (means_packing, residuals_packing,
                                                     sums_from_decoded, unscale_fit)
from safn_core.harmonisation import (CombatFit, MeanSums, ResidualSums, solve_means,
                                     solve_variance)
from safn_core.harmonisation.setup import combat_spec
from safn_core.io import write_json
from safn.server.run_context import RunContext
from safn.server.site_waits import SitesMissing

FILE = "harmonisation.json"


class HarmonisationFailed(SitesMissing):
    """Federated ComBat could not be fitted (a site could not take part, or the pooled design
    is singular): the run stops with the reason."""


def load_fit(run_dir: Path) -> CombatFit | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    return CombatFit.from_dict(json.loads(path.read_text())["fit"])


def fitted_on(run_dir: Path) -> str:
    """In words, which participants the run's fit was estimated from (for the model card)."""
    try:
        return str(json.loads((Path(run_dir) / FILE).read_text())["fitted_on"])
    except (OSError, ValueError, KeyError):
        return "the training sites' training splits"


def fit_harmonisation(run: RunContext, desc, secure, held_out: frozenset[str]) -> CombatFit:
    """The run's fit: the saved one when resuming, else the two rounds above (secure sums
    through ``secure``, a `safn.server.secure_aggregation.SecureAggregation`, when it is given)."""
    saved = load_fit(run.run_dir)
    if saved is not None:
        run.events.emit(Event.HARMONISATION, code="kept", participants=saved.n,
                        file=str(Path(run.run_dir) / FILE))
        return saved
    cfg = run.cfg
    modalities = modalities_from_record(desc.structure)
    try:
        spec = combat_spec(cfg.harmonisation, modalities)
    except SafnError as exc:
        raise HarmonisationFailed(str(exc)) from None
    nodes = sorted(desc.eligible)
    names = {n: desc.names.get(n, str(n)) for n in nodes}
    scales = None
    if secure is not None:
        features = list(desc.structure["features"])
        scales = dict(zip(features, (float(s) for s in desc.scales)))
    extra = {Config.HARMONISATION_SCALES: [scales[f] for f in desc.structure["features"]]} \
        if scales else {}
    try:
        total = _round(run, secure, held_out, nodes, names, "means", spec, extra)
        means = solve_means(spec, total)
        extra[Config.HARMONISATION_MEANS] = json.dumps(
            {k: np.asarray(v).tolist() for k, v in means.to_arrays().items()})
        fit = unscale_fit(solve_variance(means, _round(run, secure, held_out, nodes, names,
                                                       "residuals", spec, extra)), scales)
    except SafnError as exc:
        raise HarmonisationFailed(f"harmonisation (ComBat) could not be fitted: "
                                  f"{' '.join(str(exc).split())}") from None
    write_json(Path(run.run_dir) / FILE, {
        "fit": fit.to_dict(), "method": cfg.harmonisation.method,
        "empirical_bayes": cfg.harmonisation.empirical_bayes,
        "parametric": cfg.harmonisation.parametric, "sites": sorted(names.values()),
        "secure_aggregation": secure is not None,
        "fitted_on": f"the training splits of {len(nodes)} sites (participants with every "
                     "harmonised feature and covariate observed)"})
    run.events.emit(Event.HARMONISATION, code="fitted", sites=len(nodes), participants=fit.n,
                    features=len(spec.features), covariates=list(spec.covariates),
                    secure=secure is not None)
    return fit


def _round(run: RunContext, secure, held_out: frozenset[str], nodes: list[int], names: dict,
           step: str, spec, extra: dict):
    """One round of sums from every training site, as their total."""
    cls = MeanSums if step == "means" else ResidualSums
    fed = run.cfg.federation
    if secure is not None:
        name = Aggregation.HARMONISE_MEANS if step == "means" else Aggregation.HARMONISE_RESIDUALS
        packing = (means_packing if step == "means" else residuals_packing)(
            spec, fed.secagg.max_site_examples, len(nodes))
        result = secure.sum_now(secure.context(0, name), packing, nodes, dict(extra))
        refused = {names.get(nid, str(nid)): str(content[REFUSAL][Describe.REASON])
                   for nid, content in secure.last_contents.items()
                   if REFUSAL in content.config_records}
        _refused(refused, set(names.values()) - {names.get(n, str(n)) for n in
                                                 secure.last_contents})
        if result.clipped and any(result.clipped.values()):
            run.events.emit(Event.HARMONISATION, code="clipped",
                            clipped={k: v for k, v in result.clipped.items() if v})
        return sums_from_decoded(cls, result.values, spec)
    config = {Config.TASK: Task.HARMONISE, Config.HARMONISE_STEP: step,
              Config.SAFN_CONFIG: run.shared_text, Config.RUN_ID: run.run_id,
              Config.HELD_OUT_SITES: sorted(held_out), **extra}
    messages = [Message(RecordDict({CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    parts, refused, answered = [], {}, set()
    for reply in run.grid.send_and_receive(messages, timeout=fed.round_timeout):
        nid = reply.metadata.src_node_id
        name = names.get(nid, str(nid))
        if reply.has_error():
            refused[name] = f"its ClientApp failed ({reply.error.reason})"
            continue
        answered.add(name)
        if REFUSAL in reply.content.config_records:
            refused[name] = str(reply.content[REFUSAL][Describe.REASON])
            continue
        arrays = reply.content[ARRAYS]
        parts.append(cls.from_arrays({k: arrays[k].numpy() for k in arrays.keys()}, spec))
    _refused(refused, set(names.values()) - answered - set(refused))
    return cls.total(parts)


def _refused(refused: dict[str, str], silent: set[str]) -> None:
    why = [f"site {k} cannot take part: {v}" for k, v in sorted(refused.items())]
    why += [f"site {k} did not answer" for k in sorted(silent)]
    if why:
        raise HarmonisationFailed("harmonisation (ComBat) needs every training site; "
                                  + "; ".join(why))


__all__ = ["fit_harmonisation", "load_fit", "HarmonisationFailed", "FILE", "SITE"]
