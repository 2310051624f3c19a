"""Privacy in a run's history: ε per site per round, refusals, central DP (no Flower here).

A round's history entry (`safn_core.federation.round_record.round_entry`) may carry:

- ``privacy``: ``{site: {dp, epsilon, delta, epsilon_budget, noise_multiplier, dp_steps,
  refused}}`` for every site that answered the training message, when at least one site trains
  with DP-SGD or refused (``epsilon`` is what the site reports: spent so far over every run in its
  ledger, at its δ; None for a site without DP);
- ``refused``: ``[{site, reason}]``, sites that did not train this round, with their reason;
- ``central_dp``: the coordinator's release this round (server-side clipping + noise) and the
  cumulative site-level ε of all central-DP rounds of the run so far;
- ``distributed_dp``: the round's distributed DP-SGD step (``privacy.mode: distributed``, noise
  shares under secure aggregation; `safn.server.distributed_dp`): ``mechanism``,
  ``noise_multiplier`` σ, ``sample_rate`` q, ``clipping_norm`` C, ``effective_clipping_norm``
  C_eff, ``colluding`` t, ``sites_asked`` n, ``shares`` (in the sum), ``participants`` N,
  ``expected_batch`` q·N and ``noise_sd`` (of the noised mean gradient); where recorded,
  ``sites_with_data`` (the sites whose clipped gradients are in the sum, when a site that does
  not train still sends its share of the noise). Every site's ε is then
  in ``privacy`` as for DP-SGD: each site's ledger records the round as ``(σ, q, 1 step)``.

This module turns those entries into ε tables, summaries for the bundle and round-line text.
"""

from __future__ import annotations

import math

import pandas as pd

from safn_core.federation.protocol import Metric

CENTRAL_DP = "central DP (server-side clipping + noise), no per-site ε"

SITE_DP_SGD = ("DP-SGD at the site (Opacus, Poisson sampling); ε spent so far over every run in "
               "the site's ledger, at its δ")
DISTRIBUTED_DP = "distributed DP-SGD (noise shares under secure aggregation)"
SITE_DISTRIBUTED = ("distributed DP-SGD (noise shares under secure aggregation: one Poisson-"
                    "subsampled Gaussian step over the union of the sites per round, recorded in "
                    "every site's ledger as (σ, q, 1 step)); ε spent so far over every run in the "
                    "site's ledger, at its δ")


def distributed_guarantee(colluding: int) -> str:
    """What distributed DP guarantees, and against whom (the words of the run's
    ``distributed_dp.json``, `safn.server.distributed_dp.GUARANTEE`)."""
    return ("record-level (ε, δ)-DP for every participant, at each site's own δ, against the "
            "coordinator and anyone who receives the model, even together with up to "
            f"{int(colluding)} colluding or dropped-out sites (the honest sites' noise shares "
            "alone carry the noise); it assumes the sites run safn's ClientApp unmodified and "
            "that the coordinator does not invent sites (secure aggregation's threat model)")


def distributed_applied(record: dict) -> bool:
    """Whether a round's distributed DP step was taken: at least n − t shares in the sum and
    some participant in it (else the coordinator left the model unchanged)."""
    return (int(record.get("shares", 0)) >= int(record["sites_asked"]) - int(record["colluding"])
            and int(record.get("participants", 0)) > 0)


def strategy_label(cfg) -> str:
    """The run's strategy in words (results.json): the coordinator's optimiser step on the
    noised gradient under distributed DP, else ``federation.strategy``."""
    if cfg.privacy.mode == "distributed":
        return f"distributed DP ({cfg.privacy.distributed.optimizer})"
    return cfg.federation.strategy


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
        kind = "distributed" if e.get("distributed_dp") else "dp-sgd"
        for site, r in (e.get("privacy") or {}).items():
            rows.append({"round": e["round"], "site": site,
                         "dp": kind if r.get("dp") else "off",
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
    δ), budget, rounds trained / refused and its ``mode`` (dp-sgd or distributed); distributed
    DP's mechanism, guarantee (against whom), σ, q, C and rounds; central DP's mechanism, σ, C
    and final ε; the sites whose statistics round went through the Gaussian mechanism
    (``statistics``: site → σ, ε spent so far after it, δ). None when the run used no DP."""
    sites: dict[str, dict] = {}
    for e in history:
        kind = "distributed" if e.get("distributed_dp") else "dp-sgd"
        for site, r in (e.get("privacy") or {}).items():
            s = sites.setdefault(site, {"dp": False, "rounds_trained": 0, "rounds_refused": 0})
            s["dp"] = s["dp"] or bool(r.get("dp"))
            if r.get("dp"):
                s["mode"] = kind
            s["rounds_refused" if r.get("refused") else "rounds_trained"] += 1
            if r.get("dp") and r.get("epsilon") is not None:
                s.update(epsilon=r["epsilon"], delta=r.get("delta"),
                         epsilon_budget=r.get("epsilon_budget"),
                         noise_multiplier=r.get("noise_multiplier") or s.get("noise_multiplier"))
    central = [e["central_dp"] for e in history if e.get("central_dp")]
    distributed = [e["distributed_dp"] for e in history if e.get("distributed_dp")]
    if not any(s["dp"] for s in sites.values()) and not central and not statistics \
            and not distributed:
        return None
    out: dict = {}
    if statistics:
        out["statistics_dp"] = {
            "mechanism": "Gaussian mechanism on the statistics round (privacy.statistics: "
                         "gaussian), charged to the site's ledger",
            "sites": {k: {"noise_multiplier": v[Metric.NOISE_MULTIPLIER],
                          "epsilon": v[Metric.EPSILON], "delta": v[Metric.DELTA]} for k, v in sorted(statistics.items())}}
    if sites:
        modes = {s.get("mode") for s in sites.values() if s["dp"]}
        if modes == {"distributed"}:
            mechanism = SITE_DISTRIBUTED
        elif "distributed" in modes:
            mechanism = ("per site as marked (mode): " + SITE_DP_SGD.split(";")[0] + ", or "
                         + DISTRIBUTED_DP + "; ε spent so far over every run in the site's "
                         "ledger, at its δ")
        else:
            mechanism = SITE_DP_SGD
        out["site_dp"] = {"mechanism": mechanism, "sites": sites}
    if distributed:
        last = distributed[-1]
        t = int(last["colluding"])
        out["distributed_dp"] = {
            "mechanism": last.get("mechanism") or DISTRIBUTED_DP,
            "guarantee": distributed_guarantee(t),
            "noise_multiplier": last["noise_multiplier"], "sample_rate": last["sample_rate"],
            "clipping_norm": last["clipping_norm"],
            "effective_clipping_norm": last.get("effective_clipping_norm"),
            "colluding": t, "rounds": len(distributed),
            "rounds_applied": sum(distributed_applied(d) for d in distributed),
            "sites": sorted(n for n, s in sites.items() if s.get("mode") == "distributed")}
    if central:
        last = central[-1]
        out["central_dp"] = {k: last[k] for k in ("mechanism", "noise_multiplier",
                                                  "clipping_norm", "sites_per_round", "delta",
                                                  "epsilon", "releases")}
    return out


def _eps(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def privacy_lines(entry: dict) -> list[str]:
    """Round-line text: distributed DP's step, ε per site, central DP, refusals."""
    lines = []
    d = entry.get("distributed_dp")
    if d:
        taken = ("" if distributed_applied(d) else
                 "; fewer than n − t shares: no step taken, the model is unchanged")
        data = d.get("sites_with_data")  # sites whose data are in the sum (the others: noise)
        data = (f", data from {data} site{'' if data == 1 else 's'}"
                if data is not None and data != d["shares"] else "")
        lines.append(f"  {DISTRIBUTED_DP}: σ {d['noise_multiplier']:.3g}, q "
                     f"{d['sample_rate']:.3g}, C {d['clipping_norm']:.3g}, t {d['colluding']} "
                     f"(colluding or dropped-out sites); {d['shares']} of {d['sites_asked']} "
                     f"shares in the sum{data} ({d['participants']} participants, expected "
                     f"batch {d['expected_batch']:.1f}){taken}")
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
        what = "distributed DP ε" if d else "DP-SGD ε"
        lines.append(f"  {what} spent so far" + (f" (δ {', '.join(delta)})" if delta else "")
                     + ": " + ", ".join(parts))
    c = entry.get("central_dp")
    if c:
        lines.append(f"  {CENTRAL_DP}: ε {c['epsilon']:.3g} at δ {c['delta']:.2g} after "
                     f"{c['releases']} releases (σ {c['noise_multiplier']:.3g}, "
                     f"C {c['clipping_norm']:.3g}, effective σ {c['effective_noise_multiplier']:.3g})")
    for x in entry.get("refused", []):
        lines.append(f"  site {x['site']} did not train: {x['reason']}")
    return lines
