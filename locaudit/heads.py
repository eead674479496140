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

_NAME = re.compile(r"L(\d+)H(\d+)")


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
            raise LocauditError(f"head set '{self.label}' has duplicate heads")

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
    m = _NAME.fullmatch(name.strip())
    if not m:
        raise LocauditError(f"malformed head name '{name}'; write heads as L<layer>H<head>, 0-based, e.g. L12H3")
    return Head(int(m.group(1)), int(m.group(2)))


def parse_heads(spec: str | Iterable[str], n_layers: int | None = None, n_heads: int | None = None,
                label: str = "custom") -> HeadSet:
    """Parse `"L3H1,L7H4"` (or a list of names) into a HeadSet, optionally checked against a model's shape."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    if not names or all(not n.strip() for n in names):
        raise LocauditError("empty head list; give heads as L<layer>H<head>[,L<layer>H<head>...], e.g. L3H1,L7H4")
    heads = [parse_head(n) for n in names]
    seen: set[Head] = set()
    for h in heads:
        if h in seen:
            raise LocauditError(f"head {h.name} is listed twice; give each head once")
        seen.add(h)
    hs = HeadSet(tuple(heads), label)
    if n_layers is not None and n_heads is not None:
        hs.validate(n_layers, n_heads)
    return hs


def _positive(k: int, what: str) -> None:
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise LocauditError(f"{what} must be a positive integer, got {k!r}")


def random_heads(k: int, seed: int, n_layers: int, n_heads: int) -> HeadSet:
    """k heads drawn uniformly without replacement from all L*H heads; the same (k, seed) gives the same set."""
    _positive(k, "random head-set size")
    if k > n_layers * n_heads:
        raise LocauditError(f"cannot draw {k} heads from a model with only {n_layers * n_heads}")
    idx = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return HeadSet(tuple(Head(int(i) // n_heads, int(i) % n_heads) for i in idx), f"random{k}-s{seed}")


def top_k_heads(ranking: Sequence[Head], k: int) -> HeadSet:
    """The first k heads of a best-first ranking (e.g. by probe accuracy)."""
    _positive(k, "top-k")
    if k > len(ranking):
        raise LocauditError(f"top-k {k} exceeds the {len(ranking)} ranked heads")
    return HeadSet(tuple(ranking[:k]), f"top{k}")


def all_heads(n_layers: int, n_heads: int) -> HeadSet:
    return HeadSet(tuple(Head(l, h) for l in range(n_layers) for h in range(n_heads)), "all")


def single_head(head: Head) -> HeadSet:
    return HeadSet((head,), f"single-{head.name}")
