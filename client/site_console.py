"""What a site's terminal shows while it serves a run: safn's own lines, not Flower's flood.

The SuperNode, its SuperExec and the ClientApps share one output stream; all of it goes to
``<site.state_dir>/supernode.log`` (`safn.client.cli`). Flower writes about 200 INFO/DEBUG lines a
site for a five-round run, and after the coordinator stops, a "Connection attempt failed,
retrying…" warning every few seconds until the SuperNode is stopped. The terminal gets:

- the ClientApp's own lines, marked with `SITE_MARK` by `say` (one per round: trained,
  refused or evaluated; the statistics round; the end of the run);
- safn's notes from the SuperNode (``safn: …``: app approval, session takeover) and Flower's
  errors, each distinct message once;
- one line when contact with the coordinator is lost (and one when it is back), however many
  retries Flower logs in between;
- a note when a Flower process (a ClientApp, the SuperNode's heartbeat) failed with a
  traceback (the traceback is in the log).

A SuperNode has no API that says what it is doing, so Flower's own lines are read: "Sent
successfully", "Connection attempt failed, retrying", "Connection successful after". safn-client
checks when it starts that the installed Flower still logs them in those words
(`safn_flower.patches.log_wording.check_supernode_log`, like a patch).
"""

from __future__ import annotations

import re
from collections.abc import Callable

SITE_MARK = "safn-site: "
RUN_END_LINE = "run end: "  # the ClientApp's line once it recorded the end of the run
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b[^:]*:\s*(.*)$")


def say(line: str) -> None:
    """Print a line for the site's terminal (from the ClientApp: its output is the SuperNode's)."""
    print(SITE_MARK + line, flush=True)


class SiteConsole:
    """Decides, line by line of the SuperNode's output, what the site's terminal shows."""

    def __init__(self, address: str, log: str, show: Callable[[str], None] = print):
        self.address, self.log, self.show = address, log, show
        self.lost = False
        self.gave_up = False           # Flower's retry gave up on the coordinator
        self._shown: set[str] = set()
        self.replies_sent = 0          # Flower's "Sent successfully", one per reply
        self._sent_before_end: int | None = None

    @property
    def run_end_acknowledged(self) -> bool:
        """The reply to the run-end message has left (after the ClientApp's run-end line, the
        SuperNode logged a sent reply): the site can stop without leaving the coordinator
        waiting for it."""
        return self._sent_before_end is not None and self.replies_sent > self._sent_before_end

    def feed(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\n")
        if line.startswith(SITE_MARK):
            text = line[len(SITE_MARK):]
            if text.startswith(RUN_END_LINE):
                self._sent_before_end = self.replies_sent
            self.show(text)
            return
        record = _RECORD.match(line)
        if record is None:
            if line.startswith("Traceback (most recent call last)"):
                self.show(f"a Flower process failed; its traceback is in {self.log}")
            return
        level, message = record.groups()
        if message.startswith("Sent successfully"):
            self.replies_sent += 1
        elif message.startswith("Connection attempt failed"):
            if not self.lost:
                self.lost = True
                self.show(f"lost contact with the coordinator at {self.address}; Flower keeps "
                          f"retrying (details in {self.log})")
        elif message.startswith("Giving up reconnection after"):
            self.gave_up = True
        elif message.startswith("Connection successful after") and self.lost:
            self.lost = False
            self.show(f"contact with the coordinator at {self.address} is back")
        elif level in ("ERROR", "CRITICAL") or message.startswith("safn: "):
            self._once(message if message.startswith("safn: ") else f"flower: {message}")

    def _once(self, text: str) -> None:
        if text not in self._shown:
            self._shown.add(text)
            self.show(text)
