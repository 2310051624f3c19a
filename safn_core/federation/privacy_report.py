"""Privacy in a run's history: ε per site per round, refusals, central DP (no Flower here).

A round's history entry (`safn_core.federation.round_record.round_entry`) may carry:

- ``privacy``: ``{site: {dp, epsilon, delta, epsilon_budget, noise_multiplier, dp_steps,
  refused}}`` for every site that answered the training message, when at least one site trains
  with DP-SGD or refused (``epsilon`` is what the site reports: spent so far over every run in its
  ledger, at its δ; None for a site without DP);
- ``refused``: ``[{site, reason}]``, sites that did not train this round, with their reason;
- ``central_dp``: the coordinator's release this round (server-side clipping + noise) and the
  cumulative site-level ε of all central-DP rounds of the run so far.

This module turns those entries into ε tables, summaries for the bundle and round-line text.
"""

from __future__ import annotations

import math

import pandas as pd

from safn_core.federation.protocol import Metric

CENTRAL_DP = "central DP (server-side clipping + noise), no per-site ε"


def central_epsilon(effective_noise: list[float], delta: float) -> float:
    """Site-level ε of the central-DP releases so far: one Gaussian mechanism per round with
    noise multiplier z (relative to one site's sensitivity), composed by Opacus' RDP accountant
    with sampling rate 1 (the coordinator's seeded site selection gives no amplification)."""
    from safn_core.privacy.accountant import epsilon

    return epsilon([(float(z), 1.0, 1) for z in effective_noise], delta, "rdp")


def central_entry(release: dict, history: list[dict], delta: float) -> dict:
    """The ``central_dp`` field of a round: this release and ε over the run's releases so far
    (those recorded in earlier rounds' entries, so a resumed run keeps counting)."""
    earlier = [e["central_dp"]["effective_noise_multiplier"] for e in history
               if e.get("central_dp")]
    z = release["effective_noise_multiplier"]
    return {"mechanism": CENTRAL_DP, **release, "delta": float(delta),
            "releases": len(earlier) + 1,
            "epsilon": central_epsilon(earlier + [z], delta)}


def privacy_entry(reports: dict[str, dict]) -> dict[str, dict] | None:
    """The ``privacy`` field of a round: every answering site's report, or None when no site
    trains with DP and none refused (a plain run's history stays as it was)."""
    if not any(r.get("dp") or r.get("refused") for r in reports.values()):
        return None
    return {site: dict(r) for site, r in sorted(reports.items())}


def epsilon_table(history: list[dict]) -> pd.DataFrame:
    """One row per round and site: ε spent so far, δ, budget, σ, steps, refused."""
    rows = []
    for e in history:
        for site, r in (e.get("privacy") or {}).items():
            rows.append({"round": e["round"], "site": site,
                         "dp": "dp-sgd" if r.get("dp") else "off",
                         "epsilon": r.get("epsilon"), "delta": r.get("delta") or None,
                         "epsilon_budget": r.get("epsilon_budget"),
                         "noise_multiplier": r.get("noise_multiplier") or None,
                         "dp_steps": r.get("dp_steps"), "refused": bool(r.get("refused"))})
    return pd.DataFrame(rows, columns=["round", "site", "dp", "epsilon", "delta",
                                       "epsilon_budget", "noise_multiplier", "dp_steps",
                                       "refused"])


def epsilon_wide(history: list[dict]) -> pd.DataFrame:
    """Rounds × sites: ε spent so far ("off" without DP; "refused" marked), for reports."""
    table = epsilon_table(history)
    if table.empty:
        return table

    def cell(r) -> str:
        if r.dp == "off":
            return "off"
        eps = "—" if r.epsilon is None or pd.isna(r.epsilon) else f"{r.epsilon:.3f}"
        return f"{eps} (refused)" if r.refused else eps

    table["cell"] = [cell(r) for r in table.itertuples()]
    wide = table.pivot(index="round", columns="site", values="cell").fillna("")
    wide.columns.name = None
    return wide.reset_index()


def privacy_summary(history: list[dict], statistics: dict[str, dict] | None = None
                    ) -> dict | None:
    """What a run's bundle says about privacy: per site the last reported ε (spent so far at its
    δ), budget, rounds trained / refused; central DP's mechanism, σ, C and final ε; the sites
    whose statistics round went through the Gaussian mechanism (``statistics``: site → σ, ε
    spent so far after it, δ). None when the run used no DP at all."""
    sites: dict[str, dict] = {}
    for e in history:
        for site, r in (e.get("privacy") or {}).items():
            s = sites.setdefault(site, {"dp": False, "rounds_trained": 0, "rounds_refused": 0})
            s["dp"] = s["dp"] or bool(r.get("dp"))
            s["rounds_refused" if r.get("refused") else "rounds_trained"] += 1
            if r.get("dp") and r.get("epsilon") is not None:
                s.update(epsilon=r["epsilon"], delta=r.get("delta"),
                         epsilon_budget=r.get("epsilon_budget"),
                         noise_multiplier=r.get("noise_multiplier") or s.get("noise_multiplier"))
    central = [e["central_dp"] for e in history if e.get("central_dp")]
    if not any(s["dp"] for s in sites.values()) and not central and not statistics:
        return None
    out: dict = {}
    if statistics:
        out["statistics_dp"] = {
            "mechanism": "Gaussian mechanism on the statistics round (privacy.statistics: "
                         "gaussian), charged to the site's ledger",
            "sites": {k: {"noise_multiplier": v[Metric.NOISE_MULTIPLIER],
                          "epsilon": v[Metric.EPSILON], "delta": v[Metric.DELTA]} for k, v in sorted(statistics.items())}}
    if sites:
        out["site_dp"] = {
            "mechanism": "DP-SGD at the site (Opacus, Poisson sampling); ε spent so far over "
                         "every run in the site's ledger, at its δ",
            "sites": sites}
    if central:
        last = central[-1]
        out["central_dp"] = {k: last[k] for k in ("mechanism", "noise_multiplier",
                                                  "clipping_norm", "sites_per_round", "delta",
                                                  "epsilon", "releases")}
    return out


def _eps(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def privacy_lines(entry: dict) -> list[str]:
    """Round-line text: ε per site, central DP, refusals."""
    lines = []
    priv = entry.get("privacy")
    if priv:
        parts = []
        for site, r in priv.items():
            if not r.get("dp"):
                parts.append(f"{site} off" + (" (refused)" if r.get("refused") else ""))
                continue
            text = f"{site} {_eps(r.get('epsilon'))}/{_eps(r.get('epsilon_budget'))}"
            if r.get("refused"):
                text += " refused"
            elif r.get("noise_multiplier"):
                text += f" (σ {r['noise_multiplier']:.3g})"
            parts.append(text)
        delta = sorted({f"{r['delta']:.2g}" for r in priv.values() if r.get("dp")
                        and r.get("delta")})
        lines.append("  DP-SGD ε spent so far" + (f" (δ {', '.join(delta)})" if delta else "")
                     + ": " + ", ".join(parts))
    c = entry.get("central_dp")
    if c:
        lines.append(f"  {CENTRAL_DP}: ε {c['epsilon']:.3g} at δ {c['delta']:.2g} after "
                     f"{c['releases']} releases (σ {c['noise_multiplier']:.3g}, "
                     f"C {c['clipping_norm']:.3g}, effective σ {c['effective_noise_multiplier']:.3g})")
    for x in entry.get("refused", []):
        lines.append(f"  site {x['site']} did not train: {x['reason']}")
    return lines
