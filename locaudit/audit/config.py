"""How an audit is sized (`AuditConfig`), in its own module so that the audit's run, its heuristic claims and its
steering arms all read it without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from locaudit.errors import LocauditError
from locaudit.packing import check_mode as check_packing
from locaudit.tasks import TaskSplit
from locaudit.training import FitConfig

# Mean-difference steering multipliers alpha, in multiples of the mean difference v itself: alpha = 1 moves the
# activation by the average preferred-minus-dispreferred gap of the training pairs, whatever the model, layer or
# unit set, so one grid fits them all (scale-free: rescaling the activations rescales v with them). Positive
# only, as ITI's grid: v points from the dispreferred to the preferred answer by construction. Octaves from half
# the gap to 16 times it, since a few neurons' share of the gap (or the last token's, where answers differ
# only through attention) can be small.
MEANDIFF_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _grid(name: str, values) -> None:
    if not values or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                         for a in values):
        raise LocauditError(f"{name} must be a non-empty list of finite numbers, got {values!r}")


@dataclass(frozen=True)
class AuditConfig:
    """How an audit is sized. `from_preset` takes these from a study preset (`smoke`, `quick`, `paper`).

    `steering`: also evaluate the claim's steering heuristic (ITI for heads, mean-difference steering for
    neurons and layers; `audit.steering`) at the claim and at each random set, its multiplier chosen on the
    validation items from `alphas` (ITI, in units of each head's sigma) or `meandiff_alphas` (multiples of the
    mean difference v; `MEANDIFF_ALPHAS`)."""

    n_random: int = 16
    match_layers: bool = False  # random sets with the claim's number of heads in each of its layers
    taus: tuple[float, ...] = (0.1,)
    limit_items: int | None = None  # a stratified random subset of the task's items before splitting
    max_val_items: int | None = None
    max_test_items: int | None = None
    seed: int = 0
    n_boot: int = 2000
    batch_size: int = 16
    full: bool = True  # fit full alignment (the ceiling the claim's effect is measured against)
    fit: FitConfig = field(default_factory=FitConfig)
    steering: bool = True
    alphas: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0, 25.0)  # ITI's grid (the study's default alphas)
    meandiff_alphas: tuple[float, ...] = MEANDIFF_ALPHAS
    packing: str = "auto"  # how an arm's tau grid is fitted: measured per device, or pinned (`locaudit.packing`)

    def __post_init__(self):
        if isinstance(self.n_random, bool) or not isinstance(self.n_random, int) or self.n_random < 0:
            raise LocauditError(f"the number of random sets must be an integer >= 0, got {self.n_random!r}")
        if not self.taus or any(not t > 0 for t in self.taus):
            raise LocauditError(f"taus must be a non-empty list of values > 0, got {self.taus!r}")
        for name in ("limit_items", "max_val_items", "max_test_items"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise LocauditError(f"{name} must be positive, got {v}")
        if self.n_boot <= 0 or self.batch_size <= 0:
            raise LocauditError(f"n_boot and batch_size must be positive, got {self.n_boot}, {self.batch_size}")
        check_packing(self.packing)
        _grid("alphas (ITI's steering grid)", self.alphas)
        _grid("meandiff_alphas (mean-difference steering grid)", self.meandiff_alphas)

    @classmethod
    def from_preset(cls, preset, **overrides) -> "AuditConfig":
        """Sizes from a study preset: its random sets, tau and ITI alpha grids, question limits, bootstrap and fit
        settings; `overrides` that are not None replace them (e.g. `steering=False`)."""
        from locaudit.study import load_preset

        p = load_preset(preset) if isinstance(preset, str) else preset
        base = dict(n_random=p.study.n_random_sets, taus=tuple(p.study.taus), limit_items=p.data.limit_questions,
                    max_val_items=p.study.max_val_questions, max_test_items=p.study.max_test_questions,
                    seed=p.data.seed, n_boot=p.study.n_boot, batch_size=p.eval.batch_size, fit=p.fit,
                    alphas=tuple(p.study.alphas), packing=p.study.packing)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def val_items(self, split: TaskSplit) -> tuple:
        """The validation items hyper-parameters (tau, alpha) and the layer sweep are chosen on."""
        n = self.max_val_items
        return split.val[:n] if n else split.val

    def test_items(self, split: TaskSplit) -> tuple:
        """The held-out items every arm is scored on."""
        n = self.max_test_items
        return split.test[:n] if n else split.test


# settings added after audits were first written, with the value those audits ran with: an audit directory (or a
# stored heuristic) written before a setting existed still matches the same audit run now
ADDED_SETTINGS = {"packing": "auto"}
ADDED_FIT_SETTINGS = {"retry_flat": False}


def upgrade_record(record):
    """An audit.json record (or a heuristic's stored key) with the settings added since it was written filled in."""
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        for k, v in ADDED_SETTINGS.items():
            record["config"].setdefault(k, v)
        if isinstance(record["config"].get("fit"), dict):
            for k, v in ADDED_FIT_SETTINGS.items():
                record["config"]["fit"].setdefault(k, v)
    return record
