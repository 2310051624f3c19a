"""A site's part of federated ComBat (``harmonisation.method: combat``), thin over
`safn_core.federation.site_harmonisation`.

- Round 1 and round 2 of the fit: the site's sums from its training split (plain: the
  ``harmonise`` query; under secure aggregation: inside the masked vector of the
  ``harmonise-means`` / ``harmonise-residuals`` secure sums, `safn.client.secure_replies`). A site
  that cannot take part (too few participants, a constant feature, a missing covariate, or a
  DP site whose statistics are released only through the Gaussian mechanism: these sums are
  exact) says why; under secure aggregation it sends masked zeros beside its reason.
- Every later message carries the fit: the site harmonises its whole cohort with its own
  adjustment (`site_context.site_for`) before it describes, trains or evaluates, and writes its
  harmonised training split to its own disk (simulation: ``<run>/harmonised/<site>.csv``;
  deployment: ``<site.state_dir>/harmonised/<run id>.csv``).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from safn.client import site_context as sc
from safn.client.site_console import say
from safn_core.errors import SafnError
from safn_core.federation.protocol import (ARRAYS, CONFIG, REFUSAL, SITE, Aggregation, Config,
                                           Describe)
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site import Site
from safn_core.federation.site_harmonisation import mean_sums, residual_sums
from safn_core.harmonisation import CombatMeans, MeanSums, ResidualSums
from safn_core.harmonisation.setup import combat_spec


def _scales(config: ConfigRecord, site: Site) -> dict[str, float] | None:
    if Config.HARMONISATION_SCALES not in config:
        return None
    values = list(config[Config.HARMONISATION_SCALES])
    return dict(zip(site.cohort.features, (float(v) for v in values)))


def sums(site: Site, config: ConfigRecord, step: str) -> tuple[dict | None, str | None]:
    """This site's sums of ``step`` (``"means"`` / ``"residuals"``) as arrays, or the one-line
    reason it sends none."""
    shared = shared_config(str(config[Config.SAFN_CONFIG]))
    if site.cfg.privacy.dp and site.cfg.privacy.statistics == "gaussian":
        return None, ("this site releases its statistics only through the Gaussian mechanism "
                      "(privacy.statistics: gaussian), and ComBat's sums are exact statistics")
    try:
        spec = combat_spec(shared.harmonisation, site.cohort.modalities)
        scales = _scales(config, site)
        if step == "means":
            return mean_sums(site, spec, scales).to_arrays(), None
        means = CombatMeans.from_arrays(
            {k: np.asarray(v, dtype=np.float64)
             for k, v in json.loads(str(config[Config.HARMONISATION_MEANS])).items()}, spec)
        return residual_sums(site, means, scales).to_arrays(), None
    except (SafnError, ValueError, KeyError) as exc:
        return None, " ".join(str(exc).split()).removeprefix(f"site {site.name}: ")


def zeros(site: Site, config: ConfigRecord, step: str) -> dict:
    """Masked zeros of the right shapes, for a site that cannot take part in a secure sum."""
    spec = combat_spec(shared_config(str(config[Config.SAFN_CONFIG])).harmonisation,
                       site.cohort.modalities)
    cls = MeanSums if step == "means" else ResidualSums
    return {k: np.zeros(shape) for k, shape in
            cls._shapes(len(spec.design_columns), len(spec.features)).items()}


def step_of(aggregation: str) -> str | None:
    return {Aggregation.HARMONISE_MEANS: "means",
            Aggregation.HARMONISE_RESIDUALS: "residuals"}.get(aggregation)


def harmonise_reply(msg: Message, context: Context) -> Message:
    """The plain ``harmonise`` query: the site's sums, or its reason."""
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    step = str(config[Config.HARMONISE_STEP])
    arrays, reason = sums(site, config, step)
    content = {SITE: ConfigRecord({Describe.NAME: site.name})}
    if reason is not None:
        say(f"harmonisation: not taking part: {reason}")
        content[REFUSAL] = ConfigRecord({Describe.REASON: reason})
    else:
        say(f"harmonisation: sent this site's {step} sums")
        content[ARRAYS] = ArrayRecord({k: Array(np.asarray(v, dtype=np.float64))
                                       for k, v in arrays.items()})
    return Message(RecordDict(content), reply_to=msg)
