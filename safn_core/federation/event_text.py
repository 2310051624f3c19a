"""Events in English: the only place a run's events (`safn_core.federation.events`) become
sentences, for a console or a log file (``progress.log``)."""

from __future__ import annotations

from collections.abc import Callable

from safn_core.federation.events import Event
from safn_core.federation.privacy_report import privacy_lines


def _names(sites) -> str:
    return ", ".join(sorted(sites))


def _sites_connected(e: dict) -> str:
    if e["connected"] >= e["expected"]:
        return f"{e['connected']} sites connected"
    return (f"{e['connected']} of {e['expected']} expected sites connected after "
            f"{e['timeout']:.0f} s; starting with them (min_sites = {e['min_sites']})")


def _statistics_noised(e: dict) -> str:
    return (f"site {e['site']} sent noised statistics (Gaussian mechanism, σ "
            f"{e['noise_multiplier']:.3g}; its ε spent so far {e['epsilon']:.3g} at δ "
            f"{e['delta']:.2g})")


def _note(e: dict) -> str:
    code = e.get("code")
    if code == "data_changed":
        return ("note: the sites' data changed since the checkpoint; the run keeps the "
                "checkpoint's preprocessing")
    if code == "selection_kept":
        return (f"note: the checkpoint selects by {e['select']} (patience {e['patience']}); "
                f"the resumed run keeps that rule, not the configuration's "
                f"{e['configured_select']} (patience {e['configured_patience']})")
    if code == "already_stopped":
        return (f"early stopping had ended this run after round {e['round']}: the model is "
                f"round {e['selected_round']}")
    return f"note: {code}"


def _rejoin(e: dict) -> str:
    when, sites = f"round {e['round']}", _names(e["sites"])
    if e["code"] == "waiting":
        return (f"{when}: waiting up to {e['timeout']:.0f} s for {sites} to reconnect "
                "(federation.rejoin_wait)")
    if e["code"] == "back":
        return f"{when}: {sites} reconnected after {e['seconds']:.0f} s"
    return (f"{when}: {sites} did not reconnect within {e['timeout']:.0f} s; going on without "
            "it (not waited for again until it is back)")


def _harmonisation(e: dict) -> str:
    code = e["code"]
    if code == "kept":
        return (f"harmonisation: the run's ComBat fit ({e['participants']} participants) is "
                f"kept from {e['file']}")
    if code == "clipped":
        return f"harmonisation: values clipped to their bounds: {e['clipped']}"
    return (f"harmonisation: ComBat fitted on the training splits of {e['sites']} sites "
            f"({e['participants']} participants, {e['features']} features, covariates "
            f"{', '.join(e['covariates']) or 'none'}"
            + ("; securely summed)" if e.get("secure") else ")"))


def _dp_plan(e: dict) -> str:
    code = e["code"]
    if code == "declined":
        return f"distributed DP: site {e['site']} takes no part: {e['reason']}"
    if code == "stopped":
        return f"distributed DP: the run cannot start: {e['reason']}"
    if code == "kept":
        return (f"distributed DP: the run's plan kept (σ {e['noise_multiplier']:.4g}, "
                f"{e['sites']} sites)")
    return (f"distributed DP: σ {e['noise_multiplier']:.4g} (the largest any of the "
            f"{e['sites']} sites' remaining budgets needs for {e['rounds']} rounds), sampling "
            f"rate {e['sample_rate']:g}, clipping norm {e['clipping_norm']:g}; the guarantee "
            f"holds against the coordinator with up to {e['colluding']} colluding sites")


def _logistic(e: dict) -> str:
    code = e["code"]
    if code == "kept":
        return f"logistic regression floor: kept from {e['file']} (penalty {e['penalty']:g})"
    if code == "skipped":
        return (f"logistic regression floor: not fitted, {e['reason']}; SAFN's wide path starts "
                "at zero")
    text = (f"logistic regression floor: fitted on the training splits of {e['sites']} sites in "
            f"{e['iterations']} Newton rounds ({e['participants']} participants"
            + (", securely summed" if e.get("secure") else "")
            + f"); penalty {e['penalty']:g} chosen by the pooled validation loss; SAFN starts "
            "from it")
    if e.get("clipped"):
        text += (f" ({e['clipped']} feature values beyond the fixed-point bound were clipped: "
                 "the fit is close to, not equal to, the pooled one)")
    if not e.get("converged", True):
        text += " (Newton did not converge within its round limit)"
    return text


def _stopped_early(e: dict) -> str:
    return (f"early stopping after round {e['round']}: {e['patience']} rounds without "
            f"improvement of the pooled {e['select'].replace('_', ' ')}; the model is round "
            f"{e['selected_round']}")


def checkpoint_text(kept_round: int | None, folder) -> str:
    """What a stopped run keeps, in words: the checkpoint of ``kept_round`` in ``folder``, or
    that it has none."""
    if kept_round is None:
        return "no round was completed, so there is no checkpoint"
    return f"the checkpoint of round {kept_round} is kept in {folder}"


def _run_end(e: dict) -> str:
    if e["status"] == "completed":
        return f"run completed after round {e['round']}"
    return (f"run stopped: {e['detail']}; "
            f"{checkpoint_text(e.get('checkpoint_round'), e.get('checkpoints'))}")


def round_text(e: dict) -> str:
    return round_line(e["entry"], e["rounds"])


def _personalisation(e: dict) -> str:
    from safn_core.federation.personal_text import personalisation_lines

    return "\n".join(personalisation_lines(e["record"]))


_TEXT: dict[str, Callable[[dict], str]] = {
    Event.SITES_CONNECTED: _sites_connected,
    Event.STATISTICS: lambda e: (f"statistics round: {e['participants']} training participants "
                                 f"at {e['sites']} sites; class counts {e['class_counts']}"),
    Event.STATISTICS_WITHHELD: lambda e: f"site {e['site']} withheld its statistics: "
                                         f"{e['reason']}",
    Event.STATISTICS_NOISED: _statistics_noised,
    Event.STATISTICS_CLIPPED: lambda e: ("secure aggregation: statistics values clipped to the "
                                         f"configured bounds (federation.secagg): {e['clipped']}"),
    Event.FEATURES_WITHHELD: lambda e: (f"{e['features']} features observed in fewer than "
                                        "min_cell people across the federation are withheld"),
    Event.SECURE_STATISTICS: lambda e: (f"secure aggregation: statistics summed over "
                                        f"{e['sites']} sites; the coordinator sees only "
                                        "federation-wide sums"),
    Event.HELD_OUT: lambda e: "held-out sites (evaluation only): " + _names(e["sites"]),
    Event.RESUMED: lambda e: f"resuming after round {e['round']} of {e['rounds']}",
    Event.NOTE: _note,
    Event.HARMONISATION: _harmonisation,
    Event.LOGISTIC: _logistic,
    Event.DP_PLAN: _dp_plan,
    Event.REJOIN: _rejoin,
    Event.SECURE_RETRY: lambda e: (f"secure aggregation {e['aggregation']} round {e['round']}: "
                                   f"{e['lost']} site(s) did not answer; redoing it with the "
                                   f"{e['others']} others and fresh keys"),
    Event.ROUND: round_text,
    Event.STOPPED_EARLY: _stopped_early,
    Event.PERSONALISATION: _personalisation,
    Event.RUN_END_UNACKNOWLEDGED: lambda e: (
        f"{e['waiting']} of {e['sites']} connected sites did not acknowledge the end of the run "
        f"within {e['timeout']:.0f} s; they keep waiting until stopped"),
    Event.RUN_END: _run_end,
}


def render(event: dict) -> str:
    """One line (or a few) for ``event``; an unknown code is shown as its code and fields."""
    text = _TEXT.get(event.get("event", ""))
    if text is None:
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        return f"{event.get('event')}: {fields}"
    return text(event)


def shown(show_line: Callable[[str], None]) -> Callable[[dict], None]:
    """An `EventLog` echo that shows each event in English with ``show_line``."""
    return lambda event: show_line(render(event))


def rejection_text(x: dict) -> str:
    """Why the coordinator did not use a site's update (a ``rejected`` entry of a round)."""
    code = x.get("code")
    if code == "site_failed":
        return f"the site failed: {x.get('detail', '')}"
    if code == "no_arrays":
        return "reply has no model arrays"
    if code == "wrong_names":
        return f"wrong array names ({', '.join(x.get('arrays', []))})"
    if code == "wrong_shape":
        return (f"wrong shape of {x['array']}: {tuple(x['shape'])} instead of "
                f"{tuple(x['expected'])}")
    if code == "non_finite":
        return f"non-finite values (NaN/Inf) in {x['array']}"
    if code == "no_examples":
        return "no positive num-examples"
    if code == "too_few":
        return (f"only {x['kept']} acceptable updates, fewer than min_sites = "
                f"{x['min_sites']}: the model is unchanged this round")
    return str(x.get("reason", code))  # a history written before codes


def _figure(value) -> str:
    """A metric to 3 decimals ("n/a" where a K-class metric is undefined: None)."""
    return "n/a" if value is None else f"{value:.3f}"


def _held_out_kclass(m: dict) -> str:
    """A held-out site's K-class metrics (argmax rule: no sensitivity or specificity)."""
    ci = (m.get("ci") or {}).get("roc_auc")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    text = (f"ROC-AUC {_figure(m.get('roc_auc'))}{interval}  "
            f"bal acc {_figure(m.get('balanced_accuracy'))}")
    if m.get("qwk") is not None:
        text += f"  QWK {_figure(m['qwk'])}"
    return text + (f"  ({m['n']} participants)" if "n" in m else "")


def round_line(entry: dict, rounds: int) -> str:
    """One readable progress line per round (pooled metrics, sites that reported), then
    indented lines for ε per site, central DP, refusals and rejected updates."""
    text = f"round {entry['round']:>3}/{rounds}"
    if entry["round"] == 0:
        text += "  (the initial model, the logistic regression floor: no training)"
    if "train_loss" in entry:
        text += f"  train loss {entry['train_loss']:.4f}"
    p = entry.get("pooled")
    if p:
        pr_auc = p["pr_auc_pd"] if "pr_auc_pd" in p else p["pr_auc"]  # K classes: macro
        text += (f"  pooled ROC-AUC {_figure(p['roc_auc'])}  PR-AUC {_figure(pr_auc)}  "
                 f"bal acc {_figure(p['balanced_accuracy'])}"
                 + (f"  QWK {_figure(p['qwk'])}" if p.get("qwk") is not None else "")
                 + f"  ({entry['n_test']} test participants "
                 f"at {entry['sites_reported']} sites")
        if entry.get("sites_withheld") and entry.get("secure_aggregation"):
            text += (f", securely summed; {len(entry['sites_withheld'])} sites' own metrics "
                     "below min_cell")
        elif entry.get("sites_withheld"):
            text += f"; {len(entry['sites_withheld'])} below min_cell"
        elif entry.get("secure_aggregation"):
            text += ", securely summed"
        text += ")"
    elif "sites_reported" in entry:
        text += "  no site could report test metrics (all below min_cell)"
    if "val_loss" in entry:
        text += f"  val loss {entry['val_loss']:.4f}"
    if entry.get("selected_round") is not None:
        text += ("  [selected]" if entry["selected_round"] == entry["round"]
                 else f"  [selected: round {entry['selected_round']}]")
    for name, m in (entry.get("held_out") or {}).items():
        text += (f"\n  held-out {name}: " + (
            _held_out_kclass(m) if m and "sensitivity" not in m else
            f"ROC-AUC {m['roc_auc']:.3f} [{m['ci']['roc_auc'][0]:.3f}, "
            f"{m['ci']['roc_auc'][1]:.3f}]  bal acc {m['balanced_accuracy']:.3f}  "
            f"sens {m['sensitivity']:.3f}  spec {m['specificity']:.3f}  ({m['n']} participants)"
            if m else "below min_cell, withheld"))
    for line in privacy_lines(entry):  # ε per site, central DP, refusals
        text += "\n" + line
    for x in entry.get("rejected", []):
        text += f"\n  rejected update from site {x['site']}: {rejection_text(x)}"
    return text
