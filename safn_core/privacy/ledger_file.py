"""The privacy ledger on disk: its JSON format, its lock, and writes that never forget anything.

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

- **Append-only.** Entries are never removed; an entry's charged ``steps`` never decreases and
  ``confirmed`` never goes back to ``reserved``. Every write is checked against the file on disk and
  refused (`LedgerRewind`) if it would forget anything (`write_over`); a ledger replaced behind a
  running process by an older copy is detected when it is read again (`reread_state`).
- **Atomic.** Written through a temporary file, fsync and rename (`safn_core.io.write_atomic`).
- **Locked.** Every read-modify-write holds an exclusive lock on ``<ledger>.lock`` (``flock``,
  `hold_lock`), so two processes cannot both spend the last of a budget; the OS releases it if a
  process dies.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from safn_core.io import write_json
from safn_core.privacy.errors import LedgerError, LedgerLocked, LedgerRewind

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


def charged(entry: dict) -> int:
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
        if charged(b) < charged(a):
            return f"spend entry {a.get('seq')} would charge fewer steps than recorded"
        if a.get("status") == "confirmed" and b.get("status") != "confirmed":
            return f"spend entry {a.get('seq')} would lose its confirmation"
    for run_id, plan in old.get("plans", {}).items():
        if new.get("plans", {}).get(run_id) != plan:
            return f"the plan of run {run_id!r} differs from the one on disk"
    if len(new.get("events", [])) < len(old.get("events", [])):
        return "it holds fewer events than the one on disk"
    return None


def read_state(path: Path) -> dict | None:
    """The ledger state in ``path``, checked to be a whole ledger; None when there is no file."""
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


def reread_state(path: Path, seen: dict) -> dict | None:
    """The ledger on disk, refused (`LedgerRewind`) if it records less than ``seen`` (this
    process' copy) or is gone after ``seen`` was written; None when there is no file yet."""
    disk = read_state(path)
    if disk is None:
        if seen.get("revision", 0) > 0:
            raise LedgerRewind(
                f"{path}: the privacy ledger disappeared while this site was using it "
                f"(revision {int(seen['revision'])}); restore it from backup — a missing ledger "
                f"would reset the site's spent budget to zero")
        return None
    why = _extends(disk, seen) if seen else None
    if why is not None:
        raise LedgerRewind(
            f"{path}: the privacy ledger on disk records less than this process has "
            f"seen ({why}); it was replaced by an older copy. Restore the newest copy; a "
            f"ledger must never be rewound")
    return disk


def write_over(path: Path, state: dict) -> None:
    """Write ``state`` as the next revision of the file, atomically; refused (`LedgerRewind`) if
    the file records anything ``state`` lacks. Sets ``state``'s revision and update time."""
    disk = read_state(path)
    if disk is not None:
        why = _extends(state, disk)
        if why is not None:
            raise LedgerRewind(
                f"{path}: refusing to write an older privacy ledger over the one on "
                f"disk ({why}); a ledger is append-only and never rewound")
        state["revision"] = int(disk.get("revision", 0)) + 1
    else:
        state["revision"] = int(state.get("revision", 0)) + 1
    state["updated"] = now()
    write_json(path, state)


@contextmanager
def hold_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock of the ledger at ``path`` (``<ledger>.lock``, which names its
    holder); `LedgerLocked` after ``timeout`` seconds of waiting."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                try:
                    holder = lock_path.read_text(encoding="utf-8").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                raise LedgerLocked(
                    f"{path}: the privacy ledger is locked by another process "
                    f"({holder}) for more than {timeout:g} s; two processes must "
                    f"not train the same site at once. Stop the other one, then retry")
            time.sleep(0.02)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n"
                     .encode())
        except OSError:
            pass
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)
