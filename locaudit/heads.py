"""Attention heads named `L<layer>H<head>` (0-based), and the head sets a study compares.

A `HeadSet` is a sorted, duplicate-free tuple of heads plus a label saying where it came from
(`top16`, `random16-s3`, `single-L4H2`, `all`). Random sets are reproducible from (size, seed) alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from locaudit.errors import LocauditError

_NAME = re.compile(r"L([0-9]+)H([0-9]+)")  # ASCII digits only: "L٣H1" is not a head name
MAX_DIGITS = 9
EXAMPLE = "write heads as L<layer>H<head>, 0-based, comma-separated, e.g. L3H1,L7H4"


def show(text, limit: int = 40) -> str:
    """User text quoted for a one-line message: repr (escapes newlines and control characters), shortened."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True, order=True)
class Head:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class HeadSet:
    heads: tuple[Head, ...]
    label: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(sorted(self.heads)))
        if len(set(self.heads)) != len(self.heads):
            dup = next(h for i, h in enumerate(self.heads) if h in self.heads[:i])
            raise LocauditError(f"head set {show(self.label)} lists head {dup.name} twice; give each head once")

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(self.heads)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    def spec(self) -> str:
        return ",".join(self.names)

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [head indices]} for the layers this set touches, in layer order."""
        out: dict[int, list[int]] = defaultdict(list)
        for h in self.heads:
            out[h.layer].append(h.head)
        return dict(sorted(out.items()))

    def validate(self, n_layers: int, n_heads: int) -> "HeadSet":
        for h in self.heads:
            _check_range(h, n_layers, n_heads)
        return self


def _check_range(h: Head, n_layers: int, n_heads: int) -> None:
    if not (0 <= h.layer < n_layers and 0 <= h.head < n_heads):
        raise LocauditError(
            f"head {h.name} is out of range: this model has layers 0..{n_layers - 1} and heads 0..{n_heads - 1} "
            f"(names are 0-based, e.g. L0H0)"
        )


def parse_head(name: str) -> Head:
    if not isinstance(name, str):
        raise LocauditError(f"head name {show(name)} is not text; {EXAMPLE}")
    m = _NAME.fullmatch(name.strip())
    if not m:
        raise LocauditError(f"malformed head name {show(name)}; {EXAMPLE}")
    if max(len(m.group(1)), len(m.group(2))) > MAX_DIGITS:
        raise LocauditError(f"head name {show(name)} has an impossibly large index; {EXAMPLE}")
    return Head(int(m.group(1)), int(m.group(2)))


def split_names(spec: str | Iterable[str], noun: str, grammar: str) -> list[str]:
    """The names of a comma-separated list (or an iterable of names) of units, each non-empty; `noun` ("head",
    "neuron", ...) and `grammar` (how to write them) word the one-line errors."""
    if isinstance(spec, str):
        names = spec.split(",")
    else:
        try:
            names = list(spec)
        except TypeError:
            raise LocauditError(f"{noun} list {show(spec)} is not a list of names; {grammar}") from None
    if not names or all(isinstance(n, str) and not n.strip() for n in names):
        raise LocauditError(f"empty {noun} list; {grammar}")
    for n in names:
        if isinstance(n, str) and not n.strip():
            raise LocauditError(f"empty {noun} name in {show(spec)} (a stray comma?); {grammar}")
    return names


def parse_heads(spec: str | Iterable[str], n_layers: int | None = None, n_heads: int | None = None,
                label: str = "custom") -> HeadSet:
    """Parse `"L3H1,L7H4"` (or a list of names) into a HeadSet, optionally checked against a model's shape.

    Anything that is not such a list (malformed or empty names, duplicates, out-of-range heads) raises
    LocauditError with a one-line message."""
    heads = [parse_head(n) for n in split_names(spec, "head", EXAMPLE)]
    seen: set[Head] = set()
    for h in heads:
        if h in seen:
            raise LocauditError(f"head {h.name} is listed twice in {show(spec)}; give each head once")
        seen.add(h)
    hs = HeadSet(tuple(heads), label)
    if n_layers is not None and n_heads is not None:
        hs.validate(n_layers, n_heads)
    return hs


def check_positive(k: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise LocauditError(f"{what} must be a positive integer, got {k!r}")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LocauditError(f"seed must be an integer >= 0, got {seed!r}")


def random_heads(k: int, seed: int, n_layers: int, n_heads: int) -> HeadSet:
    """k heads drawn uniformly without replacement from all L*H heads; the same (k, seed) gives the same set."""
    check_positive(k, "random head-set size")
    check_seed(seed)
    if k > n_layers * n_heads:
        raise LocauditError(f"cannot draw {k} heads from a model with only {n_layers * n_heads}; use a size of at most {n_layers * n_heads}")
    idx = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return HeadSet(tuple(Head(int(i) // n_heads, int(i) % n_heads) for i in idx), f"random{k}-s{seed}")


def random_heads_like(claim: HeadSet, seed: int, n_layers: int, n_heads: int) -> HeadSet:
    """A random set matched to `claim`'s layer distribution: as many heads in each layer as the claim has there,
    drawn uniformly without replacement within the layer (`random_heads` draws from every layer)."""
    check_seed(seed)
    rng = np.random.default_rng(seed)
    heads = []
    for layer, hs in claim.by_layer().items():
        _check_range(Head(layer, 0), n_layers, n_heads)
        heads += [Head(layer, int(h)) for h in sorted(rng.choice(n_heads, size=len(hs), replace=False))]
    return HeadSet(tuple(heads), f"random{len(heads)}-layers-s{seed}")


def top_k_heads(ranking: Sequence[Head], k: int) -> HeadSet:
    """The first k heads of a best-first ranking (e.g. by probe accuracy)."""
    check_positive(k, "top-k")
    if k > len(ranking):
        raise LocauditError(f"top-k {k} exceeds the {len(ranking)} ranked heads")
    return HeadSet(tuple(ranking[:k]), f"top{k}")


def all_heads(n_layers: int, n_heads: int) -> HeadSet:
    return HeadSet(tuple(Head(l, h) for l in range(n_layers) for h in range(n_heads)), "all")


def single_head(head: Head) -> HeadSet:
    return HeadSet((head,), f"single-{head.name}")
