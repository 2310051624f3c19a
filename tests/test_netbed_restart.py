"""The coordinator's host restarting, and a straggler on a slow link, on the multi-host test bed
(issue #29), secure aggregation on: real `safn-server` / `safn-client` processes in network
namespaces of their own, each site reaching the coordinator by name through its own link of the
fault proxy (`tests.netbed`). Every wait is on an event (a line, a file, a round in
history.json) with a generous bound for failure, never a guessed sleep.
"""

from __future__ import annotations

import json
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


def _audit(fed: Federation, site: str) -> list[dict]:
    path = fed.folder / f"state_{site}" / "audit" / "outgoing.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


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
ROUND_TIMEOUT = 15  # s: federation.round_timeout of the straggler's run
UPLOAD_SECONDS = 24  # s: the straggler's training reply on its throttled link: beyond the
# round's deadline, within Flower's 30 s per-request limit (else its upload would be retried)


def _superlink_replies(fed: Federation) -> list[dict]:
    """The replies the SuperLink still holds (`message_res` of its state database) with the
    type of the instruction each answers: a reply the ServerApp pulled is deleted with its
    instruction; one it never asked for stays."""
    import sqlite3

    db = sqlite3.connect(fed.run_dir / "superlink.db")
    try:
        rows = db.execute(
            "SELECT r.src_node_id, r.delivered_at, i.message_type, r.reply_to_message_id "
            "FROM message_res r LEFT JOIN message_ins i ON i.message_id = r.reply_to_message_id"
        ).fetchall()
    finally:
        db.close()
    return [{"node": src % 2**64, "delivered_at": delivered, "type": kind, "reply_to": reply_to}
            for src, delivered, kind, reply_to in rows]


def _wait_for_audit(fed: Federation, site: str, kind: str, round_: int, server, timeout: float):
    """The site's audit entry of its ``kind`` reply of round ``round_``, once its ClientApp made
    it (before its SuperNode sends it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in _audit(fed, site) if e["type"] == kind and e.get("round") == round_]
        if found:
            return found[0]
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{site} made no {kind} reply of round {round_}:\n"
                                 + server.output()[-3000:])
        time.sleep(0.05)


@slow
@pytest.mark.timeout(1500)
@pytest.mark.skip(reason="unfinished (issue #29): the throttle is not calibrated yet; on the bed a "
                  "site sends ~1 MB upstream per round besides its 67 kB training reply and the "
                  "fault proxy's up_rate applies per connection, so neither 'bytes since the "
                  "throttle >= one reply' nor a rate from the reply's size made site_d late "
                  "(it trained in every round of the two runs that got that far)")
def test_a_straggler_on_a_slow_link_is_left_out_by_the_deadline_and_never_mixed_in(
        material, make_bed, tmp_path):
    """Four sites, ``min_sites`` 3, ``round_timeout`` 15 s, 4 rounds. Once site_d has made its
    evaluation reply of round 1, its upload is throttled so hard that a training reply (the
    secure sum's packing of the model, 8 bytes a value) needs 24 s on the wire; once that many
    bytes have passed (its late reply delivered) the link is back to full speed. The round's
    deadline and ``min_sites`` decide: the next round (2; 3 if the throttle came after site_d's
    round-2 reply had left, on a loaded machine) trains with the three others, the secure sum
    redone without site_d, and the coordinator names the site it went on without. The late reply
    reaches the SuperLink and stays there, never pulled: the ServerApp pulls only the replies to
    the messages of the exchange it is collecting (`safn_flower.patches.serverapp.PollingGrid`
    asks by message id); the rounds after it, in which site_d trains again, hold four sites and
    four only. The run completes."""
    from safn_core.config import load_config
    from safn_core.federation.checkpoint import load_checkpoint
    from safn_core.federation.secure_records import train_packing

    bed = make_bed(SITES)
    with federations(material, tmp_path) as make:
        fed = make(net=bed, listed=SITES, rounds=4, min_sites=3, round_timeout=ROUND_TIMEOUT,
                   rejoin_wait=0, wait_for_sites=600, histogram_bins=10)
        server, sites = fed.start(SITES)
        fed.wait_for_round(0, 900, server)  # the floor evaluated: the model's size is on disk
        state = load_checkpoint(fed.run_dir)
        n_weights = sum(int(np.asarray(w).size) for w in state.weights.values())
        reply_bytes = 8 * train_packing(n_weights, load_config(fed.server_yaml).federation,
                                        len(SITES)).size
        rate = reply_bytes / UPLOAD_SECONDS
        _wait_for_audit(fed, STRAGGLER, "evaluate", 1, server, 900)
        before = bed.control.stats()[STRAGGLER]["up"]
        bed.shape(STRAGGLER, up_rate=rate)
        t0 = time.monotonic()
        while bed.control.stats()[STRAGGLER]["up"] - before < reply_bytes:  # its late reply
            assert time.monotonic() - t0 < 600 and server.proc.poll() is None, \
                server.output()[-3000:]
            time.sleep(0.2)
        throttled = time.monotonic() - t0
        bed.shape(STRAGGLER, up_rate=0)
        assert server.wait(900) == 0, server.output()[-4000:]
        out = server.output()
        print(f"\ntraining reply {reply_bytes} B; site_d throttled to {rate:.0f} B/s for "
              f"{throttled:.1f} s")

    names = {int(k): v for k, v in load_checkpoint(fed.run_dir).sites.items()}
    node = {v: k for k, v in names.items()}
    history = fed.history()
    assert [e["round"] for e in history] == [0, 1, 2, 3, 4]
    left_out = [e["round"] for e in history[1:] if STRAGGLER not in e["sites_trained"]]
    assert len(left_out) == 1 and left_out[0] in (2, 3), [e["sites_trained"] for e in history]
    late = left_out[0]
    for e in history[1:]:
        trained = [s for s in SITES if e["round"] != late or s != STRAGGLER]
        assert e["sites_trained"] == trained, e  # never a fifth: no late reply mixed in
        assert e["secure_sum"]["sites_trained"] == len(trained), e
    # the deadline decided: site_d named, the secure sum redone with the three others
    assert [(x["site"], x["code"]) for x in history[late]["rejected"]] == [
        (STRAGGLER, "no_reply")], history[late]
    assert (f"rejected update from site {STRAGGLER}: no reply by the round's deadline "
            f"(federation.round_timeout, {ROUND_TIMEOUT} s); the round went on without it") in out
    assert (f"secure aggregation train round {late}: 1 site(s) did not answer; redoing it "
            "with the 3 others and fresh keys") in out
    assert [x["aggregation"] for x in history[late]["secure_sum"]["retries"]][:1] == ["train"]
    # the late reply did arrive, and was never pulled; site_d made one training reply a round
    held = [r for r in _superlink_replies(fed)
            if r["node"] == node[STRAGGLER] and r["type"] == "train"]
    assert len(held) == 1 and not held[0]["delivered_at"], _superlink_replies(fed)
    assert [e["round"] for e in _audit(fed, STRAGGLER) if e["type"] == "train"] == [1, 2, 3, 4]


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
