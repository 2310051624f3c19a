"""What a federated model's figures rest on: each site's kind of data, and the participants and
sites behind its pooled and held-out metrics (no Flower here).

The coordinator's own ``data`` section says nothing about the sites' data (it is a default on a
coordinator), so the model card and the run report take both from what the sites said:

- ``data_sources``: site → the kind of data its own ``data.source`` names (``synthetic``,
  ``ppmi``, ``table``), from the statistics round (`safn.server.statistics_round.Described.sources`);
- ``test_evaluation`` (`evaluation_basis`): the selected round's pooled test participants, the
  sites they come from, the sites that withheld theirs, and each held-out site's own count.

Only counts that the sites themselves released pass through here (each above ``min_cell``, or
under secure aggregation the federation-wide sum); a site that withheld its metrics is named,
never counted.
"""

from __future__ import annotations

SOURCE_NAMES = {"synthetic": "synthetic PPMI-style cohort (not real patients)",
                "ppmi": "PPMI download", "table": "table (with a column mapping)"}
"""How the model card and the report name a site's ``data.source``."""


def source_name(kind: str) -> str:
    """A readable name of a ``data.source`` kind (the kind itself when it is none of SAFN's)."""
    return SOURCE_NAMES.get(kind, kind)


def synthetic_sites(sources: dict[str, str]) -> list[str]:
    """The sites that said their data is the synthetic cohort."""
    return sorted(name for name, kind in sources.items() if kind == "synthetic")


def sources_line(sources: dict[str, str], held_out: list[str] | tuple[str, ...] = ()) -> str:
    """One line (``data: …``): every site's kind of data, as it described it in the statistics
    round."""
    if sources and len(synthetic_sites(sources)) == len(sources):
        return (f"data: {SOURCE_NAMES['synthetic']} at every site "
                f"({', '.join(sorted(sources))}), as each described its data in the statistics "
                "round")
    return "data, as each site described it in the statistics round: " + "; ".join(
        f"{name}{' (held out)' if name in held_out else ''}: {source_name(kind)}"
        for name, kind in sorted(sources.items()))


def evaluation_basis(entry: dict, training_sites: list[str], min_cell: int) -> dict:
    """What the pooled test metrics of a round's history entry rest on.

    ``participants``: the pooled test participants (0 when no pooled metrics exist); ``sites``:
    the training sites they come from (plain: those that did not withhold theirs; secure
    aggregation: those in the sum, where known); ``withheld``: plain, the sites that withheld
    their test metrics (a class below min_cell), which are not in the pool; secure, the sites
    whose *own* metrics are below min_cell, whose values are still in the sum; ``held_out``:
    each held-out site's own count (None: withheld). ``min_cell`` is the run's, a lower bound
    (a site may set a larger one).
    """
    secure = bool(entry.get("secure_aggregation"))
    pooled = bool(entry.get("pooled"))
    withheld = sorted(entry.get("sites_withheld") or [])
    if secure:
        sites = entry.get("sites_summed")
        n_sites = int(entry.get("sites_reported", 0)) if pooled else 0
    else:
        sites = sorted(set(entry.get("sites") or {}) - set(withheld)) if pooled else []
        n_sites = len(sites)
    return {"participants": int(entry.get("n_test", 0)) if pooled else 0,
            "n_sites": n_sites, "sites": None if sites is None else sorted(sites),
            "training_sites": sorted(training_sites), "withheld": withheld,
            "secure_aggregation": secure, "min_cell": int(min_cell),
            "held_out": {name: (int(m["n"]) if m else None)
                         for name, m in sorted((entry.get("held_out") or {}).items())}}


def basis_lines(basis: dict) -> list[str]:
    """Sentences (markdown bullets' text) saying how many participants and sites the pooled
    and held-out metrics rest on."""
    n, k, m = basis["participants"], basis["n_sites"], len(basis["training_sites"])
    sites, withheld = basis.get("sites"), basis.get("withheld") or []
    below = f"a class below min_cell, at least {basis['min_cell']}"
    if not n:
        lines = ["no pooled test metrics: " + (
            f"the federation's summed test splits have {below} (secure aggregation)"
            if basis["secure_aggregation"] else f"every training site withheld its test "
                                                f"metrics ({below})")]
    else:
        named = f" ({', '.join(sites)})" if sites else ""
        text = (f"pooled test metrics rest on {n} test participants from {k} of {m} training "
                f"sites{named}")
        if basis["secure_aggregation"]:
            text += (", a secure sum: the count is federation-wide, no site's own count is "
                     "known")
            if withheld:
                text += (f"; in the sum, but their own metrics withheld ({below}): "
                         f"{', '.join(withheld)}")
        elif withheld:
            text += f"; withheld ({below}), not in the pool: {', '.join(withheld)}"
        missing = sorted(set(basis["training_sites"]) - set(sites or []) - set(withheld))
        if missing and sites is not None:
            text += f"; not evaluated in that round: {', '.join(missing)}"
        lines = [text]
    for name, count in basis.get("held_out", {}).items():
        lines.append(f"held-out {name}: " + (
            f"{count} participants (all of its data, at the training sites' threshold)"
            if count is not None else f"metrics withheld ({below})"))
    return lines
