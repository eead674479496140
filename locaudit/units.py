"""The units a localization claim can name, behind one protocol, and the table of their kinds.

A claim "behaviour B lives at units S" is audited by fitting the optimal edit at S, at random S' of the same
size, and everywhere. `KINDS` lists the kinds of unit, each with its name grammar, its parser, how many units a
layer has, and its optimal edit (b = 0 at initialisation, so every edit starts as the identity):

- heads `L<l>H<h>` (head h of layer l; `L<l>A`: every head of layer l, the attention output of a whole layer):
  LocalizedRank1, delta r = s <a, o> W b with b non-zero only on the heads of S;
- neurons `L<l>N<i>` (neuron i of layer l's MLP): NeuronRank1, delta = s <a, m> W_down b with m the MLP hidden
  activation and b non-zero only on the neurons of S;
- layers `L<l>` (the residual stream after block l): ResidualRank1, r <- r + s <a, r> b.

`UnitSet` is the protocol the audit and the fitting code talk to: `kind`, `names`, `spec()`, `label`, `len`,
`by_layer()`, `validate(arch)`, `make_edit(arch, seed, scale)` and `lr_size(arch)`. It wraps the kind's own
set (`HeadSet`, `NeuronSet`, `LayerSet`), so head claims keep every number they had before units existed.
`parse_units` reads a claim (`check_names` checks one without the model), `random_units` draws a random set like
it, `all_units` is every unit of a kind.

Learning rate (`lr_size`): `training.default_lr(n)` was tuned by the number of heads n, i.e. by how many
d-entry blocks of b the edit trains (a head's slice of b has d = head_dim entries). Every kind uses that measure:
n = ceil(entries of b trained / d). A head set gives its number of heads (as before); k neurons (one entry of b
each) give ceil(k / d), so 1 neuron takes the one-head rate and 16 heads' worth of neurons the 16-head rate;
a layer (b of d_model entries) counts as d_model / d (= H) heads, like every head of the layer. A set of every
unit of its kind in the model gives None, the all-heads / full-alignment rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import numpy as np

from locaudit.errors import LocauditError
from locaudit.heads import (EXAMPLE as HEAD_GRAMMAR, Head, HeadSet, check_positive, check_seed, parse_head, show,
                            split_names)
from locaudit.interventions import Intervention, LocalizedRank1, NeuronRank1, ResidualRank1
from locaudit.models import Arch
from locaudit.unitsets import (LAYER_GRAMMAR, NEURON_GRAMMAR, LayerSet, Neuron, NeuronSet, parse_layers,
                               parse_neurons)

Members = Union[HeadSet, NeuronSet, LayerSet]
GRAMMAR = ("write units as attention heads L<layer>H<head> (L<layer>A: every head of a layer), MLP neurons "
           "L<layer>N<neuron> or layers L<layer> (the residual stream after that block), 0-based, comma-separated, "
           "one kind per claim, e.g. L12H3,L14H1 or L3N100,L3N7 or L12")
_WHOLE_ATTENTION = re.compile(r"L([0-9]+)A")


def _parse_heads(spec: str | Iterable[str], arch: Arch | None, label: str) -> HeadSet:
    """Head names, with `L<l>A` standing for every head of layer l (which needs the model's head count)."""
    heads: list[Head] = []
    for n in split_names(spec, "head", HEAD_GRAMMAR):
        m = _WHOLE_ATTENTION.fullmatch(n.strip())
        if m is None:
            heads.append(parse_head(n))
        elif arch is None:
            raise LocauditError(f"{show(n)} names every head of layer {m.group(1)}, which needs the model's head count; "
                                f"pass the model's arch to parse it")
        else:
            heads += [Head(int(m.group(1)), h) for h in range(arch.n_heads)]
    seen: set[Head] = set()
    for h in heads:
        if h in seen:
            raise LocauditError(f"head {h.name} is listed twice in {show(spec)}; give each head once")
        seen.add(h)
    hs = HeadSet(tuple(heads), label)
    return hs.validate(arch.n_layers, arch.n_heads) if arch is not None else hs


def _shape(arch: Arch | None, *fields: str) -> tuple:
    """The named sizes of `arch`, or Nones (no model to check against)."""
    return tuple(None if arch is None else getattr(arch, f) for f in fields)


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit: its names, its set type, how many a layer has, and its optimal edit."""

    name: str  # the kind, as in UnitSet.kind and KINDS
    noun: str  # one unit, for messages
    grammar: str  # how to write the names, for messages
    pattern: re.Pattern  # one name of this kind (to tell kinds apart)
    members: type  # the kind's own set type
    per_layer: Callable[[Arch], int]  # units in each layer
    b_entries: Callable[[Arch], int]  # entries of b the optimal edit trains per unit (see `lr_size`)
    parse: Callable[[str | Iterable[str], Arch | None, str], Members]  # names -> set, checked against arch if given
    build: Callable[[Sequence[tuple[int, int]], str], Members]  # (layer, index within layer) pairs -> set
    check: Callable[[Members, Arch], object]  # raises on units outside the model
    edit: Callable[[Members, Arch, int, float], Intervention]  # the optimal edit (members, arch, seed, scale)
    whole: str  # what a claim takes when a layer-matched draw can only return it

    def all(self, arch: Arch) -> "UnitSet":
        """Every unit of this kind in the model."""
        return UnitSet(self.build([(l, i) for l in range(arch.n_layers) for i in range(self.per_layer(arch))], "all"))


KINDS: dict[str, UnitKind] = {k.name: k for k in (
    UnitKind("heads", "head", HEAD_GRAMMAR + " (L<layer>A: every head of a layer)",
             re.compile(r"L[0-9]+(H[0-9]+|A)"), HeadSet,
             per_layer=lambda arch: arch.n_heads, b_entries=lambda arch: arch.head_dim,
             parse=_parse_heads,
             build=lambda pairs, label: HeadSet(tuple(Head(l, i) for l, i in pairs), label),
             check=lambda hs, arch: hs.validate(arch.n_layers, arch.n_heads),
             edit=lambda hs, arch, seed, scale: LocalizedRank1(hs, arch, seed=seed, scale=scale),
             whole="every head of each of its layers"),
    UnitKind("neurons", "neuron", NEURON_GRAMMAR, re.compile(r"L[0-9]+N[0-9]+"), NeuronSet,
             per_layer=lambda arch: arch.n_neurons, b_entries=lambda arch: 1,
             parse=lambda spec, arch, label: parse_neurons(spec, *_shape(arch, "n_layers", "n_neurons"), label),
             build=lambda pairs, label: NeuronSet(tuple(Neuron(l, i) for l, i in pairs), label),
             check=lambda ns, arch: ns.validate(arch.n_layers, arch.n_neurons),
             edit=lambda ns, arch, seed, scale: NeuronRank1(ns, arch, seed=seed, scale=scale),
             whole="every MLP neuron of each of its layers"),
    UnitKind("layers", "layer", LAYER_GRAMMAR, re.compile(r"L[0-9]+"), LayerSet,
             per_layer=lambda arch: 1, b_entries=lambda arch: arch.d_model,
             parse=lambda spec, arch, label: parse_layers(spec, *_shape(arch, "n_layers"), label),
             build=lambda pairs, label: LayerSet(tuple(l for l, _ in pairs), label),
             check=lambda ls, arch: ls.validate(arch.n_layers),
             edit=lambda ls, arch, seed, scale: ResidualRank1(ls, arch, seed=seed, scale=scale),
             whole="whole layers, each a single unit"),
)}


def _kind_of_members(members) -> UnitKind:
    kind = next((k for k in KINDS.values() if isinstance(members, k.members)), None)
    if kind is None:
        raise LocauditError(f"{type(members).__name__} is not a set of units; give a UnitSet, HeadSet, NeuronSet or "
                            f"LayerSet (`parse_units` reads names)")
    return kind


@dataclass(frozen=True)
class UnitSet:
    """A claim's units, of one kind: the protocol every consumer of a claim (the audit, `fit_optimal_edit`) uses."""

    members: Members

    def __post_init__(self):
        _kind_of_members(self.members)

    @property
    def unit_kind(self) -> UnitKind:
        return _kind_of_members(self.members)

    @property
    def kind(self) -> str:
        return self.unit_kind.name

    @property
    def label(self) -> str:
        return self.members.label

    @property
    def names(self) -> list[str]:
        return self.members.names

    def spec(self) -> str:
        return self.members.spec()

    def __len__(self) -> int:
        return len(self.members)

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [indices of the units within the layer]}, in layer order (a layer unit has index 0)."""
        return self.members.by_layer()

    def pairs(self) -> list[tuple[int, int]]:
        """(layer, index within layer) of every unit, sorted."""
        return [(l, i) for l, ix in self.by_layer().items() for i in ix]

    def validate(self, arch: Arch) -> "UnitSet":
        """Raise a one-line LocauditError on a unit this model does not have; return self."""
        self.unit_kind.check(self.members, arch)
        return self

    def make_edit(self, arch: Arch, seed: int = 0, scale: float = 1.0) -> Intervention:
        """The optimal edit at these units, at its initialisation (the identity); `scale` is the LoRA scale s."""
        return self.unit_kind.edit(self.validate(arch).members, arch, seed, scale)

    def lr_size(self, arch: Arch) -> int | None:
        """The n of `training.default_lr(n, cfg)` for this set (see the module docstring); None: every unit."""
        k = self.unit_kind
        if len(self) == arch.n_layers * k.per_layer(arch):
            return None
        return math.ceil(len(self) * k.b_entries(arch) / arch.head_dim)


def as_units(units: UnitSet | Members) -> UnitSet:
    """A UnitSet from itself or from a kind's own set (a HeadSet keeps all its numbers)."""
    return units if isinstance(units, UnitSet) else UnitSet(units)


def _kind_of_name(name) -> UnitKind:
    if not isinstance(name, str):
        raise LocauditError(f"unit name {show(name)} is not text; {GRAMMAR}")
    kind = next((k for k in KINDS.values() if k.pattern.fullmatch(name.strip())), None)
    if kind is None:
        raise LocauditError(f"malformed unit name {show(name)}; {GRAMMAR}")
    return kind


def _one_kind(spec: str | Iterable[str]) -> tuple[UnitKind, list[str]]:
    """The kind of every name of `spec` (one kind per claim) and the names."""
    names = split_names(spec, "unit", GRAMMAR)
    kinds = [_kind_of_name(n) for n in names]
    first = kinds[0]
    other = next((i for i, k in enumerate(kinds) if k is not first), None)
    if other is not None:
        raise LocauditError(f"claim {show(spec)} mixes {first.name} ({names[0].strip()}) and {kinds[other].name} "
                            f"({names[other].strip()}); name units of one kind per claim")
    return first, names


def parse_units(spec: str | Iterable[str], arch: Arch | None = None, label: str = "custom") -> UnitSet:
    """Parse a claim (`"L3N100,L3N7"`, `"L12"`, `"L12H3,L14H1"`, `"L12A"`, or a list of names) into a UnitSet, checked
    against `arch` when given (`L<l>A` needs it). Malformed, empty, duplicate or out-of-range names, and a claim
    mixing kinds, raise a one-line LocauditError."""
    kind, _ = _one_kind(spec)
    return UnitSet(kind.parse(spec, arch, label))


def check_names(spec: str | Iterable[str]) -> UnitKind:
    """The kind of a claim's names, after every check that needs no model (syntax, one kind, no name twice), so
    a command can fail before it loads one; `L<l>A` names are expanded, and checked, by `parse_units` with the
    model's arch."""
    kind, names = _one_kind(spec)
    if not any(isinstance(n, str) and _WHOLE_ATTENTION.fullmatch(n.strip()) for n in names):
        kind.parse(spec, None, "custom")
    return kind


def all_units(kind: str, arch: Arch) -> UnitSet:
    """Every unit of `kind` ("heads", "neurons", "layers") in the model."""
    if kind not in KINDS:
        raise LocauditError(f"unknown unit kind {kind!r}; use one of {', '.join(KINDS)}")
    return KINDS[kind].all(arch)


def random_units(like: UnitSet | Members, seed: int, arch: Arch, match_layers: bool = False) -> UnitSet:
    """A random set of `like`'s kind and size, reproducible from (claim, seed): drawn uniformly without replacement
    from every unit of the model, or (`match_layers`) with as many units in each layer as `like` has there, drawn
    uniformly without replacement within the layer. For heads this is exactly `heads.random_heads` /
    `heads.random_heads_like` (same sets, same labels)."""
    like = as_units(like).validate(arch)
    check_seed(seed)
    kind, k = like.unit_kind, len(like)
    per = kind.per_layer(arch)
    rng = np.random.default_rng(seed)
    if not match_layers:
        check_positive(k, f"random {kind.noun}-set size")  # a valid claim has at most every unit: k fits
        idx = rng.choice(arch.n_layers * per, size=k, replace=False)
        return UnitSet(kind.build([(int(i) // per, int(i) % per) for i in idx], f"random{k}-s{seed}"))
    by_layer = like.by_layer()
    if all(len(ix) == per for ix in by_layer.values()):
        raise LocauditError(f"a layer-matched random draw for {show(like.spec())} can only return the claim itself (it "
                            f"takes {kind.whole}); use match_layers=False to draw from every layer")
    pairs = [(l, int(i)) for l, ix in by_layer.items() for i in sorted(rng.choice(per, size=len(ix), replace=False))]
    return UnitSet(kind.build(pairs, f"random{k}-layers-s{seed}"))
