"""Recalibration of a K-class bundle (K > 2) at a site: temperature or vector scaling.

The binary maps (`safn_core.recalibration`) act on one logit; a K-class model has K logits z
(its softmax is its class probabilities, for the softmax and the ordinal head alike). Two
maps, both unpenalised maximum-likelihood fits of the multi-class log loss on the
recalibration part only, whose state is a few numbers kept in ``bundle.json``:

- **temperature**: P = softmax(z / T) with one T > 0 (Guo et al. 2017). It keeps every
  participant's ranking of the classes, so the argmax (and the macro ROC-AUC) do not change;
  it fixes over- or underconfidence.
- **vector**: P = softmax(w ⊙ z + b) with a scale w_k and a bias b_k per class (b_0 = 0: the
  softmax does not change when every logit moves by the same amount). It also moves the
  classes' shares (a site whose case mix differs from training), so the argmax may change.

Where no finite map exists (a class missing from the part, logits that separate the classes so
that the likelihood grows without bound, a best temperature ≤ 0) the fit raises the binary
path's `NoCalibrationMap` with the same reason codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from safn_core.errors import DataError
from safn_core.recalibration import NoCalibrationMap

K_METHODS = ("temperature", "vector")
"""The maps of a K-class bundle (``--calibration``)."""

_BOUND = 1e3  # a fitted parameter beyond this: the likelihood grows without bound (separation)


def _logits(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 3:
        raise ValueError(f"K-class logits must be (n, K) with K > 2, got shape {z.shape}")
    return z


@dataclass(frozen=True)
class MultiClassMap:
    """A fitted map from the model's K logits to calibrated class probabilities.

    ``params``: ``{"temperature": T}`` or ``{"scale": [w_0..w_K-1], "bias": [b_0..b_K-1]}``;
    `to_dict` / `from_dict` are its JSON form in a bundle's meta (``recalibration.map``)."""

    method: str
    params: dict

    @property
    def n_classes(self) -> int | None:
        return None if self.method == "temperature" else len(self.params["scale"])

    def logit(self, z: np.ndarray) -> np.ndarray:
        """The calibrated logits (n, K)."""
        z = _logits(z)
        if self.method == "temperature":
            return z / self.params["temperature"]
        if z.shape[1] != len(self.params["scale"]):
            raise DataError(f"a {len(self.params['scale'])}-class vector map cannot take "
                            f"{z.shape[1]} logits")
        return z * np.asarray(self.params["scale"]) + np.asarray(self.params["bias"])

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n, K)."""
        return softmax(self.logit(z), axis=1)

    def describe(self) -> str:
        if self.method == "temperature":
            return f"temperature T = {self.params['temperature']:.3f} (on the K logits)"
        fmt = ", ".join
        return (f"vector scaling: scale [{fmt(f'{w:.3f}' for w in self.params['scale'])}], "
                f"bias [{fmt(f'{b:.3f}' for b in self.params['bias'])}]")

    def to_dict(self) -> dict:
        if self.method == "temperature":
            return {"method": "temperature", "params": {
                "temperature": float(self.params["temperature"])}}
        return {"method": "vector", "params": {k: [float(v) for v in self.params[k]]
                                               for k in ("scale", "bias")}}

    @classmethod
    def from_dict(cls, d: dict, where: str = "recalibration.map",
                  n_classes: int | None = None) -> "MultiClassMap":
        """The map from its JSON form; a clear error naming ``where`` when it is broken (or, for
        a vector map, when it has not ``n_classes`` entries)."""
        method = (d or {}).get("method")
        params = (d or {}).get("params") or {}
        want = {"temperature": {"temperature"}, "vector": {"scale", "bias"}}
        if method not in want or set(params) != want[method]:
            raise DataError(f"{where}: expected method temperature (params temperature) or "
                            f"vector (params scale, bias) for a K-class bundle, got {d!r}")
        try:
            if method == "temperature":
                values = {"temperature": float(params["temperature"])}
                flat = [values["temperature"]]
            else:
                values = {k: [float(v) for v in params[k]] for k in ("scale", "bias")}
                flat = values["scale"] + values["bias"]
        except (TypeError, ValueError):
            raise DataError(f"{where}: parameters must be numbers, got {params!r}") from None
        if not all(np.isfinite(flat)) or (method == "temperature"
                                          and values["temperature"] <= 0):
            raise DataError(f"{where}: parameters must be finite (and a temperature > 0), got "
                            f"{params!r}")
        if method == "vector" and (len(values["scale"]) != len(values["bias"]) or (
                n_classes is not None and len(values["scale"]) != n_classes)):
            raise DataError(f"{where}: a vector map needs one scale and one bias per class "
                            f"({n_classes or 'K'}), got {params!r}")
        return cls(method, values)


def log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean multi-class log loss of softmax(z) (natural log)."""
    y = np.asarray(y).astype(int)
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))


def _nll_grad(z: np.ndarray, onehot: np.ndarray):
    """Summed negative log-likelihood of softmax(z') and its gradient with respect to z'."""
    logp = log_softmax(z, axis=1)
    return float(-np.sum(onehot * logp)), np.exp(logp) - onehot


def _fit_temperature(z, onehot) -> tuple[float, bool]:
    """The maximum-likelihood s = 1/T (concave in s) and whether the fit converged."""
    def f(v):
        nll, g = _nll_grad(v[0] * z, onehot)
        return nll, np.array([np.sum(g * z)])

    res = minimize(f, np.array([1.0]), jac=True, method="L-BFGS-B",
                   bounds=[(-_BOUND, _BOUND)], options={"maxiter": 500, "ftol": 1e-15,
                                                       "gtol": 1e-10})
    return float(res.x[0]), bool(res.success)


def _fit_vector(z, onehot) -> tuple[np.ndarray, np.ndarray, bool]:
    """The maximum-likelihood scale w (K) and bias b (K, b_0 = 0)."""
    k = z.shape[1]

    def f(v):
        w, b = v[:k], np.concatenate([[0.0], v[k:]])
        nll, g = _nll_grad(z * w + b, onehot)
        return nll, np.concatenate([np.sum(g * z, axis=0), np.sum(g, axis=0)[1:]])

    res = minimize(f, np.concatenate([np.ones(k), np.zeros(k - 1)]), jac=True,
                   method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x[:k], np.concatenate([[0.0], res.x[k:]]), bool(res.success)


def fit_multiclass_map(method: str, z: np.ndarray, y: np.ndarray, n_classes: int, *,
                       at_training: bool = False) -> MultiClassMap:
    """Fit a K-class calibration map on logits ``z`` (n, K) and labels ``y`` (0..K-1) by
    minimising the multi-class log loss (the recalibration part only).

    Raises `NoCalibrationMap` (a `DataError`, the binary path's reasons): a class missing
    (``one_class``), logits that separate the classes (the fit runs off to infinity:
    ``separated``), no convergence, or a best temperature ≤ 0 (``wrong_order``)."""
    if method not in K_METHODS:
        raise DataError(f"--calibration {method}: a {n_classes}-class bundle is recalibrated "
                        f"by {' or '.join(K_METHODS)} (platt is the binary map; vector scaling "
                        "is its K-class form)")

    def none(reason: dict) -> NoCalibrationMap:
        return NoCalibrationMap(method, reason, at_training=at_training)

    z = _logits(z)
    y = np.asarray(y).astype(int)
    if z.shape[1] != n_classes:
        raise ValueError(f"{z.shape[1]} logits for a {n_classes}-class target")
    if len(y) == 0 or len(np.unique(y)) < n_classes:
        raise none({"code": "one_class"})
    onehot = np.eye(n_classes)[y]
    if method == "temperature":
        s, ok = _fit_temperature(z, onehot)
        if abs(s) >= _BOUND * 0.999:
            raise none({"code": "separated", "overlap": 0})
        if not ok:
            raise none({"code": "not_converged"})
        if s <= 0:
            raise none({"code": "wrong_order", "inverse_temperature": float(s)})
        return MultiClassMap("temperature", {"temperature": 1.0 / s})
    w, b, ok = _fit_vector(z, onehot)
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))) or max(
            np.abs(w).max(), np.abs(b).max()) > _BOUND:
        raise none({"code": "separated", "overlap": 0})
    if not ok:
        raise none({"code": "not_converged"})
    return MultiClassMap("vector", {"scale": w.tolist(), "bias": b.tolist()})
