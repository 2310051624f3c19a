"""Named arrays in and out of one flat uint64 vector, so one masked message carries everything.

A `Packing` is the spec both sides agree on: an ordered list of fields, each a ``count`` (non-
negative integers, summed exactly), a ``real`` (floats, clipped to ``[-clip, clip]`` and summed in
fixed point, see `fixed_point`) or a ``ring`` (signed integers the site has already put on a
fixed-point grid of its own, added modulo 2^64 and read back as int64 without any clipping:
distributed DP's noised gradient shares, `safn_core.privacy.noise_shares`, whose Gaussian tails
must not be cut), and ``max_parties``, the most vectors that will ever be added.
Counts travel inside the vector on purpose: a count sent beside it (``n``, class counts) would be
visible per site. The layout is the fields in order, each flattened in C order, then one slot per
real field holding how many of its values were clipped, so the coordinator learns the
federation-wide clip count and no site's own.

The coordinator sends ``packing.to_dict()`` in a message; a site rebuilds it with
`Packing.from_dict`, which validates it like any other input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from safn_core.secagg import fixed_point

FORMAT = "safn-secagg-packing/1"
KINDS = ("count", "real", "ring")


@dataclass(frozen=True)
class Field:
    """One named array of a `Packing`: ``kind`` is ``"count"``, ``"real"`` (then ``clip`` > 0) or
    ``"ring"``."""

    name: str
    kind: str
    shape: tuple[int, ...] = ()
    clip: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a field name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        try:
            if isinstance(self.shape, (str, bytes)):
                raise TypeError
            shape = tuple(int(d) for d in self.shape)
        except (TypeError, ValueError):
            raise ValueError(f"field {self.name!r}: shape must be a tuple of ints, "
                             f"got {self.shape!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"field {self.name!r}: shape {shape} has a negative dimension")
        object.__setattr__(self, "shape", shape)
        if self.kind == "real":
            if self.clip is None or isinstance(self.clip, bool):
                raise ValueError(f"real field {self.name!r} needs a clip bound")
            clip = float(self.clip)
            if not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"real field {self.name!r}: clip must be a positive finite "
                                 f"number, got {self.clip!r}")
            object.__setattr__(self, "clip", clip)
        elif self.clip is not None:
            raise ValueError(f"{self.kind} field {self.name!r} takes no clip bound")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def count(cls, name: str, shape: Iterable[int] = ()) -> Field:
        return cls(name, "count", tuple(shape))

    @classmethod
    def real(cls, name: str, shape: Iterable[int] = (), *, clip: float) -> Field:
        return cls(name, "real", tuple(shape), clip)

    @classmethod
    def ring(cls, name: str, shape: Iterable[int] = ()) -> Field:
        return cls(name, "ring", tuple(shape))


class Encoded(NamedTuple):
    """A site's encoded vector and, per real field, how many of its values were clipped."""

    vector: np.ndarray
    clipped: dict[str, int]


@dataclass(frozen=True)
class Packing:
    """The layout of one secure sum; see the module docstring."""

    fields: tuple[Field, ...]
    max_parties: int

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        if not fields or not all(isinstance(f, Field) for f in fields):
            raise ValueError("a Packing needs at least one Field")
        names = [f.name for f in fields]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"field names must be unique; repeated: {duplicated}")
        if isinstance(self.max_parties, bool) or not isinstance(self.max_parties, int) \
                or self.max_parties < 1:
            raise ValueError(f"max_parties must be a positive int, got {self.max_parties!r}")
        object.__setattr__(self, "fields", fields)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def _reals(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.kind == "real")

    @property
    def size(self) -> int:
        """Length of the encoded vector: every field's values, then one clip slot per real field."""
        return sum(f.size for f in self.fields) + len(self._reals)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise ValueError(f"unknown field {name!r}; fields are {list(self.names)}")

    def scale(self, name: str) -> float:
        """The fixed-point scale of real field ``name``."""
        f = self._real_field(name)
        return fixed_point.scale_for(f.clip, self.max_parties)

    def error_bound(self, name: str) -> float:
        """Per-coordinate bound on |decoded sum − exact sum of clipped values| (0 for counts and
        ring fields: their integers add exactly)."""
        f = self.field(name)
        if f.kind in ("count", "ring"):
            return 0.0
        return fixed_point.error_bound(f.clip, self.max_parties)

    @property
    def max_count(self) -> int:
        """The largest value one site may put in a count field: the sum then fits in an int64."""
        return fixed_point.INT64_MAX // self.max_parties

    def _real_field(self, name: str) -> Field:
        f = self.field(name)
        if f.kind != "real":
            raise ValueError(f"field {name!r} is a {f.kind} field; it has no scale")
        return f

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, values: Mapping[str, Any]) -> Encoded:
        """One site's ``{field: array}`` as a flat uint64 vector, with its clip counts."""
        if not isinstance(values, Mapping):
            raise ValueError("values must be a dict of field name to array, got "
                             f"{type(values).__name__}")
        unknown = sorted(set(values) - set(self.names))
        missing = [n for n in self.names if n not in values]
        if unknown or missing:
            raise ValueError(f"values do not match the packing: unknown fields {unknown}, "
                             f"missing fields {missing}")
        parts: list[np.ndarray] = []
        clipped: dict[str, int] = {}
        for f in self.fields:
            array = np.asarray(values[f.name])
            if array.shape != f.shape:
                raise ValueError(f"field {f.name!r}: expected shape {f.shape}, got {array.shape}")
            if f.kind == "count":
                parts.append(self._encode_count(f, array))
            elif f.kind == "ring":
                parts.append(self._encode_ring(f, array))
            else:
                q, clipped[f.name] = self._encode_real(f, array)
                parts.append(q)
        parts.append(np.array([clipped[f.name] for f in self._reals], dtype=np.uint64))
        return Encoded(np.concatenate([p.ravel() for p in parts]).astype(np.uint64, copy=False),
                       clipped)

    def _encode_count(self, f: Field, array: np.ndarray) -> np.ndarray:
        if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"count field {f.name!r} must hold integers, got dtype {array.dtype}")
        if array.size and array.min() < 0:
            raise ValueError(f"count field {f.name!r} has a negative value ({array.min()})")
        if array.size and int(array.max()) > self.max_count:
            raise ValueError(f"count field {f.name!r}: {int(array.max())} exceeds "
                             f"{self.max_count}, the most one of {self.max_parties} parties "
                             "may send without the sum overflowing")
        return array.astype(np.uint64)

    def _encode_ring(self, f: Field, array: np.ndarray) -> np.ndarray:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"ring field {f.name!r} must hold integers (already on its "
                             f"fixed-point grid), got dtype {array.dtype}")
        return array.astype(np.int64).view(np.uint64)

    def _encode_real(self, f: Field, array: np.ndarray) -> tuple[np.ndarray, int]:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
                or array.dtype == np.bool_):
            raise ValueError(f"real field {f.name!r} must hold numbers, got dtype {array.dtype}")
        array = array.astype(np.float64)
        if not np.all(np.isfinite(array)):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise ValueError(f"real field {f.name!r} has {bad} non-finite value(s) (NaN or inf)")
        return fixed_point.quantise(array, f.clip, self.scale(f.name))

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector)
        if vector.dtype != np.uint64 or vector.shape != (self.size,):
            raise ValueError(f"expected a uint64 vector of length {self.size}, got {vector.dtype} "
                             f"of shape {vector.shape}")
        return vector

    def decode(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """A sum of encoded vectors back to ``{field: array}``: counts int64, reals float64."""
        vector = self._check_vector(vector)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for f in self.fields:
            chunk = vector[offset:offset + f.size]
            offset += f.size
            if f.kind == "count":
                counts = chunk.view(np.int64)
                if counts.size and counts.min() < 0:
                    raise ValueError(f"count field {f.name!r} decoded negative: the masks did not "
                                     "cancel (a participant's vector is missing from the sum?)")
                out[f.name] = counts.reshape(f.shape).copy()
            elif f.kind == "ring":
                out[f.name] = chunk.view(np.int64).reshape(f.shape).copy()
            else:
                out[f.name] = fixed_point.dequantise(chunk, self.scale(f.name)).reshape(f.shape)
        return out

    def decode_clipped(self, vector: np.ndarray) -> dict[str, int]:
        """How many values of each real field were clipped, summed over every site in the sum."""
        vector = self._check_vector(vector)
        tail = vector[self.size - len(self._reals):]
        return {f.name: int(c) for f, c in zip(self._reals, tail)}

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-compatible dict for a message; `from_dict` rebuilds the same Packing."""
        fields = []
        for f in self.fields:
            entry: dict[str, Any] = {"name": f.name, "kind": f.kind, "shape": list(f.shape)}
            if f.kind == "real":
                entry["clip"] = f.clip
            fields.append(entry)
        return {"format": FORMAT, "max_parties": self.max_parties, "fields": fields}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Packing:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"not a packing spec (expected format {FORMAT!r})")
        if set(data) != {"format", "max_parties", "fields"}:
            raise ValueError("packing spec keys must be format, max_parties, fields; got "
                             f"{sorted(data)}")
        if not isinstance(data["fields"], (list, tuple)):
            raise ValueError("packing spec 'fields' must be a list")
        fields = []
        for entry in data["fields"]:
            allowed = {"name", "kind", "shape", "clip"}
            if not isinstance(entry, Mapping) or not {"name", "kind", "shape"} <= set(entry) \
                    or not set(entry) <= allowed:
                raise ValueError(f"packing field must have name, kind, shape (and clip for real): "
                                 f"got {entry!r}")
            fields.append(Field(entry["name"], entry["kind"], entry["shape"], entry.get("clip")))
        return cls(tuple(fields), data["max_parties"])
