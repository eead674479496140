"""Per-head logistic-regression probes for truthfulness (ITI's localization heuristic) and ITI directions.

For each head (l, h): fit a probe on training-question activations, score accuracy on validation questions,
rank heads by it. The same activations give ITI's mass-mean-shift direction u (truthful mean minus
untruthful mean, unit norm) and sigma (std of the training activations projected on u).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from locaudit.errors import LocauditError
from locaudit.heads import Head, HeadSet, top_k_heads
from locaudit.storage import atomic_write, atomic_write_text


@dataclass(frozen=True, eq=False)
class ProbeResult:
    val_acc: np.ndarray  # (L, H)
    train_acc: np.ndarray  # (L, H)
    directions: np.ndarray  # (L, H, d) unit mass-mean-shift directions u
    sigmas: np.ndarray  # (L, H) std of training activations along u
    n_train: int
    n_val: int

    @property
    def ranking(self) -> list[Head]:
        """All heads, best validation accuracy first (ties broken by layer, then head)."""
        L, H = self.val_acc.shape
        order = sorted(((-self.val_acc[l, h], l, h) for l in range(L) for h in range(H)))
        return [Head(l, h) for _, l, h in order]

    def top(self, k: int) -> HeadSet:
        return top_k_heads(self.ranking, k)

    def save(self, out: Path) -> None:
        """probes.csv (layer,head,name,val_acc), top_heads.txt (best first), probes.npz (everything)."""
        out = Path(out)
        rows = ["layer,head,name,val_acc"]
        L, H = self.val_acc.shape
        rows += [f"{l},{h},L{l}H{h},{self.val_acc[l, h]:.6f}" for l in range(L) for h in range(H)]
        atomic_write_text(out / "probes.csv", "\n".join(rows) + "\n")
        atomic_write_text(out / "top_heads.txt", "\n".join(h.name for h in self.ranking) + "\n")

        def write(tmp: Path):
            with open(tmp, "wb") as f:
                np.savez(f, val_acc=self.val_acc, train_acc=self.train_acc, directions=self.directions,
                         sigmas=self.sigmas, n=np.array([self.n_train, self.n_val]))
        atomic_write(out / "probes.npz", write)

    @classmethod
    def load(cls, out: Path) -> "ProbeResult":
        path = Path(out) / "probes.npz"
        if not path.is_file():
            raise LocauditError(f"{path} not found; run `locaudit probe --out {out}` first")
        try:
            z = np.load(path, allow_pickle=False)
            return cls(z["val_acc"], z["train_acc"], z["directions"], z["sigmas"], int(z["n"][0]), int(z["n"][1]))
        except Exception as e:  # truncated or foreign file
            raise LocauditError(f"{path} is unreadable ({type(e).__name__}); delete it and rerun `locaudit probe`") from None


def train_probes(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 seed: int = 0, progress: bool = True) -> ProbeResult:
    """Fit one probe per head. x_*: (N, L, H, d) activations; y_*: (N,) labels in {0, 1}."""
    for name, y in (("training", y_train), ("validation", y_val)):
        if len(y) == 0:
            raise LocauditError(f"no {name} probe examples; raise --limit-questions")
        if len(np.unique(y)) < 2:
            raise LocauditError(f"{name} probe examples contain only one label; raise --limit-questions")
    _, L, H, d = x_train.shape
    val_acc = np.zeros((L, H))
    train_acc = np.zeros((L, H))
    directions = np.zeros((L, H, d), dtype=np.float32)
    sigmas = np.zeros((L, H), dtype=np.float32)
    for l in tqdm(range(L), desc="probing layers", disable=not progress, leave=False):
        for h in range(H):
            xt, xv = x_train[:, l, h].astype(np.float64), x_val[:, l, h].astype(np.float64)
            clf = LogisticRegression(max_iter=1000, random_state=seed).fit(xt, y_train)
            train_acc[l, h] = clf.score(xt, y_train)
            val_acc[l, h] = clf.score(xv, y_val)
            u = xt[y_train == 1].mean(0) - xt[y_train == 0].mean(0)
            norm = np.linalg.norm(u)
            u = u / norm if norm > 0 else u
            directions[l, h] = u
            sigmas[l, h] = float(np.std(xt @ u))
    return ProbeResult(val_acc, train_acc, directions, sigmas, len(y_train), len(y_val))


def probe_heads(lm, split, probe_format: str = "iti_end_q", seed: int = 0, batch_size: int = 16,
                progress: bool = True) -> ProbeResult:
    """Probe every head of `lm`: capture activations for train/val probe examples (cached) and fit probes."""
    from locaudit.activations import cached_activations
    from locaudit.data.examples import probe_examples

    pool = list(split.train) + list(split.val) + list(split.test)
    train = probe_examples(split.train, probe_format, seed=seed, pool=pool)
    val = probe_examples(split.val, probe_format, seed=seed + 1, pool=pool)
    acts = cached_activations(lm, [e.text for e in train] + [e.text for e in val], batch_size, progress)
    y = np.array([e.label for e in train] + [e.label for e in val])
    n = len(train)
    return train_probes(acts[:n], y[:n], acts[n:], y[n:], seed=seed, progress=progress)


def probe_task(lm, task, split, seed: int = 0, batch_size: int = 16, progress: bool = True) -> ProbeResult:
    """ITI's probing heuristic on any task: a probe per head on the last-token head output of prompt + preferred
    answer (label 1) vs prompt + dispreferred answer (label 0), trained on the task's training items and scored on
    its validation items; `ProbeResult.top(k)` is the claim such a study would make."""
    from locaudit.activations import cached_activations

    train = task.probe_examples(split.train, seed=seed, lm=lm)
    val = task.probe_examples(split.val, seed=seed + 1, lm=lm)
    acts = cached_activations(lm, [e.text for e in train] + [e.text for e in val], batch_size, progress)
    y = np.array([e.label for e in train] + [e.label for e in val])
    n = len(train)
    return train_probes(acts[:n], y[:n], acts[n:], y[n:], seed=seed, progress=progress)
