"""When to pack: fitting one location's grid of edits (the tau grid of an arm) in one pass or one by one, chosen
by measuring both on the device that does the fitting.

`packed.fit_packed` gives what K `training.fit` calls give (up to float rounding), but whether it is faster
depends on the device and on where the edits sit: on a GPU a step of one small edit is latency-bound and K edits
in one pass cost little more than one; on a CPU the arithmetic is the bound and packing pays only through the
layers below the lowest edited layer, which run once instead of K times (bench/README.md, "Packed fits"). So
`fit_grid` decides per device, edit kind and lowest edited layer: with mode "auto" it times `MEASURE_STEPS` steps
of the K fits one by one and in one pack, on a few of the fit's own training pairs, and packs when that is at
least `MIN_SPEEDUP` times faster; "on" and "off" pin the choice. The decision is a `PackingChoice`, stored
(atomically) as one JSON file per (device, kind, layer) under a directory the caller gives, so that later grids
of that kind from that layer, other workers on the same device and a resumed run reuse it instead of measuring
again (and so make the same choice).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from locaudit.data.examples import PreferencePair
from locaudit.errors import LocauditError
from locaudit.interventions import Intervention
from locaudit.models import LoadedModel
from locaudit.packed import PACKABLE, fit_packed, fit_packed_to_optimum
from locaudit.storage import atomic_write_json, read_json
from locaudit.training import FitConfig, FitResult, fit, fit_to_optimum, prepare_pairs

MODES = ("auto", "on", "off")
MEASURE_STEPS = 2  # training steps timed per fit, one by one and packed
MIN_SPEEDUP = 1.2  # pack only when clearly faster: a near tie is not worth results that differ by rounding


def device_name(lm: LoadedModel) -> str:
    """The device the model runs on, in words (e.g. "cuda:0 NVIDIA H200", "cpu (2 threads)")."""
    import torch

    dev = lm.device
    if dev.type == "cuda":
        return f"{dev} {torch.cuda.get_device_name(dev)}"
    return f"{dev.type} ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class PackingChoice:
    """Whether grids of K fits are packed on `device`, and the measurement (or setting) that decided it."""

    device: str
    packed: bool
    mode: str  # auto | on | off
    kind: str | None = None  # the edits' kind and lowest edited layer the decision is for (auto)
    lowest_layer: int | None = None
    k: int = 0  # the measured grid's size (auto)
    steps: int = 0  # training steps timed per fit, beyond a first one (auto)
    sequential_s: float | None = None  # seconds of `steps` more steps of the K fits one by one (auto)
    packed_s: float | None = None  # the same in one pack (auto)
    measured_on: str | None = None  # which fits were timed

    @property
    def speedup(self) -> float | None:
        if not self.sequential_s or not self.packed_s:
            return None
        return self.sequential_s / self.packed_s

    def line(self) -> str:
        """One log line saying what was decided and why."""
        what = "packed (one pass per grid)" if self.packed else "one by one"
        if self.mode != "auto":
            return f"packed training on {self.device}: grids fitted {what} (packing = {self.mode})"
        return (f"packed training on {self.device}, {self.kind} edits from layer {self.lowest_layer}: {self.steps} "
                f"steps of {self.k} fits of {self.measured_on} took {self.sequential_s:.2f} s one by one and "
                f"{self.packed_s:.2f} s packed ({self.speedup:.2f}x; packing from {MIN_SPEEDUP}x): grids fitted {what}")

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}

    @classmethod
    def from_dict(cls, d: dict) -> "PackingChoice":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LocauditError(f"packing = {mode!r} is not a packing mode; use one of {', '.join(MODES)}")
    return mode


def _choice_path(store: Path, choice_of: str) -> Path:
    return Path(store) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", choice_of).strip("_") + ".json")


def stored_choices(store: Path) -> list[dict]:
    """Every stored decision under `store` (for run records and logs): one per device, edit kind and lowest
    edited layer that had a grid to fit."""
    store = Path(store)
    return [read_json(p) for p in sorted(store.glob("*.json"))] if store.is_dir() else []


def measure(lm: LoadedModel, new_edits: Sequence[Callable[[], Intervention]], train_pairs: Sequence[PreferencePair],
            val_pairs: Sequence[PreferencePair], cfgs: Sequence[FitConfig], n_heads: int | None,
            label: str, steps: int = MEASURE_STEPS) -> PackingChoice:
    """Time the K fits one by one and in one pack (fresh edits, thrown away; pi0 computed beforehand) for 1 and
    for 1 + `steps` training steps, on the first (1 + steps) * batch_size training pairs, each fit validated once
    on one pair, and compare the differences: the cost of `steps` steps without each fit's fixed setup (which a
    2-step timing would be dominated by, and a real fit of hundreds of steps is not)."""
    short = [replace(c, eval_every=None, patience=None, epochs=1, max_train_pairs=(1 + steps) * c.batch_size,
                     max_val_pairs=1) for c in cfgs]
    prepare_pairs(lm, train_pairs, val_pairs, short[0], progress=False)  # pi0 of these pairs: not timed
    fit(lm, new_edits[0](), train_pairs, val_pairs, replace(short[0], max_steps=1), n_heads=n_heads, progress=False)

    def timed(n: int) -> tuple[float, float]:
        cs = [replace(c, max_steps=n) for c in short]
        t0 = time.perf_counter()
        for new, c in zip(new_edits, cs):
            fit(lm, new(), train_pairs, val_pairs, c, n_heads=n_heads, progress=False)
        t1 = time.perf_counter()
        fit_packed(lm, [new() for new in new_edits], train_pairs, val_pairs, cs, n_heads, progress=False)
        return t1 - t0, time.perf_counter() - t1

    (seq1, pack1), (seq2, pack2) = timed(1), timed(1 + steps)
    t_seq, t_pack = seq2 - seq1, pack2 - pack1
    if t_seq <= 0 or t_pack <= 0:  # noise above the signal (a busy machine): compare the whole timings
        t_seq, t_pack = seq2, pack2
    edit = new_edits[0]()
    return PackingChoice(device_name(lm), t_seq / t_pack >= MIN_SPEEDUP, "auto", edit.kind, lowest_layer(edit),
                         len(new_edits), steps, t_seq, t_pack, label)


def lowest_layer(edit: Intervention) -> int:
    """The lowest layer a packable edit changes (the layers below it run once per batch in a pack)."""
    return min(PACKABLE[edit.kind](edit))


def fit_grid(lm: LoadedModel, new_edit: Callable[[], Intervention], train_pairs: Sequence[PreferencePair],
             val_pairs: Sequence[PreferencePair], cfgs: Sequence[FitConfig], n_heads: int | None = None,
             mode: str = "auto", store: Path | None = None, label: str = "one location",
             progress: bool = True) -> tuple[list[FitResult], PackingChoice | None]:
    """K fits of the same location (fresh edits from `new_edit()`) that differ only in their configs (the tau
    grid), each trained to its optimum (`training.fit_to_optimum`): in one pack or one by one, as `mode` and the
    device decide (module docstring). Returns the results in `cfgs`' order and the decision (None when there was
    nothing to decide: one fit, or an edit kind that cannot be packed)."""
    check_mode(mode)
    cfgs = list(cfgs)
    choice = None
    edit = new_edit() if len(cfgs) > 1 else None  # its kind and lowest layer key the decision
    if edit is not None and edit.kind in PACKABLE:
        choice = _decide(lm, edit, new_edit, train_pairs, val_pairs, cfgs, n_heads, mode, store, label, progress)
    if choice is not None and choice.packed:
        return fit_packed_to_optimum(lm, [new_edit] * len(cfgs), train_pairs, val_pairs, cfgs, n_heads,
                                     progress=progress), choice
    return [fit_to_optimum(lm, new_edit, train_pairs, val_pairs, c, n_heads=n_heads, progress=progress)
            for c in cfgs], choice


def _decide(lm, edit, new_edit, train_pairs, val_pairs, cfgs, n_heads, mode, store, label, progress) -> PackingChoice:
    """The decision for this grid: pinned by `mode` (one per device), else stored for the device, the edits' kind
    and their lowest layer, else measured now and stored."""
    device = device_name(lm)
    if mode != "auto":
        choice = PackingChoice(device, mode == "on", mode)
        if store is not None:
            atomic_write_json(_choice_path(store, device), choice.as_dict())
        return choice
    path = _choice_path(store, f"{device} {edit.kind} L{lowest_layer(edit)}") if store is not None else None
    if path is not None and path.is_file():
        try:
            stored = PackingChoice.from_dict(read_json(path))
            if stored.mode == "auto":
                return stored
        except (LocauditError, TypeError):
            pass  # unreadable: measure again
    choice = measure(lm, [new_edit] * len(cfgs), train_pairs, val_pairs, cfgs, n_heads, label)
    if progress:
        print(choice.line(), file=sys.stderr, flush=True)
    if path is not None:
        atomic_write_json(path, choice.as_dict())
    return choice
