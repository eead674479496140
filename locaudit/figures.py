"""Every figure locaudit draws (matplotlib, headless), one function per figure, each saving a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from locaudit.storage import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def probe_heatmap(acc: np.ndarray, path: Path, marked: Sequence[tuple[int, int]] = (), title: str = "") -> Path:
    """Probe validation accuracy, layers (rows) x heads (columns); marked heads get a box."""
    L, H = acc.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * H + 2), max(3, 0.22 * L + 1.5)))
    im = ax.imshow(acc, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax, label="probe validation accuracy")
    for layer, head in marked:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "Per-head probe accuracy" + (" (boxes: selected heads)" if marked else ""))
    return _save(fig, path)


def training_curve(history: Sequence[dict], path: Path, title: str = "") -> Path:
    """Training loss per step, and validation loss / preference accuracy per evaluation."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h for h in history if "train_loss" in h]
    evals = [h for h in history if "val_loss" in h]
    if steps:
        ax1.plot([h["step"] for h in steps], [h["train_loss"] for h in steps], lw=0.8, label="train (batch)")
    if evals:
        ax1.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation")
        ax2.plot([h["step"] for h in evals], [h["val_pref_acc"] for h in evals], "o-", color="C2")
    ax1.set_xlabel("step"); ax1.set_ylabel("loss"); ax1.legend()
    ax2.set_xlabel("step"); ax2.set_ylabel("validation preference accuracy"); ax2.set_ylim(0, 1)
    fig.suptitle(title)
    return _save(fig, path)


def null_histogram(random_scores: Sequence[float], path: Path, marks: dict[str, float], xlabel: str, title: str) -> Path:
    """Histogram of a metric over random head sets, with named reference values as vertical lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if len(random_scores):
        ax.hist(random_scores, bins=min(12, max(4, len(random_scores))), color="0.7", edgecolor="0.3",
                label=f"random sets (n={len(random_scores)})")
    for i, (name, value) in enumerate(marks.items()):
        if value is not None and np.isfinite(value):
            ax.axvline(value, color=f"C{i}", ls="--", lw=2, label=f"{name} = {value:.3f}")
    ax.set_xlabel(xlabel); ax.set_ylabel("count"); ax.set_title(title); ax.legend(fontsize=8)
    return _save(fig, path)


def scatter(points: Sequence[dict], x: str, y: str, path: Path, title: str, group: str = "method") -> Path:
    """Scatter of two metrics, one colour per group (e.g. method or arm kind)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups = sorted({p[group] for p in points})
    for i, g in enumerate(groups):
        pts = [p for p in points if p[group] == g and p.get(x) is not None and p.get(y) is not None]
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], s=22, color=f"C{i}", label=g, alpha=0.8)
    ax.set_xlabel(x); ax.set_ylabel(y); ax.set_title(title)
    if groups:
        ax.legend(fontsize=8)
    return _save(fig, path)


def tradeoff_curves(curves: Sequence[dict], x: str, y: str, path: Path, title: str) -> Path:
    """One line per arm through its hyper-parameter grid (the paper's trade-off figures): `curves` are
    {"label", "kind" (top | random | full | baseline), "points": [{x, y, "hp"}]}; S* and full alignment are drawn
    bold, random sets thin grey."""
    style = {"top": dict(color="C3", lw=2.2, marker="o", zorder=3), "full": dict(color="C0", lw=2.2, marker="s", zorder=3),
             "random": dict(color="0.55", lw=0.9, marker=".", zorder=2), "baseline": dict(color="k", marker="*", ms=12, lw=0)}
    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    seen = set()
    for c in curves:
        pts = [p for p in c["points"] if p.get(x) is not None and p.get(y) is not None]
        if not pts:
            continue
        kw = dict(style.get(c["kind"], {}))
        label = c["label"] if c["kind"] != "random" else "random sets"
        ax.plot([p[x] for p in pts], [p[y] for p in pts], label=None if label in seen else label, **kw)
        seen.add(label)
        if c["kind"] == "top":
            for p in pts:
                ax.annotate(f"{p['hp']:g}", (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x); ax.set_ylabel(y); ax.set_title(title); ax.legend(fontsize=8)
    return _save(fig, path)


def effect_vs_probe(points: Sequence[dict], full_low: float | None, path: Path, title: str) -> Path:
    """Single heads: the optimal edit's True*Info against the head's probe accuracy (the paper's Figure 6)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for reach in (False, True):
        pts = [p for p in points if p["reaches_full"] == reach]
        ax.scatter([p["probe_acc"] for p in pts], [p["truth_info"] for p in pts], s=30, color="C2" if reach else "C7",
                   label="reaches full alignment's interval" if reach else "below it")
    for p in points:
        ax.annotate(p["arm"].replace("ipo-single-", ""), (p["probe_acc"], p["truth_info"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if full_low is not None:
        ax.axhline(full_low, color="C0", ls="--", lw=1.5, label=f"full alignment 95% CI low = {full_low:.3f}")
    ax.set_xlabel("probe validation accuracy"); ax.set_ylabel("True*Info (test)"); ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def audit_null(random_values: Sequence[float], claim: float, base: float, full: float | None, path: Path,
               xlabel: str = "score", title: str = "") -> Path:
    """An audit's random null: each random set's score (dots over a histogram), the claim, the unedited model
    and full alignment as vertical lines."""
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    r = np.asarray(random_values, float)
    if r.size:
        ax.hist(r, bins=max(5, min(20, r.size)), color="#c8c8e8", edgecolor="#8888aa", label=f"random sets (n={r.size})")
        ax.plot(r, np.full(r.size, 0.05), "|", color="#333366", ms=14)
    ax.axvline(base, color="grey", ls=":", label=f"unedited {base:.3f}")
    ax.axvline(claim, color="crimson", lw=2, label=f"claim {claim:.3f}")
    if full is not None:
        ax.axvline(full, color="black", ls="--", label=f"full alignment {full:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("random sets")
    ax.set_title(title or "Optimal edit: claim vs random sets of the same size")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
