"""What the reports say about a distributed DP run (``privacy.mode: distributed``), from
hand-made history entries (no simulation): the ε table's mechanism column, the bundle's privacy
summary (the mechanism, its guarantee and against whom), the round lines, the model card, the
run report's privacy section and results.json's strategy."""

from __future__ import annotations

import re

import pytest

from safn_core.config import load_config
from safn_core.federation.privacy_report import (DISTRIBUTED_DP, distributed_applied,
                                                 distributed_guarantee, epsilon_table,
                                                 epsilon_wide, privacy_lines, privacy_summary,
                                                 strategy_label)
from safn_core.modelcard import model_card
from safn_core.report import Report

SITES = ("site_a", "site_b", "site_c", "site_d")
SIGMA = 1.37


def site_report(eps: float, *, dp: bool = True, refused: bool = False) -> dict:
    """A site's privacy report as a round's history entry keeps it."""
    if not dp:
        return {"dp": False, "epsilon": None, "delta": 0.0, "epsilon_budget": None,
                "noise_multiplier": 0.0, "dp_steps": 0, "refused": refused}
    return {"dp": True, "epsilon": eps, "delta": 1e-5, "epsilon_budget": 3.0,
            "noise_multiplier": SIGMA, "dp_steps": 0 if refused else 1, "refused": refused}


def distributed_record(shares: int = 4, sites_asked: int = 4, colluding: int = 2,
                       participants: int = 400) -> dict:
    """A round's ``distributed_dp`` record as `safn.server.distributed_dp.DistributedDP`
    writes it."""
    expected = 0.25 * participants
    return {"mechanism": "distributed DP-SGD (noise shares under secure aggregation)",
            "noise_multiplier": SIGMA, "sample_rate": 0.25, "clipping_norm": 0.5,
            "effective_clipping_norm": 0.5000000001, "colluding": colluding,
            "sites_asked": sites_asked, "shares": shares, "participants": participants,
            "expected_batch": expected, "noise_sd": 0.0123}


def distributed_history() -> list[dict]:
    """Three rounds of a 4-site run against t = 2: in round 2 only one share reached the sum
    (fewer than n − t = 2: no step), in round 3 site_d refused (its budget)."""
    history = []
    for r in (1, 2, 3):
        privacy = {s: site_report(0.5 * r + 0.01 * i) for i, s in enumerate(SITES)}
        if r == 3:
            privacy["site_d"] = site_report(1.03, refused=True)
        record = distributed_record(shares={1: 4, 2: 1, 3: 3}[r])
        entry = {"round": r, "privacy": privacy, "distributed_dp": record}
        if r == 3:
            entry["refused"] = [{"site": "site_d", "reason": "privacy budget exhausted"}]
        history.append(entry)
    return history


def dp_sgd_history() -> list[dict]:
    """Two rounds of local DP-SGD at site_a and site_b, site_c without DP."""
    return [{"round": r, "privacy": {"site_a": site_report(0.4 * r), "site_b": site_report(0.3 * r),
                                     "site_c": site_report(0.0, dp=False)}} for r in (1, 2)]


def card_meta(history: list[dict]) -> dict:
    return {"kind": "federated", "threshold": 0.5, "class_counts": [60, 90],
            "label_names": ["HC", "PD"], "metrics": {},
            "training": {"participants": 150, "sites": list(SITES), "rounds": len(history)},
            "privacy": privacy_summary(history)}


def card_privacy(history: list[dict]) -> str:
    card = model_card(card_meta(history), load_config(None, []))
    return card.split("## Privacy\n", 1)[1].split("\n## ", 1)[0]


# -- the ε table --------------------------------------------------------------------------------


def test_the_epsilon_table_names_the_distributed_mechanism_per_round():
    table = epsilon_table(distributed_history())
    assert set(table["dp"]) == {"distributed"}
    assert len(table) == 3 * len(SITES)
    # a round without distributed_dp is local DP-SGD, a site without DP is off
    plain = epsilon_table(dp_sgd_history())
    assert set(plain.loc[plain.site != "site_c", "dp"]) == {"dp-sgd"}
    assert set(plain.loc[plain.site == "site_c", "dp"]) == {"off"}
    # the wide table (ε per site per round) still shows every distributed site's ε
    wide = epsilon_wide(distributed_history())
    assert wide.loc[wide["round"] == 3, "site_d"].item() == "1.030 (refused)"
    assert wide.loc[wide["round"] == 1, "site_b"].item() == "0.510"


# -- the bundle's privacy summary ---------------------------------------------------------------


def test_the_summary_carries_the_distributed_mechanism_and_its_guarantee():
    summary = privacy_summary(distributed_history())
    d = summary["distributed_dp"]
    assert d["mechanism"] == DISTRIBUTED_DP
    assert (d["noise_multiplier"], d["sample_rate"], d["clipping_norm"], d["colluding"]) == (
        SIGMA, 0.25, 0.5, 2)
    assert d["rounds"] == 3 and d["rounds_applied"] == 2  # round 2 had 1 < n − t = 2 shares
    assert d["sites"] == list(SITES)
    assert "up to 2 colluding or dropped-out sites" in d["guarantee"]
    assert "against the coordinator" in d["guarantee"]
    assert "does not invent sites" in d["guarantee"]
    # every site's final ε stays in site_dp, which no longer claims local DP-SGD
    site_dp = summary["site_dp"]
    assert "Opacus" not in site_dp["mechanism"] and "at the site" not in site_dp["mechanism"]
    assert site_dp["mechanism"].startswith("distributed DP-SGD")
    assert site_dp["sites"]["site_c"]["epsilon"] == pytest.approx(1.52)
    assert site_dp["sites"]["site_d"]["rounds_refused"] == 1
    assert {s["mode"] for s in site_dp["sites"].values()} == {"distributed"}


def test_a_dp_sgd_run_is_summarised_as_before():
    summary = privacy_summary(dp_sgd_history())
    assert "distributed_dp" not in summary
    assert summary["site_dp"]["mechanism"].startswith("DP-SGD at the site (Opacus")
    assert summary["site_dp"]["sites"]["site_a"]["mode"] == "dp-sgd"
    assert privacy_summary([{"round": 1}]) is None


def test_the_guarantee_is_the_one_the_coordinator_writes_into_distributed_dp_json():
    from safn.server.distributed_dp import GUARANTEE

    for t in (0, 1, 3):
        assert distributed_guarantee(t) == GUARANTEE.format(t=t)


def test_a_round_takes_its_step_only_with_n_minus_t_shares_and_participants():
    assert distributed_applied(distributed_record(shares=2, sites_asked=4, colluding=2))
    assert not distributed_applied(distributed_record(shares=1, sites_asked=4, colluding=2))
    assert not distributed_applied(distributed_record(shares=4, participants=0))


# -- round lines --------------------------------------------------------------------------------


def test_the_round_lines_show_the_distributed_step_and_the_sites_epsilon():
    history = distributed_history()
    first = privacy_lines(history[0])
    assert first[0].strip().startswith(DISTRIBUTED_DP)
    assert "σ 1.37" in first[0] and "t 2" in first[0] and "4 of 4 shares" in first[0]
    assert "no step taken" not in first[0]
    assert first[1].strip().startswith("distributed DP ε spent so far")
    assert "site_a 0.5/3" in first[1]
    assert "no step taken" in privacy_lines(history[1])[0]  # 1 share of 4, t = 2
    third = privacy_lines(history[2])
    assert any("site site_d did not train: privacy budget exhausted" in x for x in third)
    plain = privacy_lines(dp_sgd_history()[0])
    assert plain[0].strip().startswith("DP-SGD ε spent so far")
    assert not any(DISTRIBUTED_DP in x for x in plain)


# -- the model card ------------------------------------------------------------------------------


def test_the_model_card_states_the_distributed_guarantee_and_against_whom():
    text = card_privacy(distributed_history())
    assert DISTRIBUTED_DP in text
    assert "σ 1.37" in text and "t = 2 colluding or dropped-out sites" in text
    assert "2 of 3 rounds took their step" in text
    assert "guarantee: record-level (ε, δ)-DP for every participant" in text
    assert "against the coordinator and anyone who receives the model" in text
    assert "up to 2 colluding or dropped-out sites" in text
    assert re.search(r"not against: .*invents sites.*modified software", text)
    assert "DP-SGD at the site (Opacus" not in text
    assert "site_c: ε 1.520 of 3" in text
    assert "not covered: the statistics round" in text


def test_the_model_card_of_a_dp_sgd_run_claims_no_distributed_guarantee():
    text = card_privacy(dp_sgd_history())
    assert "DP-SGD at the site (Opacus" in text
    assert DISTRIBUTED_DP not in text and "guarantee:" not in text


def test_a_distributed_site_that_never_trained_is_named_as_such_on_the_card():
    history = distributed_history()
    for e in history:
        e["privacy"]["site_d"] = {**site_report(0.0, refused=True), "epsilon": None}
    text = card_privacy(history)
    assert "site_d: distributed DP, no round trained (3 refused)" in text


# -- the run report ------------------------------------------------------------------------------


def privacy_html(history: list[dict], tmp_path) -> str:
    from safn_core.federation.run_report import privacy_section

    rep = Report("test")
    privacy_section(rep, history, tmp_path)
    return rep.write(tmp_path / "report.html").read_text()


def test_the_report_shows_the_mode_sigma_t_and_epsilon_per_site_per_round(tmp_path):
    import html

    page = html.unescape(privacy_html(distributed_history(), tmp_path))
    assert "Mode: distributed DP (privacy.mode: distributed)" in page
    assert "σ = 1.37" in page and "t = 2 colluding or dropped-out sites" in page
    assert "up to 2 colluding or dropped-out sites" in page  # the guarantee, against whom
    assert "distributed DP per round" in page
    assert "no (fewer than n − t shares)" in page  # round 2
    assert "<td>0.0123</td>" in page  # the noise SD per round
    assert "ε per site per round" in page
    assert "1.030 (refused)" in page and "<td>1.520</td>" in page  # site_c, round 3
    assert "ε per site is what each DP-SGD site reports" not in page


def test_the_report_of_a_dp_sgd_run_has_no_distributed_section(tmp_path):
    import html

    page = html.unescape(privacy_html(dp_sgd_history(), tmp_path))
    assert "ε per site is what each DP-SGD site reports" in page
    assert "Mode: distributed DP" not in page and "distributed DP per round" not in page


# -- results.json ------------------------------------------------------------------------------


def test_results_name_the_distributed_optimiser_instead_of_the_strategy():
    cfg = load_config(None, ["privacy.mode=distributed", "privacy.epsilon=3",
                             "privacy.distributed.optimizer=sgd", "federation.strategy=fedprox"])
    assert strategy_label(cfg) == "distributed DP (sgd)"
    assert strategy_label(load_config(None, ["federation.strategy=fedprox"])) == "fedprox"
    assert strategy_label(load_config(None, ["privacy.mode=dp-sgd", "privacy.epsilon=3",
                                             "federation.strategy=fedprox"])) == "fedprox"


def test_a_round_whose_refusing_site_sent_noise_only_says_whose_data_are_in_the_sum(tmp_path):
    import html

    history = distributed_history()
    for e in history:  # the newer record: every site's noise, data from those that trained
        e["distributed_dp"]["sites_with_data"] = 3 if e["round"] == 3 else e["distributed_dp"][
            "shares"]
    history[2]["distributed_dp"]["shares"] = 4
    line = privacy_lines(history[2])[0]
    assert "4 of 4 shares in the sum, data from 3 sites" in line
    assert "data from" not in privacy_lines(history[0])[0]  # every share carried data
    page = html.unescape(privacy_html(history, tmp_path))
    assert "<th>sites_with_data</th>" in page
    assert "<th>sites_with_data</th>" not in html.unescape(
        privacy_html(distributed_history(), tmp_path))  # older records: no such column
