"""A site's privacy ledger: every DP release ever made on its data, on its own disk, append-only.

The file (its JSON format, lock, atomic and append-only writes) is `ledger_file`; this module is
the record kept in it: who it is for, what was spent and planned, and the transactions that add to
it.

Each entry is one Poisson-subsampled Gaussian release, ``(noise_multiplier, sample_rate, steps)``
in Opacus' accountant-history form (a statistics release is ``(σ, 1.0, 1)``), so the whole history
is what an Opacus accountant would have recorded, and ε is recomputed from it at any time.

Rules that keep it honest (with the file's: append-only, atomic, locked; see `ledger_file`):

- **Append-only.** An older in-memory copy cannot overwrite a newer ledger, and a ledger replaced
  behind a running process by an older copy is detected.
- **Reserve, then train, then confirm.** Spend is written *before* the training it pays for; a
  crash between the two leaves the reservation charged in full (never under-counted).
- **Locked.** Every read-modify-write holds the file's lock, so two processes cannot both spend
  the last of a budget.
- **Bound to the data.** A ledger for another training split (fingerprint), accountant or δ is
  refused unless the site says ``privacy.accept_ledger_change: true``; the old spend then still
  counts (the people in both splits have already paid it).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safn_core.privacy.errors import LedgerError, LedgerMismatch
from safn_core.privacy.ledger_file import (
    DEFAULT_NAME, FORMAT, LOCK_TIMEOUT, charged, hold_lock, now, read_state, reread_state,
    write_over,
)


def data_fingerprint(participant_ids: Iterable[Any], features: Iterable[str]) -> str:
    """``sha256:…`` of the sorted participant ids and ordered feature list of a training split.

    The same people with the same features give the same fingerprint whatever the row order.
    """
    ids = sorted(str(i) for i in participant_ids)
    payload = json.dumps({"ids": ids, "features": [str(f) for f in features]},
                         separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def default_ledger_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / DEFAULT_NAME


def resolve_ledger_path(configured: str | Path | None, state_dir: str | Path | None) -> Path:
    """``privacy.ledger`` as a path: absolute as given, relative to the site state folder, or the
    default ``<state folder>/privacy_ledger.json``."""
    if configured is not None:
        path = Path(configured).expanduser()
        if path.is_absolute():
            return path
        if state_dir is None:
            return path.resolve()
        return Path(state_dir) / path
    if state_dir is None:
        raise LedgerError("privacy: no ledger location; set privacy.ledger in the site config "
                          "or give the site a state folder")
    return default_ledger_path(state_dir)


# ------------------------------------------------------------------------------- history forms


def merge_history(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Merge consecutive ``(σ, q, steps)`` entries with the same σ and q, as Opacus' accountants
    do step by step (composition is unchanged; PRV's discretisation then matches Opacus')."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


# ----------------------------------------------------------------------------------- the ledger


class PrivacyLedger:
    """The persistent, append-only record of a site's DP spend (see the module docstring)."""

    def __init__(self, path: Path, state: dict, lock_timeout: float = LOCK_TIMEOUT):
        self.path = Path(path)
        self._state = state
        self._depth = 0
        self._held = False  # this object holds the file's lock
        self._dirty = False
        self.lock_timeout = lock_timeout

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, fingerprint: str, accountant: str, delta: float,
             site: str = "", accept_changes: bool = False,
             lock_timeout: float = LOCK_TIMEOUT) -> "PrivacyLedger":
        """Open (or create) the ledger at ``path`` for this training split, accountant and δ.

        A ledger written for other data, another accountant or another δ raises `LedgerMismatch`
        unless ``accept_changes``; then the change is recorded as an event and the recorded spend
        keeps counting.
        """
        ledger = cls(Path(path), {}, lock_timeout)
        with ledger._locked():
            state = read_state(ledger.path)
            if state is None:
                state = {"format": FORMAT, "site": site, "created": now(), "revision": 0,
                         "fingerprint": fingerprint, "accountant": accountant,
                         "delta": float(delta), "entries": [], "plans": {},
                         "events": [{"time": now(), "kind": "created", "fingerprint": fingerprint,
                                     "accountant": accountant, "delta": float(delta)}]}
                ledger._state = state
                ledger._write()
                return ledger
            ledger._state = state
            changes = []
            if state["fingerprint"] != fingerprint:
                changes.append(("fingerprint", state["fingerprint"], fingerprint,
                                "the training split (participants or features) changed"))
            if state["accountant"] != accountant:
                changes.append(("accountant", state["accountant"], accountant,
                                "privacy.accountant changed"))
            if not _close(float(state["delta"]), float(delta)):
                changes.append(("delta", state["delta"], float(delta), "privacy.delta changed"))
            if changes and not accept_changes:
                what = "; ".join(f"{why} (ledger: {old!r}, now: {new!r})"
                                 for _, old, new, why in changes)
                raise LedgerMismatch(
                    f"{ledger.path}: this privacy ledger was written for different settings: "
                    f"{what}. Its recorded spend (ε = its accountant's history) still applies to "
                    f"the people it covers. To continue it anyway set "
                    f"privacy.accept_ledger_change: true; never delete it to start over")
            if changes:
                for key, old, new, why in changes:
                    state[key] = new
                    state["events"].append({"time": now(), "kind": f"{key}_changed",
                                            "old": old, "new": new, "reason": why})
                ledger._write()
        return ledger

    @classmethod
    def read(cls, path: str | Path) -> "PrivacyLedger":
        """A read-only view of an existing ledger (no checks, no lock held afterwards)."""
        state = read_state(Path(path))
        if state is None:
            raise LedgerError(f"{path}: no privacy ledger there")
        return cls(Path(path), state)

    # -- views -------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self._state["fingerprint"]

    @property
    def accountant(self) -> str:
        return self._state["accountant"]

    @property
    def delta(self) -> float:
        return float(self._state["delta"])

    @property
    def revision(self) -> int:
        return int(self._state["revision"])

    @property
    def entries(self) -> list[dict]:
        return copy.deepcopy(self._state["entries"])

    @property
    def events(self) -> list[dict]:
        return copy.deepcopy(self._state["events"])

    def plan(self, run_id: str) -> dict | None:
        plan = self._state["plans"].get(run_id)
        return copy.deepcopy(plan) if plan is not None else None

    def history(self) -> list[tuple[float, float, int]]:
        """Every charged release as Opacus accountant history, consecutive equal ones merged."""
        return merge_history((e["noise_multiplier"], e["sample_rate"], charged(e))
                             for e in self._state["entries"])

    def charged_steps(self, run_id: str | None = None, kind: str | None = None) -> int:
        return sum(charged(e) for e in self._state["entries"]
                   if (run_id is None or e["run_id"] == run_id)
                   and (kind is None or e["kind"] == kind))

    def snapshot(self) -> dict:
        """A deep copy of the whole ledger state (what the file holds)."""
        return copy.deepcopy(self._state)

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator["PrivacyLedger"]:
        """Lock, re-read the file (another process may have spent), yield, write if changed.

        Re-entrant. If the body raises, nothing is written and the in-memory state is restored.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        with self._locked():
            self._reload()
            before = copy.deepcopy(self._state)
            self._dirty = False
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._state = before
                raise
            finally:
                self._depth = 0
            if self._dirty:
                self._write()

    def reserve(self, *, kind: str, run_id: str, round: int | None, noise_multiplier: float,
                sample_rate: float, steps: int, note: str = "") -> int:
        """Append a spend entry *before* the release it pays for; returns its ``seq``."""
        if steps <= 0:
            raise ValueError("a reservation must charge at least one step")
        if not (0 < sample_rate <= 1) or not noise_multiplier > 0:
            raise ValueError(f"invalid release: noise multiplier {noise_multiplier}, "
                             f"sample rate {sample_rate}")
        with self.transaction():
            entries = self._state["entries"]
            seq = (entries[-1]["seq"] + 1) if entries else 1
            entries.append({"seq": seq, "kind": kind, "run_id": str(run_id), "round": round,
                            "noise_multiplier": float(noise_multiplier),
                            "sample_rate": float(sample_rate), "steps": int(steps),
                            "steps_taken": None, "status": "reserved", "reserved_at": now(),
                            "confirmed_at": None, "note": note})
            self._dirty = True
        return seq

    def confirm(self, seq: int, steps_taken: int) -> None:
        """Record that the release ``seq`` happened with ``steps_taken`` steps.

        Charges ``max(reserved, taken)``: confirming never lowers what an entry costs.
        """
        with self.transaction():
            entry = next((e for e in self._state["entries"] if e["seq"] == seq), None)
            if entry is None:
                raise LedgerError(f"{self.path}: no spend entry {seq} to confirm")
            if entry["status"] == "confirmed":
                raise LedgerError(f"{self.path}: spend entry {seq} is already confirmed")
            entry["steps_taken"] = int(steps_taken)
            entry["status"] = "confirmed"
            entry["confirmed_at"] = now()
            self._dirty = True

    def set_plan(self, run_id: str, plan: dict) -> None:
        """Record a run's calibrated plan (once; a plan is never changed afterwards)."""
        with self.transaction():
            if run_id in self._state["plans"]:
                raise LedgerError(f"{self.path}: run {run_id!r} already has a plan")
            self._state["plans"][run_id] = copy.deepcopy(plan)
            self._state["events"].append({"time": now(), "kind": "plan", "run_id": run_id})
            self._dirty = True

    def add_event(self, kind: str, **detail) -> None:
        with self.transaction():
            self._state["events"].append({"time": now(), "kind": kind, **detail})
            self._dirty = True

    def save(self) -> None:
        """Write this in-memory copy; refused (`LedgerRewind`) if the file records anything this
        copy lacks, e.g. when this copy is older than the ledger on disk."""
        with self._locked():
            self._write()

    # -- internals -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._held:  # already held by this object
            yield
            return
        with hold_lock(self.path, self.lock_timeout):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    def _reload(self) -> None:
        disk = reread_state(self.path, self._state)
        if disk is not None:
            self._state = disk

    def _write(self) -> None:
        write_over(self.path, self._state)
        self._dirty = False


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-300)
