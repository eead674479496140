"""Attribution patching (AtP): for every unit at once, a first-order estimate of how far ablating it moves the
task's preference margin; the localization heuristic that ranks units by gradient x activation.

For a pair (x, y+, y-) the margin is m = log p(y+|x) - log p(y-|x), summed answer log-probs. Ablating a unit
replaces its activation a_t, at the answer-predicting positions t of both answers' rows (`rows`), by a
baseline: zero (`baseline="zero"`, the default) or the unit's mean over those positions of all the pairs' rows
(`baseline="mean"`). To first order the change in m is

    delta_m = sum_t grad_{a_t} m . (baseline - a_t)        (zero ablation: -sum_t grad_{a_t} m . a_t)

and one backward pass per batch gives it for every unit: each head (its slice o_h^l of the input o^l of W^l),
each MLP neuron (entry i of the input m^l of W_down^l) and each layer (the residual stream leaving block l).
Gradients are total derivatives: through later units, later layers and later positions' attention.
`Attribution` holds the signed estimate averaged over pairs, E[delta_m]; units are ranked by |E[delta_m]|
(the absolute mean effect, as AtP ranks nodes), ties by layer then index.

Zero-ablating a whole residual stream is nearly invisible to first order where a normalisation follows it: a
norm is scale-invariant, so grad_r m . r = 0 for the last layer's residual (up to the norm's epsilon). Rank
layers with `baseline="mean"`. Memory: one backward pass holds every site's activation and gradient for a batch
of `batch_size` pairs (two rows each); lower it for long prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from locaudit.errors import LocauditError
from locaudit.heads import HeadSet, parse_heads
from locaudit.heuristics.rows import pair_batches, pair_margins, row_logprobs, task_pairs
from locaudit.heuristics.sites import KIND_SITES, site
from locaudit.models import LoadedModel
from locaudit.training import EncodedPairs

BASELINES = ("zero", "mean")


@dataclass(frozen=True, eq=False)
class Attribution:
    """Signed first-order change in the margin m when each unit is ablated, averaged over pairs:
    heads (L, H), neurons (L, n_neurons), layers (L,)."""

    heads: np.ndarray
    neurons: np.ndarray
    layers: np.ndarray
    n_pairs: int
    baseline: str

    def effects(self, kind: str) -> np.ndarray:
        """The (L, units) array of `kind` (heads, neurons or layers; layers as (L, 1))."""
        if kind not in KIND_SITES:
            raise LocauditError(f"unknown unit kind {kind!r}; use one of {', '.join(KIND_SITES)}")
        e = getattr(self, kind)
        return e.reshape(e.shape[0], -1)

    def ranking(self, kind: str) -> list[str]:
        """Every unit of `kind` by name, largest |E[delta_m]| first (ties: lower layer, then lower index)."""
        e = self.effects(kind)
        layer, index = np.indices(e.shape)
        order = np.lexsort((index.ravel(), layer.ravel(), -np.abs(e).ravel()))
        name = site(KIND_SITES[kind]).unit_name
        return [name(int(layer.flat[j]), int(index.flat[j])) for j in order]

    def top(self, kind: str, k: int) -> list[str]:
        n = self.effects(kind).size
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= n:
            raise LocauditError(f"top-k for {kind} must be an integer in 1..{n}, got {k!r}")
        return self.ranking(kind)[:k]

    def top_heads(self, k: int) -> list[str]:
        """Names L<l>H<h> of the k heads with the largest |E[delta_m]|."""
        return self.top("heads", k)

    def top_neurons(self, k: int) -> list[str]:
        """Names L<l>N<i> of the k MLP neurons with the largest |E[delta_m]|."""
        return self.top("neurons", k)

    def top_layers(self, k: int) -> list[str]:
        """Names L<l> of the k layers with the largest |E[delta_m]|."""
        return self.top("layers", k)

    def head_set(self, k: int) -> HeadSet:
        """The top-k heads as a claim to audit (label `atp<k>`)."""
        return parse_heads(self.top_heads(k), label=f"atp{k}")


def attribute_pairs(lm: LoadedModel, enc: EncodedPairs, *, baseline: str = "zero", batch_size: int = 8,
                    progress: bool = False) -> Attribution:
    """Attribution patching (module docstring) of every head, neuron and layer on tokenised pairs."""
    if baseline not in BASELINES:
        raise LocauditError(f"unknown ablation baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if len(enc) == 0:
        raise LocauditError("no preference pairs to attribute; pass items with chosen and rejected answers")
    arch = lm.arch
    sites = {kind: site(name) for kind, name in KIND_SITES.items()}
    keys = [(kind, l) for kind in sites for l in range(arch.n_layers)]
    widths = {kind: s.width(arch) for kind, s in sites.items()}
    # per (kind, layer), over every answer-predicting position of every row: sum of g*a, of g and of a
    sums = {k: torch.zeros(3, widths[k[0]], dtype=torch.float64) for k in keys}
    count = 0
    n_batches = -(-len(enc) // batch_size) if isinstance(batch_size, int) and batch_size > 0 else 0
    bar = tqdm(total=n_batches, desc="attribution patching", disable=not progress, leave=False)
    for _, rows in pair_batches(enc, batch_size, lm.device):
        leaves: dict = {}

        def make(key):
            def fn(x):
                z = torch.zeros_like(x, requires_grad=True)  # d m / d z = d m / d x, the total derivative
                leaves[key] = (z, x.detach())
                return x + z
            return fn

        handles = [sites[kind].hook(arch, l, make((kind, l))) for kind, l in keys]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                m = pair_margins(row_logprobs(lm, rows))
                missing = [k for k in keys if k not in leaves]
                if missing:
                    raise LocauditError(f"the forward pass never reached the {missing[0][0]} site of layer "
                                        f"{missing[0][1]}; this model's layout is not supported")
                grads = torch.autograd.grad(m.sum(), [leaves[k][0] for k in keys], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        pred = rows.predicting[..., None].float()
        for k, g in zip(keys, grads):
            a = leaves[k][1].float() * pred
            g = torch.zeros_like(a) if g is None else g.float() * pred
            sums[k] += torch.stack([(g * a).sum((0, 1)), g.sum((0, 1)), a.sum((0, 1))]).double().cpu()
        count += int(rows.predicting.sum())
        bar.update(1)
    bar.close()
    out = {}
    for kind, s in sites.items():
        per_layer = []
        for l in range(arch.n_layers):
            ga, g, a = sums[(kind, l)]
            delta = -ga if baseline == "zero" else (a / count) * g - ga
            per_layer.append((delta.view(s.n_units(arch), s.group(arch)).sum(-1) / len(enc)).numpy())
        out[kind] = np.stack(per_layer)
    return Attribution(out["heads"], out["neurons"], out["layers"][:, 0], len(enc), baseline)


def attribution_patching(lm: LoadedModel, task, items: Sequence, *, baseline: str = "zero", batch_size: int = 8,
                         progress: bool = False) -> Attribution:
    """Attribution patching of every head, neuron and layer on the preference pairs of a task's `items`
    (usually its training items), in the task's prompt format."""
    return attribute_pairs(lm, task_pairs(lm, task, items), baseline=baseline, batch_size=batch_size,
                           progress=progress)
