"""The SAFN model on the wire: one flat vector and the layout that names its parts.

Flower moves every array of a message as a separate object, one request per object and hop
(ServerApp → SuperLink → SuperNode → ClientApp and back). SAFN's ~60 parameter tensors made
that ~60 requests per hop per message, which dominated a deployed round; one vector makes it
one. Aggregation is element-wise in every strategy we use (FedAvg, FedProx, FedAdam, FedYogi,
central DP's clipping by the update's global norm), so the flat vector aggregates exactly as
the separate arrays did.

Both sides build the layout from their own model (the same safn version builds the same model
from the same config); the coordinator sends its layout's fingerprint and a site refuses a
vector it would cut differently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

KEY = "model"
"""The one array of a model message."""


class LayoutMismatch(ValueError):
    """The two sides' models are laid out differently (e.g. different safn versions)."""


@dataclass(frozen=True)
class Layout:
    """Parameter names and shapes, in state-dict order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> "Layout":
        for name, a in state.items():
            if np.asarray(a).dtype.kind != "f":
                raise TypeError(f"parameter {name} is {np.asarray(a).dtype}, not floating "
                                "point: it cannot travel in the model vector")
        return cls(tuple(state), tuple(tuple(np.shape(a)) for a in state.values()))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def fingerprint(self) -> str:
        text = json.dumps([self.names, self.shapes])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        if tuple(state) != self.names:
            odd = sorted(set(state) ^ set(self.names))[:3]
            raise LayoutMismatch(f"the weights do not match the model layout ({', '.join(odd)})")
        parts = []
        for (name, shape), a in zip(zip(self.names, self.shapes), state.values()):
            a = np.asarray(a)
            if a.shape != shape:
                raise LayoutMismatch(f"{name} has shape {a.shape}, the layout {shape}")
            parts.append(a.ravel())
        # the parts' own precision (float32 from a site; float64 once an adaptive server
        # optimiser has updated the global model): flattening never rounds
        dtype = np.result_type(*parts) if parts else np.float32
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        vector = np.asarray(vector)
        if vector.ndim != 1 or vector.size != self.size:
            raise LayoutMismatch(f"a model vector of shape {vector.shape} does not fit this "
                                 f"model ({self.size} parameters)")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = int(np.prod(shape))
            out[name] = vector[start:start + n].reshape(shape).copy()
            start += n
        return out

    def check(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint():
            raise LayoutMismatch("the coordinator's model is laid out differently from this "
                                 "site's (different safn versions or model settings); install "
                                 "the coordinator's safn version")
