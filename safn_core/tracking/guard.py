"""Every MLflow call through one guard: a tracking store that fails never fails the run.

The first failure (a server down, gone away, too slow, or refusing a value) prints one warning;
from then on nothing more is sent (no further waits on a dead server), and each thing that was
not logged is named in `Guard.not_logged`, which the command writes into ``results.json``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


def _default_warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Guard:
    def __init__(self, uri: str, warn: Callable[[str], None] | None = None):
        self.uri, self.warn = uri, warn or _default_warn
        self.error: str | None = None
        self.not_logged: list[str] = []
        self._lock = threading.Lock()  # the round follower's thread and the command's

    @property
    def failed(self) -> bool:
        return self.error is not None

    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None (and ``what`` noted) after a failure."""
        with self._lock:
            if self.error is None:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:  # any store error: the run goes on without it
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    self.error = f"{type(exc).__name__}: {first}"
                    self.warn(f"warning: MLflow tracking at {self.uri} failed ({self.error}); "
                              "the run goes on without it; what was not logged is listed under "
                              "'tracking' in results.json")
            if what not in self.not_logged:
                self.not_logged.append(what)
            return None
