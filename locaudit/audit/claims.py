"""The claim an audit tests: unit names, or the units a localization heuristic selects on the task.

A heuristic claim is written `NAME:K` (the top K units) or `NAME` (a heuristic that picks its own units); the
table `HEURISTICS` holds them:

| spec | units | what ranks them | items |
|---|---|---|---|
| `probe:K` | heads | ITI's probes: a logistic regression per head on the last-token head output of prompt + preferred vs prompt + dispreferred answer, scored by accuracy | trained on training, ranked on validation items |
| `atp-heads:K`, `atp-neurons:K` | heads, MLP neurons | attribution patching (`heuristics.attribution`): |E[delta m]|, the first-order change of the preference margin when the unit is zero-ablated | training items |
| `atp-layers:K` | layers | the same with mean ablation (zero-ablating a residual stream is invisible to first order where a norm follows it) | training items |
| `sweep` | one layer | CAA's layer sweep (`heuristics.layer_sweep`): mean-difference steering at each layer at each multiplier of `AuditConfig.meandiff_alphas`; the layer of the best (layer, multiplier), ties to the smaller multiplier, then the lower layer | validation items (vectors from training items) |

Each writes what it computed under OUT/heuristic/: `heuristic.json` (the spec, what the scores are, the claim's
units best first with their scores, and the settings it was computed with) and the scores as `.npy` arrays
(probes also as `probes.npz`, `probes.csv`, `top_heads.txt`). A rerun of the same audit reads them back
instead of recomputing them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from locaudit.audit.config import AuditConfig, upgrade_record
from locaudit.audit.steering import pair_batch
from locaudit.errors import LocauditError
from locaudit.heads import HeadSet
from locaudit.heuristics import attribution_patching, layer_sweep, mean_diff_vectors
from locaudit.models import Arch, LoadedModel
from locaudit.probes import ProbeResult, probe_task
from locaudit.storage import atomic_write, atomic_write_json, read_json
from locaudit.tasks import Task, TaskSplit
from locaudit.units import GRAMMAR, KINDS, UnitSet, as_units, check_names, parse_units

HEURISTIC_DIR = "heuristic"
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")  # a heuristic's name; unit names always hold a layer number


@dataclass(frozen=True, eq=False)
class Selection:
    """What a heuristic computed: the claim, arrays of scores to write as .npy, JSON-able facts (`info`: what
    the scores are, the claim's units with theirs), and what the steering arms can reuse."""

    units: UnitSet
    scores: dict[str, np.ndarray]
    info: dict
    probes: ProbeResult | None = None
    vectors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class HeuristicInputs:
    lm: LoadedModel
    task: Task
    split: TaskSplit
    cfg: AuditConfig
    progress: bool = False


@dataclass(frozen=True)
class Heuristic:
    """One localization heuristic whose claim the audit can test (module docstring)."""

    name: str
    kind: str  # the unit kind of its claims
    takes_k: bool  # NAME:K (top K) or NAME (it picks its units)
    help: str  # for the command line
    select: Callable[[HeuristicInputs, int | None], Selection]

    def spec(self) -> str:
        return f"{self.name}:K" if self.takes_k else self.name

    def n_units(self, arch: Arch) -> int:
        kind = KINDS[self.kind]
        return arch.n_layers * kind.per_layer(arch)


def _unit_scores(units: list[str], scores: np.ndarray, arch: Arch) -> list[dict]:
    """[{"unit", "score"}] of named units, from an (L, units per layer) array (layers: (L,))."""
    s = scores.reshape(arch.n_layers, -1)
    out = []
    for name in units:
        (l, i), = parse_units(name, arch).pairs()
        out.append({"unit": name, "score": float(s[l, i])})
    return out


def _probe(inp: HeuristicInputs, k: int | None) -> Selection:
    result = probe_task(inp.lm, inp.task, inp.split, seed=inp.cfg.seed, batch_size=inp.cfg.batch_size,
                        progress=inp.progress)
    best = [h.name for h in result.ranking[:k]]
    return Selection(as_units(HeadSet(result.top(k).heads, f"probe-top{k}")), {"val_acc": result.val_acc},
                     {"score": "validation accuracy of a logistic-regression probe on each head's last-token output "
                               "(prompt + preferred vs prompt + dispreferred answer), trained on the training items",
                      "arrays": {"val_acc": "(layers, heads)"}, "n_train": result.n_train, "n_val": result.n_val,
                      "top": _unit_scores(best, result.val_acc, inp.lm.arch)},
                     probes=result)


def _atp(kind: str, baseline: str) -> Callable[[HeuristicInputs, int | None], Selection]:
    def select(inp: HeuristicInputs, k: int | None) -> Selection:
        a = attribution_patching(inp.lm, inp.task, inp.split.train, baseline=baseline,
                                 batch_size=pair_batch(inp.cfg), progress=inp.progress)
        best = a.top(kind, k)
        return Selection(parse_units(best, inp.lm.arch, f"atp-{kind}-top{k}"),
                         {"heads": a.heads, "neurons": a.neurons, "layers": a.layers},
                         {"score": f"attribution patching: E[delta m], the first-order change of the preference margin "
                                   f"when the unit is {baseline}-ablated, averaged over the training pairs; units "
                                   f"ranked by its absolute value", "baseline": baseline, "n_pairs": a.n_pairs,
                          "arrays": {"heads": "(layers, heads)", "neurons": "(layers, neurons)", "layers": "(layers,)"},
                          "top": _unit_scores(best, a.effects(kind), inp.lm.arch)})
    return select


def _sweep(inp: HeuristicInputs, k: int | None) -> Selection:
    lm, cfg = inp.lm, inp.cfg
    val = cfg.val_items(inp.split)
    vectors = mean_diff_vectors(lm, inp.task, inp.split.train, "residual", batch_size=pair_batch(cfg))
    sweeps = [layer_sweep(lm, inp.task, inp.split.train, val, alpha, vectors=vectors, batch_size=cfg.batch_size,
                          progress=inp.progress) for alpha in cfg.meandiff_alphas]
    values = np.stack([s.values for s in sweeps])  # (alphas, layers)
    alphas, layers = list(cfg.meandiff_alphas), list(sweeps[0].layers)
    j, l = min(((j, l) for j in range(len(alphas)) for l in range(len(layers)) if np.isfinite(values[j, l])),
               key=lambda jl: (-values[jl], abs(alphas[jl[0]]), layers[jl[1]], jl[0]), default=(None, None))
    if j is None:
        raise LocauditError("the layer sweep's statistic is undefined at every layer and multiplier; check the "
                            "validation items")
    return Selection(parse_units(f"L{layers[l]}", lm.arch, "sweep"), {"values": values},
                     {"score": "the task's statistic on the validation items with mean-difference steering "
                               "r <- r + alpha v^l at each layer l (v^l from the training items), at each alpha",
                      "arrays": {"values": "(alphas, layers)"}, "alphas": alphas, "layers": layers,
                      "base": float(sweeps[0].base), "alpha": alphas[j], "n_val": len(val),
                      "top": [{"unit": f"L{layers[l]}", "score": float(values[j, l])}]},
                     vectors={"residual": vectors})


HEURISTICS: dict[str, Heuristic] = {h.name: h for h in (
    Heuristic("probe", "heads", True, "the top K heads of ITI-style probes trained on the task", _probe),
    Heuristic("atp-heads", "heads", True, "the top K heads by attribution patching on the task", _atp("heads", "zero")),
    Heuristic("atp-neurons", "neurons", True, "the top K MLP neurons by attribution patching on the task",
              _atp("neurons", "zero")),
    Heuristic("atp-layers", "layers", True, "the top K layers by attribution patching (mean ablation) on the task",
              _atp("layers", "mean")),
    Heuristic("sweep", "layers", False, "the best steering layer of CAA's layer sweep on the task", _sweep),
)}
SPECS = ", ".join(h.spec() for h in HEURISTICS.values())


def heuristic_help(kind: str | None = None) -> str:
    """The heuristic claims (of one unit kind, or all), for `--help` texts."""
    return "; ".join(f"{h.spec()}: {h.help}" for h in HEURISTICS.values() if kind in (None, h.kind))


def parse_heuristic(text: str) -> tuple[Heuristic, int | None] | None:
    """(heuristic, K) for a spec like `atp-neurons:32` or `sweep`; None for unit names. A bad spec (unknown name,
    a K that is not a positive number, K given to `sweep` or missing elsewhere) raises one LocauditError line;
    K's upper bound needs the model (`check_k`)."""
    t = text.strip()
    name, sep, k = t.partition(":")
    if not sep and not _WORD.fullmatch(t):
        return None
    h = HEURISTICS.get(name.strip().lower())
    if h is None:
        raise LocauditError(f"unknown claim heuristic {name.strip()!r} in {t!r}; use one of {SPECS}, or unit names "
                            f"({GRAMMAR})")
    noun = KINDS[h.kind].noun
    if not h.takes_k:
        if sep:
            raise LocauditError(f"claim {t!r}: {h.name} takes no K (it selects one {noun}); write {h.name}")
        return h, None
    if not sep or not re.fullmatch(r"[0-9]{1,9}", k.strip()) or int(k) <= 0:
        raise LocauditError(f"claim {t!r}: give {h.name}:K with K a number of {noun}s (a whole number >= 1), "
                            f"e.g. {h.name}:16")
    return h, int(k)


def check_k(h: Heuristic, k: int | None, arch: Arch, text: str) -> None:
    """K within the model's units of the heuristic's kind."""
    n = h.n_units(arch)
    if h.takes_k and not 0 < k <= n:
        raise LocauditError(f"claim {text.strip()!r}: give {h.name}:K with K a number of {KINDS[h.kind].noun}s "
                            f"from 1 to {n} (this model has {n})")


def claim_kind(text: str) -> str:
    """The unit kind a claim spec names (heuristic or unit names), after every check that needs no model."""
    parsed = parse_heuristic(text)
    return parsed[0].kind if parsed is not None else check_names(text).name


@dataclass(frozen=True, eq=False)
class Claim:
    """A resolved claim: its units, the heuristic that chose them (audit.json's record; None for named units) and
    what the steering arms can reuse from it (the probes of `probe:K`, the residual vectors of `sweep`)."""

    units: UnitSet
    heuristic: dict | None = None
    probes: ProbeResult | None = None
    vectors: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


def heuristic_record(text: str) -> dict | None:
    """audit.json's description of a heuristic claim (what ranks the units, on which items); None for names."""
    parsed = parse_heuristic(text) if isinstance(text, str) else None
    if parsed is None:
        return None
    h, k = parsed
    return {"spec": h.name if k is None else f"{h.name}:{k}", "name": h.name, "k": k, "kind": h.kind,
            "what": h.help, "files": HEURISTIC_DIR}


# the audit settings a heuristic reads (`HeuristicInputs`: the split, probes' and steering batches, the sweep's
# validation items and multipliers); a stored heuristic is reused while these match, whatever the fit settings
HEURISTIC_SETTINGS = ("seed", "limit_items", "max_val_items", "batch_size", "meandiff_alphas")


def heuristic_key(record: dict) -> dict:
    """What a stored heuristic's scores depend on, from an audit.json record (model, task, the heuristic's spec and
    `HEURISTIC_SETTINGS`); a stored key written with the whole record gives the same key."""
    record = upgrade_record(record)
    try:
        return {**{k: record[k] for k in ("version", "model", "task", "heuristic")},
                "config": {k: record["config"][k] for k in HEURISTIC_SETTINGS}}
    except (KeyError, TypeError):
        return {}


def _write(out: Path, sel: Selection, record: dict, key: dict) -> None:
    for name, arr in sel.scores.items():
        def save(tmp: Path, arr=arr):
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(arr))
        atomic_write(out / f"{name}.npy", save)
    if sel.probes is not None:
        sel.probes.save(out)
    atomic_write_json(out / "heuristic.json", {**record, **sel.info, "claim": sel.units.names,
                                               "label": sel.units.label, "key": key})


def _stored(out: Path, record: dict, key: dict, arch: Arch) -> Claim | None:
    """The claim a previous run of this audit computed (same spec and settings), or None."""
    path = out / "heuristic.json"
    if not path.is_file():
        return None
    try:
        stored = read_json(path)
        if heuristic_key(stored.get("key")) != heuristic_key(key) or stored.get("spec") != record["spec"]:
            return None
        probes = ProbeResult.load(out) if record["name"] == "probe" else None
        return Claim(parse_units(stored["claim"], arch, stored["label"]), record, probes)
    except (LocauditError, KeyError, AttributeError, TypeError):
        return None  # unreadable or from another version: recompute


def resolve_claim(claim: UnitSet | HeadSet | str, lm: LoadedModel, task: Task, split: TaskSplit, cfg: AuditConfig,
                  out: Path | None = None, progress: bool = False, key: dict | None = None) -> Claim:
    """The claim as units: given units, names ("L12H3,L14H1", "L3N100,L3N7", "L12", "L12A"), or a heuristic
    spec (`HEURISTICS`: probe:K, atp-heads:K, atp-neurons:K, atp-layers:K, sweep) run on the task's items. With
    `out`, the heuristic's scores are written under out/heuristic/; with `key` too (the audit's settings), a
    heuristic already computed there with the same `heuristic_key` (the settings it reads; an audit with other fit
    settings, given a copy of another audit's heuristic/, reuses it) is read back instead of run again."""
    a = lm.arch
    if not isinstance(claim, str):
        return Claim(as_units(claim).validate(a))
    parsed = parse_heuristic(claim)
    if parsed is None:
        return Claim(parse_units(claim.strip(), a))
    h, k = parsed
    check_k(h, k, a, claim)
    record = heuristic_record(claim)
    where = None if out is None else Path(out) / HEURISTIC_DIR
    if where is not None and key is not None:
        stored = _stored(where, record, key, a)
        if stored is not None:
            return stored
    sel = h.select(HeuristicInputs(lm, task, split, cfg, progress), k)
    if where is not None:
        _write(where, sel, record, heuristic_key(key))
    return Claim(sel.units, record, sel.probes, sel.vectors)
