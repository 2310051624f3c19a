"""The coordinator's host restarting, and a straggler on a slow link, on the multi-host test bed
(issue #29), secure aggregation on: real `safn-server` / `safn-client` processes in network
namespaces of their own, each site reaching the coordinator by name through its own link of the
fault proxy (`tests.netbed`). Every wait is on an event (a line, a file, a round in
history.json) with a generous bound for failure, never a guessed sleep.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import yaml

from tests import netbed
from tests.deploy_harness import Federation, federations, kill_coordinator, make_material

slow = pytest.mark.slow  # the two tests that start federations (a unit test runs in CI's fast set)

SITES = ("site_a", "site_b", "site_c", "site_d")
THREE = SITES[:3]
LOST = r"lost contact with the coordinator at coordinator\.safn\.test:9092"
BACK = r"contact with the coordinator at coordinator\.safn\.test:9092 is back"


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("restart"), sites=SITES,
                         hosts=(netbed.COORDINATOR,))


def _weights(fed: Federation) -> dict[str, np.ndarray]:
    """The final model's arrays, as the run folder's bundle stores them (``model/weights.pt``)."""
    from safn_core.bundle import load_bundle

    return {k: v.detach().cpu().numpy()
            for k, v in load_bundle(fed.run_dir / "model").model.state_dict().items()}


def _round_facts(entry: dict) -> dict:
    """What a round's history entry says of who took part and what was summed (no timings)."""
    return {"round": entry["round"], "sites_trained": entry.get("sites_trained"),
            "secure_sum": entry.get("secure_sum"), "rejected": entry.get("rejected"),
            "n_test": entry.get("n_test"), "sites_reported": entry.get("sites_reported")}


@slow
@pytest.mark.timeout(1500)
def test_the_coordinators_host_restarts_and_the_resumed_run_equals_an_uninterrupted_one(
        material, make_bed, tmp_path):
    """The coordinator's host dies after round 1 (safn-server, its SuperLink and ServerApp
    killed at once) and is off the network while down: every site's link is cut (packets lost,
    no reset), then the host comes back (``safn-server --resume``; the links mended once its
    SuperLink listens). The sites are never touched by the test: each says it lost contact and
    that contact is back, and each ends by itself when the run completes. The resumed run
    completes after the last checkpointed round, no round lost or repeated.

    (Why the sites' links and not the coordinator's own port: the fault proxy accepts a site's
    connection and closes it when it cannot reach the coordinator, so a site sees a TLS
    handshake cut short, ``SSL: UNEXPECTED_EOF_WHILE_READING``, which Flower's retry gives up
    on; its SuperNode then stopped serving without exiting. With the cables cut a site's
    connection attempts time out, which Flower retries, as across a real network to a host that
    is down.)

    Against the same federation run without a fault (same material, same config and seeds, on
    a second bed at the same time): the same rounds, participants and secure-sum counts, and the
    **same final model, bit for bit**, with the same pooled metrics. That holds because nothing
    in a round depends on the Flower run (which is new after a resume): a site's local training
    is seeded by ``train.seed``, the round and the site (`safn_core.federation.sampling.
    site_seed`); the round's sites are drawn by name, seeded per round; the secure sum is exact
    integer arithmetic (the masks, which do depend on the run id and fresh keys, cancel
    exactly); the resumed coordinator restarts from the checkpoint's float32 model and its model
    selection state.

    The model has no wide path (``model.wide: off``), so no logistic regression floor: on a
    loaded machine one site was briefly offline when the floor's sums began (a missed
    heartbeat), the floor was skipped ("only 2 were asked") in one run and fitted in the other,
    and the two runs differed before any fault; that is a separate finding, not the resume's."""
    kw = dict(listed=THREE, rounds=3, min_sites=3, wait_for_sites=600, rejoin_wait=300,
              round_timeout=300)
    bed, quiet = make_bed(THREE), make_bed(THREE)
    with federations(material, tmp_path) as make:
        fed = make(net=bed, **kw)
        reference = make(net=quiet, **kw)
        for f in (fed, reference):  # no logistic regression floor (model.wide off): see above
            cfg = yaml.safe_load(f.server_yaml.read_text())
            cfg["model"]["wide"] = "off"
            f.server_yaml.write_text(yaml.safe_dump(cfg))
        server, sites = fed.start(THREE)
        ref_server, ref_sites = reference.start(THREE)

        fed.wait_for_round(1, 900, server)
        for site in THREE:  # the coordinator's host goes off the network ...
            bed.cut(site)
        kill_coordinator(fed, server)  # ... and dies
        from safn_core.federation.checkpoint import load_checkpoint

        done = load_checkpoint(fed.run_dir).round  # the last complete round on disk
        assert 1 <= done < 3, done
        for site in sites:  # each site notices by itself (a request times out after 30 s)
            site.wait_for_output(LOST, 300)
            assert site.proc.poll() is None, site.output()[-3000:]
        supernodes = {s.name: (fed.folder / f"state_{s.name}" / "supernode.pid").read_text()
                      for s in sites}

        resumed = fed.server("--resume")  # the host is back: the coordinator restarts ...
        resumed.wait_for_output(r"SuperLink listening on coordinator\.safn\.test:9092", 300)
        for site in THREE:  # ... and is on the network again
            bed.mend(site)
        assert resumed.wait(900) == 0, resumed.output()[-4000:]
        out = resumed.output()
        assert f"resuming after round {done} of 3" in out, out[-4000:]
        assert "run completed after round 3 (run id run-" in out, out[-4000:]
        for site in sites:  # never restarted by the test: the same processes reconnected
            site.wait_for_output(BACK, 120)
            assert site.wait(300) == 0, site.output()[-3000:]
            assert "done, the run completed" in site.output()
        assert [p.name for p in fed.procs] == ["safn-server", *THREE, "safn-server"]
        # (safn-client kept its SuperNode: the same process before and after)
        assert supernodes == {s: (fed.folder / f"state_{s}" / "supernode.pid").read_text()
                              for s in THREE}

        assert ref_server.wait(900) == 0, ref_server.output()[-4000:]
        assert all(s.wait(300) == 0 for s in ref_sites)

    history, ref_history = fed.history(), reference.history()
    assert [e["round"] for e in history] == [1, 2, 3]  # none lost, none repeated
    assert [_round_facts(e) for e in history] == [_round_facts(e) for e in ref_history]
    assert all(e["sites_trained"] == list(THREE) for e in history[1:])
    # the same final model, bit for bit, and so the same pooled metrics every round
    got, want = _weights(fed), _weights(reference)
    assert list(got) == list(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), (name, np.abs(got[name] - want[name]).max())
    for key in ("pooled", "val_loss", "train_loss", "selected_round"):
        assert [e.get(key) for e in history] == [e.get(key) for e in ref_history], key
    bundle = json.loads((fed.run_dir / "model" / "bundle.json").read_text())
    ref_bundle = json.loads((reference.run_dir / "model" / "bundle.json").read_text())
    assert bundle["training"]["sites"] == ref_bundle["training"]["sites"]


STRAGGLER = "site_d"
OTHERS = SITES[:3]
ROUND_TIMEOUT = 20  # s: federation.round_timeout of the straggler's run
UP_RATE = 2000  # B/s: site_d's upload while throttled; its training reply (the small model's
# masked update, 8 bytes a value, ≈ 67 kB) then needs ≈ 35 s on the wire, beyond the round's
# deadline and beyond the ServerApp's wait for a reply's objects (REPLY_UPLOAD_WAIT, 30 s)
REPLY_UPLOAD_WAIT = 30.0  # s: safn_flower.patches.serverapp.REPLY_UPLOAD_WAIT (checked below)
LATE_CODES = {"no_reply": "no reply by the round's deadline",
              "site_failed": "the node went offline, or its reply's update did not arrive "
                             "within the ServerApp's wait (Flower's error reply)"}
UNAVAILABLE = "Reply message objects are unavailable"  # Flower's error reply for the latter


class _LateReply:
    """site_d's ``n``-th training reply, followed from the test's wait loops: its instruction's
    and its own message ID and when (test clock) its SuperNode finished sending it, from its
    Flower log (``Receiving: train message (ID: …)``, ``Sending: train message (ID: …)``, then
    ``Sent successfully`` or ``Failed to send message …``); and what the SuperLink's state
    database held for that instruction meanwhile (the rows of ``message_res`` that answer it:
    the run's messages are deleted when the run ends, so they are looked at while it runs)."""

    RECEIVING = re.compile(r"Receiving: train message \(ID: ([0-9a-f]+)\)")
    SENDING = re.compile(r"Sending: train message \(ID: ([0-9a-f]+)\)")
    DONE = re.compile(r"(Sent successfully|Failed to send message [0-9a-f]+: .*)")

    def __init__(self, fed: Federation, site: str, n: int, t0: float):
        self.log = fed.folder / f"state_{site}" / "supernode.log"
        self.db = fed.run_dir / "superlink.db"
        self.n, self.t0 = n, t0
        self.instruction = self.message_id = self.outcome = None
        self.at: float | None = None
        self.rows: dict[str, dict] = {}  # message_res rows answering the instruction, by id
        self._next_db = 0.0

    def poll(self) -> None:
        if self.at is None:
            try:
                text = self.log.read_text(errors="replace")
            except OSError:
                text = ""
            received = list(self.RECEIVING.finditer(text))
            sending = list(self.SENDING.finditer(text))
            if len(received) >= self.n:
                self.instruction = received[self.n - 1].group(1)
            if len(sending) >= self.n:
                self.message_id = sending[self.n - 1].group(1)
                done = self.DONE.search(text, sending[self.n - 1].end())
                if done:
                    self.outcome, self.at = done.group(1), time.monotonic() - self.t0
        if self.instruction is not None and time.monotonic() >= self._next_db:
            self._next_db = time.monotonic() + 0.5
            self._look_in_db()

    def _look_in_db(self) -> None:
        import sqlite3

        try:
            db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                rows = db.execute(
                    "SELECT message_id, src_node_id, delivered_at, error IS NOT NULL "
                    "FROM message_res WHERE reply_to_message_id = ?",
                    (self.instruction,)).fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            return
        for mid, src, delivered, error in rows:
            row = self.rows.setdefault(mid, {"message_id": mid, "node": src % 2**64,
                                             "error": bool(error),
                                             "first_seen": round(time.monotonic() - self.t0, 1)})
            row["delivered_at"] = delivered


def _round_block(out: str, r: int, rounds: int) -> str:
    """The coordinator's lines for round ``r``: its progress line and the indented lines below
    it (ε per site, rejected updates)."""
    m = re.search(rf"^round\s+{r}/{rounds}\b.*\n(?:  .*\n?)*", out, re.MULTILINE)
    assert m, f"no line for round {r} in the coordinator's output:\n{out[-4000:]}"
    return m.group(0)


@slow
@pytest.mark.timeout(1500)
def test_a_straggler_on_a_slow_link_is_left_out_by_the_deadline_and_never_mixed_in(
        material, make_bed, tmp_path):
    """Four sites, secure aggregation, ``min_sites`` 3, ``round_timeout`` 20 s, 3 rounds. The
    statistics round, the logistic floor and round 1 run at full speed. Once site_d has made its
    last reply of round 1 (its evaluation), its whole upload link (shared by all of its
    connections, heartbeats included) is throttled to 2000 B/s, so that its training reply of
    round 2 (≈ 67 kB: 33.7 s on the wire) cannot arrive by the round's deadline; once round 2 is
    booked in history.json the throttle is lifted.

    Round 2 goes on without site_d: it trains with site_a, site_b and site_c, the secure sum
    redone with those three, site_d named in the round's ``rejected`` entries and in the
    coordinator's output, ``no_reply`` or ``site_failed`` (both mean "late or absent"; the test
    prints which). What the bed gives: ``site_failed``, "Reply message objects are unavailable":
    a SuperNode sends a reply's message before its objects, so the small message reached the
    SuperLink in time and the ServerApp pulled it, then waited for its update (the objects) up
    to `safn_flower.patches.serverapp.REPLY_UPLOAD_WAIT` (30 s, longer than the deadline) and
    made it an error reply; site_d's SuperNode then gave up sending it (its next connection's
    TLS handshake queued behind the upload and timed out). The late reply is never mixed into
    round 3: round 3's secure sum counts exactly the sites of round 3's own replies, each once
    (site_d, when it trains in round 3, with a training reply of its own for round 3 in its
    audit log), and the SuperLink never handed the late update to the ServerApp (its log and
    state database, looked at while the run ran, say how). The run completes, rounds 1-3 each
    booked once."""
    from safn_flower.patches import serverapp

    assert serverapp.REPLY_UPLOAD_WAIT == REPLY_UPLOAD_WAIT
    bed = make_bed(SITES)
    with federations(material, tmp_path) as make:
        fed = make(net=bed, listed=SITES, rounds=3, min_sites=3, round_timeout=ROUND_TIMEOUT,
                   rejoin_wait=30, wait_for_sites=600, histogram_bins=10)
        started = time.monotonic()
        server, sites = fed.start(SITES)
        # the throttle comes once site_d made its evaluation reply of round 1 (its last reply of
        # round 1; that small reply itself goes through the throttle), so it is in place before
        # round 2's instruction can reach site_d: waiting for round 1 in history.json instead
        # leaves a race (round 2 starts as soon as round 1 is booked)
        fed.wait_for_reply(STRAGGLER, "evaluate", 1, server, 900)
        trained_1 = fed.wait_for_reply(STRAGGLER, "train", 1, server, 0)
        (masked,) = [a for rec in trained_1["records"].values() if rec["kind"] == "arrays"
                     for a in rec["arrays"].values()]
        assert masked["dtype"] == "uint64", masked
        reply_bytes = 8 * int(np.prod(masked["shape"]))
        assert reply_bytes / UP_RATE > REPLY_UPLOAD_WAIT + 2, reply_bytes  # the calibration
        up_before = bed.control.stats()[STRAGGLER]["up"]
        bed.shape(STRAGGLER, up_rate=UP_RATE)
        throttled_at = time.monotonic()
        watch = _LateReply(fed, STRAGGLER, 2, throttled_at)

        def wait_for_round(r: int, timeout: float) -> float:
            deadline = time.monotonic() + timeout
            while not any(e["round"] >= r for e in fed.history()):
                watch.poll()
                assert server.proc.poll() is None, server.output()[-4000:]
                assert time.monotonic() < deadline, \
                    f"round {r} not booked in {timeout:.0f} s:\n{server.output()[-4000:]}"
                time.sleep(0.1)
            return time.monotonic() - throttled_at

        assert all(e["round"] <= 1 for e in fed.history()), fed.history()  # not yet round 2
        round_1_s = wait_for_round(1, 300)
        round_2_s = wait_for_round(2, 900)  # booked: round 2 went on without site_d
        bed.shape(STRAGGLER, up_rate=0)
        up_throttled = bed.control.stats()[STRAGGLER]["up"] - up_before
        round_3_s = wait_for_round(3, 900)
        bound = time.monotonic() + 300
        while server.proc.poll() is None:  # the run's end (its messages are deleted then)
            watch.poll()
            assert time.monotonic() < bound, server.output()[-4000:]
            time.sleep(0.1)
        assert server.wait(0) == 0, server.output()[-4000:]
        for site in sites:
            assert site.wait(300) == 0, site.output()[-3000:]
        watch.poll()
        wall = time.monotonic() - started
        out = server.output()
        superlink_log = (fed.run_dir / "superlink.log").read_text(errors="replace")
        audit_d = fed.audit(STRAGGLER)
        said_d = sites[SITES.index(STRAGGLER)].output()

    from safn.server.screening import Rejection

    assert set(LATE_CODES) == {Rejection.NO_REPLY, Rejection.SITE_FAILED}
    history = fed.history()
    by_round = {e["round"]: e for e in history}
    timeline = (f"training reply {reply_bytes} B at {UP_RATE} B/s ({reply_bytes / UP_RATE:.1f} s "
                f"on the wire); from the throttle: round 1 booked at {round_1_s:.1f} s, round 2 "
                f"at {round_2_s:.1f} s (throttle lifted; {up_throttled} B up meanwhile), round 3 "
                f"at {round_3_s:.1f} s; site_d's round-2 training reply (ID "
                f"{watch.message_id}) {watch.outcome!r} at "
                + ("never" if watch.at is None else f"{watch.at:.1f} s")
                + f"; whole run {wall:.0f} s")
    print("\n" + timeline)
    events = [json.loads(line) for line in
              (fed.run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    booked_1 = next(e["time"] for e in events
                    if e["event"] == "round" and e["entry"]["round"] == 1)
    redone = [e["time"] - booked_1 for e in events
              if e["event"] == "secure_retry" and e["round"] == 2 and e["aggregation"] == "train"]
    print(f"round 2's training exchange: its secure sum redone without site_d "
          f"{', '.join(f'{t:.1f}' for t in redone)} s after round 1 was booked "
          f"(round_timeout {ROUND_TIMEOUT} s)")

    # the run completed, rounds 1-3 booked once each (0: the logistic floor's evaluation)
    assert [e["round"] for e in history] == [0, 1, 2, 3], [e["round"] for e in history]
    assert "run completed after round 3 (run id run-" in out, out[-4000:]
    assert by_round[1]["sites_trained"] == list(SITES), by_round[1]
    assert by_round[1]["secure_sum"]["sites_trained"] == 4, by_round[1]

    # round 2: the deadline and min_sites decided; the sum redone with the three others
    late = by_round[2]
    assert late["sites_trained"] == list(OTHERS), late
    assert late["secure_sum"]["sites_trained"] == 3, late["secure_sum"]
    assert [x["site"] for x in late["rejected"]] == [STRAGGLER], late["rejected"]
    rejection = late["rejected"][0]
    assert rejection["code"] in LATE_CODES, rejection
    from safn_core.federation.event_text import rejection_text

    said = f"rejected update from site {STRAGGLER}: {rejection_text(rejection)}"
    print(f"round 2: site_d rejected with code {rejection['code']!r} "
          f"({LATE_CODES[rejection['code']]}); the coordinator said: {said!r}")
    assert said in _round_block(out, 2, 3), _round_block(out, 2, 3)
    if rejection["code"] == Rejection.NO_REPLY:
        assert said.endswith(f"no reply by the round's deadline (federation.round_timeout, "
                             f"{ROUND_TIMEOUT} s); the round went on without it"), said
    retries = late["secure_sum"]["retries"]
    assert retries and retries[0]["aggregation"] == "train" and retries[0]["lost"] == 1, retries
    assert ("secure aggregation train round 2: 1 site(s) did not answer; redoing it with the "
            "3 others and fresh keys") in out
    assert STRAGGLER not in late.get("privacy", {}), late.get("privacy")

    # round 3: its own replies only, each site once; no late round-2 reply in it
    last = by_round[3]
    trained_3 = last["sites_trained"]
    assert len(trained_3) == len(set(trained_3)) and set(trained_3) <= set(SITES), trained_3
    assert set(OTHERS) <= set(trained_3), trained_3
    assert last["secure_sum"]["sites_trained"] == len(trained_3), last
    train_rounds_d = [e.get("round") for e in audit_d if e["type"] == "train"]
    if STRAGGLER in trained_3:  # with a round-3 reply of its own, besides the late one
        assert train_rounds_d == [1, 2, 3], audit_d
        assert not last["rejected"], last["rejected"]
        print(f"round 3: site_d trained again with a reply of its own (audit: train replies "
              f"of rounds {train_rounds_d}); round 3's secure sum counted 4 sites")
    else:  # still away at round 3: named again, never counted
        assert train_rounds_d == [1, 2], audit_d
        assert [x["site"] for x in last["rejected"]] in ([], [STRAGGLER]), last["rejected"]
        print(f"round 3: site_d did not train (audit: train replies of rounds "
              f"{train_rounds_d}); round 3's secure sum counted 3 sites")
    assert "site site_d: round 2: trained on" in said_d, said_d[-3000:]

    # what became of the late reply: never handed to the ServerApp as an update
    assert watch.message_id is not None and watch.instruction is not None, timeline
    refused = [line for line in superlink_log.splitlines()
               if "Failed to store Message reply" in line and watch.instruction in line]
    rows = list(watch.rows.values())
    print(f"site_d's SuperNode on its round-2 training reply: {watch.outcome!r}; SuperLink "
          f"refusals of a reply to instruction {watch.instruction}: {refused!r}; message_res "
          f"rows answering it seen while the run ran: {rows!r}")
    assert watch.outcome is not None, timeline  # the SuperNode finished with it, one way or other
    if UNAVAILABLE in rejection.get("detail", ""):
        # what the bed gives: the reply message (sent before its objects) reached the SuperLink
        # before the deadline and was handed over at the ServerApp's next pull (Flower 1.42
        # deletes the instruction and its reply there); its update (the objects) did not
        # follow within the ServerApp's wait, which made it an error reply; nothing of it
        # could be stored later as a reply (the instruction is gone) and none was refused
        assert not refused, refused
    elif rejection["code"] == Rejection.NO_REPLY:
        # the reply came after the deadline: refused, or held and never delivered
        held = [r for r in rows if r["message_id"] == watch.message_id]
        assert refused or watch.outcome.startswith("Failed to send") or (
            held and not held[0]["delivered_at"]), (refused, rows, watch.outcome)
    else:  # the node went offline: the SuperLink answered for it, the real reply is refused
        assert refused or watch.outcome.startswith("Failed to send"), (refused, watch.outcome)


def test_a_site_without_a_reply_by_the_deadline_is_named_and_a_late_reply_is_not_an_answer():
    """`safn.server.screening.no_reply`: the sites a round's instruction went to whose reply did
    not come by the deadline, named with the deadline; a reply to another message (a late one
    of an earlier exchange) does not count as an answer."""
    from types import SimpleNamespace as NS

    from safn_core.federation.event_text import rejection_text
    from safn.server.screening import Rejection, no_reply

    sent = [NS(metadata=NS(message_id=f"m{n}", dst_node_id=n)) for n in (11, 12, 13)]
    replies = [NS(metadata=NS(reply_to_message_id="m11")),
               NS(metadata=NS(reply_to_message_id="m0"))]  # late: an earlier round's
    names = {11: "site_a", 12: "site_b", 13: "site_c"}
    missing = no_reply(sent, replies, names.__getitem__, 15.0)
    assert [(x["site"], x["code"]) for x in missing] == [("site_b", Rejection.NO_REPLY),
                                                         ("site_c", Rejection.NO_REPLY)]
    assert rejection_text(missing[0]) == ("no reply by the round's deadline "
                                          "(federation.round_timeout, 15 s); the round went on "
                                          "without it")
    assert no_reply(sent, [NS(metadata=NS(reply_to_message_id=f"m{n}")) for n in (11, 12, 13)],
                    names.__getitem__, 15.0) == []
