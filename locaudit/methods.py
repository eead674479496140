"""The study's methods as objects: what an arm does to the model, in one table.

A method says which hyper-parameter its arms choose on validation (ITI's alpha, IPO's tau, or none), where
that grid comes from in the study settings, which runner stage its trials are timed under, whether it trains
its edit (and so needs pi0's log-probs of the preference pairs), where it edits (nothing, an arm's head set S,
or every W^l), and how to build its edit for given heads and value. The runner, the study driver, the plan
and the report look methods up in `METHODS` instead of branching on their names.

A fitted method may also offer `build_grid(src, heads, values)` (`OptimalEdit` does): the runner then fits an
arm's whole grid in one call, packed into one pass where the device's measurement says it pays (`packing`).

The names ("none", "iti", "ipo", "full") are stored in trial files and results.csv: keep them. A new method
is one new entry here (and the arms that use it in `study.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence

from locaudit.data.examples import PreferencePair
from locaudit.errors import LocauditError
from locaudit.heads import HeadSet
from locaudit.interventions import ITI, FullRank1, Intervention, NoEdit
from locaudit.units import UnitSet, as_units
from locaudit.models import LoadedModel
from locaudit.packing import PackingChoice, fit_grid
from locaudit.probes import ProbeResult
from locaudit.training import FitConfig, FitResult

SCOPES = ("none", "heads", "all")  # where a method edits: nothing, the arm's head set S, every W^l


def make_edit(lm: LoadedModel, heads: UnitSet | HeadSet | None, seed: int = 0, scale: float = 1.0) -> Intervention:
    """The optimal edit of a unit set (heads: LocalizedRank1; neurons: NeuronRank1; layers: ResidualRank1, see
    `units`), or FullRank1 (ordinary rank-1 LoRA on every W^l) when None; `scale` is the LoRA scale s (PEFT's
    lora_alpha / r, `FitConfig.lora_scale`)."""
    if heads is None:
        return FullRank1(lm.arch, seed=seed, scale=scale)
    return as_units(heads).make_edit(lm.arch, seed=seed, scale=scale)


def fit_optimal_edit(lm: LoadedModel, heads: HeadSet | None, train_pairs: Sequence[PreferencePair],
                     val_pairs: Sequence[PreferencePair], cfg: FitConfig, seed: int = 0,
                     progress: bool = True) -> FitResult:
    """The optimal edit at `heads` (None: full alignment), trained to its optimum from fresh edits
    (`training.fit_to_optimum`); a set of every head takes the all-heads learning rate, like full alignment."""
    (result,), _ = fit_optimal_edits(lm, heads, train_pairs, val_pairs, [cfg], seed=seed, progress=progress)
    return result  # one fit: `fit_grid` fits it with `training.fit_to_optimum`, nothing to decide


def fit_optimal_edits(lm: LoadedModel, heads: HeadSet | None, train_pairs: Sequence[PreferencePair],
                      val_pairs: Sequence[PreferencePair], cfgs: Sequence[FitConfig], seed: int = 0,
                      packing: str = "auto", store: Path | None = None,
                      progress: bool = True) -> tuple[list[FitResult], PackingChoice | None]:
    """`fit_optimal_edit` for each of `cfgs` (a grid at one location, e.g. its taus), packed into one pass or one
    by one as the device's measurement decides (`packing.fit_grid`); the results in `cfgs`' order and the
    decision."""
    n_heads = None if heads is None else as_units(heads).lr_size(lm.arch)
    label = "full alignment" if heads is None else as_units(heads).spec()
    return fit_grid(lm, lambda: make_edit(lm, heads, seed=seed, scale=cfgs[0].lora_scale), train_pairs, val_pairs,
                    cfgs, n_heads=n_heads, mode=packing, store=store, label=label, progress=progress)


@dataclass(frozen=True)
class EditSource:
    """What methods build edits from: the model; probe directions and sigmas and ITI's placement (steering);
    preference pairs, fit settings (tau is set per value) and the edit's initialisation seed (fitted edits)."""

    lm: LoadedModel
    probes: ProbeResult | None = None
    placement: str = "iti"
    train_pairs: Sequence[PreferencePair] = ()
    val_pairs: Sequence[PreferencePair] = ()
    fit: FitConfig = field(default_factory=FitConfig)
    seed: int = 0
    progress: bool = False
    packing: str = "auto"  # how a fitted method's grid is trained (`packing.MODES`)
    packing_store: Path | None = None  # where each device's packing decision is kept (`packing.fit_grid`)


@dataclass
class Built:
    """A method's edit for one value; `fit` is the training record of a fitted edit (saved beside it)."""

    edit: Intervention
    fit: FitResult | None = None


class Grids(Protocol):
    """The hyper-parameter grids of the study settings (`study.StudySettings`)."""

    alphas: tuple[float, ...]
    taus: tuple[float, ...]


class Method(Protocol):
    name: str  # stored in trial files and results.csv
    label: str  # what reports call it
    hyper: str | None  # "alpha" | "tau" | None: the hyper-parameter chosen on validation (a trial field)
    stage: str  # the runner stage its trials' evaluation is timed under
    needs_fit: bool  # trains its edit (and needs pi0's log-probs of the preference pairs)
    scope: str  # one of SCOPES
    cost: float  # rough relative time of one of its arms; the runner starts the costliest arms first

    def grid(self, study: Grids) -> tuple[float | None, ...]:
        """The values its arms try on validation ((None,) without a hyper-parameter)."""

    def build(self, src: EditSource, heads: HeadSet | None, value: float | None) -> Built:
        """Its edit at `heads` (ignored unless scope is "heads") for hyper-parameter `value`."""


@dataclass(frozen=True)
class Unedited:
    """The unedited model: the study's baseline."""

    name: str = "none"
    label: str = "Unedited"
    hyper: str | None = None
    stage: str = "baseline"
    needs_fit: bool = False
    scope: str = "none"
    cost: float = 1.0  # one test trial

    def grid(self, study: Grids) -> tuple[float | None, ...]:
        return (None,)

    def build(self, src: EditSource, heads: HeadSet | None, value: float | None) -> Built:
        return Built(NoEdit())


@dataclass(frozen=True)
class Steering:
    """ITI: o_h += alpha sigma_h u_h at the heads of S, with u and sigma from the probes."""

    name: str = "iti"
    label: str = "ITI"
    hyper: str | None = "alpha"
    stage: str = "iti"
    needs_fit: bool = False
    scope: str = "heads"
    cost: float = 2.0  # a trial per alpha on validation, one on test; no fit

    def grid(self, study: Grids) -> tuple[float | None, ...]:
        return tuple(study.alphas)

    def build(self, src: EditSource, heads: HeadSet | None, value: float | None) -> Built:
        if heads is None or src.probes is None:
            raise LocauditError("ITI needs a head set and probe results (directions and sigmas); probe first")
        return Built(ITI.from_probes(heads, src.probes, value, placement=src.placement))


@dataclass(frozen=True)
class OptimalEdit:
    """The optimal rank-1 edit trained by preference alignment at temperature tau: LocalizedRank1 at the arm's
    heads (scope "heads"), or FullRank1 on every W^l (scope "all": full alignment)."""

    name: str = "ipo"
    label: str = "Optimal edit (IPO)"
    hyper: str | None = "tau"
    stage: str = "ipo_eval"
    needs_fit: bool = True
    scope: str = "heads"
    cost: float = 20.0  # a fit per tau (tens of evaluations' time), then its trials

    def grid(self, study: Grids) -> tuple[float | None, ...]:
        return tuple(study.taus)

    def build(self, src: EditSource, heads: HeadSet | None, value: float | None) -> Built:
        if self.scope == "heads" and heads is None:
            raise LocauditError(f"method {self.name!r} edits a head set; give heads")
        result = fit_optimal_edit(src.lm, heads if self.scope == "heads" else None, src.train_pairs, src.val_pairs,
                                  replace(src.fit, tau=value), seed=src.seed, progress=src.progress)
        return Built(result.edit, result)

    def build_grid(self, src: EditSource, heads: HeadSet | None, values: Sequence[float]) -> list[Built]:
        """Its edits for every tau of `values` at once: one pack when the device's measurement says packing pays
        (`fit_optimal_edits`), else one fit after another."""
        if self.scope == "heads" and heads is None:
            raise LocauditError(f"method {self.name!r} edits a head set; give heads")
        results, _ = fit_optimal_edits(src.lm, heads if self.scope == "heads" else None, src.train_pairs,
                                       src.val_pairs, [replace(src.fit, tau=v) for v in values], seed=src.seed,
                                       packing=src.packing, store=src.packing_store, progress=src.progress)
        return [Built(r.edit, r) for r in results]


METHODS: dict[str, Method] = {m.name: m for m in (
    Unedited(),
    Steering(),
    OptimalEdit(),
    OptimalEdit(name="full", label="Full alignment", scope="all", cost=25.0),  # every W^l: the most to train
)}


def method_of(row: dict) -> Method:
    """The method of a stored trial (its "method" field)."""
    name = row.get("method")
    if name not in METHODS:
        raise LocauditError(f"trial of arm {row.get('arm')!r} has unknown method {name!r}; known: "
                            f"{', '.join(METHODS)} (was it written by a newer locaudit?)")
    return METHODS[name]


def value_of(row: dict) -> float | None:
    """A stored trial's hyper-parameter value (None for a method without one)."""
    hyper = method_of(row).hyper
    return row[hyper] if hyper else None
