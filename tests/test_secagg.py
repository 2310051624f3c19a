"""safn_core.secagg: exactness, mask cancellation, dropouts, refusals, packing, key storage."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from safn_core.secagg import (AggregationContext, Field, Packing, SecureAggregationRefused,
                              SecureSumFailed, SiteSecret, SiteSession, aggregation_keypair,
                              announce_key, announced_keys, expand_mask, mask_vector, pair_seed,
                              public_key_bytes, scale_for, secure_sum, unmask_sum)
from safn_core.secagg.keys import SECRET_FILE
from safn_core.secagg.protocol import KEYS, MASK

BASE = AggregationContext("run-1", 3, "statistics")


def sessions(ids):
    return {i: SiteSession(SiteSecret.generate(), i) for i in ids}


def transport(sites, values, drop=None):
    """An in-memory ``request``; ``drop(phase, call) -> ids`` that do not answer that call."""
    calls = []

    def request(phase, payloads):
        calls.append((phase, sorted(payloads)))
        gone = drop(phase, len(calls)) if drop else set()
        return {i: sites[i].respond(phase, p, values[i]) for i, p in payloads.items()
                if i not in gone}
    return request, calls


def exact_sum(arrays):
    """The exact (rational) coordinate-wise sum of float arrays."""
    flat = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    return [sum((Fraction(float(a[k])) for a in flat), Fraction(0)) for k in range(flat[0].size)]


# -- end to end: exact for counts, within error_bound for reals --------------------------------
@pytest.mark.parametrize("seed", range(50))
def test_secure_sum_matches_plain_sum(seed):
    rng = np.random.default_rng(seed)          # test data only
    n = int(rng.integers(3, 13))
    max_parties = n + int(rng.integers(0, 20))
    clip = float(rng.choice([1e-3, 0.5, 1.0, 7.3, 1e6]))
    shapes = {"n": (), "classes": (int(rng.integers(0, 4)),),
              "grad": (int(rng.integers(1, 60)),), "moments": (int(rng.integers(1, 5)), 3)}
    packing = Packing((Field.count("n"), Field.count("classes", shapes["classes"]),
                       Field.real("grad", shapes["grad"], clip=clip),
                       Field.real("moments", shapes["moments"], clip=2 * clip)), max_parties)
    max_count = packing.max_count if seed % 5 == 0 else 10_000
    values = {i: {"n": int(rng.integers(0, max_count, dtype=np.int64, endpoint=True)),
                  "classes": rng.integers(0, 1000, size=shapes["classes"]),
                  "grad": rng.uniform(-1.2 * clip, 1.2 * clip, size=shapes["grad"]),
                  "moments": rng.normal(0, clip, size=shapes["moments"])} for i in range(n)}
    ids = [int(x) for x in rng.permutation(1000)[:n]]
    values = dict(zip(ids, values.values()))
    request, _ = transport(sessions(ids), values)

    result = secure_sum(ids, request, packing, BASE.with_attempt, min_parties=3)

    assert result.contributors == tuple(sorted(ids)) and result.attempts == 1
    assert result.values["n"].dtype == np.int64
    assert int(result.values["n"]) == sum(v["n"] for v in values.values())
    np.testing.assert_array_equal(result.values["classes"],
                                  sum(v["classes"] for v in values.values()))
    for name, bound in (("grad", clip), ("moments", 2 * clip)):
        got = result.values[name]
        assert got.dtype == np.float64 and got.shape == shapes[name]
        want = exact_sum([np.clip(v[name], -bound, bound) for v in values.values()])
        worst = max(abs(Fraction(float(g)) - w) for g, w in zip(got.ravel(), want))
        assert worst <= Fraction(packing.error_bound(name))
        assert result.clipped[name] == sum(int(np.sum(np.abs(v[name]) > bound))
                                           for v in values.values())


def test_error_bound_formula():
    packing = Packing((Field.real("x", (2,), clip=3.0), Field.count("c")), max_parties=10)
    scale = packing.scale("x")
    assert math.log2(scale).is_integer()
    assert 10 * 3.0 * scale < 2**63 <= 10 * 3.0 * scale * 2
    assert packing.error_bound("x") == pytest.approx(10 * (0.5 / scale + 3.0 * 2**-52))
    assert packing.error_bound("c") == 0.0


# -- masks -------------------------------------------------------------------------------------
def masked_by(ids, vectors, context=BASE):
    secrets = {i: SiteSecret.generate() for i in ids}
    keys = {i: aggregation_keypair(secrets[i], context) for i in ids}
    peers = {i: public_key_bytes(k) for i, k in keys.items()}
    return {i: mask_vector(vectors[i], i, keys[i], peers, context) for i in ids}


def test_masks_cancel_only_when_everyone_contributes():
    rng = np.random.default_rng(1)
    ids = [2, 5, 9, 11]
    vectors = {i: rng.integers(0, 2**40, size=257).astype(np.uint64) for i in ids}
    masked = masked_by(ids, vectors)
    plain = unmask_sum(list(vectors.values()))
    np.testing.assert_array_equal(unmask_sum(list(masked.values())), plain)
    partial = unmask_sum([masked[i] for i in ids[:-1]])
    assert np.count_nonzero(partial == unmask_sum([vectors[i] for i in ids[:-1]])) == 0
    assert np.count_nonzero(partial == plain) == 0


def test_own_key_in_peers_is_optional_and_checked():
    a, b, c = (SiteSecret.generate() for _ in range(3))
    ka, kb, kc = (aggregation_keypair(s, BASE) for s in (a, b, c))
    peers = {0: public_key_bytes(ka), 1: public_key_bytes(kb), 2: public_key_bytes(kc)}
    x = np.arange(10, dtype=np.uint64)
    without_own = {k: v for k, v in peers.items() if k != 0}
    np.testing.assert_array_equal(mask_vector(x, 0, ka, peers, BASE),
                                  mask_vector(x, 0, ka, without_own, BASE))
    stranger = public_key_bytes(aggregation_keypair(SiteSecret.generate(), BASE))
    with pytest.raises(ValueError, match="not its key"):
        mask_vector(x, 0, ka, {**peers, 0: stranger}, BASE)
    with pytest.raises(ValueError, match="uint64"):
        mask_vector(x.astype(np.int64), 0, ka, peers, BASE)


def test_pair_seed_is_symmetric_and_bound_to_context():
    a, b = SiteSecret.generate(), SiteSecret.generate()
    ka, kb = aggregation_keypair(a, BASE), aggregation_keypair(b, BASE)
    seed = pair_seed(ka, public_key_bytes(kb), BASE)
    assert seed == pair_seed(kb, public_key_bytes(ka), BASE) and len(seed) == 32
    other = BASE.with_attempt(1)
    assert pair_seed(ka, public_key_bytes(kb), other) != seed   # same keys, other context
    with pytest.raises(ValueError, match="own public key"):
        pair_seed(ka, public_key_bytes(ka), BASE)


def test_keys_and_masks_fresh_per_context_and_attempt():
    secret = SiteSecret.generate()
    contexts = [BASE, BASE.with_attempt(1), AggregationContext("run-1", 4, "statistics"),
                AggregationContext("run-1", 3, "train"),
                AggregationContext("run-2", 3, "statistics")]
    publics = [public_key_bytes(aggregation_keypair(secret, c)) for c in contexts]
    assert len(set(publics)) == len(contexts)
    assert len({c.info() for c in contexts}) == len(contexts)
    # re-derivable: the same context gives the same key (a fresh process can re-create it)
    assert public_key_bytes(aggregation_keypair(secret, BASE)) == publics[0]
    # no ambiguity between fields in the canonical bytes
    assert AggregationContext("ab", 1, "c").info() != AggregationContext("a", 1, "bc").info()
    x = np.zeros(64, dtype=np.uint64)
    m0 = masked_by([0, 1, 2], {i: x for i in range(3)}, BASE)[0]
    m1 = masked_by([0, 1, 2], {i: x for i in range(3)}, BASE.with_attempt(1))[0]
    assert not np.array_equal(m0, m1)


def test_chacha20_expansion_known_answer():
    # RFC 7539 §2.3.2-style vector: all-zero key, nonce and counter give this keystream block.
    block = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
                          "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    np.testing.assert_array_equal(expand_mask(bytes(32), 8), np.frombuffer(block, "<u8"))


def test_masked_vector_looks_uniform():
    packing = Packing((Field.count("n", (2048,)), Field.real("x", (2048,), clip=1.0)), 5)
    values = {i: {"n": np.ones(2048, dtype=np.int64), "x": np.zeros(2048)} for i in range(5)}
    site = SiteSession(SiteSecret.generate(), 0)
    peers = {i: SiteSession(SiteSecret.generate(), i).public_key(BASE) for i in range(1, 5)}
    plain = packing.encode(values[0]).vector
    masked = site.masked(values[0], packing, BASE, peers)
    assert np.count_nonzero(masked == plain) == 0

    def entropy(v):
        counts = np.bincount(np.frombuffer(v.tobytes(), np.uint8), minlength=256)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())
    assert entropy(plain) < 1.0
    assert entropy(masked) > 7.98


# -- protocol: dropouts, refusals, piggy-backed keys -------------------------------------------
PACKING = Packing((Field.count("n"), Field.real("mean", (4,), clip=10.0)), max_parties=20)


def site_values(ids):
    return {i: {"n": 10 * i + 1, "mean": np.full(4, float(i) - 2.5)} for i in ids}


def test_dropout_between_keys_and_mask_retries_with_survivors():
    ids = [1, 2, 3, 4, 5]
    values = site_values(ids)
    def drop(phase, call):                               # site 4 vanishes after sending its key
        return {4} if phase == MASK and call == 2 else set()
    request, calls = transport(sessions(ids), values, drop=drop)
    result = secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3)
    survivors = [1, 2, 3, 5]
    assert result.contributors == tuple(survivors)
    assert result.attempts == 2 and result.context.attempt == 1
    assert 4 in result.dropped
    assert int(result.values["n"]) == sum(values[i]["n"] for i in survivors)
    np.testing.assert_allclose(result.values["mean"], sum(values[i]["mean"] for i in survivors),
                               atol=PACKING.error_bound("mean"), rtol=0)
    assert calls == [(KEYS, ids), (MASK, ids), (KEYS, survivors), (MASK, survivors)]


def test_dropout_in_key_phase_needs_no_retry():
    ids = [1, 2, 3, 4]
    values = site_values(ids)
    request, calls = transport(sessions(ids), values,
                               drop=lambda phase, call: {2} if phase == KEYS else set())
    result = secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3)
    assert result.contributors == (1, 3, 4) and result.attempts == 1
    assert int(result.values["n"]) == sum(values[i]["n"] for i in (1, 3, 4))


def test_fewer_than_min_parties_fails():
    ids = [1, 2, 3, 4]
    request, _ = transport(sessions(ids), site_values(ids),
                           drop=lambda phase, call: {1, 2} if phase == MASK else set())
    with pytest.raises(SecureSumFailed, match=r"2 site\(s\) remain, fewer than min_parties=3"):
        secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3)


def test_attempts_exhausted_fails():
    ids = list(range(8))
    request, _ = transport(sessions(ids), site_values(ids),
                           drop=lambda phase, call: {call} if phase == MASK else set())
    with pytest.raises(SecureSumFailed, match="2 attempts"):
        secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3, max_attempts=2)


def test_two_parties_refused():
    ids = [1, 2]
    request, calls = transport(sessions(ids), site_values(ids))
    with pytest.raises(SecureAggregationRefused, match="secure_aggregation: false"):
        secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=2)
    assert calls == []                                   # nothing was asked of anyone
    with pytest.raises(ValueError, match="min_parties must be at least 3"):
        secure_sum([1, 2, 3], request, PACKING, BASE.with_attempt, min_parties=2)
    site = SiteSession(SiteSecret.generate(), 1)         # sites refuse too
    with pytest.raises(SecureAggregationRefused):
        site.masked(site_values([1])[1], PACKING, BASE, {2: site.public_key(BASE)[::-1]})


def test_piggy_backed_keys_skip_the_key_round_trip():
    ids = [1, 2, 3]
    sites = sessions(ids)
    values = site_values(ids)
    replies = {i: {"metrics": {}, **announce_key(sites[i], BASE)} for i in ids}
    replies[3] = {**replies[3], "secagg_next_context": BASE.with_attempt(5).to_dict()}  # stale
    known = announced_keys(replies, BASE)
    assert sorted(known) == [1, 2]
    request, calls = transport(sites, values)
    result = secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3, known_keys=known)
    assert calls == [(KEYS, [3]), (MASK, ids)]
    assert int(result.values["n"]) == sum(v["n"] for v in values.values())
    request, calls = transport(sites, values)
    secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3,
               known_keys={i: sites[i].public_key(BASE) for i in ids})
    assert calls == [(MASK, ids)]


def test_messages_are_plain_data():
    ids = [1, 2, 3]
    sites = sessions(ids)
    seen = []

    def request(phase, payloads):
        out = {}
        for i, p in payloads.items():
            p = json.loads(json.dumps(p, default=lambda b: b.hex()))  # what a message can carry
            if "peers" in p:
                p["peers"] = {k: bytes.fromhex(v) for k, v in p["peers"].items()}
            seen.append(p)
            out[i] = sites[i].respond(phase, p, site_values(ids)[i])
        return out
    result = secure_sum(ids, request, PACKING, BASE.with_attempt, min_parties=3)
    assert int(result.values["n"]) == 11 + 21 + 31
    assert all(isinstance(p["context"], dict) for p in seen)


# -- fixed point and packing -------------------------------------------------------------------
def test_values_at_clip_bound_do_not_wrap():
    for clip, parties in [(1.0, 3), (7.3, 20), (1e-3, 64), (1e9, 5), (3.0, 5000)]:
        packing = Packing((Field.real("x", (3,), clip=clip), Field.count("c")), parties)
        top = packing.encode({"x": np.array([clip, -clip, clip]), "c": packing.max_count})
        total = unmask_sum([top.vector] * parties)
        decoded = packing.decode(total)
        np.testing.assert_allclose(decoded["x"], [parties * clip, -parties * clip, parties * clip],
                                   atol=packing.error_bound("x"), rtol=0)
        assert int(decoded["c"]) == parties * packing.max_count
        scale = scale_for(clip, parties)
        assert parties * math.ceil(clip * scale) <= 2**63 - 1


def test_clipping_is_reported():
    packing = Packing((Field.real("x", (5,), clip=1.0),), 3)
    encoded = packing.encode({"x": [0.5, 2.0, -3.0, 1.0, -1.0]})
    assert encoded.clipped == {"x": 2}
    assert packing.decode_clipped(encoded.vector) == {"x": 2}
    np.testing.assert_allclose(packing.decode(encoded.vector)["x"], [0.5, 1, -1, 1, -1])


def test_packing_round_trips_through_a_plain_dict():
    packing = Packing((Field.count("n"), Field.count("classes", (2,)),
                       Field.real("w", (3, 4), clip=0.25)), max_parties=12)
    spec = json.loads(json.dumps(packing.to_dict()))
    rebuilt = Packing.from_dict(spec)
    assert rebuilt == packing and rebuilt.size == 1 + 2 + 12 + 1
    values = {"n": 7, "classes": [3, 4], "w": np.linspace(-0.2, 0.2, 12).reshape(3, 4)}
    np.testing.assert_array_equal(packing.encode(values).vector, rebuilt.encode(values).vector)
    with pytest.raises(ValueError, match="not a packing spec"):
        Packing.from_dict({"fields": []})
    with pytest.raises(ValueError, match="clip"):
        Packing.from_dict({**spec, "fields": [{"name": "w", "kind": "real", "shape": [2]}]})


@pytest.mark.parametrize("values, message", [
    ({"n": 1, "x": [0.0, 0.0], "extra": 1}, "unknown fields \\['extra'\\]"),
    ({"x": [0.0, 0.0]}, "missing fields \\['n'\\]"),
    ({"n": 1, "x": [0.0, 0.0, 0.0]}, "expected shape \\(2,\\)"),
    ({"n": -1, "x": [0.0, 0.0]}, "negative"),
    ({"n": 1.5, "x": [0.0, 0.0]}, "must hold integers"),
    ({"n": 1, "x": [np.nan, 0.0]}, "non-finite"),
    ({"n": 1, "x": [np.inf, 0.0]}, "non-finite"),
    ({"n": 2**62, "x": [0.0, 0.0]}, "overflow"),
])
def test_packing_validates_inputs(values, message):
    packing = Packing((Field.count("n"), Field.real("x", (2,), clip=1.0)), max_parties=4)
    with pytest.raises(ValueError, match=message):
        packing.encode(values)


def test_packing_validates_spec():
    with pytest.raises(ValueError, match="unique"):
        Packing((Field.count("a"), Field.count("a")), 3)
    with pytest.raises(ValueError, match="positive finite"):
        Field.real("x", (1,), clip=float("inf"))
    with pytest.raises(ValueError, match="takes no clip"):
        Field("n", "count", (), 1.0)
    with pytest.raises(ValueError, match="max_parties"):
        Packing((Field.count("a"),), 0)
    with pytest.raises(ValueError, match="unknown field"):
        Packing((Field.count("a"),), 3).error_bound("b")


# -- site secret -------------------------------------------------------------------------------
def test_site_secret_file_is_private_and_kept(tmp_path):
    secret = SiteSecret.load_or_create(tmp_path / "state")
    path = tmp_path / "state" / SECRET_FILE
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32 and "hidden" in repr(secret)
    before = path.read_bytes()
    again = SiteSecret.load_or_create(tmp_path / "state")
    assert again.value == secret.value == before == path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [SECRET_FILE]   # no temp files left


def test_site_secret_rederives_keys_in_a_fresh_process(tmp_path):
    secret = SiteSecret.load_or_create(tmp_path)
    code = ("import sys; from safn_core.secagg import *; "
            "s = SiteSession(SiteSecret.load_or_create(sys.argv[1]), 0); "
            "print(s.public_key(AggregationContext('run-1', 3, 'statistics')).hex()); "
            "print('flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    key, flwr_loaded = out.stdout.split()
    assert bytes.fromhex(key) == SiteSession(secret, 0).public_key(BASE)
    assert flwr_loaded == "False"                        # safn_core never imports Flower


def test_site_secret_rejects_damaged_or_exposed_file(tmp_path):
    path = tmp_path / SECRET_FILE
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="damaged"):
        SiteSecret.load_or_create(tmp_path)
    assert path.read_bytes() == b"short"                  # never overwritten
    if os.name == "posix":
        path.write_bytes(bytes(32))
        os.chmod(path, 0o644)
        with pytest.raises(ValueError, match="chmod 600"):
            SiteSecret.load_or_create(tmp_path)
