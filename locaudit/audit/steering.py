"""The claim's steering heuristic, at the claim and at each random set: beside "does the optimal edit single out
the claimed units?", the audit asks "does the edit the heuristic's own study would make work better at the
claimed units than at random units of the same size?".

| unit kind | steering heuristic (`STEERING`) | multiplier grid |
|---|---|---|
| heads | ITI (Li et al. 2023): o_h^l += alpha sigma_h u_h at each head h of S; u_h the mass-mean direction (preferred minus dispreferred mean of the head's output, unit norm) and sigma_h the std of training activations along it (`probes.probe_task` on the training items) | `AuditConfig.alphas`, in units of sigma |
| neurons | mean-difference steering at the neurons: m^l_S += alpha v^l_S, v^l the mean over training pairs of m^l(x + y+) - m^l(x + y-) at the last token (`heuristics.MeanDiffSteering`) | `AuditConfig.meandiff_alphas`, multiples of v |
| layers | CAA: r^{l+1} += alpha v^l at each layer l of S, v^l the same mean difference of the residual stream | `AuditConfig.meandiff_alphas` |

Every steering edit shifts the positions ITI does (`placement="iti"`: the answer tokens when answers are
scored, the last prompt token and generated tokens in generation). Each arm's multiplier is the one with the
best statistic on the validation items (`heuristics.choose_alpha`; ties to the smaller alpha); the edit at that
multiplier is scored on the test items. Probes and vectors come from the training items, once per audit, and
only when a steering trial is not stored yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from locaudit.audit.config import AuditConfig
from locaudit.heuristics import MeanDiffSteering, mean_diff_vectors
from locaudit.heuristics.sites import KIND_SITES
from locaudit.interventions import ITI, Intervention
from locaudit.models import LoadedModel
from locaudit.probes import ProbeResult, probe_task
from locaudit.tasks import Task, TaskSplit
from locaudit.units import UnitSet


def pair_batch(cfg: AuditConfig) -> int:
    """Pairs per forward for the heuristics that run whole pairs (two rows each): half the evaluation batch."""
    return max(1, cfg.batch_size // 2)


class SteeringSource:
    """What the steering heuristics learn from the training items: ITI's probes (directions u, sigmas) and the
    mean-difference vectors of each site, each computed on first use (or given: the claim's own probes)."""

    def __init__(self, lm: LoadedModel, task: Task, split: TaskSplit, cfg: AuditConfig,
                 probes: ProbeResult | None = None, vectors: Mapping[str, Mapping[int, torch.Tensor]] | None = None,
                 progress: bool = False):
        self.lm, self.task, self.split, self.cfg, self.progress = lm, task, split, cfg, progress
        self._probes = probes
        self._vectors = {k: dict(v) for k, v in (vectors or {}).items()}

    def probes(self) -> ProbeResult:
        if self._probes is None:
            self._probes = probe_task(self.lm, self.task, self.split, seed=self.cfg.seed,
                                      batch_size=self.cfg.batch_size, progress=self.progress)
        return self._probes

    def vectors(self, site_name: str) -> dict[int, torch.Tensor]:
        """{l: v^l} of every layer at the site (`heuristics.sites`), from the training items."""
        if site_name not in self._vectors:
            self._vectors[site_name] = mean_diff_vectors(self.lm, self.task, self.split.train, site_name,
                                                         batch_size=pair_batch(self.cfg))
        return self._vectors[site_name]


def _iti(src: SteeringSource, units: UnitSet) -> Callable[[float], Intervention]:
    probes = src.probes()
    return lambda alpha: ITI.from_probes(units.members, probes, alpha, placement="iti")


def _meandiff(src: SteeringSource, units: UnitSet) -> Callable[[float], Intervention]:
    site_name = KIND_SITES[units.kind]
    vectors = src.vectors(site_name)
    by_layer = units.by_layer()
    edit = MeanDiffSteering(src.lm.arch, site_name, {l: vectors[l] for l in by_layer}, 1.0,
                            units=None if site_name == "residual" else by_layer, placement="iti", label=units.label)
    return edit.with_alpha


@dataclass(frozen=True)
class SteeringHeuristic:
    """One unit kind's steering heuristic: its name (in trial files and results.json), how the verdict names it,
    its multiplier grid, and `build(source, units)`, the edit at `units` as a function of the multiplier."""

    name: str
    kind: str
    what: str
    grid: Callable[[AuditConfig], tuple[float, ...]]
    build: Callable[[SteeringSource, UnitSet], Callable[[float], Intervention]]


STEERING: dict[str, SteeringHeuristic] = {h.kind: h for h in (
    SteeringHeuristic("iti", "heads", "ITI", lambda cfg: tuple(cfg.alphas), _iti),
    SteeringHeuristic("meandiff", "neurons", "Mean-difference steering",
                      lambda cfg: tuple(cfg.meandiff_alphas), _meandiff),
    SteeringHeuristic("caa", "layers", "CAA steering",
                      lambda cfg: tuple(cfg.meandiff_alphas), _meandiff),
)}
