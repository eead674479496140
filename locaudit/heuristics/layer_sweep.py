"""CAA's layer sweep: steer at each layer in turn and see where steering moves the behaviour most.

For each layer l, the mean-difference vector v^l of the residual stream leaving block l (`steering`, from the
training items) is added with one fixed multiplier alpha, r^{l+1} <- r^{l+1} + alpha v^l, and the task's statistic
(`task.statistic(task.evaluate(...))`) is measured on the validation items. The effect of layer l is that value
minus the unsteered one; the best layer is the one whose effect goes furthest in alpha's direction (the largest
effect for alpha > 0, the most negative for alpha < 0; ties to the lower layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.errors import LocauditError
from locaudit.heuristics.sites import check_layers
from locaudit.heuristics.steering import MeanDiffSteering, mean_diff_vectors
from locaudit.models import LoadedModel


@dataclass(frozen=True, eq=False)
class LayerSweep:
    """Statistic on the validation items with steering at each swept layer (`values`, in `layers` order) and
    without it (`base`), at multiplier `alpha`."""

    layers: tuple[int, ...]
    values: np.ndarray
    base: float
    alpha: float

    @property
    def effects(self) -> np.ndarray:
        """Change in the statistic when steering at each layer: values - base."""
        return self.values - self.base

    @property
    def best_layer(self) -> int:
        """The layer whose effect goes furthest in alpha's direction (ties: the lower layer)."""
        toward = np.where(np.isfinite(self.effects), np.sign(self.alpha or 1.0) * self.effects, -np.inf)
        return self.layers[int(np.argmax(toward))]

    def effect(self, layer: int) -> float:
        if layer not in self.layers:
            raise LocauditError(f"layer {layer} was not swept; swept layers are {list(self.layers)}")
        return float(self.effects[self.layers.index(layer)])


def layer_sweep(lm: LoadedModel, task, train_items: Sequence, val_items: Sequence, alpha: float = 1.0, *,
                layers: Sequence[int] | None = None, vectors: Mapping[int, torch.Tensor] | None = None,
                placement: str = "iti", answer_token: int = -1, batch_size: int = 16,
                progress: bool = False) -> LayerSweep:
    """CAA's layer sweep (module docstring) over every layer (or `layers`). `vectors` ({l: v^l}) reuses
    mean differences already computed from `train_items`; otherwise they are read at `answer_token`."""
    if not val_items:
        raise LocauditError("no validation items to sweep layers on; pass task.split().val")
    arch = lm.arch
    layers = check_layers(range(arch.n_layers) if layers is None else layers, arch)
    if vectors is None:
        vectors = mean_diff_vectors(lm, task, train_items, "residual", layers, batch_size, answer_token)
    missing = [l for l in layers if l not in vectors]
    if missing:
        raise LocauditError(f"no steering vector given for layer {missing[0]}; give vectors for every swept layer")

    def stat(edit):
        return float(task.statistic(task.evaluate(lm, edit, val_items, batch_size=batch_size)))

    base = stat(None)
    values = []
    for l in tqdm(layers, desc="layer sweep", disable=not progress, leave=False):
        edit = MeanDiffSteering(arch, "residual", {l: vectors[l]}, alpha, placement=placement, label=f"L{l}")
        values.append(stat(edit))
    return LayerSweep(tuple(layers), np.array(values, dtype=np.float64), base, float(alpha))
