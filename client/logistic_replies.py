"""A site's part of the logistic regression floor, thin over `safn_core.federation.site_logistic`.

- Plain runs: the ``logistic`` query carries every candidate's coefficients; the site answers
  with its Newton-round sums, or with the reason it sends none.
- Under secure aggregation the same sums ride inside the masked vector of the ``logistic``
  secure sum (`safn.client.secure_replies`); a refusing site sends masked zeros beside its
  reason, so every other site's masks still cancel.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from safn.client import site_context as sc
from safn.client.site_console import say
from safn_core.federation.protocol import ARRAYS, CONFIG, REFUSAL, SITE, Config, Describe
from safn_core.federation.site import Site
from safn_core.federation.site_logistic import (KIND, betas_from, logistic_values, refusal,
                                                zero_values)


def values(site: Site, config: ConfigRecord, secure: bool) -> tuple[dict, str | None]:
    """The site's sums for the message's coefficients (zeros when it refuses) and its reason;
    the regression's kind from the message (absent: binary), K from its class weights."""
    n_features = len(site.cohort.features)
    kind = str(config.get(KIND, "binary"))
    weights = [float(w) for w in config[Config.LOGISTIC_WEIGHTS]]
    betas = betas_from(config[Config.LOGISTIC_BETAS], n_features, kind, len(weights))
    reason = refusal(site, secure, len(weights))
    if reason is not None:
        return zero_values(len(betas), n_features, kind, len(weights)), reason
    return logistic_values(site, sc.preprocessor(site, config), betas, weights, secure,
                           kind), None


def logistic_reply(msg: Message, context: Context) -> Message:
    """The plain ``logistic`` query: the site's sums, or its reason."""
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    sums, reason = values(site, config, secure=False)
    content = {SITE: ConfigRecord({Describe.NAME: site.name})}
    if reason is not None:
        say(f"logistic regression floor: not taking part: {reason}")
        content[REFUSAL] = ConfigRecord({Describe.REASON: reason})
    else:
        content[ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in sums.items()})
    return Message(RecordDict(content), reply_to=msg)
