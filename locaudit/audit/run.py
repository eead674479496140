"""Auditing one localization claim: the optimal edit at the claimed units (attention heads, MLP neurons or
layers) against the same edit at random sets of the same size and against full alignment, on any task.

Arms: `none` (the unedited model), `claim` (the unit kind's optimal edit, e.g. for heads delta r = s <a, o> W b
with b non-zero only on the claimed heads; `units.py`), `random-<i>` (the same edit at R random sets of the
claim's kind and size, drawn from every layer or matched to the claim's layers), and `full` (a rank-1 LoRA on every layer's W: the common ceiling).
Each fitted arm is trained to its optimum at every tau of the grid (`fit_optimal_edit`), its tau chosen on
validation items by the task's statistic, and scored on test items. With `AuditConfig.steering`, the arms
`claim-steer` and `random-<i>-steer` evaluate the claim's steering heuristic (ITI for heads, mean-difference
steering for neurons and layers; `audit.steering`) at the same units, its multiplier chosen on validation items.
The claim may be a heuristic's (`audit.claims`: probe:K, atp-heads:K, atp-neurons:K, atp-layers:K, sweep).
Every trial is one JSON file written atomically under `out/trials/`, so an interrupted audit resumes where it
stopped and a rerun recomputes nothing; the same seed gives the same audit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from locaudit.audit.claims import Claim, heuristic_record, resolve_claim
from locaudit.audit.config import AuditConfig, upgrade_record
from locaudit.audit.steering import STEERING, SteeringSource
from locaudit.errors import LocauditError
from locaudit.heads import HeadSet
from locaudit.heuristics import choose_alpha
from locaudit.interventions import Intervention, NoEdit, load_intervention
from locaudit.models import Arch, LoadedModel, load_model
from locaudit.storage import atomic_write_json, prepare_out_dir, read_json
from locaudit.tasks import ItemScores, Task, TaskSplit, load_task
from locaudit.training import FitConfig, fit_summary
from locaudit.units import UnitSet, as_units, parse_units, random_units

AUDIT_VERSION = 2
STEER_KINDS = ("claim-steer", "random-steer")


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # none | claim | random | full | claim-steer | random-steer
    units: UnitSet | None  # None: no edit (none) or every layer (full)

    @property
    def steers(self) -> bool:
        """Whether the arm evaluates the steering heuristic (else the optimal edit, or nothing)."""
        return self.kind in STEER_KINDS

    def describe(self) -> str:
        if self.kind == "none":
            return "unedited model"
        if self.kind == "full":
            return "full alignment (rank-1 LoRA on every layer)"
        if self.steers:
            return f"{STEERING[self.units.kind].name} at {self.units.spec()}"
        return self.units.spec()


def plan(claim: UnitSet | HeadSet, arch: Arch, cfg: AuditConfig) -> list[Arm]:
    """The audit's arms in run order: none, claim, the random sets, full, then (with `cfg.steering`) the steering
    heuristic at the claim and at each random set. Random sets have the claim's kind and size
    (`units.random_units`); a draw equal to the claim or to an earlier set is replaced by the next seed's draw;
    the seeds are `seed * 1000 + 1` and on."""
    claim = as_units(claim)
    arms = [Arm("none", "none", None), Arm("claim", "claim", claim)]
    s = cfg.seed * 1000
    seen = {tuple(claim.names)}
    for i in range(cfg.n_random):
        for _ in range(1000):
            s += 1
            us = random_units(claim, s, arch, cfg.match_layers)
            if tuple(us.names) not in seen:
                break
        else:
            raise LocauditError(f"cannot draw {cfg.n_random} distinct random sets of {len(claim)} {claim.kind} different "
                                f"from the claim in this model; ask for fewer random sets")
        seen.add(tuple(us.names))
        arms.append(Arm(f"random-{i:02d}", "random", us))
    if cfg.full:
        arms.append(Arm("full", "full", None))
    if cfg.steering:
        arms += [Arm(f"{a.name}-steer", f"{a.kind}-steer", a.units) for a in arms if a.kind in ("claim", "random")]
    return arms


def fit_edit(lm: LoadedModel, task: Task | str, units: UnitSet | HeadSet | str | None, config: FitConfig | None = None,
             seed: int = 0, limit: int | None = None, split: TaskSplit | None = None, progress: bool = True):
    """The optimal edit at `units` (names like "L12H3,L14H1", "L3N100,L3N7" or "L12", a unit set, or None for full
    alignment) for `task`, trained on its training items and early-stopped on its validation items (`FitConfig`:
    tau, steps, patience); returns the `training.FitResult` (`.edit` is the fitted edit, `.status` says whether it
    converged)."""
    from locaudit.methods import fit_optimal_edit

    task = load_task(task)
    if isinstance(units, str):
        units = parse_units(units, lm.arch)
    elif units is not None:
        units = as_units(units).validate(lm.arch)
    split = split or task.split(seed, limit)
    return fit_optimal_edit(lm, units, *_fit_pairs(task, split), task_fit_config(lm, task, config or FitConfig(), seed),
                            seed=seed, progress=progress)


def task_fit_config(lm: LoadedModel, task: Task, config: FitConfig, seed: int) -> FitConfig:
    """`config` for fitting on `task`: the audit's seed and the task's prompt format for this model."""
    return replace(config, seed=seed, fmt=task.prompt_format(lm).name)


def _fit_pairs(task: Task, split: TaskSplit) -> tuple[list, list]:
    """The preference pairs a fit trains on (training items) and early-stops on (validation items)."""
    return task.pairs(split.train), task.pairs(split.val)


def _tau_tag(tau: float) -> str:
    return f"tau{tau:g}"


@dataclass
class AuditRun:
    """Everything the trials of one audit share (built once; the steering heuristics' probes and vectors on
    first use)."""

    lm: LoadedModel
    task: Task
    claim: UnitSet
    cfg: AuditConfig
    out: Path
    split: TaskSplit
    progress: bool = True
    resolved: Claim | None = None  # the claim's heuristic, whose probes / vectors the steering arms reuse
    _source: SteeringSource | None = None
    _val_base: float | None = None
    _fitted: dict = field(default_factory=dict)  # (arm, tau) -> FitResult fitted with its grid, not yet stored
    placement: dict = field(default_factory=lambda: {"backend": "this process", "workers": 1})  # where arms ran

    @property
    def val_items(self) -> tuple:
        return self.cfg.val_items(self.split)

    @property
    def test_items(self) -> tuple:
        return self.cfg.test_items(self.split)

    @property
    def source(self) -> SteeringSource:
        if self._source is None:
            r = self.resolved
            self._source = SteeringSource(self.lm, self.task, self.split, self.cfg, probes=r and r.probes,
                                          vectors=r and r.vectors, progress=self.progress)
        return self._source

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def evaluate(self, edit: Intervention | None, items, tau: float) -> ItemScores:
        return self.task.evaluate(self.lm, edit, items, tau=tau, batch_size=self.cfg.batch_size, progress=False)

    def trial_path(self, arm: Arm, tau: float | None) -> Path:
        if arm.steers:
            return self.out / "trials" / arm.name / "steer.json"
        return self.out / "trials" / arm.name / (f"{_tau_tag(tau)}.json" if tau is not None else "eval.json")

    def run_trial(self, arm: Arm, tau: float | None) -> dict:
        """One (arm, tau): fit (unless `none`), save the edit, score validation (when there is a tau to choose)
        and test items; a steering arm (tau None) chooses its multiplier on validation items instead of fitting.
        Written atomically, and read back instead of recomputed when already there."""
        path = self.trial_path(arm, tau)
        if path.is_file():
            try:
                return read_json(path)
            except LocauditError:
                pass  # unreadable: recompute
        t0 = time.time()
        record = {"arm": arm.name, "kind": arm.kind, "units": None if arm.units is None else arm.units.names,
                  "tau": tau, "split_hash": self.split.hash}
        if arm.steers:
            edit = self._steer(arm, record)
        elif arm.kind == "none":
            edit = NoEdit()
        else:
            result = self._fitted.pop((arm.name, tau), None) or fit_edit(
                self.lm, self.task, arm.units, replace(self.cfg.fit, tau=tau), seed=self.cfg.seed, split=self.split,
                progress=self.progress)
            edit = result.edit
            summary = fit_summary(result)
            edit_dir = self.out / "edits" / f"{arm.name}-{_tau_tag(tau)}"
            edit.save(edit_dir, extra={"model": self.lm.name, "task": self.task.spec(), "arm": arm.name,
                                       "units": record["units"], "split_hash": self.split.hash, **summary})
            record["fit"] = {k: summary[k] for k in ("status", "steps", "best", "val_start", "seconds",
                                                      "n_train_pairs", "n_val_pairs", "attempts")}
            record["fit"]["lr"] = result.config.lr
            record["edit_dir"] = str(edit_dir.relative_to(self.out))
        if len(self.cfg.taus) > 1 and arm.kind not in ("none", *STEER_KINDS):
            record["val"] = self.evaluate(edit, self.val_items, tau).as_dict()
        record["test"] = self.evaluate(edit, self.test_items, tau if tau is not None else self.cfg.taus[0]).as_dict()
        record["seconds"] = time.time() - t0
        atomic_write_json(path, record)
        return record

    def fit_grid(self, arm: Arm) -> None:
        """Fit the arm's taus whose trials are not stored yet together (`methods.fit_optimal_edits`: one pack where
        this device's measurement says packing pays, decision kept under packing/); `run_trial` takes them."""
        from locaudit.methods import fit_optimal_edits

        missing = [t for t in self.cfg.taus if not self.trial_path(arm, t).is_file()]
        if arm.kind in ("none", *STEER_KINDS) or len(missing) < 2:
            return
        cfg = task_fit_config(self.lm, self.task, self.cfg.fit, self.cfg.seed)
        results, _ = fit_optimal_edits(self.lm, arm.units, *_fit_pairs(self.task, self.split),
                                       [replace(cfg, tau=t) for t in missing], seed=self.cfg.seed,
                                       packing=self.cfg.packing, store=self.out / "packing", progress=self.progress)
        self._fitted.update({(arm.name, t): r for t, r in zip(missing, results)})

    def val_base(self) -> float:
        """The unedited model's statistic on the validation items (each steering arm's alpha choice compares to it)."""
        if self._val_base is None:
            self._val_base = float(self.task.statistic(self.evaluate(None, self.val_items, self.cfg.taus[0])))
        return self._val_base

    def _steer(self, arm: Arm, record: dict) -> Intervention:
        """The steering heuristic at the arm's units, at the multiplier of its grid with the best validation
        statistic (`heuristics.choose_alpha`); saved under edits/, its choice recorded in `record`."""
        heuristic = STEERING[arm.units.kind]
        steer = heuristic.build(self.source, arm.units)
        choice = choose_alpha(self.lm, self.task, steer, heuristic.grid(self.cfg), self.val_items,
                              batch_size=self.cfg.batch_size, base=self.val_base())
        edit = steer(choice.alpha)
        edit_dir = self.out / "edits" / f"{arm.name}-alpha{choice.alpha:g}"
        edit.save(edit_dir, extra={"model": self.lm.name, "task": self.task.spec(), "arm": arm.name,
                                   "split_hash": self.split.hash})
        record.update({"steering": heuristic.name, "alpha": choice.alpha,
                       "alpha_choice": {"alphas": list(choice.alphas), "values": list(choice.values),
                                        "base": choice.base, "n_val": len(self.val_items)},
                       "edit_dir": str(edit_dir.relative_to(self.out))})
        return edit

    def load_edit(self, record: dict) -> Intervention:
        if record["kind"] == "none":
            return NoEdit()
        return load_intervention(self.out / record["edit_dir"], self.lm.arch)


def _trial_line(k: int, n: int, arm: Arm, tau: float | None, r: dict, primary: str, stored: bool) -> str:
    fit = r.get("fit")
    parts = [f"[{k}/{n}] {arm.name} ({arm.describe()})"]
    if tau is not None:
        parts.append(f"tau={tau:g}")
    if r.get("alpha") is not None:
        parts.append(f"alpha={r['alpha']:g}")
    parts.append(f"test {primary}={ItemScores.from_dict(r['test']).mean(primary):.3f}")
    if fit:
        parts.append(f"fit {fit['status']} after {fit['steps']} steps")
    parts.append("(stored)" if stored else f"{r['seconds']:.0f}s")
    return " ".join(parts)


def _config_record(lm: LoadedModel, task: Task, claim, cfg: AuditConfig) -> dict:
    """audit.json without the claim's units: what must match before a heuristic claim is (re)computed here."""
    return {"version": AUDIT_VERSION, "model": lm.name, "task": task.spec(),
            "heuristic": heuristic_record(claim) if isinstance(claim, str) else None,
            "config": json.loads(json.dumps(asdict(cfg)))}


def _check_same(prev: Path, record: dict, out: Path) -> None:
    """Refuse an output directory holding another audit (`record` without "claim": compare everything else)."""
    if not prev.is_file():
        return
    old = upgrade_record(read_json(prev))
    if not isinstance(old, dict) or {k: v for k, v in old.items() if k != "claim" or "claim" in record} != record:
        raise LocauditError(f"{out} holds an audit with different settings; give a new output directory or the same "
                            f"settings")


def audit(claim: UnitSet | HeadSet | str, task: Task | str, out: str | Path, config: AuditConfig | None = None,
          lm: LoadedModel | str | None = None, progress: bool = True, backend=None):
    """Audit the claim that `task`'s behaviour lives at the units `claim` (module docstring); write trials, the
    report (report.md, report.html), results.json and results.csv under `out`; return the `AuditResult`.

    `claim`: a unit set, names like "L12H3,L14H1", "L3N100,L3N7", "L12", or a heuristic's claim (probe:K,
    atp-heads:K, atp-neurons:K, atp-layers:K, sweep; `audit.claims`); `task`: a Task or its spec (`truthfulqa`,
    `caa:sycophancy`, a .jsonl path); `lm`: a loaded model, a model id/path, or None for the embedded default;
    `backend`: None runs every arm here, one after another; an execution backend (`study.make_backend("local",
    workers=2)`, `make_backend("ray", address=...)`) runs them on its workers (`audit.distributed`), with the
    same trial files, so the same statistics and a resumable run."""
    from locaudit.audit.report import write_audit_report
    from locaudit.audit.verdict import summarize

    cfg = config or AuditConfig()
    task = load_task(task)
    out = prepare_out_dir(Path(out))
    if not isinstance(lm, LoadedModel):
        lm = load_model(lm) if lm is not None else load_model()
    a = lm.arch
    split = task.split(cfg.seed, cfg.limit_items)
    record = _config_record(lm, task, claim, cfg)
    prev = out / "audit.json"
    _check_same(prev, record, out)  # before a heuristic writes anything here
    resolved = resolve_claim(claim, lm, task, split, cfg, out, progress, key=dict(record))
    record["claim"] = resolved.units.names
    _check_same(prev, record, out)
    atomic_write_json(prev, record)
    run = AuditRun(lm, task, resolved.units, cfg, out, split, progress, resolved)
    arms = plan(resolved.units, a, cfg)
    trials: dict[str, list[dict]] = {}
    t0 = time.time()
    todo = [(arm, tau) for arm in arms for tau in ((None,) if arm.kind == "none" or arm.steers else cfg.taus)]
    if backend is not None:
        from locaudit.audit.distributed import run_on_backend

        trials = run_on_backend(run, arms, backend, progress)
    for k, (arm, tau) in enumerate(todo, 1):
        if backend is not None:  # already run: log each trial in plan order
            r = next(x for x in trials[arm.name] if x["tau"] == tau)
            run.log(_trial_line(k, len(todo), arm, tau, r, task.primary, False))
            continue
        if tau == cfg.taus[0]:
            run.fit_grid(arm)
        done = run.trial_path(arm, tau).is_file()
        r = run.run_trial(arm, tau)
        trials.setdefault(arm.name, []).append(r)
        run.log(_trial_line(k, len(todo), arm, tau, r, task.primary, done))
    result = summarize(run, arms, trials, wall_seconds=time.time() - t0)
    write_audit_report(result, out)
    return result
