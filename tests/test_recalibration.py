"""Local recalibration (safn_core.recalibration): the two maps' fits, the participant split,
the part-size rule and that only the recalibration part is read. The CLI path (site bundle,
round trip, the input bundle untouched) is in tests/test_validate.py."""

import numpy as np
import pytest
import statsmodels.api as sm
from scipy.special import expit

from safn_core.errors import DataError
from safn_core.metrics import calibration_slope
from safn_core.recalibration import (CalibrationMap, check_parts, fit_map, recalibrate,
                                     split_participants)


def _miscalibrated(n=20000, seed=0, a=0.0, b=1.0, spread=1.5):
    """Logits z of a model whose true P(PD) is σ(a + b·z): a known miscalibration."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.3, spread, n)
    y = (rng.random(n) < expit(a + b * z)).astype(int)
    return z, y


def test_temperature_recovers_a_known_overconfidence():
    z, y = _miscalibrated(b=1 / 2.5)  # logits 2.5 times too large
    cmap = fit_map("temperature", z, y)
    assert cmap.method == "temperature"
    assert cmap.params["temperature"] == pytest.approx(2.5, rel=0.05)
    # the exact maximum-likelihood fit: a logistic regression of y on z without intercept
    glm = sm.GLM(y, z[:, None], family=sm.families.Binomial()).fit()
    assert cmap.params["temperature"] == pytest.approx(1 / glm.params[0], rel=1e-8)
    under, y2 = _miscalibrated(b=1.6, seed=1)  # underconfident: T < 1
    assert fit_map("temperature", under, y2).params["temperature"] == pytest.approx(1 / 1.6,
                                                                                   rel=0.05)


def test_platt_recovers_a_known_shift_and_slope():
    z, y = _miscalibrated(a=-0.8, b=0.6)
    cmap = fit_map("platt", z, y)
    assert cmap.params["a"] == pytest.approx(-0.8, abs=0.06)
    assert cmap.params["b"] == pytest.approx(0.6, abs=0.04)
    glm = sm.GLM(y, sm.add_constant(z), family=sm.families.Binomial()).fit()
    assert [cmap.params["a"], cmap.params["b"]] == pytest.approx(list(glm.params), rel=1e-8)
    # Platt is the recalibration that calibration_slope measures: on its own data the
    # calibrated scores have slope 1 and intercept 0
    cal = calibration_slope(y, cmap(z))
    assert cal["slope"] == pytest.approx(1, abs=1e-4)
    assert cal["intercept"] == pytest.approx(0, abs=1e-4)


def test_map_state_is_plain_json_and_checked():
    cmap = CalibrationMap("platt", {"a": -0.5, "b": 0.7})
    again = CalibrationMap.from_dict(cmap.to_dict())
    z = np.linspace(-4, 4, 9)
    assert again == cmap and np.allclose(again(z), expit(-0.5 + 0.7 * z))
    t = CalibrationMap.from_dict({"method": "temperature", "params": {"temperature": 2.0}})
    assert np.allclose(t(z), expit(z / 2))
    for bad in ({"method": "temperature", "params": {"temperature": 0}},
                {"method": "temperature", "params": {"a": 1, "b": 1}},
                {"method": "isotonic", "params": {}}, None):
        with pytest.raises(DataError, match="bundle.json recalibration.map"):
            CalibrationMap.from_dict(bad, "bundle.json recalibration.map")


def test_no_finite_map_is_a_clear_error():
    z = np.array([-3.0, -2, -1, -0.5, 0.5, 1, 2, 3])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    for method in ("temperature", "platt"):
        with pytest.raises(DataError, match="separate the recalibration part's classes "
                                            "completely"):
            fit_map(method, z, y)
    rz, ry = _miscalibrated(n=2000, b=-1.0)  # scores that run against the labels
    with pytest.raises(DataError, match="wrong way round"):
        fit_map("temperature", rz, ry)
    assert fit_map("platt", rz, ry).params["b"] < 0  # Platt can say so: a negative slope
    with pytest.raises(DataError, match="one class only"):
        fit_map("platt", z[:4], y[:4])


def _site(n=200, seed=3):
    rng = np.random.default_rng(seed)
    ids = np.array([f"P{i:03d}" for i in range(n)])
    y = (rng.random(n) < 0.7).astype(int)
    return ids, y


def test_split_is_stratified_disjoint_by_participant_and_seeded():
    ids, y = _site()
    part = split_participants(ids, y, 0.3, seed=5)
    for c in (0, 1):
        n_c = int((y == c).sum())
        assert int((part & (y == c)).sum()) == int(np.floor(0.3 * n_c + 0.5))
    recal, ev = set(ids[part]), set(ids[~part])
    assert recal.isdisjoint(ev) and recal | ev == set(ids)
    assert np.array_equal(split_participants(ids, y, 0.3, seed=5), part)
    assert not np.array_equal(split_participants(ids, y, 0.3, seed=6), part)
    # the rows' order does not matter: the same participants recalibrate
    order = np.random.default_rng(0).permutation(len(ids))
    assert set(ids[order][split_participants(ids[order], y[order], 0.3, seed=5)]) == recal
    # every row of a participant goes to the same part
    twice_ids, twice_y = np.concatenate([ids, ids[:50]]), np.concatenate([y, y[:50]])
    twice = split_participants(twice_ids, twice_y, 0.3, seed=5)
    assert all(len(set(twice[twice_ids == i])) == 1 for i in ids[:50])
    with pytest.raises(DataError, match="P000 has rows with different labels"):
        split_participants(np.array(["P000", "P000"]), np.array([0, 1]), 0.5, 0)
    with pytest.raises(DataError, match="--recalibration-fraction 1: must lie strictly"):
        split_participants(ids, y, 1.0, 0)


def test_parts_smaller_than_min_cell_are_refused_with_a_way_out():
    ids, y = _site()  # about 60 HC, 140 PD
    n_hc = int((y == 0).sum())
    part = split_participants(ids, y, 0.05, seed=0)
    with pytest.raises(DataError) as err:
        check_parts(y, part, 5, 0.05)
    msg = str(err.value)
    k = int(np.floor(0.05 * n_hc + 0.5))
    assert (f"--recalibration-fraction 0.05 puts {k} HC in the recalibration part and "
            f"{n_hc - k} in the evaluation part ({n_hc} HC at the site)") in msg
    assert "data.min_cell = 5" in msg and "between 0.09 and 0.91 would work" in msg
    check_parts(y, split_participants(ids, y, 0.09, seed=0), 5, 0.09)  # the way out works
    few = np.array([0] * 8 + [1] * 40)
    with pytest.raises(DataError, match="needs at least 10 of each class .* it has 8 HC and "
                                        "40 PD"):
        check_parts(few, split_participants(np.arange(48), few, 0.5, 0), 5, 0.5)


def test_only_the_recalibration_part_is_read():
    """A leakage spy: whatever the evaluation part's scores and labels, the same map and
    threshold; a change in the recalibration part changes them."""
    z, y = _miscalibrated(n=400, a=0.4, b=0.5, seed=2)
    ids = np.array([f"P{i:03d}" for i in range(len(z))])
    part = split_participants(ids, y, 0.5, seed=0)
    rng = np.random.default_rng(9)
    for method in ("temperature", "platt"):
        cmap, t = recalibrate(z, y, part, method)
        z2, y2 = z.copy(), y.copy()
        z2[~part] = rng.normal(5, 3, (~part).sum())  # other scores and labels, evaluation only
        y2[~part] = rng.integers(0, 2, (~part).sum())
        assert recalibrate(z2, y2, part, method) == (cmap, t)
        # more evaluation rows: still the same
        more = np.concatenate([part, np.zeros(30, bool)])
        assert recalibrate(np.concatenate([z, rng.normal(size=30)]),
                           np.concatenate([y, np.ones(30, int)]), more, method) == (cmap, t)
        z3, y3 = z.copy(), y.copy()
        flip = np.flatnonzero(part)[:20]
        y3[flip] = 1 - y3[flip]
        z3[part] *= 1.5
        changed = recalibrate(z3, y3, part, method)
        assert changed[0] != cmap
