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
