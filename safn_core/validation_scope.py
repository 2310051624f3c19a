"""Is an evaluation internal, external, mixed or unknown: the validated data's sites against
the training (and held-out) sites a bundle records, and what that means for its figures.

`safn-validate` labels every output with it (`safn_core.cli.validate`). Names are all a bundle
records, so sites are matched by name: a federation knows a site by its site.yaml ``site.name``;
a table by its site column values (also as ``site_<value>``, how a simulation with
``partition: natural`` names them). A simulation's virtual sites cut at random from one cohort
match no table's sites: the label is then unknown.
"""

from __future__ import annotations

import numpy as np

# site values that name no site: a table without a site column ("all"), a PPMI participant
# whose site is unknown
NO_SITE = {"all", "nan", "none", ""}


def recorded_sites(meta: dict) -> tuple[list[str], list[str]]:
    """The training sites and the held-out (evaluation-only) sites a bundle records: a
    federation's site names, or the site column values of a centralised bundle's table."""
    training = meta.get("training") or {}
    sites = training.get("sites") or []
    names = sites.keys() if isinstance(sites, dict) else sites
    return (sorted(str(s) for s in names if not is_no_site(s)),
            sorted(str(s) for s in training.get("held_out_sites") or []))


def is_no_site(value) -> bool:
    """A site value that names no site (no site column, an unknown PPMI site)."""
    return str(value).strip().lower() in NO_SITE


def _random_virtual_sites(bundle, training: list[str]) -> bool:
    """A simulation's virtual sites cut at random from one cohort (``simulation.partition``
    iid, dirichlet or size_skew): their names say nothing about a table's site column."""
    sim = bundle.config.simulation
    names = {f"site_{i + 1:02d}" for i in range(sim.n_sites)}
    return (bundle.meta.get("kind") == "federated" and sim.partition != "natural"
            and bool(training) and set(training) <= names)


def validation_scope(bundle, validated: list[str] | None, *, by_site_file: bool = False,
                     same_data: bool = False) -> dict:
    """Is this evaluation internal, external, mixed or unknown, and why.

    ``validated`` names the evaluated data's sites: the site.yaml ``site.name`` (how a
    federation knows a site) or the data's site column values (None when it has none). A
    value matches a training site by its name, or as ``site_<value>`` (how a simulation with
    ``partition: natural`` names the sites of a site column). Names are all a bundle records,
    so a new site reusing a training site's name reads as internal. ``same_data``: the data
    file is the one the bundle's config names (the training table of a centralised bundle).
    """
    training, held_out = recorded_sites(bundle.meta)

    def trained(v: str) -> bool:
        return v in training or f"site_{v}" in training

    scope = {"training_sites": training, "held_out_sites": held_out,
             "validated_sites": validated, "by": "site.name in the site file" if by_site_file
             else "the data's site column"}
    if (validated is None or not training
            or (not by_site_file and _random_virtual_sites(bundle, training))):
        label = "internal" if same_data else "unknown"
        scope.update(validation=label, internal_sites=[], external_sites=[])
    else:
        inside = [v for v in validated if trained(v)]
        outside = [v for v in validated if not trained(v)]
        label = "internal" if not outside else "external" if not inside else "mixed"
        scope.update(validation=label, internal_sites=inside, external_sites=outside)
    scope["note"] = scope_note(bundle, scope, same_data) + recalibration_note(bundle.meta)
    return scope


def recalibration_note(meta: dict) -> str:
    """For a site bundle (``safn-validate --recalibrate``): its calibration map and threshold
    were fitted on some of one site's participants, and figures on data that includes them are
    optimistic for calibration and the threshold-based metrics. Empty for any other bundle."""
    rec = meta.get("recalibration")
    if not rec:
        return ""
    r = rec.get("recalibration_part") or {}
    return (f" This bundle's calibration map and threshold were fitted at {rec.get('site')} on "
            f"{r.get('n', 'some')} of its participants (its recalibration_split.csv lists "
            "them): on data that includes them, calibration and the threshold-based metrics are "
            "optimistic; validate on that site's evaluation part, or on other data.")


def scope_note(bundle, scope: dict, same_data: bool) -> str:
    """Plain words on what the label means for these figures."""
    label, federated = scope["validation"], bundle.meta.get("kind") == "federated"
    inside, outside = ", ".join(scope["internal_sites"]), ", ".join(scope["external_sites"])
    train = ", ".join(scope["training_sites"]) or "none recorded"
    if label == "unknown":
        why = ("the data has no site column" if scope["validated_sites"] is None
               else "the bundle records no training site names" if not scope["training_sites"]
               else "the model was trained on virtual sites cut at random from one cohort "
                    f"(simulation.partition {bundle.config.simulation.partition})")
        return (f"Unknown whether these participants trained the model: {why}, so their sites "
                "cannot be matched to the training sites. Treat the figures as internal "
                "(optimistic) unless the data is known to be new.")
    if label == "external":
        held = [v for v in scope["external_sites"]
                if v in scope["held_out_sites"] or f"site_{v}" in scope["held_out_sites"]]
        extra = (f" {', '.join(held)} took part in the run as held-out site(s): evaluated the "
                 "model during the run, never trained it." if held else "")
        if federated and scope["by"] == "the data's site column":
            extra += (" A federation knows its sites by their site.yaml names: for a training "
                      "site's own data, validate with --site site.yaml.")
        what = (f"{outside} did not train this model (training sites: {train}" if federated
                else f"the model's training table has no participants from {outside} (its "
                     f"sites: {train}")
        return f"External validation: {what}; matched by site name).{extra}"
    if federated:
        whose = f"{inside}'s own" if inside else "the training sites'"
        risk = (f"These participants may include {whose} training participants: the "
                "model was fitted on each training site's training split and chosen on its "
                "validation split, and only its test split was unseen. The figures are "
                "optimistic; the model card's test-split figures are the internal estimate on "
                "unseen participants.")
        seen, unseen = f"{inside} trained this model", f"{outside} did not"
    else:
        risk = ("The model's final fit used every participant of its training table; "
                + ("this is that table: these participants trained the model and the figures "
                   "are optimistic (resubstitution)." if same_data else
                   "those of these participants who were in it trained the model, and the "
                   "figures are optimistic to that extent.")
                + " The model card's cross-validation figures are the internal estimate on "
                  "unseen participants.")
        seen = f"the model's training table has participants from {inside or 'this data'}"
        unseen = f"none from {outside}"
    if label == "mixed":
        return (f"Mixed: {seen}, {unseen} (matched by site name); the figures mix seen and "
                f"unseen participants. {risk} Validate each site's data on its own for separate "
                "internal and external figures.")
    return f"Internal validation: {seen}. {risk}"


def modality_weights(bundle, alpha: np.ndarray) -> dict[str, float]:
    """The mean weight of each modality over the rows of ``alpha``."""
    mods = [m.name for m in bundle.preprocessor.modalities]
    return {m: float(a) for m, a in zip(mods, alpha.mean(0))}


def scope_record(site) -> dict:
    """What ``validation.json`` says of the evaluation's scope, model and data (``site``: a
    `validation.SiteData`)."""
    scope = site.scope
    return {"validation": scope["validation"], "validation_note": scope["note"],
            "training_sites": scope["training_sites"], "held_out_sites": scope["held_out_sites"],
            "validated_sites": scope["validated_sites"], "sites_matched_by": scope["by"],
            "model": str(site.model), "data": site.source}
