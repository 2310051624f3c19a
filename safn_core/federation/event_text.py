"""Events in English: the only place a run's events (`safn_core.federation.events`) become
sentences, for a console or a log file."""

from __future__ import annotations

from collections.abc import Callable

_TEXT: dict[str, Callable[[dict], str]] = {}


def render(event: dict) -> str:
    """One line for ``event``; an unknown code is shown as its code and fields."""
    text = _TEXT.get(event.get("event", ""))
    if text is None:
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        return f"{event.get('event')}: {fields}"
    return text(event)
