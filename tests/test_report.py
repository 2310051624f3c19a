"""The HTML report renders in headless Chromium with every figure loaded, and loads nothing
from the network."""

import os
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from safn_core.report import Report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'IMAGES ' + ok + '/' + imgs.length;
});
</script></body>"""


def make_report(tmp_path):
    for name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        fig.savefig(tmp_path / f"{name}.png")
        plt.close(fig)
    rep = Report("test report <&>", "subtitle")
    rep.heading("Table").table(pd.DataFrame({"model": ["SAFN"], "auc": [0.91234]}))
    rep.figure(tmp_path / "a.png", "first").figure(tmp_path / "b.png", "second")
    rep.figure(tmp_path / "missing.png", "skipped")
    rep.code("data:\n  source: synthetic")
    return rep.write(tmp_path / "report.html")


def test_report_is_self_contained(tmp_path):
    html = make_report(tmp_path).read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert not re.search(r"(src|href)=\"https?://", html)
    assert "test report &lt;&amp;&gt;" in html and "0.912" in html


def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = make_report(tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK))
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<title>IMAGES 2/2</title>" in proc.stdout, proc.stdout[:500]
    assert "Uncaught" not in proc.stderr
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                    f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_round_axes_have_integer_ticks():
    """Rounds 1, 2, 3 are labelled 1, 2, 3: no 1.5 or 2.5 tick between them."""
    from safn_core import plots

    history = [{"round": r, "pooled": {"roc_auc": 0.6 + 0.05 * r, "balanced_accuracy": 0.6,
                                       "pr_auc_hc": 0.5},
                "sites": {"a": {"roc_auc": 0.7}, "b": {"roc_auc": 0.65}},
                "privacy": {"a": {"dp": True, "epsilon": 0.4 * r, "epsilon_budget": 2.0}}}
               for r in (1, 2, 3)]
    figs = [plots.learning_curves_figure(history), plots.epsilon_figure(history)]
    try:
        axes = [ax for fig in figs for ax in fig.axes]
        assert len(axes) == 3
        for ax in axes:
            lo, hi = ax.get_xlim()
            shown = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert len(shown) >= 3 and all(float(t).is_integer() for t in shown), shown
    finally:
        for fig in figs:
            plt.close(fig)
