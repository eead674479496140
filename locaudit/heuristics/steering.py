"""Mean-difference steering, Contrastive Activation Addition's edit (Rimsky et al. 2024), at any set of units.

Vector. Over training pairs (x, y+, y-), the steering vector at a site of layer l is the mean difference
    v^l = mean_pairs [ a^l(x + y+) - a^l(x + y-) ],
a^l read at the last token of prompt + answer by default, which exists for answers of any form. CAA reads the
answer letter's position instead; for answers "(A)" tokenised as "(", "A", ")" that is `answer_token=-2` (the last
token ")" is the same in both answers and differs only through attention, so early layers' vectors are tiny). Sites (`sites`):
`residual` (the residual stream r^{l+1} leaving block l: CAA's own edit), `neurons` (the MLP hidden m^l at a
set of neurons S: the difference of their mean activations, zero outside S) and `heads` (head slices of o^l).

Edit. r <- r + alpha v^l (m_S <- m_S + alpha v_S, ...) at the positions `placement` selects: "iti" (default)
only where evaluation code declares (`interventions.edit_positions`): in answer scoring the answer tokens,
i.e. every position after the prompt, as CAA steers; in generation the last prompt token and every generated
token (ITI's placement); on plain text (CE/KL) every token. "all": every position of every forward.

`choose_alpha` picks the multiplier alpha from a grid by the task's statistic on validation items.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from locaudit.errors import LocauditError
from locaudit.heuristics.rows import check_answer_token, pair_batches, task_pairs
from locaudit.heuristics.sites import check_layers, site, site_units
from locaudit.interventions import PLACEMENTS, Intervention, declared_positions, register_loader
from locaudit.models import Arch, LoadedModel
from locaudit.storage import read_json
from locaudit.training import EncodedPairs


@torch.inference_mode()
def mean_difference(lm: LoadedModel, enc: EncodedPairs, site_name: str = "residual", layers: Sequence[int] | None = None,
                    batch_size: int = 8, answer_token: int = -1) -> dict[int, torch.Tensor]:
    """{l: v^l}, the full-width (float32, CPU) mean over pairs of a(x + y+) - a(x + y-) at answer token
    `answer_token` (-1: the last token), for every layer (or `layers`) of the site, from tokenised pairs."""
    arch = lm.arch
    s = site(site_name)
    layers = check_layers(range(arch.n_layers) if layers is None else layers, arch)
    if len(enc) == 0:
        raise LocauditError("no preference pairs to average over; pass items with chosen and rejected answers")
    answer_token = check_answer_token(enc, answer_token)
    total = {l: torch.zeros(s.width(arch), dtype=torch.float64) for l in layers}
    for _, rows in pair_batches(enc, batch_size, lm.device):
        at_last: dict[int, torch.Tensor] = {}
        where = rows.answer_position(answer_token)

        def make(l):
            def fn(x):
                at_last[l] = x[torch.arange(x.shape[0], device=x.device), where].double().cpu()
            return fn

        handles = [s.hook(arch, l, make(l)) for l in layers]
        try:
            lm.model.base_model(input_ids=rows.ids, attention_mask=rows.mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            total[l] += (at_last[l][0::2] - at_last[l][1::2]).sum(0)
    return {l: (t / len(enc)).float() for l, t in total.items()}


def mean_diff_vectors(lm: LoadedModel, task, items: Sequence, site_name: str = "residual",
                      layers: Sequence[int] | None = None, batch_size: int = 8,
                      answer_token: int = -1) -> dict[int, torch.Tensor]:
    """`mean_difference` on the preference pairs of a task's `items` (its training items), in its prompt format."""
    return mean_difference(lm, task_pairs(lm, task, items), site_name, layers, batch_size, answer_token)


class MeanDiffSteering(Intervention):
    """Add alpha * v^l at a site of some layers of a model of shape `arch` (module docstring). `vectors`:
    {l: full-width v^l}; `units` ({l: unit indices}; None: every unit of each layer) keeps v^l on those units
    only: its entries outside them are set to zero."""

    kind = "meandiff"

    def __init__(self, arch: Arch, site_name: str, vectors: Mapping[int, torch.Tensor], alpha: float, *,
                 units: Mapping[int, Sequence[int]] | None = None, placement: str = "iti", label: str = "meandiff"):
        super().__init__()
        self.site = site(site_name)
        if placement not in PLACEMENTS:
            raise LocauditError(f"unknown steering placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
        if not vectors:
            raise LocauditError("a steering edit needs at least one layer's vector")
        vectors = {int(l): v for l, v in vectors.items()}
        if units is not None and sorted(units) != sorted(vectors):
            raise LocauditError(f"units are given for layers {sorted(units)} but vectors for {sorted(vectors)}; "
                                f"give both for the same layers")
        self.alpha = _finite_alpha(alpha)
        self.placement = placement
        self.label = label
        self.layers = check_layers(vectors, arch)
        width, group, n_units = self.site.width(arch), self.site.group(arch), self.site.n_units(arch)
        self.units = None if units is None else {l: sorted({int(i) for i in units[l]}) for l in self.layers}
        for l in self.layers:
            v = torch.as_tensor(vectors[l], dtype=torch.float32).detach().clone().reshape(-1).cpu()
            if v.numel() != width:
                raise LocauditError(f"the steering vector of layer {l} has {v.numel()} entries but this model's "
                                    f"{self.site.name} site has {width}; compute it on this model")
            if not torch.isfinite(v).all():
                raise LocauditError(f"the steering vector of layer {l} has non-finite entries")
            if self.units is not None:
                bad = [i for i in self.units[l] if not 0 <= i < n_units]
                if bad or not self.units[l]:
                    raise LocauditError(f"{self.site.name} unit {bad[0] if bad else 'list'} of layer {l} is out of "
                                        f"range or empty: this model has units 0..{n_units - 1} per layer")
                keep = torch.zeros(n_units, dtype=torch.bool)
                keep[self.units[l]] = True
                v = v * keep.repeat_interleave(group)
            self.register_buffer(f"v{l}", v)

    @classmethod
    def at_units(cls, lm: LoadedModel, task, items: Sequence, names, alpha: float, *, placement: str = "iti",
                 batch_size: int = 8, answer_token: int = -1) -> "MeanDiffSteering":
        """Steering at named units of one kind (`L5` a layer's residual stream, `L5N17,L6N2` MLP neurons,
        `L5H2` heads) by the mean difference over the preference pairs of `items` (the task's training items)."""
        site_name, units = site_units(names, lm.arch)
        vectors = mean_diff_vectors(lm, task, items, site_name, list(units), batch_size, answer_token)
        whole = site_name == "residual"
        return cls(lm.arch, site_name, vectors, alpha, units=None if whole else units, placement=placement,
                   label=",".join(_names(site_name, None if whole else units, list(units))))

    @classmethod
    def at_layer(cls, lm: LoadedModel, task, items: Sequence, layer: int, alpha: float, *, placement: str = "iti",
                 batch_size: int = 8, answer_token: int = -1) -> "MeanDiffSteering":
        """CAA's edit: r^{l+1} <- r^{l+1} + alpha v^l at the output of block `layer`."""
        return cls.at_units(lm, task, items, [f"L{int(layer)}"], alpha, placement=placement, batch_size=batch_size,
                            answer_token=answer_token)

    @classmethod
    def load(cls, path: str | Path, arch: Arch) -> "MeanDiffSteering":
        """A steering edit written by `save` (edit.json + edit.safetensors) for a model of shape `arch`."""
        path = Path(path)
        meta_path, tensor_path = path / "edit.json", path / "edit.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise LocauditError(f"{path} is not a saved steering edit (needs edit.json and edit.safetensors); "
                                f"save one with `edit.save(dir)`")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("kind") != cls.kind:
            raise LocauditError(f"{meta_path} does not describe a steering edit (kind {cls.kind!r}); give the "
                                f"directory a MeanDiffSteering was saved to")
        try:
            return cls.from_saved(meta, load_file(str(tensor_path)), arch)
        except KeyError as e:
            raise LocauditError(f"steering edit in {path} lacks {e}; it is incomplete, save it again") from None
        except (OSError, ValueError, RuntimeError, TypeError) as e:  # safetensors raises its own errors on corrupt files
            raise LocauditError(f"{tensor_path} is unreadable ({' '.join(str(e).split())[:120]}); save it again") from None

    @classmethod
    def from_saved(cls, meta: dict, tensors: Mapping[str, torch.Tensor], arch: Arch) -> "MeanDiffSteering":
        """The edit from its edit.json (`meta`) and edit.safetensors (`tensors`): `load`, and the loader
        `interventions.load_intervention` uses for kind "meandiff" (registered below)."""
        site_name, units = site_units(meta["units"], arch)
        vectors = {l: tensors[f"v.{l}"] for l in meta["layers"]}
        return cls(arch, site_name, vectors, meta["alpha"], units=None if site_name == "residual" else units,
                   placement=meta["placement"], label=meta.get("label", "meandiff"))

    def with_alpha(self, alpha: float) -> "MeanDiffSteering":
        """The same vectors and units at another multiplier (for alpha grids)."""
        edit = copy.deepcopy(self)
        edit.alpha = _finite_alpha(alpha)
        return edit

    def vector(self, layer: int) -> torch.Tensor:
        """v^l (full width, zero outside the units)."""
        return getattr(self, f"v{layer}")

    def _hooks(self, lm: LoadedModel) -> list:
        arch = lm.arch
        check_layers(self.layers, arch)
        width = self.site.width(arch)
        for l in self.layers:
            if self.vector(l).numel() != width:
                raise LocauditError(f"the steering vector of layer {l} has {self.vector(l).numel()} entries but this "
                                    f"model's {self.site.name} site has {width}; build the edit on this model")
        selective = self.placement == "iti"
        handles = []
        for l in self.layers:
            def fn(x, l=l):
                shift = (self.alpha * self.vector(l)).to(device=x.device, dtype=x.dtype)
                mask = declared_positions(lm) if selective else None
                if mask is not None:
                    if tuple(mask.shape) != tuple(x.shape[:2]):
                        raise LocauditError(f"declared edit positions {tuple(mask.shape)} do not match the forward's "
                                            f"(batch, tokens) {tuple(x.shape[:2])}")
                    shift = mask.unsqueeze(-1).to(device=x.device, dtype=x.dtype) * shift
                return x + shift
            handles.append(self.site.hook(arch, l, fn))
        return handles

    def merge(self, lm: LoadedModel) -> None:
        raise LocauditError("a steering edit adds a vector to activations and is not folded into the weights; "
                            "use it attached (`with edit.attach(lm): ...`)")

    def is_identity(self) -> bool:
        return self.alpha == 0.0 or all(not bool(self.vector(l).any()) for l in self.layers)

    def unit_names(self) -> list[str]:
        """The units steered: `L<l>` per layer (residual), `L<l>N<i>` / `L<l>H<h>` per neuron / head."""
        return _names(self.site.name, self.units, self.layers)

    def config(self) -> dict:
        return {"kind": self.kind, "site": self.site.name, "layers": self.layers, "units": self.unit_names(),
                "alpha": self.alpha, "placement": self.placement, "label": self.label}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"v.{l}": self.vector(l) for l in self.layers}


register_loader(MeanDiffSteering.kind, MeanDiffSteering.from_saved)  # `load_intervention` reads saved steering edits


def _finite_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise LocauditError(f"steering multiplier alpha must be a finite number, got {alpha!r}")
    return value


def _names(site_name: str, units: Mapping[int, Sequence[int]] | None, layers: Sequence[int]) -> list[str]:
    name = site(site_name).unit_name
    if units is None:
        return [name(l, 0) for l in layers]
    return [name(l, i) for l, idx in units.items() for i in idx]


@dataclass(frozen=True)
class AlphaChoice:
    """The chosen multiplier and the task's statistic on the validation items at each alpha of the grid (`base`:
    without steering)."""

    alpha: float
    alphas: tuple[float, ...]
    values: tuple[float, ...]
    base: float


def choose_alpha(lm: LoadedModel, task, steer_factory: Callable[[float], Intervention], alphas: Sequence[float],
                 val_items: Sequence, *, maximize: bool = True, batch_size: int = 16, progress: bool = False,
                 base: float | None = None) -> AlphaChoice:
    """The alpha of the grid whose edit `steer_factory(alpha)` gives the highest (`maximize=False`: lowest)
    `task.statistic` on `val_items`; ties go to the smaller |alpha|, then to the earlier in the grid. `base`: the
    unsteered statistic on `val_items` when the caller already has it (it is then not evaluated again)."""
    grid = [float(a) for a in alphas]
    if not grid:
        raise LocauditError("empty alpha grid; give at least one multiplier, e.g. alphas=(0.5, 1, 2, 4)")
    bad = [a for a in grid if not math.isfinite(a)]
    if bad:
        raise LocauditError(f"alpha grid holds a non-finite value {bad[0]}; give finite multipliers")
    if not val_items:
        raise LocauditError("no validation items to choose alpha on; pass task.split().val")

    def stat(edit):
        return float(task.statistic(task.evaluate(lm, edit, val_items, batch_size=batch_size, progress=progress)))

    base = stat(None) if base is None else float(base)
    values = [stat(steer_factory(a)) for a in grid]
    sign = 1.0 if maximize else -1.0
    finite = [j for j, v in enumerate(values) if np.isfinite(v)]
    if not finite:
        raise LocauditError("the task's statistic is undefined at every alpha of the grid; check the validation items")
    best = min(finite, key=lambda j: (-sign * values[j], abs(grid[j]), j))
    return AlphaChoice(grid[best], tuple(grid), tuple(values), base)
