"""A run's events: one complete JSON line each, read back in order by a follower (also while a
line is half written), every code shown in English by event_text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safn_core.federation.event_text import render, rejection_text, shown
from safn_core.federation.events import EVENTS_FILE, Event, EventFollower, EventLog, read_events


def test_events_are_json_lines_a_follower_reads_in_order(tmp_path):
    path = tmp_path / EVENTS_FILE
    seen = []
    log = EventLog(path, shown(seen.append))
    follower = EventFollower(path)
    assert follower.events() == []  # no file yet
    log.emit(Event.RESUMED, round=np.int64(3), rounds=20)
    log.emit(Event.HELD_OUT, sites={"site_b", "site_a"})
    got = follower.events()
    assert [e["event"] for e in got] == ["resumed", "held_out"]
    assert got[0]["round"] == 3 and isinstance(got[0]["round"], int)
    assert got[1]["sites"] == ["site_a", "site_b"]  # a set, sorted
    assert seen == ["resuming after round 3 of 20", "held-out sites (evaluation only): site_a, "
                                                    "site_b"]
    assert follower.events() == []  # nothing new
    # a line being written is not read until it is complete
    with path.open("ab") as fh:
        fh.write(b'{"event": "note", "code": "data_')
    assert follower.events() == []
    with path.open("ab") as fh:
        fh.write(b'changed"}\n')
    assert [e["code"] for e in follower.events()] == ["data_changed"]
    assert len(read_events(tmp_path)) == 3
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_an_event_cannot_overwrite_its_own_fields():
    with pytest.raises(ValueError, match="'event' and 'time'"):
        EventLog(None).emit(Event.NOTE, time=1)


def test_a_follower_from_the_end_sees_only_new_events(tmp_path):
    log = EventLog(tmp_path / EVENTS_FILE)
    log.emit(Event.NOTE, code="data_changed")
    follower = EventFollower(tmp_path / EVENTS_FILE, from_end=True)
    log.emit(Event.STATISTICS, participants=10, sites=3, class_counts=[4, 6])
    assert [e["event"] for e in follower.events()] == ["statistics"]


EXAMPLES = {
    Event.SITES_CONNECTED: dict(connected=2, expected=3, timeout=300.0, min_sites=2),
    Event.STATISTICS: dict(participants=453, sites=5, class_counts=[86, 367]),
    Event.STATISTICS_WITHHELD: dict(site="a", reason="class HC below min_cell"),
    Event.STATISTICS_NOISED: dict(site="a", noise_multiplier=1.5, epsilon=0.4, delta=1e-5),
    Event.STATISTICS_CLIPPED: dict(clipped={"sum": 2}),
    Event.FEATURES_WITHHELD: dict(features=2),
    Event.SECURE_STATISTICS: dict(sites=5),
    Event.HELD_OUT: dict(sites=["c"]),
    Event.RESUMED: dict(round=3, rounds=20),
    Event.NOTE: dict(code="selection_kept", select="val_loss", patience=5,
                     configured_select="last", configured_patience=3),
    Event.HARMONISATION: dict(code="fitted", sites=3, participants=200, features=40,
                              covariates=["AGE"], secure=True),
    Event.LOGISTIC: dict(code="fitted", sites=3, participants=200, iterations=9, penalty=10.0,
                         converged=True, clipped=0, secure=True),
    Event.DP_PLAN: dict(code="planned", noise_multiplier=1.62, sample_rate=0.2,
                        clipping_norm=1.0, colluding=1, rounds=30, sites=5),
    Event.REJOIN: dict(code="back", round=4, sites=["b"], seconds=3.0),
    Event.SECURE_RETRY: dict(aggregation="train", round=2, lost=1, others=3),
    Event.ROUND: dict(entry={"round": 1, "train_loss": 0.5,
                             "rejected": [{"round": 1, "site": "c", "code": "non_finite",
                                           "array": "model"}]}, rounds=3),
    Event.STOPPED_EARLY: dict(round=8, patience=5, select="val_loss", selected_round=3),
    Event.PERSONALISATION: dict(record={"method": "ditto", "sites": {}, "refused": {},
                                        "no_answer": ["b"], "pooled": None,
                                        "pooled_from": {"code": "too_few_keys", "sites": 2,
                                                        "min_parties": 3}}),
    Event.RUN_END_UNACKNOWLEDGED: dict(waiting=1, sites=3, timeout=30.0),
    Event.RUN_END: dict(status="failed", code="SitesMissing", detail="only 1 site", round=2,
                        checkpoint_round=2, checkpoints="/run/checkpoints"),
}


def test_every_event_code_has_its_english():
    codes = {v for k, v in vars(Event).items() if k.isupper()}
    assert codes == set(EXAMPLES), codes ^ set(EXAMPLES)
    for code, fields in EXAMPLES.items():
        text = render({"event": code, "time": 0.0, **fields})
        assert text and text != f"{code}: {fields}", (code, text)  # not the unknown-code form
    line = render({"event": Event.ROUND, **EXAMPLES[Event.ROUND]})
    assert "rejected update from site c: non-finite values (NaN/Inf) in model" in line
    assert render({"event": Event.RUN_END, **EXAMPLES[Event.RUN_END]}) == (
        "run stopped: only 1 site; the checkpoint of round 2 is kept in /run/checkpoints")
    assert render({"event": "unknown", "x": 1}) == "unknown: {'x': 1}"


def test_the_floor_s_events_say_what_happened():
    base = {"event": Event.LOGISTIC, "time": 0.0}
    assert render({**base, **EXAMPLES[Event.LOGISTIC]}) == (
        "logistic regression floor: fitted on the training splits of 3 sites in 9 Newton rounds "
        "(200 participants, securely summed); penalty 10 chosen by the pooled validation loss; "
        "SAFN starts from it")
    assert "not equal to" in render({**base, **EXAMPLES[Event.LOGISTIC], "clipped": 4})
    assert render({**base, "code": "skipped", "reason": "site a cannot take part: DP"}) == (
        "logistic regression floor: not fitted, site a cannot take part: DP; SAFN's wide path "
        "starts at zero")
    assert render({**base, "code": "kept", "file": "/r/logistic.json", "penalty": 0.1}) == (
        "logistic regression floor: kept from /r/logistic.json (penalty 0.1)")


def test_rejections_are_codes_with_their_facts():
    assert rejection_text({"code": "too_few", "kept": 1, "min_sites": 2}) == (
        "only 1 acceptable updates, fewer than min_sites = 2: the model is unchanged this round")
    assert rejection_text({"code": "wrong_shape", "array": "w", "shape": [3],
                           "expected": [4]}) == "wrong shape of w: (3,) instead of (4,)"
    assert rejection_text({"site": "a", "reason": "an old history's words"}) == (
        "an old history's words")


def test_a_character_split_across_two_reads_is_read_whole(tmp_path):
    path = tmp_path / EVENTS_FILE
    follower = EventFollower(path)
    raw = json.dumps({"event": "note", "code": "ε"}, ensure_ascii=False).encode() + b"\n"
    cut = raw.index("ε".encode()) + 1  # inside the two bytes of ε
    path.write_bytes(raw[:cut])
    assert follower.events() == []
    with path.open("ab") as fh:
        fh.write(raw[cut:])
    assert follower.events() == [{"event": "note", "code": "ε"}]
