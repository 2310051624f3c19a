"""A site's privacy ledger: every DP release ever made on its data, on its own disk, append-only.

The ledger is one JSON file (default ``<site state folder>/privacy_ledger.json``)::

    {"format": "safn-privacy-ledger/1", "site": "...", "revision": 12,
     "fingerprint": "sha256:…",          # participant ids + feature list of the training split
     "accountant": "rdp", "delta": 1e-4,
     "entries": [{"seq": 1, "kind": "train", "run_id": "…", "round": 1,
                  "noise_multiplier": 1.07, "sample_rate": 0.25, "steps": 8,
                  "steps_taken": 8, "status": "confirmed", "reserved_at": "…", "confirmed_at": "…"},
                 ...],
     "plans": {"<run id>": {"noise_multiplier": 1.07, "sample_rate": 0.25, ...}},
     "events": [{"time": "…", "kind": "created", ...}, ...]}

Each entry is one Poisson-subsampled Gaussian release, ``(noise_multiplier, sample_rate, steps)``
in Opacus' accountant-history form (a statistics release is ``(σ, 1.0, 1)``), so the whole history
is what an Opacus accountant would have recorded, and ε is recomputed from it at any time.

Rules that keep it honest:

- **Append-only.** Entries are never removed; an entry's charged ``steps`` never decreases and
  ``confirmed`` never goes back to ``reserved``. Every write is checked against the file on disk and
  refused (`LedgerRewind`) if it would forget anything: an older in-memory copy cannot overwrite a
  newer ledger, and a ledger replaced behind a running process by an older copy is detected.
- **Reserve, then train, then confirm.** Spend is written *before* the training it pays for; a
  crash between the two leaves the reservation charged in full (never under-counted).
- **Atomic.** Written through a temporary file, fsync and rename (`safn_core.io.write_atomic`).
- **Locked.** Every read-modify-write holds an exclusive lock on ``<ledger>.lock`` (``flock``),
  so two processes cannot both spend the last of a budget; the OS releases it if a process dies.
- **Bound to the data.** A ledger for another training split (fingerprint), accountant or δ is
  refused unless the site says ``privacy.accept_ledger_change: true``; the old spend then still
  counts (the people in both splits have already paid it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safn_core.io import write_json
from safn_core.privacy.errors import LedgerError, LedgerLocked, LedgerMismatch, LedgerRewind

FORMAT = "safn-privacy-ledger/1"
DEFAULT_NAME = "privacy_ledger.json"
LOCK_TIMEOUT = 60.0

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


def _charged(entry: dict) -> int:
    """Steps an entry costs: the reservation, or what was taken if that was more."""
    return max(int(entry["steps"]), int(entry.get("steps_taken") or 0))


def _extends(new: dict, old: dict) -> str | None:
    """Why ``new`` does not keep everything ``old`` records (None when it does)."""
    if int(new.get("revision", 0)) < int(old.get("revision", 0)):
        return f"it is revision {new.get('revision')}, the one on disk is {old.get('revision')}"
    old_e, new_e = old.get("entries", []), new.get("entries", [])
    if len(new_e) < len(old_e):
        return f"it holds {len(new_e)} spend entries, the one on disk {len(old_e)}"
    for a, b in zip(old_e, new_e):
        same = all(a.get(k) == b.get(k) for k in
                   ("seq", "kind", "run_id", "round", "noise_multiplier", "sample_rate"))
        if not same:
            return f"spend entry {a.get('seq')} differs from the one on disk"
        if _charged(b) < _charged(a):
            return f"spend entry {a.get('seq')} would charge fewer steps than recorded"
        if a.get("status") == "confirmed" and b.get("status") != "confirmed":
            return f"spend entry {a.get('seq')} would lose its confirmation"
    for run_id, plan in old.get("plans", {}).items():
        if new.get("plans", {}).get(run_id) != plan:
            return f"the plan of run {run_id!r} differs from the one on disk"
    if len(new.get("events", [])) < len(old.get("events", [])):
        return "it holds fewer events than the one on disk"
    return None


# ----------------------------------------------------------------------------------- the ledger


class PrivacyLedger:
    """The persistent, append-only record of a site's DP spend (see the module docstring)."""

    def __init__(self, path: Path, state: dict, lock_timeout: float = LOCK_TIMEOUT):
        self.path = Path(path)
        self._state = state
        self._depth = 0
        self._fd: int | None = None
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
            state = _read(ledger.path)
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
        state = _read(Path(path))
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
        return merge_history((e["noise_multiplier"], e["sample_rate"], _charged(e))
                             for e in self._state["entries"])

    def charged_steps(self, run_id: str | None = None, kind: str | None = None) -> int:
        return sum(_charged(e) for e in self._state["entries"]
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
        if self._fd is not None:  # already held by this object
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    try:
                        holder = lock_path.read_text(encoding="utf-8").strip() or "unknown"
                    except OSError:
                        holder = "unknown"
                    raise LedgerLocked(
                        f"{self.path}: the privacy ledger is locked by another process "
                        f"({holder}) for more than {self.lock_timeout:g} s; two processes must "
                        f"not train the same site at once. Stop the other one, then retry")
                time.sleep(0.02)
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n"
                         .encode())
            except OSError:
                pass
            self._fd = fd
            try:
                yield
            finally:
                self._fd = None
                _unlock(fd)
        finally:
            os.close(fd)

    def _reload(self) -> None:
        disk = _read(self.path)
        if disk is None:
            if self._state.get("revision", 0) > 0:
                raise LedgerRewind(
                    f"{self.path}: the privacy ledger disappeared while this site was using it "
                    f"(revision {self.revision}); restore it from backup — a missing ledger "
                    f"would reset the site's spent budget to zero")
            return
        why = _extends(disk, self._state) if self._state else None
        if why is not None:
            raise LedgerRewind(
                f"{self.path}: the privacy ledger on disk records less than this process has "
                f"seen ({why}); it was replaced by an older copy. Restore the newest copy; a "
                f"ledger must never be rewound")
        self._state = disk

    def _write(self) -> None:
        disk = _read(self.path)
        if disk is not None:
            why = _extends(self._state, disk)
            if why is not None:
                raise LedgerRewind(
                    f"{self.path}: refusing to write an older privacy ledger over the one on "
                    f"disk ({why}); a ledger is append-only and never rewound")
            self._state["revision"] = int(disk.get("revision", 0)) + 1
        else:
            self._state["revision"] = int(self._state.get("revision", 0)) + 1
        self._state["updated"] = now()
        write_json(self.path, self._state)
        self._dirty = False


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-300)


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: the privacy ledger cannot be read ({exc}); do not delete "
                          f"it (that would reset the site's spent budget): restore it from "
                          f"backup") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LedgerError(f"{path}: not a safn privacy ledger (expected format {FORMAT!r})")
    for key in ("fingerprint", "accountant", "delta", "entries", "plans", "events", "revision"):
        if key not in state:
            raise LedgerError(f"{path}: the privacy ledger lacks '{key}'; restore it from backup")
    return state
