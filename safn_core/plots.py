"""Figures of a run (matplotlib, Agg backend: no display needed, no network resources)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from safn_core.metrics import calibration_text  # noqa: E402


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _round_axis(ax) -> None:
    """Rounds are whole numbers: no 1.5 tick between round 1 and round 2."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def roc_pr_curves(preds: pd.DataFrame, models: list[str], path: Path, title: str = "") -> Path:
    """ROC and PR (PD positive) curves from out-of-fold predictions, one line per model."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.6))
    for name in models:
        d = preds[preds.model == name]
        if d.empty or d.y.nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(d.y, d.p)
        prec, rec, _ = precision_recall_curve(d.y, d.p)
        ax_roc.plot(fpr, tpr, label=name, lw=1.4)
        ax_pr.plot(rec, prec, label=name, lw=1.4)
    if not preds.empty:
        prevalence = float(preds.y.mean())
        ax_pr.axhline(prevalence, color="grey", ls=":", lw=1, label=f"chance ({prevalence:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax_roc.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC")
    ax_pr.set(xlabel="recall (PD)", ylabel="precision (PD)", title="Precision–recall, PD positive")
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def modality_weights(weights: pd.DataFrame, drops: pd.DataFrame | None, path: Path) -> Path:
    """Mean gate weight per modality (± SD over folds) beside the modality-drop AUC loss."""
    cols = [c for c in weights.columns if c not in ("repeat", "fold", "feature_set")]
    n = 2 if drops is not None and not drops.empty else 1
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4))
    axes = np.atleast_1d(axes)
    mean, sd = weights[cols].mean(), weights[cols].std(ddof=1).fillna(0)
    axes[0].bar(cols, mean, yerr=sd, capsize=4, color="#4c72b0")
    axes[0].set(ylabel="mean gate weight α", title="SAFN modality weights")
    if n == 2:
        dcols = [c for c in cols if c in drops.columns]
        axes[1].bar(dcols, drops[dcols].mean(), yerr=drops[dcols].std(ddof=1).fillna(0),
                    capsize=4, color="#dd8452")
        axes[1].set(ylabel="ROC-AUC lost", title="Modality replaced by its training mean")
        axes[1].axhline(0, color="grey", lw=0.8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability(calib: dict, path: Path, title: str = "Calibration") -> Path:
    """Reliability diagram from `metrics.calibration` output, with slope, intercept and ECE (or
    why there is no slope)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    curve = calib["curve"]
    if curve:
        ax.plot([c["mean_predicted"] for c in curve], [c["observed"] for c in curve], "o-",
                color="#4c72b0", label="SAFN")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="ideal")
    ax.set(xlabel="mean predicted P(PD)", ylabel="observed fraction PD", xlim=(0, 1), ylim=(0, 1),
           title=f"{title}\n{_calibration_title(calib)}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _calibration_title(calib: dict) -> str:
    """`metrics.calibration_text`, short enough for a figure title (why there is no slope is in
    the report's text)."""
    if calib.get("slope") is None:
        return f"calibration slope not reported; ECE {calib['ece']:.3f}"
    return calibration_text(calib)


def learning_curves(history: list[dict], path: Path) -> Path:
    """Pooled ROC-AUC and balanced accuracy per round, and each site's ROC-AUC."""
    return _save(learning_curves_figure(history), path)


def learning_curves_figure(history: list[dict]) -> Figure:
    """The figure of `learning_curves` (open; the caller saves or closes it)."""
    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    # K classes: macro one-vs-rest ROC-AUC, balanced accuracy and (ordered) QWK
    for key, label in (("roc_auc", "ROC-AUC"), ("balanced_accuracy", "balanced accuracy"),
                       ("pr_auc_hc", "PR-AUC (HC positive)"), ("qwk", "quadratic weighted κ")):
        pts = [(h["round"], h["pooled"].get(key)) for h in history if h.get("pooled")]
        if any(v is not None for _, v in pts):
            ax_p.plot([r for r, v in pts if v is not None], [v for _, v in pts if v is not None],
                      marker=".", label=label)
    ax_p.set(xlabel="round", ylabel="pooled metric", title="Pooled (from summed histograms)")
    sites = sorted({s for h in history for s in h.get("sites", {})})
    for s in sites:
        vals = [(h["round"], h["sites"][s]["roc_auc"]) for h in history
                if (h.get("sites", {}).get(s) or {}).get("roc_auc") is not None]
        if vals:
            ax_s.plot(*zip(*vals), marker=".", label=s)
    ax_s.set(xlabel="round", ylabel="ROC-AUC", title="Per site (test split)")
    for ax in (ax_p, ax_s):
        _round_axis(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def epsilon_per_round(history: list[dict], path: Path) -> Path | None:
    """ε spent so far per site per round (DP-SGD sites, refused rounds marked ×, each site's
    budget dotted) and the central-DP ε when the run used it. None when there is nothing to
    plot."""
    fig = epsilon_figure(history)
    return None if fig is None else _save(fig, path)


def epsilon_figure(history: list[dict]) -> Figure | None:
    """The figure of `epsilon_per_round` (open; the caller saves or closes it), or None."""
    sites = sorted({s for h in history for s, r in (h.get("privacy") or {}).items()
                    if r.get("dp")})
    central = [(h["round"], h["central_dp"]["epsilon"]) for h in history if h.get("central_dp")]
    if not sites and not central:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, s in enumerate(sites):
        color = f"C{i % 10}"
        pts = [(h["round"], h["privacy"][s]) for h in history
               if (h.get("privacy") or {}).get(s, {}).get("epsilon") is not None]
        if not pts:
            continue
        ax.plot([r for r, _ in pts], [p["epsilon"] for _, p in pts], marker=".", color=color,
                label=s)
        refused = [(r, p["epsilon"]) for r, p in pts if p.get("refused")]
        if refused:
            ax.scatter(*zip(*refused), marker="x", color=color, s=40, zorder=3)
        budgets = {p.get("epsilon_budget") for _, p in pts if p.get("epsilon_budget")}
        for b in budgets:
            ax.axhline(b, color=color, ls=":", lw=0.8)
    if central:
        ax.plot(*zip(*central), marker="s", color="black", label="central DP (site-level)")
    ax.set(xlabel="round", ylabel="ε spent so far",
           title="Privacy spend per site (× refused; dotted: budget)")
    _round_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def confusion_matrices(confusion, classes, path: Path, title: str = "") -> Path:
    """A K-class confusion matrix (rows = true class, columns = predicted) twice: counts and
    row-normalised (each true class's share predicted as each class: its recall on the
    diagonal)."""
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2 + 0.4 * k, 3.4 + 0.35 * k))
    for ax, m, what, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                             (axes[1], shares, "row-normalised (share of each true class)",
                              "{:.2f}")):
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(float(m.max()), 1e-9))
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if m[i, j] > 0.6 * m.max() else "black")
        ax.set_xticks(range(k), classes, rotation=20)
        ax.set_yticks(range(k), classes)
        ax.set(xlabel="predicted class", ylabel="true class", title=what)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def ovr_roc_curves(y, p, classes, path: Path, title: str = "", p_other=None,
                   other_label: str = "") -> Path:
    """One-vs-rest ROC curve of each class from class probabilities ``p`` (n, K), its AUC in
    the legend; ``p_other`` (same shape) adds dashed curves (e.g. after recalibration)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    for k, name in enumerate(classes):
        pos = y == k
        if not pos.any() or pos.all():
            continue
        for probs, style, suffix in ((p, "-", ""), (p_other, "--", f" {other_label}")):
            if probs is None:
                continue
            fpr, tpr, _ = roc_curve(pos, probs[:, k])
            ax.plot(fpr, tpr, style, color=f"C{k % 10}", lw=1.4,
                    label=f"{name} vs rest{suffix} (AUC {roc_auc_score(pos, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity",
           title=title or "One-vs-rest ROC per class")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)
