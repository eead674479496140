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


def paired_differences(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Per test question, the claim's (S*'s) judge scores minus another arm's, one row per comparison: `rows` are
    {"label", "kind" (random | full), "truth_p": [...], "info_p": [...]}. Left: truth, right: informativeness;
    each dot is one question, the black bar is the mean difference, and 0 (no difference) is the dashed line."""
    metrics = (("truth_p", "judge's p(true)"), ("info_p", "judge's p(informative)"))
    n = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 1.1 + 0.34 * max(n, 2)), sharey=True, squeeze=False)
    rng = np.random.default_rng(0)  # vertical jitter only, so dots at equal differences stay visible
    for ax, (key, name) in zip(axes[0], metrics):
        for i, r in enumerate(rows):
            d = np.asarray(r[key], float)
            color = "C0" if r["kind"] == "full" else "0.45"
            ax.scatter(d, i + rng.uniform(-0.18, 0.18, d.size), s=10, color=color, alpha=0.55, lw=0)
            if d.size:
                ax.plot([d.mean()] * 2, [i - 0.32, i + 0.32], color="k", lw=2)
        ax.axvline(0, color="crimson", ls="--", lw=1)
        ax.set_xlabel(f"S* minus comparison: {name}")
        ax.grid(axis="x", color="0.9")
    axes[0][0].set_yticks(range(n), [r["label"] for r in rows], fontsize=8)
    axes[0][0].set_ylim(n - 0.5, -0.5)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


FIT_STYLES = {"converged": "-", "step_cap": "--", "fixed_schedule": "--", "stuck": ":", "flat": "-."}


def fit_curves(fits: Sequence[dict], path: Path, title: str, ncols: int = 5) -> Path:
    """Every fit's training curve as small multiples, one panel per arm and one colour per tau. `fits` are
    {"arm", "tau", "status", "selected", "train": [[step, loss]], "val": [[step, loss]], "best_step"}.

    Losses are divided by the fit's validation loss at step 0 (the unedited model: IPO's (1 / (2 tau))^2), so
    every tau starts at 1 and one panel holds them all; a fit that learned ends below 1. Thin lines: training
    batches; dots: validation; star: the kept checkpoint; line style: how the fit ended; bold: the tau chosen
    on validation."""
    arms = list(dict.fromkeys(f["arm"] for f in fits))
    taus = sorted({f["tau"] for f in fits})
    ncols = max(1, min(ncols, len(arms)))
    nrows = -(-len(arms) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 0.9 + 1.85 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(arms):]:
        ax.set_visible(False)
    for ax, arm in zip(axes.flat, arms):
        chosen = None
        for f in (f for f in fits if f["arm"] == arm):
            start = f["val"][0][1] if f["val"] and f["val"][0][0] == 0 and f["val"][0][1] > 0 else 1.0
            color = f"C{taus.index(f['tau']) % 10}"
            ls = FIT_STYLES.get(f["status"], "-.")
            lw = 1.8 if f["selected"] else 1.0
            if f["train"]:
                ax.plot([s for s, _ in f["train"]], [v / start for _, v in f["train"]], color=color, lw=0.6, alpha=0.45, ls=ls)
            if f["val"]:
                ax.plot([s for s, _ in f["val"]], [v / start for _, v in f["val"]], color=color, lw=lw, ls=ls, marker="o", ms=2.5)
                best = [v for s, v in f["val"] if s == f["best_step"]]
                if best:
                    ax.plot([f["best_step"]], [best[0] / start], marker="*", ms=8, color=color, mec="k", mew=0.5, ls="")
            if f["selected"]:
                chosen = f
        ax.axhline(1.0, color="0.6", lw=0.6)
        ax.set_title(arm, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        if chosen is not None:
            ax.text(0.03, 0.04, f"tau {chosen['tau']:g}: {chosen['status'].replace('_', ' ')}", transform=ax.transAxes,
                    fontsize=7, color="crimson" if chosen["status"] == "stuck" else "0.25")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss / start", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("step", fontsize=7)
    handles = [plt.Line2D([], [], color=f"C{i % 10}", lw=1.8, label=f"tau {t:g}") for i, t in enumerate(taus)]
    handles += [plt.Line2D([], [], color="0.3", ls=ls, label=s.replace("_", " "))
                for s, ls in FIT_STYLES.items() if s != "fixed_schedule" and any(f["status"] == s for f in fits)]
    handles += [plt.Line2D([], [], color="0.3", lw=0.6, alpha=0.6, label="training batches"),
                plt.Line2D([], [], color="0.3", marker="o", ms=3, label="validation"),
                plt.Line2D([], [], color="0.3", marker="*", ms=8, ls="", mec="k", label="kept checkpoint")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 * ncols), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
