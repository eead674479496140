"""Where the heuristics read and write activations: one table entry per site of a block.

- `heads`: the input o^l of the attention output projection W^l (`Arch.out_proj`), H*d wide; unit h is its
  slice `head_slice(h)` (name `L<l>H<h>`).
- `neurons`: the input m^l of the MLP output projection W_down^l (`Arch.down_proj`), n_neurons wide; unit i is
  entry i (name `L<l>N<i>`).
- `residual`: the residual stream r^{l+1} leaving block l (`Arch.block`), d_model wide; the whole vector is one
  unit, the layer (name `L<l>`).

`Site.hook(arch, l, fn)` installs a hook that passes the site's (batch, tokens, width) activation to `fn` and
uses what `fn` returns in its place (None: unchanged), whether the site is a module's input (pre-hook) or a
block's output (forward hook; a tuple output has the hidden states first). `site_units` reads unit names back
(with `locaudit.units.parse_units`: one grammar, and one set of errors, for every unit name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from locaudit.errors import LocauditError
from locaudit.models import Arch
from locaudit.units import parse_units


@dataclass(frozen=True)
class Site:
    name: str
    module: Callable[[Arch, int], nn.Module]
    width: Callable[[Arch], int]
    group: Callable[[Arch], int]  # activation entries per unit: d for heads, 1 for neurons, d_model for a layer
    unit_name: Callable[[int, int], str]  # (layer, unit index) -> name
    reads_input: bool  # True: the module's input (pre-hook); False: its output

    def n_units(self, arch: Arch) -> int:
        return self.width(arch) // self.group(arch)

    def hook(self, arch: Arch, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        module = self.module(arch, layer)
        if self.reads_input:
            def pre(mod, args):
                new = fn(args[0])
                return None if new is None else (new,) + tuple(args[1:])
            return module.register_forward_pre_hook(pre)

        def post(mod, args, output):
            x = output[0] if isinstance(output, tuple) else output
            new = fn(x)
            if new is None:
                return None
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(post)


SITES: dict[str, Site] = {
    "heads": Site("heads", lambda arch, l: arch.out_proj(l), lambda arch: arch.n_heads * arch.head_dim,
                  lambda arch: arch.head_dim, lambda l, i: f"L{l}H{i}", reads_input=True),
    "neurons": Site("neurons", lambda arch, l: arch.down_proj(l), lambda arch: arch.n_neurons, lambda arch: 1,
                    lambda l, i: f"L{l}N{i}", reads_input=True),
    "residual": Site("residual", lambda arch, l: arch.block(l), lambda arch: arch.d_model, lambda arch: arch.d_model,
                     lambda l, i: f"L{l}", reads_input=False),
}


def site(name: str) -> Site:
    if name not in SITES:
        raise LocauditError(f"unknown activation site {name!r}; use one of {', '.join(SITES)}")
    return SITES[name]


def check_layers(layers, arch: Arch) -> list[int]:
    """Sorted, distinct layer indices, each in 0..L-1."""
    out = sorted({int(l) for l in layers})
    if not out:
        raise LocauditError("no layers given; give at least one layer index")
    bad = [l for l in out if not 0 <= l < arch.n_layers]
    if bad:
        raise LocauditError(f"layer {bad[0]} is out of range: this model has layers 0..{arch.n_layers - 1}")
    return out


# unit kind (`locaudit.units.KINDS`) -> the activation site its units live at
KIND_SITES = {"heads": "heads", "neurons": "neurons", "layers": "residual"}


def site_units(names, arch: Arch) -> tuple[str, dict[int, list[int]]]:
    """Unit names of one kind (a list or comma-separated text, in `locaudit.units`' grammar: `L3`, `L3H1`, `L3A`,
    `L3N17`) as (site name, {layer: sorted unit indices}), checked against the model's shape; bad names get that
    grammar's one-line errors."""
    units = parse_units(names, arch)
    return KIND_SITES[units.kind], {l: sorted(ix) for l, ix in units.by_layer().items()}
