"""A site's part of personalisation (``personalisation.method``), thin over
`safn_core.federation.personal_training` (its personal model), `personal_comparison` (against
the global model) and `personal_wire` (the reply).

- In every training round of a Ditto run, after the global update is computed, the site trains
  its personal model (`ditto_step`); nothing of it is added to the reply.
- The ``personalise`` query at the end of the run carries the selected global model and the
  federation's threshold: the site makes or loads its personal model, compares both on its
  test split and answers with the comparison's metrics (only where its test classes pass
  ``min_cell``); under secure aggregation the confusion counts are masked
  (`safn_core.federation.secure_records.personalise_values`), in plain runs they ride beside the
  metrics under the same rule. The personal model itself never leaves the site's state folder.

The core's records carry codes (`personal_training`); the site's terminal lines are made here
(`reason_text`, `comparison_line`).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from safn.client import secure_aggregation as secure
from safn.client import site_context as sc
from safn.client.site_console import say
from safn_core.errors import SafnError
from safn_core.federation.sampling import site_seed
from safn_core.federation.personal_comparison import Comparison, personalise
from safn_core.federation.personal_training import (PRIVACY_REFUSED, VALIDATION_TOO_SMALL,
                                                    ditto_round)
from safn_core.federation.personal_wire import comparison_to_metrics
from safn_core.federation.protocol import (ARRAYS, CONFIG, MASKED, METRICS, REFUSAL, Config,
                                           Describe)
from safn_core.federation.secure_records import personalise_values
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site import Site
from safn_core.federation.site_privacy import effective_privacy


def reason_text(reason: dict, *, short: bool = False) -> str:
    """A code of `personal_training` (why the site keeps the global model or trains no
    personal model) in words; ``short``: without what follows from it."""
    if reason["code"] == VALIDATION_TOO_SMALL:
        counts = reason["class_counts"]
        text = ("its validation split has " + " / ".join(str(c) for c in counts) +
                f" participants per class, fewer than min_cell = {reason['min_cell']}")
        return text if short else (text + ", too few to choose a personal model: it keeps the "
                                          "global model")
    if reason["code"] == PRIVACY_REFUSED:
        return reason["reason"]
    raise ValueError(f"unknown personalisation reason {reason!r}")


def comparison_line(c: Comparison) -> str:
    """The site's terminal line for its comparison (its own figures: it may see them all)."""
    if c.refusal is not None:
        return f"personalisation: no personal model: {c.refusal}"
    g, p = c.metrics["global"], c.metrics["personal"]
    which = ("the global model: " + reason_text(c.selected["because"], short=True)
             if c.kept_global else
             f"epoch {c.selected['epoch']}" if "epoch" in c.selected
             else f"round {c.selected.get('round')}")
    line = (f"personalisation ({c.method}, kept {which}): balanced accuracy on this site's "
            f"test split {g['balanced_accuracy']:.3f} global, {p['balanced_accuracy']:.3f} "
            f"personal ({sum(c.class_counts)} participants)")
    if not c.reported:
        line += "; not sent (a class below min_cell)"
    return line


def ditto_step(msg: Message, context: Context, site: Site, config: ConfigRecord,
               global_weights: dict, server_round: int) -> None:
    """Ditto's personal training of this round (its line on the site's terminal)."""
    try:
        privacy = effective_privacy(site, shared_config(str(config[Config.SAFN_CONFIG])).privacy)
    except (SafnError, ValueError) as exc:  # the training reply already reported it
        say(f"round {server_round}: personal model not trained: {exc}")
        return
    out = ditto_round(site, global_weights, sc.preprocessor(site, config),
                      list(config[Config.CLASS_COUNTS]), server_round=server_round,
                      privacy=privacy, state_dir=sc.state_dir(site, context),
                      run_id=sc.run_id(msg, config),
                      seed=site_seed(int(config[Config.SEED]), server_round,
                                     sc.partition(context)))
    if out.refusal is not None:
        say(f"round {server_round}: personal model not trained: {reason_text(out.refusal)}")
    elif out.trained:
        say(f"round {server_round}: personal model (ditto) trained, validation loss "
            f"{out.val_loss:.4f}; kept round {out.selected_round}")


def personalise_reply(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = sc.site_for(context, config)
    shared = shared_config(str(config[Config.SAFN_CONFIG]))
    reason = None
    try:
        privacy = effective_privacy(site, shared.privacy)
    except (SafnError, ValueError) as exc:
        privacy, reason = None, " ".join(str(exc).split())
    state = sc.state_dir(site, context)
    if privacy is not None:
        comparison = personalise(
            site, sc.global_weights(site, msg.content[ARRAYS], config),
            sc.preprocessor(site, config), list(config[Config.CLASS_COUNTS]),
            federation_threshold=float(config[Config.THRESHOLD]), privacy=privacy,
            state_dir=state, run_id=sc.run_id(msg, config),
            seed=site_seed(int(config[Config.SEED]), shared.federation.rounds + 1,
                           sc.partition(context)))
        reason = comparison.refusal
        say(comparison_line(comparison))
    else:
        comparison = Comparison.refused(site.name, shared.personalisation.method, reason,
                                        site.cohort.n_classes)
        say(f"personalisation: no personal model: {reason}")
    safe = secure.is_secure(config)
    content = {METRICS: MetricRecord(comparison_to_metrics(comparison, secure=safe))}
    if reason is not None:
        content[REFUSAL] = ConfigRecord({Describe.REASON: reason})
    if safe:
        sess = sc.session(site, context)
        masked = secure.mask(sess, state, config,
                             personalise_values(comparison.confusion, reason is None,
                                                site.cohort.n_classes))
        content[ARRAYS] = ArrayRecord({MASKED: Array(masked)})
        content[secure.RECORD] = secure.announce(sess, config)
    return Message(RecordDict(content), reply_to=msg)
