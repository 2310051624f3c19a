"""Local recalibration of a bundle at a site: a calibration map and a new decision threshold.

A hospital adopting a bundle may find its scores miscalibrated for its own population (another
prevalence, scanner or case mix). ``safn-validate --recalibrate`` (`safn_core.validation`)
splits the site's labelled participants by participant, stratified by class and seeded, into a
recalibration part and an evaluation part (`split_participants`). On the recalibration part
only it fits a calibration map on the model's own logits (`fit_map`) and then the decision
threshold on the calibrated scores (`metrics.choose_threshold`, the rule training uses: maximum
balanced accuracy); the evaluation part, never used to fit either, gives the before/after
figures.

Two maps, both unpenalised maximum-likelihood fits whose state is a few numbers (kept in the
bundle's ``bundle.json``, never pickled):

- **temperature**: p = σ(z / T) with one T > 0. It rescales the logit z and keeps every ranking,
  so ROC/PR-AUC do not change; it fixes over- or underconfidence, not a shifted prevalence.
- **platt**: p = σ(a + b·z), the logistic regression of y on z. It also moves the intercept (a
  site whose prevalence differs from training), and is the fit whose ideal is the calibration
  slope 1 and intercept 0 that `metrics.calibration_slope` reports.

z is the model's logit of P(PD) (the difference of its two output logits) before any map: a
bundle that was already recalibrated is refitted from the original model's logits, and the new
map replaces the old one rather than being stacked on it.

``train.temperature_scaling`` fits the same temperature when a model is trained
(`fit_training_temperature`: on its validation split, the one early stopping and the
threshold use; T = 1 where that split cannot give one). safn-train's bundle carries it under
``calibration`` in ``bundle.json``; a site's recalibration, fitted on the raw logits, replaces it.

A K-class bundle (K > 2) is recalibrated by temperature or vector scaling on its K logits
(`safn_core.recalibration_multiclass`); the split and the part sizes here serve it too (every
class stratified, every class at least ``data.min_cell`` in each part).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from scipy.special import expit

from safn_core.errors import DataError
from safn_core.metrics import MIN_OVERLAP, _logistic_mle, _overlap, choose_threshold

METHODS = ("temperature", "platt")
"""The maps of a binary bundle."""
ALL_METHODS = ("temperature", "platt", "vector")
"""Every ``--calibration`` choice: vector scaling is for a K-class bundle (K > 2,
`safn_core.recalibration_multiclass`), platt for a binary one; temperature for both."""


def _check_method(method: str) -> None:
    if method not in ALL_METHODS:
        raise DataError(f"--calibration {method}: choose one of {', '.join(ALL_METHODS)}")


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise DataError(f"--recalibration-fraction {fraction:g}: must lie strictly between 0 "
                        "and 1 (the share of the site's participants that recalibrate; the "
                        "others are evaluated)")


@dataclass(frozen=True)
class RecalibrationOptions:
    """How a site recalibrates: the map (``method``), the share of its participants of each
    class that fit it (``fraction``; the others are evaluated) and the split's seed. Checked
    when made: a wrong value is a one-line `DataError`."""

    method: str = "temperature"
    fraction: float = 0.5
    split_seed: int = 0

    def __post_init__(self):
        _check_method(self.method)
        _check_fraction(self.fraction)


@dataclass(frozen=True)
class CalibrationMap:
    """A fitted map from the model's logit z to a calibrated P(PD).

    ``params``: ``{"temperature": T}`` or ``{"a": a, "b": b}``; `to_dict` / `from_dict` are its
    JSON form in a bundle's meta (``recalibration.map``).
    """

    method: str
    params: dict

    def logit(self, z: np.ndarray) -> np.ndarray:
        """The calibrated logit of P(PD)."""
        z = np.asarray(z, dtype=np.float64)
        if self.method == "temperature":
            return z / self.params["temperature"]
        return self.params["a"] + self.params["b"] * z

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Calibrated P(PD) for logits ``z``."""
        return expit(self.logit(z))

    def describe(self) -> str:
        if self.method == "temperature":
            return f"temperature T = {self.params['temperature']:.3f}"
        return f"Platt a = {self.params['a']:.3f}, b = {self.params['b']:.3f}"

    def to_dict(self) -> dict:
        return {"method": self.method, "params": {k: float(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "recalibration.map") -> "CalibrationMap":
        """The map from its JSON form; a clear error naming ``where`` when it is broken."""
        want = {"temperature": ("temperature",), "platt": ("a", "b")}
        method = (d or {}).get("method")
        params = (d or {}).get("params") or {}
        if method not in want or set(params) != set(want[method]):
            raise DataError(f"{where}: expected method temperature (params temperature) or "
                            f"platt (params a, b), got {d!r}")
        try:
            values = {k: float(params[k]) for k in want[method]}
        except (TypeError, ValueError):
            raise DataError(f"{where}: parameters must be numbers, got {params!r}") from None
        if not all(np.isfinite(v) for v in values.values()) or (
                method == "temperature" and values["temperature"] <= 0):
            raise DataError(f"{where}: parameters must be finite (and a temperature > 0), got "
                            f"{params!r}")
        return cls(method, values)


def _inverse_temperature_mle(z: np.ndarray, y: np.ndarray, max_iter: int = 100,
                             tol: float = 1e-12) -> float | None:
    """Unpenalised maximum-likelihood s of P(y=1) = σ(s·z) (s = 1/T; the log-likelihood is
    concave in s) by Newton's method with step halving; None when it does not converge."""
    def nll(s):
        return float(np.sum(np.logaddexp(0.0, s * z) - y * s * z))

    s, cur = 1.0, nll(1.0)
    for _ in range(max_iter):
        mu = expit(s * z)
        grad, hess = float(np.sum((mu - y) * z)), float(np.sum(mu * (1 - mu) * z * z))
        if hess <= 0:
            return None
        step = -grad / hess
        for _ in range(30):  # halve the step until the likelihood does not fall
            new = nll(s + step)
            if new <= cur + 1e-12 * max(1.0, cur):
                break
            step /= 2
        s, cur = s + step, new
        if not np.isfinite(s):
            return None
        if abs(step) < tol * max(1.0, abs(s)):
            return s
    return None


class NoCalibrationMap(DataError):
    """No finite calibration map exists on these logits; ``reason`` says why as a code with its
    numbers (`no_map_text` puts it in words):

    - ``{"code": "one_class"}``
    - ``{"code": "separated", "overlap": n}``: the scores (almost) separate the classes (``n``
      participants of a class where the two classes' scores overlap)
    - ``{"code": "not_converged"}``
    - ``{"code": "wrong_order", "inverse_temperature": s}``: the best s = 1/T is ≤ 0
    """

    def __init__(self, method: str, reason: dict, *, at_training: bool):
        self.method, self.reason, self.at_training = method, reason, at_training
        super().__init__(no_map_text(method, reason, at_training=at_training))


def no_map_text(method: str, reason: dict, *, at_training: bool) -> str:
    """A `NoCalibrationMap` reason in words (with the site's advice unless ``at_training``)."""
    part = "validation split" if at_training else "recalibration part"
    code = reason["code"]
    if code == "one_class":
        return f"the {part} holds one class only: no calibration map"
    if code == "separated":
        overlap = reason["overlap"]
        return (f"the model's scores separate the {part}'s classes "
                f"{'completely' if overlap == 0 else 'almost completely'} ({overlap} "
                "participant(s) of a class where the two classes' scores overlap): the "
                f"maximum-likelihood {method} map is unbounded, so there is nothing finite to fit"
                + ("" if at_training else "; validate without --recalibrate, or recalibrate on "
                                          "more participants (--recalibration-fraction)"))
    if code == "not_converged":
        return (f"the {'temperature' if method == 'temperature' else 'Platt'} fit did not "
                f"converge on the {part}")
    if code == "wrong_order":
        who = ("the validation split's participants" if at_training else
               "this site's recalibration participants")
        return (f"the model's scores rank {who} the wrong way round (best inverse temperature "
                f"{reason['inverse_temperature']:.3f} ≤ 0): no temperature T > 0 can calibrate "
                "them" + ("" if at_training else "; the model does not transfer to this site"))
    raise ValueError(f"unknown calibration reason {reason!r}")


def fit_map(method: str, z: np.ndarray, y: np.ndarray, *,
            at_training: bool = False) -> CalibrationMap:
    """Fit a calibration map on logits ``z`` and labels ``y`` (the recalibration part only;
    ``at_training``: a new model's validation split, and the errors say so without the site's
    advice).

    Raises `NoCalibrationMap` (a `DataError`) when no finite map exists: one class only, scores
    that (almost) separate the classes (the likelihood grows without bound as T → 0 or b → ∞),
    or, for a temperature, scores that rank the classes the wrong way round (the best s = 1/T
    is ≤ 0).
    """
    if method not in METHODS:
        raise DataError(f"--calibration {method}: a binary bundle is recalibrated by "
                        f"{' or '.join(METHODS)} (vector scaling is for K > 2 classes)")

    def none(reason: dict) -> NoCalibrationMap:
        return NoCalibrationMap(method, reason, at_training=at_training)

    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y).astype(float)
    if len(y) == 0 or y.min() == y.max():
        raise none({"code": "one_class"})
    overlap = _overlap(z, y.astype(int))
    if overlap < MIN_OVERLAP:
        raise none({"code": "separated", "overlap": int(overlap)})
    if method == "temperature":
        s = _inverse_temperature_mle(z, y)
        if s is None:
            raise none({"code": "not_converged"})
        if s <= 0:
            raise none({"code": "wrong_order", "inverse_temperature": float(s)})
        return CalibrationMap("temperature", {"temperature": 1.0 / s})
    fit = _logistic_mle(z, y)
    if fit is None:
        raise none({"code": "not_converged"})
    return CalibrationMap("platt", {"a": fit[0], "b": fit[1]})


IDENTITY = CalibrationMap("temperature", {"temperature": 1.0})
"""T = 1: the model's own probabilities (σ(z) is its softmax P(PD))."""


@dataclass(frozen=True)
class TrainingTemperature:
    """A temperature fitted when the model was trained, on its validation split's logits
    (`fit_training_temperature`); ``reason`` says why T = 1 was kept where none could be
    fitted (None: fitted), as a code: ``{"code": "too_few", "classes": [names], "min_cell":
    m}`` (the split's classes below ``min_cell``; its counts are ``validation_split``) or a
    `NoCalibrationMap` reason. A bundle carries `to_dict` in ``bundle.json`` under
    ``calibration``; a site's ``--recalibrate`` refits from the raw logits and supersedes it.
    """

    map: CalibrationMap
    validation_split: dict
    reason: dict | None = None

    @property
    def temperature(self) -> float:
        return float(self.map.params["temperature"])

    @property
    def note(self) -> str | None:
        """Why T = 1 was kept, in words (None: fitted)."""
        return None if self.reason is None else kept_text(self.reason, self.validation_split)

    def to_dict(self) -> dict:
        return {"method": "temperature", "map": self.map.to_dict(), "fitted": self.reason is None,
                "fitted_at": "training", "fitted_on": "validation split",
                "validation_split": self.validation_split, "reason": self.reason}


def kept_text(reason: dict, split: dict) -> str:
    """Why a training temperature of T = 1 was kept, in words (`TrainingTemperature.reason`
    and its validation split's `counts`)."""
    if reason["code"] == "too_few":
        m = reason["min_cell"]
        few = [f"{split[name]} {name}" for name in reason["classes"]]
        return (f"the validation split holds {' and '.join(few)}: a temperature needs at least "
                f"data.min_cell = {m} of each class; T = 1 kept")
    return no_map_text("temperature", reason, at_training=True) + "; T = 1 kept"


def fit_training_temperature(z: np.ndarray, y: np.ndarray, min_cell: int,
                             names=("HC", "PD")) -> TrainingTemperature:
    """The temperature of a model just trained, fitted on its validation split's logits ``z``
    and labels ``y`` (never its training or test participants), by the maximum likelihood
    `fit_map` uses at a site. Where that split cannot give one, T = 1 (the model as it is) and
    the reason says why: fewer than ``min_cell`` participants of a class (no statistic from
    fewer, as at a site), or no finite temperature (`fit_map`'s reasons: one class, separated
    classes, scores ranked the wrong way round)."""
    y = np.asarray(y).astype(int)
    split = counts(y, names)
    few = [names[c] for c in (0, 1) if split[names[c]] < min_cell]
    if few:
        return TrainingTemperature(IDENTITY, split, {"code": "too_few", "classes": few,
                                                     "min_cell": int(min_cell)})
    try:
        return TrainingTemperature(fit_map("temperature", z, y, at_training=True), split)
    except NoCalibrationMap as err:
        return TrainingTemperature(IDENTITY, split, err.reason)


def training_calibration_text(record: dict) -> str:
    """What a card or console says of a bundle's ``calibration`` record (a bundle from before
    the reason codes carries its reason in words, under ``note``)."""
    split = record.get("validation_split") or {}
    names = [k for k in split if k != "n"]
    who = f"{split.get('n')} participants: " + " / ".join(f"{split[k]} {k}" for k in names) \
        if split else "participants"
    if not record.get("fitted", True):
        why = (kept_text(record["reason"], split) if record.get("reason")
               else record.get("note"))
        return f"no temperature fitted at training on the validation split ({who}): {why}"
    cmap = CalibrationMap.from_dict(record.get("map"), "bundle.json calibration.map")
    return (f"{cmap.describe()} fitted at training on the validation split ({who}) by maximum "
            "likelihood on the model's logits z: every P(PD) is σ(z/T), rankings (ROC/PR-AUC) "
            "unchanged, and the decision threshold was chosen on these scores")


def split_participants(ids, y, fraction: float, seed: int) -> np.ndarray:
    """True for the rows in the recalibration part, False for the evaluation part.

    By participant (all rows of one id go to one part), stratified by class (round(fraction·n)
    of each class's participants recalibrate) and deterministic for a seed: ids are sorted
    before the seeded shuffle, so the row order of the data does not matter.
    """
    _check_fraction(fraction)
    ids = np.asarray(ids).astype(str)
    y = np.asarray(y).astype(int)
    first = {}
    for i, label in zip(ids, y):
        if first.setdefault(i, label) != label:
            raise DataError(f"participant {i} has rows with different labels; one label per "
                            "participant is needed to split by participant")
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for c in range(max(2, int(y.max(initial=0)) + 1)):  # binary: (0, 1) as always
        members = np.array(sorted(i for i, label in first.items() if label == c))
        k = int(np.floor(fraction * len(members) + 0.5))
        chosen.update(members[rng.permutation(len(members))[:k]].tolist())
    return np.array([i in chosen for i in ids])


def check_parts(y, in_recal: np.ndarray, min_cell: int, fraction: float,
                label_names=("HC", "PD")) -> None:
    """Each part must hold at least ``min_cell`` participants of each class (no statistic from
    fewer); otherwise say how many there are and what fraction, or how much data, would do."""
    y = np.asarray(y).astype(int)
    counts = {c: (int(((y == c) & in_recal).sum()), int(((y == c) & ~in_recal).sum()))
              for c in range(len(label_names))}
    short = [c for c, (r, e) in counts.items() if min(r, e) < min_cell]
    if not short:
        return
    c = short[0]
    r, e = counts[c]
    totals = {k: sum(v) for k, v in counts.items()}
    lo = max(min_cell / n for n in totals.values())
    hi = min((n - min_cell) / n for n in totals.values())
    fix = (f"a --recalibration-fraction between {np.ceil(lo * 100) / 100:.2f} and "
           f"{np.floor(hi * 100) / 100:.2f} would work" if np.ceil(lo * 100) <= np.floor(hi * 100)
           else f"the site needs at least {2 * min_cell} of each class (2 × data.min_cell); "
                f"it has {_and(f'{totals[k]} {label_names[k]}' for k in totals)}")
    raise DataError(
        f"--recalibration-fraction {fraction:g} puts {r} {label_names[c]} in the recalibration "
        f"part and {e} in the evaluation part ({totals[c]} {label_names[c]} at the site); each "
        f"part needs at least data.min_cell = {min_cell} of each class: {fix}")


def _and(parts) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def counts(y, names=("HC", "PD")) -> dict:
    """Participants per class, by class name, and in all (binary: the positive class first,
    as always; K classes: in class order)."""
    y = np.asarray(y).astype(int)
    if len(names) == 2:
        return {"n": int(len(y)), names[1]: int(y.sum()), names[0]: int(len(y) - y.sum())}
    return {"n": int(len(y)), **{name: int((y == k).sum()) for k, name in enumerate(names)}}


def recalibrate(z: np.ndarray, y: np.ndarray, in_recal: np.ndarray, method: str
                ) -> tuple[CalibrationMap, float]:
    """The calibration map and decision threshold, fitted on the recalibration part only
    (rows where ``in_recal``): the map on the model's logits ``z``, then the threshold that
    maximises balanced accuracy on the calibrated scores (`choose_threshold`, the rule
    centralised training uses; a federation's histogram rule maximises the same)."""
    zr, yr = np.asarray(z)[in_recal], np.asarray(y)[in_recal]
    cmap = fit_map(method, zr, yr)
    return cmap, choose_threshold(yr, cmap(zr))


def recalibration_record(cmap: CalibrationMap, threshold: float, meta: dict, *, site: str,
                         data: str, validation: str, parts: dict, options: RecalibrationOptions,
                         source_bundle: str) -> dict:
    """The ``recalibration`` record a site bundle carries in ``bundle.json`` (and
    ``validation.json``): the map, the new threshold and the one it replaces, where, on whom
    (``parts``: `counts` of the recalibration and evaluation parts), how the participants were
    split, when, from which bundle, and the map in force until now (``replaces``: an earlier
    site's record, else the temperature from training, never stacked)."""
    previous = meta.get("recalibration")
    return {
        "method": cmap.method, "map": cmap.to_dict(), "threshold": float(threshold),
        "threshold_before": float(meta["threshold"]),
        "training_threshold": (previous or {}).get("training_threshold", float(meta["threshold"])),
        "site": site, "data": data, "validation": validation,
        "recalibration_part": parts["recalibration"], "evaluation_part": parts["evaluation"],
        "fraction": options.fraction, "split_seed": options.split_seed,
        "stratified_by": "class", "split_by": "participant",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_bundle": source_bundle,
        "replaces": previous or meta.get("calibration"),
    }
