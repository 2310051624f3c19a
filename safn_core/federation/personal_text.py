"""The personalised comparison (``personalisation.json``) in English, for the coordinator's
console and the run report."""

from __future__ import annotations

UNAVAILABLE = ("too_few_keys", "secure_sum_failed")
"""Codes of ``pooled_from`` where the secure sum could not be made (no pooled comparison)."""


def basis_text(pooled_from: dict) -> str:
    """What the pooled comparison rests on, in words (``pooled_basis`` in the report)."""
    code = pooled_from["code"]
    if code == "secure_sum":
        return f"secure sum over {pooled_from['sites']} sites with a personal model"
    if code == "reported_sites":
        return f"sum over the {pooled_from['sites']} sites whose test split passes min_cell"
    if code == "too_few_keys":
        return (f"no pooled comparison: only {pooled_from['sites']} sites sent a key for the "
                f"secure sum, fewer than {pooled_from['min_parties']}")
    if code == "secure_sum_failed":
        return f"no pooled comparison: {pooled_from['reason']}"
    raise ValueError(f"unknown pooled comparison basis {pooled_from!r}")


def personalisation_lines(record: dict) -> list[str]:
    """The coordinator's lines for the comparison (``personalisation.json``'s record)."""
    out = []
    for name, s in record["sites"].items():
        if name in record["refused"]:
            out.append(f"personalisation: site {name} has no personal model: "
                       f"{record['refused'][name]}")
        elif s.get("kept_global"):
            out.append(f"personalisation: site {name} keeps the global model (its validation "
                       "split has a class below min_cell)"
                       + (f"; balanced accuracy {s['global']['balanced_accuracy']:.3f} "
                          f"({s['n']} test participants)" if s["reported"] else ""))
        elif not s["reported"]:
            out.append(f"personalisation: site {name} withheld its comparison (a class of its "
                       "test split below min_cell)")
        else:
            out.append(f"personalisation: site {name}: balanced accuracy "
                       f"{s['global']['balanced_accuracy']:.3f} global, "
                       f"{s['personal']['balanced_accuracy']:.3f} personal "
                       f"({s['n']} test participants)")
    for name in record["no_answer"]:
        out.append(f"personalisation: site {name} did not answer")
    pooled = record.get("pooled")
    if pooled:
        out.append(f"personalisation ({record['method']}): pooled balanced accuracy "
                   f"{pooled['global']['balanced_accuracy']:.3f} global, "
                   f"{pooled['personal']['balanced_accuracy']:.3f} personal "
                   f"({pooled['n']} test participants; {basis_text(record['pooled_from'])})")
    elif record["pooled_from"]["code"] in UNAVAILABLE:
        out.append(f"personalisation ({record['method']}): {basis_text(record['pooled_from'])}")
    else:
        out.append(f"personalisation ({record['method']}): no pooled comparison (fewer than "
                   "min_cell test participants of a class in the sum)")
    return out
