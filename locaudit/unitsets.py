"""MLP neurons named `L<layer>N<neuron>` and whole layers named `L<layer>` (0-based): the units beside heads.py's
attention heads.

Neuron i of layer l is coordinate i of the MLP hidden activation m^l, the input of the MLP output projection
W_down^l (so column i of W_down^l is what it writes to the residual stream). Layer l is the residual stream r^l
after block l (the output of decoder layer l). Like `HeadSet`, a `NeuronSet` or `LayerSet` is a sorted,
duplicate-free tuple plus a label saying where it came from (`custom`, `random8-s3`, `all`). `locaudit.units`
puts all three kinds behind one protocol; this module only names and checks them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from locaudit.errors import LocauditError
from locaudit.heads import MAX_DIGITS, show, split_names

_NEURON = re.compile(r"L([0-9]+)N([0-9]+)")  # ASCII digits only, like head names
_LAYER = re.compile(r"L([0-9]+)")
NEURON_GRAMMAR = "write MLP neurons as L<layer>N<neuron>, 0-based, comma-separated, e.g. L3N100,L3N7"
LAYER_GRAMMAR = "write layers as L<layer>, 0-based, comma-separated, e.g. L12 (the residual stream after block 12)"


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    index: int

    @property
    def name(self) -> str:
        return f"L{self.layer}N{self.index}"

    def __str__(self) -> str:
        return self.name


def _no_duplicates(items: tuple, label: str, noun: str, name) -> None:
    if len(set(items)) != len(items):
        dup = next(x for i, x in enumerate(items) if x in items[:i])
        raise LocauditError(f"{noun} set {show(label)} lists {noun} {name(dup)} twice; give each {noun} once")


@dataclass(frozen=True)
class NeuronSet:
    neurons: tuple[Neuron, ...]
    label: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "neurons", tuple(sorted(self.neurons)))
        _no_duplicates(self.neurons, self.label, "neuron", lambda n: n.name)

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.neurons]

    def spec(self) -> str:
        return ",".join(self.names)

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [neuron indices]} for the layers this set touches, in layer order."""
        out: dict[int, list[int]] = defaultdict(list)
        for n in self.neurons:
            out[n.layer].append(n.index)
        return dict(sorted(out.items()))

    def validate(self, n_layers: int, n_neurons: int) -> "NeuronSet":
        for n in self.neurons:
            if not (0 <= n.layer < n_layers and 0 <= n.index < n_neurons):
                raise LocauditError(f"neuron {n.name} is out of range: this model has layers 0..{n_layers - 1} and MLP "
                                    f"neurons 0..{n_neurons - 1} in each (names are 0-based, e.g. L0N0)")
        return self


@dataclass(frozen=True)
class LayerSet:
    """Whole layers: the residual stream after each listed block. Each layer is one unit, so `by_layer` gives
    {l: [0]} (index 0 of the single unit a layer has)."""

    layers: tuple[int, ...]
    label: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(int(l) for l in self.layers)))
        _no_duplicates(self.layers, self.label, "layer", lambda l: f"L{l}")

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def names(self) -> list[str]:
        return [f"L{l}" for l in self.layers]

    def spec(self) -> str:
        return ",".join(self.names)

    def by_layer(self) -> dict[int, list[int]]:
        return {l: [0] for l in self.layers}

    def validate(self, n_layers: int) -> "LayerSet":
        for l in self.layers:
            if not 0 <= l < n_layers:
                raise LocauditError(f"layer L{l} is out of range: this model has layers 0..{n_layers - 1} "
                                    f"(names are 0-based, e.g. L0)")
        return self


def _match(pattern: re.Pattern, name, noun: str, grammar: str) -> re.Match:
    if not isinstance(name, str):
        raise LocauditError(f"{noun} name {show(name)} is not text; {grammar}")
    m = pattern.fullmatch(name.strip())
    if not m:
        raise LocauditError(f"malformed {noun} name {show(name)}; {grammar}")
    if max(len(g) for g in m.groups()) > MAX_DIGITS:
        raise LocauditError(f"{noun} name {show(name)} has an impossibly large index; {grammar}")
    return m


def parse_neuron(name: str) -> Neuron:
    m = _match(_NEURON, name, "neuron", NEURON_GRAMMAR)
    return Neuron(int(m.group(1)), int(m.group(2)))


def parse_layer(name: str) -> int:
    return int(_match(_LAYER, name, "layer", LAYER_GRAMMAR).group(1))


def _once(items: list, spec, noun: str, name) -> None:
    seen = set()
    for x in items:
        if x in seen:
            raise LocauditError(f"{noun} {name(x)} is listed twice in {show(spec)}; give each {noun} once")
        seen.add(x)


def parse_neurons(spec: str | Iterable[str], n_layers: int | None = None, n_neurons: int | None = None,
                  label: str = "custom") -> NeuronSet:
    """Parse `"L3N100,L3N7"` (or a list of names) into a NeuronSet, optionally checked against a model's shape."""
    neurons = [parse_neuron(n) for n in split_names(spec, "neuron", NEURON_GRAMMAR)]
    _once(neurons, spec, "neuron", lambda n: n.name)
    ns = NeuronSet(tuple(neurons), label)
    return ns.validate(n_layers, n_neurons) if n_layers is not None and n_neurons is not None else ns


def parse_layers(spec: str | Iterable[str], n_layers: int | None = None, label: str = "custom") -> LayerSet:
    """Parse `"L12"` or `"L3,L7"` (or a list of names) into a LayerSet, optionally checked against a model's depth."""
    layers = [parse_layer(n) for n in split_names(spec, "layer", LAYER_GRAMMAR)]
    _once(layers, spec, "layer", lambda l: f"L{l}")
    ls = LayerSet(tuple(layers), label)
    return ls.validate(n_layers) if n_layers is not None else ls
