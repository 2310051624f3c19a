"""A self-contained HTML report for every run: tables, figures and configuration in one page.

Figures are embedded as base64 PNG data (the PNG files stay beside the page too), the style sheet
is inline, and the page loads nothing from the network, so it can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from safn_core.io import write_atomic

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;border-bottom:2px solid #4c72b0;padding-bottom:.3rem}
h2{font-size:1.2rem;margin-top:2rem;color:#2b4a7d}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#eef2f8}td:first-child,th:first-child,td.t{text-align:left}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85rem;color:#555}
pre{background:#f6f8fa;padding:.7rem;overflow:auto;font-size:.8rem}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .8rem;font-size:.9rem}
.ci{white-space:nowrap;color:#555}
"""


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def interval_text(value, ci=None, digits: int = 3, sep: str = " ") -> str:
    """A figure with its interval, ``0.912 [0.871, 0.948]``: the point estimate, then the
    interval's bounds in brackets after ``sep`` (a newline puts them on a second line of a
    console cell). "—" for a missing figure; the figure alone when the interval is missing."""
    if _missing(value):
        return "—"
    text = f"{float(value):.{digits}f}"
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(_missing(b) for b in ci):
        return text
    return f"{text}{sep}[{float(ci[0]):.{digits}f}, {float(ci[1]):.{digits}f}]"


_INTERVAL = re.compile(r"^(\S+) (\[[^\]]*\])$")
"""A figure followed by its interval (`interval_text`): the interval wraps as one piece."""


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:.{digits}f}"
    text = html.escape(str(value))
    m = _INTERVAL.match(text)
    return f'{m.group(1)} <span class="ci">{m.group(2)}</span>' if m else text


def _cell(value, digits: int = 3) -> str:
    """Numbers (and "0.9 ± 0.1", "0.912 [0.871, 0.948]" figures) right-aligned, text
    left-aligned."""
    text = _fmt(value, digits)
    numeric = isinstance(value, (int, float)) or text[:1].isdigit() or text[:1] in "-+—"
    return f"<td>{text}</td>" if numeric else f'<td class="t">{text}</td>'


def _digits(column) -> int:
    """Decimals of a column's floats: one for percentages (a column named "% …" or "… %"),
    three otherwise."""
    name = str(column).strip()
    return 1 if name.startswith("%") or name.endswith("%") else 3


class Report:
    """Collects sections in order and writes one HTML page."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self.parts: list[str] = []

    def heading(self, text: str) -> "Report":
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str, note: bool = False) -> "Report":
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def table(self, data: pd.DataFrame | list[dict] | dict, caption: str = "") -> "Report":
        if isinstance(data, dict):
            data = pd.DataFrame({"": list(data.keys()), "value": list(data.values())})
        df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        digits = [_digits(c) for c in df.columns]
        rows = "".join("<tr>" + "".join(_cell(v, d) for v, d in zip(row, digits)) + "</tr>"
                       for row in df.itertuples(index=False))
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        return self

    def figure(self, png: Path, caption: str = "") -> "Report":
        png = Path(png)
        if not png.is_file():
            return self
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        self.parts.append(
            f'<figure><img alt="{html.escape(caption or png.stem)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
            f"</figcaption></figure>")
        return self

    def code(self, text: str) -> "Report":
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def render(self) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        sub = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{sub}<p style=\"color:#777;font-size:.8rem\">"
                f"generated {stamp} by safn</p>{body}</body></html>\n")

    def write(self, path: Path) -> Path:
        write_atomic(Path(path), self.render())
        return Path(path)
